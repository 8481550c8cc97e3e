"""The protocol's frames (ebbcast.core.frames) and what `ebbcast client` prints of them."""

from __future__ import annotations

import json

import pytest

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


@pytest.mark.parametrize("text", ["hi", 'a "quote", a \\ and a\nnew line', "\u2028 é 😀 \x00\x1f", ""])
def test_a_channel_message_is_the_text_the_json_encoder_writes(text: str) -> None:
    """Put together by hand (the channels' most frequent frame): byte for byte what
    the compact encoder makes of the same fields, whatever the text holds."""
    for ts in (1700000000.1234, 1.0, 0.0005):
        built = frames.channel_message("scores.1", "alice", text, ts)
        assert built == json.dumps({"type": "message", "channel": "scores.1", "from": "alice",
                                    "text": text, "ts": round(ts, 3)},
                                   separators=(",", ":"), ensure_ascii=False)
        assert json.loads(built)["text"] == text


def test_client_prints_each_frame_as_one_json_line():
    assert json.loads(frame_as_json_line('{"type": "welcome"}')) == {"type": "welcome"}
    assert json.loads(frame_as_json_line("plain")) == {"text": "plain"}
    assert json.loads(frame_as_json_line("[1]")) == {"text": "[1]"}
    assert json.loads(frame_as_json_line(b"\x00\xff")) == {"binary_base64": "AP8="}
    assert "\n" not in frame_as_json_line('{"a":\n1}')
