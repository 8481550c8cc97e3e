#!/usr/bin/env python3
"""Run the Autobahn|Testsuite fuzzing client against a fresh ebbcast daemon.

    .venv/bin/python conformance/run.py            # every case (about 95 s here)
    .venv/bin/python conformance/run.py --quick    # all but 9.x (about 15 s here)
    .venv/bin/python conformance/run.py --cases '7.*' --cases 1.1.1

Steps: makes sure conformance/.venv27 holds wstest (conformance/setup.sh, a
no-op when it is up to date); starts ``python -m ebbcast serve --port 0
--admin-port 0`` in raw-envelope echo mode (see DAEMON_ENV) and reads the port
from its ``serving ws=... admin=...`` log line; writes the fuzzingclient spec
pointing at that ws:// URL; runs ``wstest -m fuzzingclient -s spec.json`` under a
time limit; stops the daemon with SIGTERM (it drains; with no client left it
exits at once); then runs check.py on the report and exits with its status.

Everything goes to conformance/reports/<name>/ (name: "quick", "full" or
"custom"; emptied first): index.html/index.json and one report per case from the
suite, spec.json, wstest.log, ebbcast.log and run.json (timings and exit codes).

Exit status: check.py's (0 no failed case, 1 failed cases, 2 no usable report),
or 3 when the harness itself failed (setup, daemon start, wstest time-out or
crash, daemon died during the run or did not exit cleanly after SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WSTEST = HERE / ".venv27" / "bin" / "wstest"
AGENT = "ebbcast"

#: The daemon's configuration for the suite (as environment
#: variables): frames relayed verbatim and echoed to their sender, nothing sent
#: unasked (no periodic frames; no keepalive pings, which the suite would record
#: among the frames it received), no rate limit, and limits above the suite's
#: largest frames (16 MiB in 9.x) and bursts.
DAEMON_ENV = {
    "EBBCAST_BROADCAST_ENVELOPE": "raw",
    "EBBCAST_BROADCAST_ECHO_TO_SENDER": "true",
    "EBBCAST_BROADCAST_PERIODIC_INTERVAL": "0",
    "EBBCAST_KEEPALIVE_PING_INTERVAL": "0",
    "EBBCAST_LIMITS_MESSAGES_PER_SECOND": "0",
    "EBBCAST_SERVER_MAX_MESSAGE_BYTES": str(16 * 1024 * 1024),
    "EBBCAST_LIMITS_CLIENT_QUEUE_BYTES": str(64 * 1024 * 1024),
}

#: Every case, and what --quick leaves out: the 54 cases of 9.x (limits and
#: performance: messages of up to 16 MiB, in frames and chops of many sizes), which
#: take about 80 of the full run's 95 seconds here. The 216 permessage-deflate cases
#: (12.x, 13.x) stay in: ebbcast offers no permessage-deflate, so each ends at the
#: handshake as UNIMPLEMENTED, all together in well under a second.
ALL_CASES = ["*"]
QUICK_EXCLUDE = ["9.*"]

#: Time limits (seconds) for one wstest run, by selection.
TIMEOUTS = {"quick": 300, "full": 1200, "custom": 1200}
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0

SERVING_RE = re.compile(r"serving ws=(?P<ws>\S+) admin=(?P<admin>\S+)")
CASE_RE = re.compile(r"Running test case ID (\S+)")


def log(message: str) -> None:
    print(f"run.py: {message}", flush=True)


def daemon_python() -> str:
    venv_python = ROOT / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


class Pump(threading.Thread):
    """Copies a child's output to a log file, line by line, watching for a pattern."""

    def __init__(self, stream: IO[bytes], sink: IO[str], pattern: re.Pattern[str]) -> None:
        super().__init__(daemon=True)
        self.stream, self.sink, self.pattern = stream, sink, pattern
        self.first_match: re.Match[str] | None = None
        self.matched = threading.Event()
        self.count = 0
        self.last = ""

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            line = raw.decode("utf-8", "replace")
            self.sink.write(line)
            self.sink.flush()
            match = self.pattern.search(line)
            if match:
                self.count += 1
                self.last = match.group(1)
                if self.first_match is None:
                    self.first_match = match
                    self.matched.set()
        self.matched.set()  # end of output: wake a waiter either way


def start_daemon(python: str, log_file: IO[str]) -> tuple[subprocess.Popen[bytes], Pump, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EBBCAST_")}
    env.update(DAEMON_ENV)
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [python, "-m", "ebbcast", "serve", "--port", "0", "--admin-port", "0"]
    shown_env = " ".join(f"{k}={v}" for k, v in DAEMON_ENV.items())
    log(f"starting ebbcast: {shown_env} {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    assert proc.stdout is not None
    pump = Pump(proc.stdout, log_file, SERVING_RE)
    pump.start()
    if not pump.matched.wait(START_TIMEOUT) or pump.first_match is None:
        stop_process(proc, "ebbcast", signal.SIGKILL, 5)
        raise RuntimeError(f"ebbcast did not log its 'serving ws=...' line within "
                           f"{START_TIMEOUT:.0f}s (exit code {proc.poll()}); see {log_file.name}")
    ws = pump.first_match.group("ws")
    url = re.sub(r"^http", "ws", ws)
    log(f"ebbcast (pid {proc.pid}) serving {url}")
    return proc, pump, url


def stop_process(proc: subprocess.Popen[bytes], name: str, sig: int,
                 timeout: float) -> int | None:
    """Send ``sig`` to the process, wait up to ``timeout``; SIGKILL its group after.

    Returns the exit code, or None if it had to be killed.
    """
    if proc.poll() is not None:
        return proc.returncode
    try:
        os.kill(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {proc.pid}) did not exit {timeout:.0f}s after "
            f"{signal.Signals(sig).name}: killing it")
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        return None


def run_wstest(spec_path: Path, outdir: Path, timeout: float) -> tuple[int | None, float, int]:
    """Run the fuzzing client; (exit code or None on time-out, seconds, cases started)."""
    cmd = [str(WSTEST), "-m", "fuzzingclient", "-s", str(spec_path)]
    log(f"running {' '.join(cmd)} (time limit {timeout:.0f}s)")
    started = time.monotonic()
    with (outdir / "wstest.log").open("w", encoding="utf-8") as sink:
        proc = subprocess.Popen(cmd, cwd=outdir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        assert proc.stdout is not None
        pump = Pump(proc.stdout, sink, CASE_RE)
        pump.start()
        deadline = started + timeout
        next_note = started + 30
        code: int | None = None
        try:
            while True:
                try:
                    code = proc.wait(1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if now >= deadline:
                    log(f"wstest still running after {timeout:.0f}s (at case {pump.last}): "
                        "stopping it")
                    stop_process(proc, "wstest", signal.SIGTERM, 5)
                    code = None
                    break
                if now >= next_note:
                    log(f"  {now - started:4.0f}s: {pump.count} cases started, now {pump.last}")
                    next_note = now + 30
        finally:
            if proc.poll() is None:
                stop_process(proc, "wstest", signal.SIGTERM, 5)
            pump.join(5)
    return code, time.monotonic() - started, pump.count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"leave out {' '.join(QUICK_EXCLUDE)} (see README.md)")
    parser.add_argument("--cases", action="append", metavar="PATTERN",
                        help="run only these case ids or patterns (e.g. '7.*'); repeatable")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="leave out these case ids or patterns; repeatable")
    parser.add_argument("--timeout", type=float, help="time limit for wstest, seconds "
                        f"(default: {TIMEOUTS['quick']} quick, {TIMEOUTS['full']} otherwise)")
    parser.add_argument("--out", type=Path, help="report directory "
                        "(default: conformance/reports/quick, full or custom)")
    parser.add_argument("--python", default=daemon_python(),
                        help="the Python that runs ebbcast (default: %(default)s)")
    parser.add_argument("--no-setup", action="store_true",
                        help="do not run setup.sh first (wstest must already be there)")
    args = parser.parse_args(argv)

    name = "custom" if args.cases else "quick" if args.quick else "full"
    cases = args.cases or ALL_CASES
    exclude = list(args.exclude) + (QUICK_EXCLUDE if args.quick else [])
    timeout = args.timeout or TIMEOUTS[name]
    outdir = (args.out or HERE / "reports" / name).resolve()

    if not args.no_setup:
        setup = subprocess.run(["bash", str(HERE / "setup.sh")], stdin=subprocess.DEVNULL,
                               timeout=900)
        if setup.returncode != 0:
            log(f"setup.sh failed (exit {setup.returncode})")
            return 3
    if not WSTEST.exists():
        log(f"{WSTEST} is missing: run conformance/setup.sh")
        return 3

    if outdir.exists():
        shutil.rmtree(outdir)
    outdir.mkdir(parents=True)
    summary: dict[str, object] = {"selection": name, "cases": cases, "exclude": exclude,
                                  "timeout_seconds": timeout}
    harness_ok = True
    run_started = time.monotonic()
    with (outdir / "ebbcast.log").open("w", encoding="utf-8") as daemon_log:
        try:
            daemon, daemon_pump, url = start_daemon(args.python, daemon_log)
        except RuntimeError as exc:
            log(str(exc))
            return 3
        try:
            spec: dict[str, object] = {
                "outdir": str(outdir),
                "servers": [{"agent": AGENT, "url": url}],
                "cases": cases,
                "exclude-cases": exclude,
                "exclude-agent-cases": {},
            }
            spec_path = outdir / "spec.json"
            spec_path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
            code, seconds, started = run_wstest(spec_path, outdir, timeout)
            summary.update(wstest_exit=code, wstest_seconds=round(seconds, 1),
                           cases_started=started)
            log(f"wstest {'timed out' if code is None else f'exited {code}'} after "
                f"{seconds:.0f}s ({started} cases started)")
            if code != 0:
                harness_ok = False
            if daemon.poll() is not None:
                log(f"ebbcast died during the run (exit {daemon.returncode}); "
                    f"see {daemon_log.name}")
                harness_ok = False
        finally:
            daemon_code = stop_process(daemon, "ebbcast", signal.SIGTERM, STOP_TIMEOUT)
            daemon_pump.join(5)
    summary.update(daemon_exit=daemon_code, total_seconds=round(time.monotonic() - run_started, 1))
    if daemon_code != 0:
        log(f"ebbcast exit code after SIGTERM: {daemon_code} (expected 0)")
        harness_ok = False
    else:
        log("ebbcast stopped (exit 0)")

    sys.path.insert(0, str(HERE))
    import check  # noqa: E402 - next to this file

    status = check.main([str(outdir)])
    summary["check_exit"] = status
    (outdir / "run.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if (outdir / "index.html").exists():
        log(f"report: {outdir / 'index.html'}")
    if not harness_ok:
        return 3
    return status


if __name__ == "__main__":
    sys.exit(main())
