"""The design most users start from: FastAPI on uvicorn (its standard extras: uvloop,
httptools, the websockets protocol), with the ConnectionManager of FastAPI's own
WebSocket tutorial, which keeps every WebSocket and awaits ``send_text`` on each in
turn. ebbcast is measured against it.

Two changes from the tutorial, so that the benchmark measures the design rather
than its bugs: the broadcast walks a copy of the list (a client that leaves during
the awaits would otherwise make it skip another), and a send that fails (a client
gone) is skipped instead of ending the publisher's own connection.

Usage: python fastapi_manager.py PORT
"""

from __future__ import annotations

import asyncio
import sys

import uvicorn
import uvloop
from fastapi import FastAPI, WebSocket, WebSocketDisconnect


class ConnectionManager:
    def __init__(self) -> None:
        self.active_connections: list[WebSocket] = []

    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.active_connections.append(websocket)

    def disconnect(self, websocket: WebSocket) -> None:
        if websocket in self.active_connections:
            self.active_connections.remove(websocket)

    async def broadcast(self, message: str) -> None:
        for connection in list(self.active_connections):
            try:
                await connection.send_text(message)
            except Exception:  # a client gone meanwhile
                self.disconnect(connection)


app = FastAPI()
manager = ConnectionManager()


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await manager.connect(websocket)
    try:
        while True:
            data = await websocket.receive_text()
            await manager.broadcast(data)
    except WebSocketDisconnect:
        manager.disconnect(websocket)


async def main(port: int) -> None:
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            backlog=2048, ws_max_size=1 << 20)
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving  # it failed to start: say why
            return
        await asyncio.sleep(0.01)
    print(f"serving ws=http://127.0.0.1:{port}/ws", file=sys.stderr, flush=True)
    await serving


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))  # the loop uvicorn[standard] picks by itself
