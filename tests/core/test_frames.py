"""The protocol's frames (ebbcast.core.frames) and what `ebbcast client` prints of them."""

from __future__ import annotations

import json

from ebbcast.client import frame_as_json_line
from ebbcast.core import frames


def test_frames_are_compact_json_with_spec_fields():
    assert json.loads(frames.welcome("c1", "node", 3)) == {
        "type": "welcome", "client_id": "c1", "server": "node", "connections": 3}
    message = frames.message("alice", "hi ☃", 1700000000.1234)
    assert json.loads(message) == {"type": "message", "from": "alice", "text": "hi ☃",
                                   "ts": 1700000000.123}
    assert " " not in frames.periodic(1, "x", 1.0, 2)
    assert json.loads(frames.shutdown(1700001800.0, 1500)) == {
        "type": "shutdown", "reason": "draining", "deadline": 1700001800.0,
        "reconnect_after_ms": 1500}
    assert json.loads(frames.error("rate_limited")) == {"type": "error",
                                                        "error": "rate_limited"}


def test_client_prints_each_frame_as_one_json_line():
    assert json.loads(frame_as_json_line('{"type": "welcome"}')) == {"type": "welcome"}
    assert json.loads(frame_as_json_line("plain")) == {"text": "plain"}
    assert json.loads(frame_as_json_line("[1]")) == {"text": "[1]"}
    assert json.loads(frame_as_json_line(b"\x00\xff")) == {"binary_base64": "AP8="}
    assert "\n" not in frame_as_json_line('{"a":\n1}')
