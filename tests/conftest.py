"""Fixtures: an in-process daemon, daemon subprocesses, a real redis-server (the
helpers they use are in helpers.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ebbcast.daemon import Daemon
from helpers import REPO, STEP_TIMEOUT, DaemonProcess, RedisServer, RunningDaemon, test_config


def redis_dumps_in_the_tree() -> set[Path]:
    """Every *.rdb file under the repository, virtualenvs and node_modules aside."""
    found = set()
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders
                         if not d.startswith((".venv", ".git")) and d != "node_modules"]
        found.update(Path(folder, f) for f in files if f.endswith(".rdb"))
    return found


@pytest.fixture(scope="session", autouse=True)
def no_redis_writes_a_dump_into_the_tree() -> Iterator[None]:
    """Every Redis the tests start works in a temporary directory: a dump file that
    appears in the repository (which .gitignore would hide from git) fails the run."""
    before = redis_dumps_in_the_tree()
    yield
    assert redis_dumps_in_the_tree() - before == set()


#: Fixtures that start processes: a test using one is not `fast`.
PROCESS_FIXTURES = {"spawn", "redis_server"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Marks `fast` every test that starts no process (no daemon subprocess, Redis,
    browser, proxy or tool): `make fast-tests` and CI's newest-versions job run those."""
    for item in items:
        if (item.get_closest_marker("processes") is None
                and item.get_closest_marker("slow") is None
                and not PROCESS_FIXTURES & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.fast)


@pytest.fixture(autouse=True)
def fast_tests_start_no_process(request: pytest.FixtureRequest,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A `fast` test that starts a process fails, naming the marker it lacks."""
    if request.node.get_closest_marker("fast") is None:
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{request.node.nodeid} is marked fast but starts a process "
                             f"({args[:1]!r}): mark it `processes`")

    monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.fixture
def start_daemon(io_loop: Any) -> Iterator[Callable[..., Any]]:
    """Start an in-process daemon (no signal handlers) with config overrides."""
    running: list[RunningDaemon] = []

    async def start(**overrides: str) -> RunningDaemon:
        config = test_config(**overrides)
        daemon = Daemon(config, reload=lambda: config, handle_signals=False)
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
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()
