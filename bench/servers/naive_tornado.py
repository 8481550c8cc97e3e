"""The baseline: a plain Tornado broadcast handler calling write_message per client.

This is what most Tornado broadcast code looks like; ebbcast is measured against it.
Usage: python naive_tornado.py PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

from tornado.web import Application
from tornado.websocket import WebSocketClosedError, WebSocketHandler


class Broadcast(WebSocketHandler):
    clients: set["Broadcast"] = set()

    def open(self) -> None:
        self.clients.add(self)

    def on_message(self, message: str | bytes) -> None:
        binary = isinstance(message, bytes)
        for client in list(self.clients):
            try:
                client.write_message(message, binary=binary)
            except WebSocketClosedError:
                pass

    def on_close(self) -> None:
        self.clients.discard(self)


async def main(port: int) -> None:
    app = Application([(r"/ws", Broadcast)], websocket_max_message_size=1 << 20)
    app.listen(port, "127.0.0.1", backlog=2048)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"serving ws=http://127.0.0.1:{port}/ws", file=sys.stderr, flush=True)
    await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
