"""Fixtures: an in-process daemon, daemon subprocesses, a real redis-server (the
helpers they use are in helpers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import unittest.mock
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

from ebbcast.process.notify import SystemdNotifier
from ebbcast.process.roles import Standalone
from ebbcast.serving.process import Daemon
from helpers import REPO, STEP_TIMEOUT, DaemonProcess, RedisServer, RunningDaemon, test_config


# hypothesis keeps no example database (a failing example is printed, and @example
# pins one for good) and its caches outside the checkout (not in ./.hypothesis/).
settings.register_profile("ebbcast", database=None)
settings.load_profile("ebbcast")
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "ebbcast-hypothesis")


#: What `make test` itself builds in the checkout before the tests run, and Python's
#: byte code: every other file a test run creates there is a bug.
BUILT = {".git", "node_modules", "__pycache__", ".mypy_cache", ".venv27", ".bootstrap27",
         "build", "ebbcast.egg-info"}


def files_in_the_checkout() -> set[Path]:
    """Every file under the repository, what BUILT names and the virtualenvs aside."""
    found = set()
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if d not in BUILT and not d.startswith(".venv")]
        found.update(Path(folder, f) for f in files)
    return found


@pytest.fixture(scope="session", autouse=True)
def the_run_creates_no_file_in_the_checkout() -> Iterator[None]:
    """Every server a test starts works in a temporary directory, and every file a
    test creates goes there too: one that appears in the checkout (a Redis dump, a
    built load generator, a tool's cache), ignored by git or not, fails the run.
    (A file changed in place is left to CI's `git status --porcelain`.)"""
    before = files_in_the_checkout()
    yield
    assert sorted(map(str, files_in_the_checkout() - before)) == []


#: Fixtures that start processes: a test using one is not `fast`.
PROCESS_FIXTURES = {"spawn", "redis_server", "wsbench"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks `fast` every test that starts no process (no daemon subprocess, Redis,
    browser, proxy or tool): `make fast-tests` and CI's newest-versions job run those.

    Refuses an async test that does not run on the io_loop fixture: pytest-tornasync
    then runs it on whatever loop is current, so it passes or fails by the tests
    before it (Python 3.12 warns when none is current)."""
    loose = [item.nodeid for item in items
             if inspect.iscoroutinefunction(getattr(item, "obj", None))
             and "io_loop" not in getattr(item, "fixturenames", ())]
    if loose:
        raise pytest.UsageError("async tests must use the io_loop fixture (directly, "
                                "through start_daemon, or by pytestmark): " + ", ".join(loose))
    for item in items:
        if (item.get_closest_marker("processes") is None
                and item.get_closest_marker("slow") is None
                and not PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.fast)


@contextlib.contextmanager
def no_process_unless_allowed(item: pytest.Item) -> Iterator[None]:
    """Around a `fast` test's set-up (its fixtures, module-scoped ones included) and
    call: starting a process fails, naming the marker the test lacks."""
    if item.get_closest_marker("fast") is None:
        yield
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{item.nodeid} is marked fast but starts a process "
                             f"({args[:1]!r}): mark it `processes`")

    with unittest.mock.patch.object(subprocess, "Popen", refuse):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with no_process_unless_allowed(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with no_process_unless_allowed(item):
        yield


@pytest.fixture
def start_daemon(io_loop: Any) -> Iterator[Callable[..., Any]]:
    """Start an in-process daemon (no signal handlers) with config overrides."""
    running: list[RunningDaemon] = []

    async def start(**overrides: str) -> RunningDaemon:
        config = test_config(**overrides)
        daemon = Daemon(config, reload=lambda: config,
                        role=Standalone(SystemdNotifier(), config), handle_signals=False)
        task = asyncio.ensure_future(daemon.run())
        serving = asyncio.ensure_future(daemon.serving.wait())
        await asyncio.wait([task, serving], timeout=STEP_TIMEOUT,
                           return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raise the start-up error
        assert daemon.serving.is_set()
        rd = RunningDaemon(daemon, task)
        running.append(rd)
        return rd

    yield start

    async def stop_all() -> None:
        for rd in running:
            if not rd.task.done():
                rd.daemon.record_signal(signal.SIGTERM)
                rd.daemon.record_signal(signal.SIGTERM)
            await asyncio.wait_for(rd.task, STEP_TIMEOUT)
            for conn in rd.clients:
                conn.close()
            rd.http.close()

    io_loop.run_sync(stop_all)


@pytest.fixture
def spawn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., DaemonProcess]]:
    """Start ebbcast subprocesses; each is killed at the end if still running.

    Each gets a RUNTIME_DIRECTORY of its own, as systemd would give it, so that
    what a killed daemon leaves there (with workers: its metrics files) stays in
    pytest's temporary folders."""
    procs: list[DaemonProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, wait: bool = True,
              cwd: Path | None = None,
              preexec_fn: Callable[[], Any] | None = None) -> DaemonProcess:
        env = {"RUNTIME_DIRECTORY": str(tmp_path_factory.mktemp("run")), **(env or {})}
        proc = DaemonProcess(list(args), env=env, cwd=cwd, preexec_fn=preexec_fn)
        procs.append(proc)
        return proc.wait_serving() if wait else proc

    yield start
    for proc in procs:
        proc.kill()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A NOTIFY_SOCKET as systemd has it (AF_UNIX datagrams, the sender's credentials
    on each: see helpers.notifications)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # learn who sends
        sock.bind(str(tmp_path / "notify.sock"))
        sock.settimeout(STEP_TIMEOUT)
        yield sock


@pytest.fixture(scope="session")
def wsbench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench/loadgen's load generator (C), built once per run outside the checkout."""
    compiler = os.environ.get("CC", "cc")
    missing = [tool for tool in ("make", compiler) if shutil.which(tool) is None]
    assert not missing, (f"building bench/loadgen/wsbench needs {missing} (Debian: "
                         "apt-get install gcc make libc6-dev, or `make test-deps`)")
    path = tmp_path_factory.mktemp("loadgen") / "wsbench"
    done = subprocess.run(["make", "-s", "-C", str(REPO / "bench" / "loadgen"),
                           f"WSBENCH={path}", str(path)], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, "building wsbench failed:\n" + done.stdout + done.stderr
    return path


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
