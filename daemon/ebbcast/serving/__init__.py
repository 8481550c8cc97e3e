"""One process that holds WebSocket clients: handshakes, connections, fan-out,
broadcasts, keepalive. Never imports ``ebbcast.process``."""
