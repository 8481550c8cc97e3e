"""What each publisher has been seen to send: repeats dropped, gaps counted.

Every instance numbers what it publishes: a raw frame by its sequence number, a
broadcast to be sequenced by its token. A publisher sends a batch again when a
publish failed on the way (``ebbcast.backplane.outbox``), and part of it may have
crossed already: a number not above the highest seen from that publisher is such a
repeat. A raw frame numbered more than one above it says how many were missed.
Nothing here does I/O.
"""

from __future__ import annotations


class Seen:
    """The highest raw sequence number and token seen from each publisher (node)."""

    def __init__(self) -> None:
        self._raw: dict[str, int] = {}
        self._tokens: dict[str, int] = {}

    def raw(self, node: str, seq: int) -> int | None:
        """None for a repeat (drop it); else how many frames of ``node`` never
        arrived before this one (0 for the first seen)."""
        last = self._raw.get(node)
        if last is not None and seq <= last:
            return None
        self._raw[node] = seq
        return 0 if last is None else seq - last - 1

    def repeated(self, node: str, token: int) -> bool:
        """Whether sequenced broadcast ``token`` of ``node`` was seen before."""
        last = self._tokens.get(node, 0)
        if token <= last:
            return True
        self._tokens[node] = token
        return False
