"""The ``ebbcast`` command (docs/operations.md "Commands"); the only place that picks exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from ebbcast import __version__
from ebbcast.config import Config, ConfigError, load_config, render_toml
from ebbcast.core import eventloop
from ebbcast.core.lifecycle import HANDLED_SIGNALS, StopReason
from ebbcast.exits import ExitCode

log = logging.getLogger(__name__)


#: Command-line flags of ``serve`` and the config keys they override.
SERVE_FLAGS = {
    "host": "server.host", "port": "server.port",
    "admin_host": "admin.host", "admin_port": "admin.port",
    "workers": "server.workers", "drain_timeout": "shutdown.drain_timeout",
    "log_level": "logging.level", "log_format": "logging.format",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ebbcast", description="WebSocket broadcast daemon that drains "
                     "gracefully on SIGTERM.")
    parser.add_argument("--version", action="version", version=f"ebbcast {__version__}")
    commands = parser.add_subparsers(dest="command", parser_class=_Parser)
    serve = commands.add_parser("serve", help="run the daemon in the foreground (default)")
    add_serve_arguments(serve)
    check = commands.add_parser("check-config", help="validate a config file and print "
                                "the effective configuration")
    check.add_argument("path", help="the TOML config file")
    client = commands.add_parser("client", help="connect, send, print received frames as "
                                 "JSON lines")
    client.add_argument("url", help="WebSocket URL, e.g. ws://127.0.0.1:8000/ws")
    client.add_argument("--send", action="append", default=[], metavar="TEXT",
                        help="a text frame to send after connecting (repeatable)")
    client.add_argument("--subscribe", action="append", default=[], metavar="CHANNEL",
                        help="subscribe to a channel after connecting, and again from its "
                        "last offset after each move (repeatable)")
    client.add_argument("--publish", action="append", default=[], nargs=2,
                        metavar=("CHANNEL", "TEXT"), help="publish TEXT to CHANNEL after "
                        "connecting (repeatable)")
    client.add_argument("--listen", metavar="DURATION", help="stop after this long "
                        "(default: when the server closes, or --count is reached)")
    client.add_argument("--count", type=int, metavar="N", help="stop after N frames")
    client.add_argument("--quiet", action="store_true", help="print no frames")
    client.add_argument("--reconnect", action="store_true", help="keep the session going: "
                        "move on shutdown frames (make before break), reconnect with "
                        "backoff when a connection drops")
    client.add_argument("--token", metavar="JWT", help="client token (auth.mode = \"jwt\"), "
                        "sent as Authorization: Bearer; default: $EBBCAST_TOKEN")
    token = commands.add_parser("token", help="print a client token signed with the "
                                "configured auth.jwt_key (HS256), for testing")
    token.add_argument("--sub", required=True, metavar="NAME",
                       help="the client id the token is for")
    token.add_argument("--ttl", default="1h", metavar="DURATION",
                       help="how long the token is valid (default 1h)")
    token.add_argument("--read-only", action="store_true",
                       help="the client may receive, not publish (\"publish\": false)")
    token.add_argument("--config", metavar="PATH", help="TOML config file (else the "
                       "environment, e.g. EBBCAST_AUTH_JWT_KEY)")
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML config file")
    parser.add_argument("--host", help="public listener address (server.host)")
    parser.add_argument("--port", help="public listener port (server.port)")
    parser.add_argument("--admin-host", help="admin listener address (admin.host)")
    parser.add_argument("--admin-port", help="admin listener port (admin.port)")
    parser.add_argument("--workers", help="worker processes (server.workers)")
    parser.add_argument("--drain-timeout", metavar="DURATION",
                        help="drain deadline (shutdown.drain_timeout)")
    parser.add_argument("--log-level", help="debug, info, warning or error (logging.level)")
    parser.add_argument("--log-format", help="text or json (logging.format)")


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or (words[0].startswith("-") and words[0] not in ("-h", "--help",
                                                                     "--version")):
        words.insert(0, "serve")  # plain ``ebbcast [flags]`` is ``ebbcast serve [flags]``
    if words[0] == WORKER_COMMAND:
        return run_worker(words[1:])
    args = build_parser().parse_args(words)
    if args.command == "check-config":
        return check_config(args.path)
    if args.command == "client":
        from ebbcast.clientcli import run_client

        return run_client(args)
    if args.command == "token":
        return print_token(args)
    return serve(args)


def _print_problems(error: ConfigError) -> None:
    for key, reason in error.problems:
        print(f"ebbcast: config error: {key}: {reason}", file=sys.stderr)


def check_config(path: str) -> int:
    try:
        config = load_config(path, os.environ)
    except ConfigError as exc:
        _print_problems(exc)
        return ExitCode.USAGE
    sys.stdout.write(f"# effective configuration from {path}\n" + render_toml(config))
    return ExitCode.OK


def print_token(args: argparse.Namespace) -> int:
    """``ebbcast token``: mint an HS256 client token with the configured key."""
    from ebbcast.config import parse_duration
    from ebbcast.serving.auth import mint, valid_subject

    try:
        config = load_config(args.config, os.environ)
    except ConfigError as exc:
        _print_problems(exc)
        return ExitCode.USAGE
    try:
        ttl = parse_duration(args.ttl)
    except ValueError as exc:
        print(f"ebbcast token: --ttl: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if not valid_subject(args.sub):
        print("ebbcast token: --sub: 1 to 128 characters, no control characters",
              file=sys.stderr)
        return ExitCode.USAGE
    if not config.jwt_secret:
        print("ebbcast token: auth.jwt_key: not set; tokens are signed with it (HS256). "
              "Set auth.jwt_key_file, or EBBCAST_AUTH_JWT_KEY", file=sys.stderr)
        return ExitCode.USAGE
    print(mint(config.jwt_secret, args.sub, ttl, args.read_only, config.auth.audience))
    return ExitCode.OK


def raise_open_files_limit() -> None:
    """Every client is a file descriptor: take the hard limit (a terminal's soft
    default of 1024 would stop the daemon at about a thousand clients)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open files limit from %d: %s", soft, exc)


def _prepare_process() -> None:
    """Hold stop and reload signals until the daemon's handlers are in place (one
    that arrives during start-up then starts a quick drain instead of killing the
    process or raising KeyboardInterrupt; Daemon.run unblocks them), and take the
    open files limit."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    raise_open_files_limit()


def _load_and_log(load: Callable[[], Config]) -> Config | None:
    """The configuration, with logging set up from it; None after printing every
    problem."""
    from ebbcast.core.logs import configure_logging

    try:
        config = load()
    except ConfigError as exc:
        _print_problems(exc)
        return None
    configure_logging(config.logging.level, config.logging.format)
    return config


def _runtime_directory() -> str:
    """A fresh private directory for this start (metrics files, effective configs):
    under $RUNTIME_DIRECTORY (systemd's, or a pod's volume), else the system's
    temporary directory, also when $RUNTIME_DIRECTORY cannot be used (logged)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    try:
        return tempfile.mkdtemp(prefix="ebbcast-", dir=runtime)
    except OSError as exc:
        if runtime is None:
            raise
        log.warning("RUNTIME_DIRECTORY %s cannot be used (%s): using %s instead", runtime,
                    exc.strerror or exc, tempfile.gettempdir())
        return tempfile.mkdtemp(prefix="ebbcast-")


def _tornado_as_expected() -> bool:
    """Check, before serving anything, that the installed Tornado still has what
    ebbcast.serving.wire relies on; log what changed if not."""
    from ebbcast.serving.wire import check_tornado, tornado_problem_report

    problems = check_tornado()
    if problems:
        log.error("%s", tornado_problem_report(problems))
    return not problems


def serve(args: argparse.Namespace) -> int:
    """The daemon: a main process (ebbcast.process.supervisor) over its serving processes;
    with ``server.workers = 1`` the one serving process runs inside it.

    prometheus_client picks its multiprocess mode when it is imported, from
    ``PROMETHEUS_MULTIPROC_DIR``: so a fresh directory is made and named here,
    before anything imports it, and removed at exit.
    """
    _prepare_process()
    path = getattr(args, "config", None)
    overrides = {key: value for flag, key in SERVE_FLAGS.items()
                 if (value := getattr(args, flag, None)) is not None}

    def reload() -> Config:
        return load_config(path, os.environ, overrides)

    config = _load_and_log(reload)
    if config is None:
        return ExitCode.USAGE
    if config.service_links:
        log.info("ignored %d environment variables Kubernetes sets for its Services "
                 "(service links): %s; `enableServiceLinks: false` in the pod spec leaves "
                 "them out", len(config.service_links), ", ".join(config.service_links))
    if not _tornado_as_expected():
        return ExitCode.FAILURE
    if "prometheus_client" in sys.modules:
        raise RuntimeError("serve must run before prometheus_client is imported")
    rundir = _runtime_directory()
    metrics_dir = os.path.join(rundir, "metrics")
    os.mkdir(metrics_dir, 0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    from ebbcast.backplane.names import new_instance_id

    # one id for every process of this daemon, generations included: how other
    # instances tell it apart (its public URL may be theirs too, behind one proxy)
    instance = new_instance_id()
    worker_args = (["--config", path] if path else []) + \
        [f"--set={key}={value}" for key, value in overrides.items()] + \
        ["--instance", instance]
    try:
        from ebbcast.core.metrics import Metrics
        from ebbcast.process.supervisor import Supervisor
        from ebbcast.process.workers import LocalRun

        def serve_here(relay: socket.socket, public: list[socket.socket], running: Config,
                       metrics: Metrics) -> LocalRun:
            """The serving process inside the main one (``server.workers = 1``); the
            serving stack is imported only then."""
            from ebbcast.process.roles import Member, WorkerSetup
            from ebbcast.serving.process import Daemon

            return Daemon(running, reload, metrics=metrics,
                          role=Member(WorkerSetup(0, relay, public, hold=True, local=True,
                                                  instance=instance)))

        return _run_until_stopped(lambda: Supervisor(config, reload, rundir, worker_args,
                                                     metrics_dir, serve_here=serve_here,
                                                     instance=instance))
    finally:
        shutil.rmtree(rundir, ignore_errors=True)


def _run_until_stopped(make: Callable[[], Any]) -> int:
    """Build the daemon (or supervisor) with ``make()``, run it, map the outcome to
    an exit code."""
    from ebbcast.process.listener import BindError

    try:
        runner = make()
        reason = eventloop.run(runner.run())
    except BindError as exc:
        log.error("%s", exc)
        return ExitCode.BIND
    except ConfigError as exc:
        _print_problems(exc)
        return ExitCode.USAGE
    except Exception:
        log.exception("unexpected failure")
        return ExitCode.FAILURE
    log.debug("exit after %s", reason.value)
    return ExitCode.FAILURE if reason is StopReason.FAILED else ExitCode.OK


#: The hidden command the main process starts its workers with.
WORKER_COMMAND = "_worker"


def run_worker(argv: Sequence[str]) -> int:
    """One worker process, started by the main process (see ebbcast.process.supervisor)."""
    parser = _Parser(prog=f"ebbcast {WORKER_COMMAND}")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--generation", type=int, default=1)
    parser.add_argument("--hold", action="store_true")
    parser.add_argument("--relay-fd", type=int, required=True)
    parser.add_argument("--listen-fds", required=True)
    parser.add_argument("--effective-config", required=True)
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    # absent when a main process of 0.1.0 starts this release's workers: they are
    # told apart by that main process's pid
    parser.add_argument("--instance", default="")
    args = parser.parse_args(argv)
    _prepare_process()
    if signal.SIGINT in signal.sigpending():
        # only a terminal's Ctrl+C, which reached this process before it left the
        # foreground process group, can be pending now: the main process forwards
        # SIGTERM. Ignoring a signal discards it; then the usual handler returns.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    overrides = dict(item.split("=", 1) for item in args.set)

    def reload() -> Config:
        return load_config(args.config, os.environ, overrides)

    config = _load_and_log(lambda: load_config(args.effective_config, env={}))
    if config is None:
        return ExitCode.USAGE
    if not _tornado_as_expected():
        return ExitCode.FAILURE
    from ebbcast.process.roles import Member, WorkerSetup
    from ebbcast.serving.process import Daemon

    setup = WorkerSetup(args.index, socket.socket(fileno=args.relay_fd),
                        [socket.socket(fileno=int(fd)) for fd in args.listen_fds.split(",")],
                        generation=args.generation, hold=args.hold,
                        instance=args.instance or f"{socket.gethostname()}:{os.getppid()}")

    return _run_until_stopped(lambda: Daemon(config, reload, Member(setup)))
