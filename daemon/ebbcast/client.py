"""``ebbcast client``: connect, send, print every received frame as one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time

from tornado.websocket import WebSocketClientConnection, websocket_connect

from ebbcast.config import parse_duration


def frame_as_json_line(frame: str | bytes) -> str:
    """A received frame as one JSON line.

    A text frame holding a JSON object is printed as that object (compact); other
    text as ``{"text": …}``; binary frames as ``{"binary_base64": …}``.
    """
    if isinstance(frame, bytes):
        return json.dumps({"binary_base64": base64.b64encode(frame).decode()})
    try:
        parsed = json.loads(frame)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)
    return json.dumps({"text": frame}, ensure_ascii=False)


async def _session(url: str, sends: list[str], listen: float | None, count: int | None,
                   quiet: bool) -> int:
    try:
        conn: WebSocketClientConnection = await asyncio.wait_for(websocket_connect(url), 10)
    except Exception as exc:  # any failure to connect is reported the same way
        print(f"ebbcast client: cannot connect to {url}: {exc}", file=sys.stderr)
        return 1
    for text in sends:
        await conn.write_message(text)
    deadline = None if listen is None else time.monotonic() + listen
    received = 0
    while count is None or received < count:
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            frame = await asyncio.wait_for(conn.read_message(), timeout)
        except asyncio.TimeoutError:
            break
        if frame is None:
            code = conn.close_code
            if not quiet:
                print(json.dumps({"closed": code, "reason": conn.close_reason}), flush=True)
            return 0
        received += 1
        if not quiet:
            print(frame_as_json_line(frame), flush=True)
    conn.close(1000)
    return 0


def run_client(args: argparse.Namespace) -> int:
    try:
        listen = None if args.listen is None else parse_duration(args.listen)
    except ValueError as exc:
        print(f"ebbcast client: --listen: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_session(args.url, args.send, listen, args.count, args.quiet))
    except KeyboardInterrupt:
        return 0
