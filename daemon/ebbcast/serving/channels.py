"""Channels in one serving process, without I/O: the names, the client's commands,
what a token lets a client do, and who is subscribed to what.

A channel name is 1 to 128 characters of ``[A-Za-z0-9_.:@-]``. A client text frame
that is a JSON object whose ``type`` is ``subscribe``, ``unsubscribe`` or
``publish`` is a command (:func:`read_command`); every other text frame is a global
broadcast, as before channels. :class:`Subscriptions` keeps each connection's
channels and each channel's connections, enforces the limits (per connection, per
process), and reports interest: a channel's first local subscriber and its last,
so that only processes with subscribers receive a channel's messages.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar, Union

from ebbcast.backplane.channels import valid_channel as valid_channel

#: Longest text frame looked at as a command (a publish's text included).
MAX_COMMAND_CHARS = 1 << 20

Conn = TypeVar("Conn")


# -- the client's commands -----------------------------------------------------------

@dataclass(frozen=True)
class Subscribe:
    channel: str
    #: Resume from after this offset of ``epoch`` (both or neither).
    since: int | None = None
    epoch: str | None = None
    #: Receive joins and leaves.
    presence: bool = False


@dataclass(frozen=True)
class Unsubscribe:
    channel: str


@dataclass(frozen=True)
class Publish:
    channel: str
    text: str


@dataclass(frozen=True)
class BadCommand:
    """A command that cannot be carried out: the ``error`` frame's code, and the
    channel it named, if any."""

    error: str
    channel: str | None = None


Command = Union[Subscribe, Unsubscribe, Publish, BadCommand]
COMMANDS = ("subscribe", "unsubscribe", "publish")


def read_command(text: str) -> Command | None:
    """The command a client text frame is, or None when it is a global broadcast
    (anything but a JSON object whose ``type`` is one of COMMANDS)."""
    if not text.startswith("{") or len(text) > MAX_COMMAND_CHARS:
        return None
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(frame, dict) or frame.get("type") not in COMMANDS:
        return None
    channel = frame.get("channel")
    if not valid_channel(channel):
        return BadCommand("bad_channel", channel if isinstance(channel, str) else None)
    assert isinstance(channel, str)
    if frame["type"] == "unsubscribe":
        return Unsubscribe(channel)
    if frame["type"] == "publish":
        text_field = frame.get("text")
        if not isinstance(text_field, str):
            return BadCommand("bad_command", channel)
        return Publish(channel, text_field)
    return _subscribe(frame, channel)


def _subscribe(frame: dict[str, object], channel: str) -> Command:
    since, epoch, presence = frame.get("since"), frame.get("epoch"), frame.get("presence", False)
    if (since is None) != (epoch is None) or not isinstance(presence, bool):
        return BadCommand("bad_command", channel)
    if since is not None and (not isinstance(since, int) or isinstance(since, bool)
                              or since < 0 or not isinstance(epoch, str)):
        return BadCommand("bad_command", channel)
    return Subscribe(channel, since, epoch, presence)  # type: ignore[arg-type]


# -- what a client may do -------------------------------------------------------------

@dataclass(frozen=True)
class ChannelPatterns:
    """Channel names and prefixes (``"scores.*"``): a token's ``channels`` claim, or
    its ``publish`` claim as a list. ``everything``: no claim, any channel."""

    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    everything: bool = False

    @classmethod
    def of(cls, claim: Iterable[str]) -> ChannelPatterns:
        items = list(claim)
        return cls(frozenset(i for i in items if not i.endswith("*")),
                   tuple(i[:-1] for i in items if i.endswith("*")))

    def allow(self, channel: str) -> bool:
        return self.everything or channel in self.names or \
            any(channel.startswith(prefix) for prefix in self.prefixes)


ANY_CHANNEL = ChannelPatterns(everything=True)
NO_CHANNEL = ChannelPatterns()


@dataclass(frozen=True)
class ChannelRights:
    """What one connection may do with channels and the global stream."""

    subscribe: ChannelPatterns = ANY_CHANNEL
    #: The channels it may publish to (beyond ``subscribe``: never).
    publish: ChannelPatterns = ANY_CHANNEL
    #: Whether its plain text frames are broadcast (else: the ``read_only`` error).
    publish_global: bool = True

    def may_publish(self, channel: str) -> bool:
        return self.subscribe.allow(channel) and self.publish.allow(channel)

    @classmethod
    def without_token(cls, client_publish: bool) -> ChannelRights:
        """A client without a token's: any channel, publishing as
        ``channels.client_publish`` says."""
        return _WITH_PUBLISH if client_publish else _WITHOUT_PUBLISH

    @classmethod
    def from_claims(cls, channels: object, publish: object,
                    client_publish: bool = True) -> ChannelRights | str:
        """The rights of a token's ``channels`` and ``publish`` claims (None:
        absent); or why they cannot be read. ``client_publish``
        (``channels.client_publish``) is for clients without a token (both None)."""
        subscribe = ANY_CHANNEL
        if channels is not None:
            if not _names_list(channels):
                return "channels must be a list of channel names or prefixes ending in *"
            subscribe = ChannelPatterns.of(channels)  # type: ignore[arg-type]
        if publish is None:
            if channels is None:
                return cls.without_token(client_publish)
            return cls(subscribe, ANY_CHANNEL if client_publish else NO_CHANNEL)
        if isinstance(publish, bool):
            return cls(subscribe, ANY_CHANNEL if publish else NO_CHANNEL, publish)
        if not _names_list(publish):
            return "publish must be true, false or a list of channel names or prefixes"
        return cls(subscribe, ChannelPatterns.of(publish), False)  # type: ignore[arg-type]


_WITH_PUBLISH = ChannelRights()
_WITHOUT_PUBLISH = ChannelRights(ANY_CHANNEL, NO_CHANNEL)


def _names_list(claim: object) -> bool:
    return isinstance(claim, list) and all(
        isinstance(item, str) and valid_channel(item[:-1] if item.endswith("*") else item)
        or item == "*" for item in claim)


# -- who is subscribed to what ---------------------------------------------------------

@dataclass(frozen=True)
class Refused:
    """A subscription not made: the ``error`` frame's code."""

    error: str


class Subscriptions(Generic[Conn]):
    """Each connection's channels and each channel's connections in one process.
    (Which processes want a channel's messages is the main process's interest
    table, ``ebbcast.backplane.centre``, told by each subscribe and unsubscribe.)"""

    def __init__(self, max_per_connection: int, max_channels: int) -> None:
        self.max_per_connection = max_per_connection
        self.max_channels = max_channels
        self._members: dict[str, dict[Conn, None]] = {}
        self._of: dict[Conn, dict[str, None]] = {}
        self._subscriptions = 0

    def subscribe(self, conn: Conn, channel: str, rights: ChannelRights = ChannelRights()
                  ) -> Refused | None:
        """Subscribe ``conn`` to ``channel`` (nothing happens if it already is); the
        reason it may not, if so."""
        mine = self._of.get(conn, {})
        if channel in mine:
            return None
        if not rights.subscribe.allow(channel):
            return Refused("forbidden")
        if len(mine) >= self.max_per_connection:
            return Refused("too_many_channels")
        if channel not in self._members and len(self._members) >= self.max_channels:
            return Refused("too_many_channels")
        self._of.setdefault(conn, {})[channel] = None
        self._subscriptions += 1
        self._members.setdefault(channel, {})[conn] = None
        return None

    def unsubscribe(self, conn: Conn, channel: str) -> bool:
        """True if ``conn`` was subscribed to ``channel``."""
        mine = self._of.get(conn)
        if mine is None or channel not in mine:
            return False
        del mine[channel]
        self._subscriptions -= 1
        if not mine:
            del self._of[conn]
        members = self._members[channel]
        del members[conn]
        if not members:
            del self._members[channel]
        return True

    def drop(self, conn: Conn) -> list[str]:
        """Unsubscribe ``conn`` from everything (it closed): the channels it had."""
        channels = list(self._of.get(conn, ()))
        for channel in channels:
            self.unsubscribe(conn, channel)
        return channels

    def has(self, conn: Conn, channel: str) -> bool:
        return channel in self._of.get(conn, ())

    def subscribers(self, channel: str) -> tuple[Conn, ...]:
        return tuple(self._members.get(channel, ()))

    def channels_of(self, conn: Conn) -> tuple[str, ...]:
        return tuple(self._of.get(conn, ()))

    def counts(self) -> dict[str, int]:
        """Each channel with a subscriber here, and how many."""
        return {channel: len(members) for channel, members in self._members.items()}

    @property
    def channels(self) -> int:
        return len(self._members)

    @property
    def subscriptions(self) -> int:
        return self._subscriptions
