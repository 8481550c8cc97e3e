"""``ebbcast client``: connect, subscribe, send and publish, print every received
frame as one JSON line; the session is ``ebbcast.client.Session`` (its notes, a
resume not recovered or a connection closed, are lines too)."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

from ebbcast.client import CannotConnect, Session
from ebbcast.config import parse_duration
from ebbcast.exits import ExitCode


async def _run(args: argparse.Namespace, listen: float | None, token: str | None) -> int:
    session = Session(args.url, token=token, reconnect=args.reconnect, quiet=args.quiet,
                      deadline=None if listen is None else time.monotonic() + listen)
    try:
        await session.connect()
    except CannotConnect as exc:
        print(f"ebbcast client: {exc}", file=sys.stderr)
        return ExitCode.FAILURE
    for channel in args.subscribe:
        await session.subscribe(channel)
    for text in args.send:
        await session.send(text)
    for channel, text in args.publish:
        await session.publish(channel, text)
    received = 0
    while args.count is None or received < args.count:
        event = await session.next_event()
        if event is None:
            break
        if event.raw is not None:
            received += 1
        if not args.quiet:
            print(event.line(), flush=True)
    await session.aclose(1.0)
    return ExitCode.FAILURE if session.refused else ExitCode.OK


def run_client(args: argparse.Namespace) -> int:
    try:
        listen = None if args.listen is None else parse_duration(args.listen)
    except ValueError as exc:
        print(f"ebbcast client: --listen: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        token = args.token or os.environ.get("EBBCAST_TOKEN") or None
        return asyncio.run(_run(args, listen, token))
    except KeyboardInterrupt:
        return ExitCode.OK
