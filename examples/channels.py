"""The Python client (``ebbcast.client``) in a program: subscribe to a channel, watch
who joins, publish, and read until a message comes back.

    python examples/channels.py ws://127.0.0.1:8000/ws

Run ``ebbcast serve`` first (``make run``). With ``reconnect=True`` the session
moves by itself when the daemon drains or upgrades, and resumes every channel from
the last offset it saw, so this loop never sees a message twice or misses one.
"""

from __future__ import annotations

import asyncio
import sys

from ebbcast.client import Session


async def main(url: str) -> int:
    session = Session(f"{url}/example", reconnect=True)
    await session.connect()
    await session.subscribe("scores", presence=True)
    async for event in session:
        frame = event.data
        kind = frame.get("type")
        if kind == "subscribed":
            print(f"subscribed to {frame['channel']} at offset {frame['offset']}")
            await session.publish("scores", "1-0")
        elif kind in ("join", "leave"):
            print(f"{frame['client_id']} {kind}s {frame['channel']}")
        elif kind == "message" and frame.get("channel") == "scores":
            print(f"{frame['from']} in {frame['channel']}: {frame['text']} "
                  f"(offset {frame['offset']})")
            break
    await session.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8000/ws")))
