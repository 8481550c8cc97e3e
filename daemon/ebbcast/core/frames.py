"""The JSON envelope: the frames the server sends its clients.

Each function returns the text of one frame. Compact separators keep frames small,
since a broadcast frame is copied to every client.
"""

from __future__ import annotations

import json
from typing import Any

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
#: A string's JSON text as ``_dumps`` writes it (``ensure_ascii=False``).
_string = json.encoder.encode_basestring

#: The ``from`` of a broadcast made through the admin API; no client may take it as
#: its id (``ebbcast.serving.handshake``), so no client's frame can look like one.
ADMIN_SENDER = "admin"


def _frame(**fields: Any) -> str:
    return _dumps(fields)


def welcome(client_id: str, server: str, connections: int, epoch: str | None = None,
            offset: int = 0, recovered: bool | None = None, missed: int = 0,
            channels: dict[str, tuple[str, int]] | None = None) -> str:
    """The first frame. With offsets (``epoch`` given): the epoch and the latest
    offset; after a resume, whether it ``recovered`` and how many broadcasts it
    ``missed`` (the replay that follows); with ``channels`` (``?channels=``),
    each channel's epoch and latest offset."""
    fields: dict[str, Any] = {"type": "welcome", "client_id": client_id, "server": server,
                              "connections": connections}
    if epoch is not None:
        fields.update(epoch=epoch, offset=offset)
    if recovered is not None:
        fields["recovered"] = recovered
        if recovered:
            fields["missed"] = missed
    if channels:
        fields["channels"] = {name: {"epoch": at[0], "offset": at[1]}
                              for name, at in channels.items()}
    return _frame(**fields)


def epoch(name: str, offset: int) -> str:
    """The history was lost: broadcasts go on from ``offset`` in epoch ``name``."""
    return _frame(type="epoch", epoch=name, offset=offset)


def message(sender: str, text: str, ts: float) -> str:
    return _frame(type="message", **{"from": sender}, text=text, ts=round(ts, 3))


def periodic(seq: int, text: str, ts: float, connections: int) -> str:
    return _frame(type="periodic", seq=seq, text=text, ts=round(ts, 3), connections=connections)


def shutdown(deadline: float, reconnect_after_ms: int, nodes: list[str] | None = None,
             reason: str = "draining") -> str:
    """The drain notice ("draining", or "upgrade" when a new generation has taken
    over); ``nodes``, when known, lists other live instances' URLs."""
    fields: dict[str, Any] = {"type": "shutdown", "reason": reason,
                              "deadline": round(deadline, 3),
                              "reconnect_after_ms": reconnect_after_ms}
    if nodes:
        fields["nodes"] = nodes
    return _frame(**fields)


def error(code: str, channel: str | None = None) -> str:
    """A command or frame refused; the connection stays open."""
    if channel is None:
        return _frame(type="error", error=code)
    return _frame(type="error", error=code, channel=channel)


# -- channels (SPEC 14) ----------------------------------------------------------

def channel_message(channel: str, sender: str, text: str, ts: float) -> str:
    """A message published to ``channel``; its sequencer adds the channel's offset.
    The text ``_frame`` would write, put together without building a dict (one per
    publish: the channels' most frequent frame)."""
    return (f'{{"type":"message","channel":{_string(channel)},"from":{_string(sender)},'
            f'"text":{_string(text)},"ts":{round(ts, 3)!r}}}')


def subscribed(channel: str, epoch: str, offset: int, recovered: bool | None = None,
               missed: int = 0) -> str:
    """A subscription made: the channel's epoch and latest offset; after a resume,
    whether it ``recovered`` and how many messages it ``missed`` (which follow)."""
    fields: dict[str, Any] = {"type": "subscribed", "channel": channel, "epoch": epoch,
                              "offset": offset}
    if recovered is not None:
        fields["recovered"] = recovered
        if recovered:
            fields["missed"] = missed
    return _frame(**fields)


def unsubscribed(channel: str, reason: str) -> str:
    return _frame(type="unsubscribed", channel=channel, reason=reason)


def direct(text: str, ts: float, sender: str = ADMIN_SENDER) -> str:
    """A message for one client id (``POST /clients/{id}/send``)."""
    return _frame(type="direct", **{"from": sender}, text=text, ts=round(ts, 3))


def presence(channel: str, client_id: str, joined: bool) -> str:
    """A client joined or left a channel (to subscribers that asked for presence)."""
    return _frame(type="join" if joined else "leave", channel=channel, client_id=client_id)
