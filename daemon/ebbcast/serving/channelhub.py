"""Channels in a serving process: the clients' commands carried out, and what
comes back from the channels' route delivered (SPEC 14).

A ``ChannelHub`` is the process's ``ChannelFeed``. A subscribe is checked here
(the name, the client's rights, the limits: ``Subscriptions``) and then asked of
the route (a centre in this process, or the main process over the relay link).
Until its answer comes back the subscription is *pending*: the channel's messages
do not reach it yet. The answer carries the channel's position and, for a resume,
the messages missed; it is written with the ``subscribed`` frame, and everything
the route sends after it follows, so a resume has no gap and no repeat. A client
subscribing at its handshake (``?channels=``) is not open yet: what its channels
send before its welcome is kept and written after it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from ebbcast.backplane.base import ChannelRoute
from ebbcast.backplane.channels import Answer, Ask, PresenceChange
from ebbcast.backplane.history import Resume
from ebbcast.config import Config
from ebbcast.core import frames
from ebbcast.core.metrics import Metrics
from ebbcast.serving.channels import (
    BadCommand,
    ChannelRights,
    Command,
    Publish,
    Refused,
    Subscribe,
    Subscriptions,
    Unsubscribe,
)
from ebbcast.serving.fanout import Fanout, Recipient
from ebbcast.serving.wire import encode_frame

log = logging.getLogger(__name__)


class Subscriber(Recipient, Protocol):
    """A connection, as channels see it (``ebbcast.serving.connection.Connection``)."""

    client_id: str

    @property
    def rights(self) -> ChannelRights: ...
    def send_text(self, text: str) -> None: ...


@dataclass
class Opening:
    """A connection subscribing at its handshake: the answers it waits for, and
    what its channels sent before it opened."""

    waiting: set[str]
    positions: dict[str, tuple[str, int]] = field(default_factory=dict)
    early: list[str] = field(default_factory=list)
    done: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class ChannelHub:
    """Each connection's channels; the route's answers, messages and presence."""

    def __init__(self, fanout: Fanout, metrics: Metrics, config: Callable[[], Config],
                 local: Callable[[str], Iterable[Subscriber]]) -> None:
        self._fanout = fanout
        self._metrics = metrics
        self._config = config  # read when needed: a reload replaces it
        self._local = local  # the open connections of a client id (direct messages)
        self.route: ChannelRoute | None = None
        # its limits are channels.* as each subscribe reads them (they reload)
        self.subscriptions: Subscriptions[Subscriber] = Subscriptions(0, 0)
        #: asked of the route and not answered yet: by request, and the request of each
        #: pending subscription (dropped together when it ends first: no answer is kept
        #: for a connection gone, even one the route never answers)
        self._asked: dict[int, tuple[Subscriber, Subscribe]] = {}
        self._last_request = 0
        self._pending: dict[tuple[Subscriber, str], int] = {}
        self._presence: dict[str, dict[Subscriber, None]] = {}
        self._opening: dict[Subscriber, Opening] = {}

    def start(self) -> None:
        if self.route is not None:
            self.route.start()

    async def stop(self) -> None:
        if self.route is not None:
            await self.route.stop()

    def default_rights(self) -> ChannelRights:
        """A client without a token: channels.client_publish decides."""
        return ChannelRights.without_token(self._config().channels.client_publish)

    # -- the clients' commands -----------------------------------------------------

    def command(self, conn: Subscriber, command: Command) -> None:
        match command:
            case BadCommand(error, channel):
                if error == "bad_channel":
                    self._metrics.subscribe_refused.labels(error).inc()
                conn.send_text(frames.error(error, channel))
            case Subscribe():
                refused = self.subscribe(conn, command)
                if refused is not None:
                    conn.send_text(frames.error(refused.error, command.channel))
            case Unsubscribe(channel):
                if self.unsubscribe(conn, channel):
                    conn.send_text(frames.unsubscribed(channel, "client"))
                else:
                    conn.send_text(frames.error("not_subscribed", channel))
            case Publish(channel, text):
                if not conn.rights.may_publish(channel):
                    conn.send_text(frames.error("forbidden", channel))
                elif not self.publish(channel, conn.client_id, text):
                    conn.send_text(frames.error("unavailable", channel))

    def subscribe(self, conn: Subscriber, command: Subscribe) -> Refused | None:
        """Check and ask for one subscription; the reason it is refused, if so."""
        channel = command.channel
        if self.subscriptions.has(conn, channel):
            return Refused("already_subscribed")
        limits = self._config().channels
        self.subscriptions.max_per_connection = limits.max_per_connection
        self.subscriptions.max_channels = limits.max
        refused = self.subscriptions.subscribe(conn, channel, conn.rights)
        if refused is not None:
            self._metrics.subscribe_refused.labels(refused.error).inc()
            return refused
        if self.route is None:
            self.subscriptions.unsubscribe(conn, channel)
            return Refused("unavailable")
        self._last_request += 1
        self._asked[self._last_request] = (conn, command)
        self._pending[conn, channel] = self._last_request
        if command.presence:
            self._presence.setdefault(channel, {})[conn] = None
        self._counted()
        resume = Resume(command.since, command.epoch) \
            if command.since is not None and command.epoch is not None else None
        if not self.route.ask(Ask(self._last_request, channel, conn.client_id, resume)):
            self._forget(conn, channel)
            return Refused("unavailable")
        return None

    def unsubscribe(self, conn: Subscriber, channel: str) -> bool:
        if not self._forget(conn, channel):
            return False
        if self.route is not None:
            self.route.leave(channel, conn.client_id)
        return True

    def _forget(self, conn: Subscriber, channel: str) -> bool:
        """Drop one subscription here (not at the route); whether there was one."""
        if not self.subscriptions.unsubscribe(conn, channel):
            return False
        request = self._pending.pop((conn, channel), None)
        if request is not None:
            del self._asked[request]
        watching = self._presence.get(channel)
        if watching is not None:
            watching.pop(conn, None)
            if not watching:
                del self._presence[channel]
        self._counted()
        return True

    def publish(self, channel: str, sender: str, text: str) -> bool:
        """Publish ``text`` to ``channel`` from ``sender`` (a client id, or admin)."""
        if self.route is None:
            return False
        frame = frames.channel_message(channel, sender, text, time.time())
        if not self.route.publish(channel, frame):
            return False
        self._metrics.channel_messages.inc()
        return True

    def closed(self, conn: Subscriber) -> None:
        """``conn`` closed (or its handshake was given up): every subscription ends."""
        self._opening.pop(conn, None)
        for channel in self.subscriptions.channels_of(conn):
            self.unsubscribe(conn, channel)

    # -- at the handshake (?channels=) --------------------------------------------

    def subscribe_opening(self, conn: Subscriber, channels: Iterable[str]
                          ) -> Opening | tuple[Refused, str]:
        """Subscribe a connection not open yet (wait for ``done``, then ``opened``);
        or why one of its channels cannot be, and which."""
        opening = Opening(set(channels))
        self._opening[conn] = opening
        for channel in list(opening.waiting):
            refused = self.subscribe(conn, Subscribe(channel))
            if refused is not None:
                self.closed(conn)
                return refused, channel
        return opening

    def opened(self, conn: Subscriber) -> list[str]:
        """``conn`` has written its welcome: the frames its channels sent before."""
        opening = self._opening.pop(conn, None)
        return opening.early if opening is not None else []

    # -- from the route (ebbcast.backplane.base.ChannelFeed) ----------------------------

    def answered(self, answer: Answer) -> None:
        asked = self._asked.pop(answer.request, None)
        if asked is None:
            return  # unsubscribed, or closed, meanwhile
        conn, command = asked
        del self._pending[conn, command.channel]
        opening = self._opening.get(conn)
        if opening is not None:
            opening.positions[answer.channel] = (answer.epoch, answer.offset)
            opening.waiting.discard(answer.channel)
            if not opening.waiting and not opening.done.done():
                opening.done.set_result(None)
            return
        replayed = answer.frames
        recovered = answer.recovered
        if recovered and sum(map(len, replayed)) > self._config().limits.client_queue_bytes:
            recovered, replayed = False, ()
        conn.send_text(frames.subscribed(answer.channel, answer.epoch, answer.offset,
                                         recovered, len(replayed)))
        for text in replayed:
            conn.send_text(text)

    def deliver_channel(self, channel: str, frame: str) -> None:
        members = self.subscriptions.subscribers(channel)
        if not members:
            return
        pending, opening = self._pending, self._opening
        ready = []
        for conn in members:
            if (conn, channel) in pending:
                continue
            if conn in opening:
                opening[conn].early.append(frame)
            else:
                ready.append(conn)
        self._fanout.send_to(ready, encode_frame(frame.encode()))

    def presence(self, change: PresenceChange) -> None:
        watching = self._presence.get(change.channel)
        if not watching:
            return
        text = frames.presence(change.channel, change.client_id, change.joined)
        ready = [conn for conn in watching
                 if (conn, change.channel) not in self._pending and conn not in self._opening]
        self._fanout.send_to(ready, encode_frame(text.encode()))

    def direct(self, client_id: str, frame: str) -> int:
        reached = list(self._local(client_id))
        self._fanout.send_to(reached, encode_frame(frame.encode()))
        self._metrics.direct_messages.inc(len(reached))
        return len(reached)

    @property
    def unanswered(self) -> int:
        """Subscriptions asked of the route and not answered yet."""
        return len(self._asked)

    def _counted(self) -> None:
        self._metrics.channels.set(self.subscriptions.channels)
        self._metrics.subscriptions.set(self.subscriptions.subscriptions)
