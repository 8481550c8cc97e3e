"""The names of ebbcast's Redis keys and channels, each ``<prefix>:<name>`` under
``backplane.prefix`` (default ``ebbcast``), so that deployments sharing one Redis
(staging and production, two applications) never see each other's broadcasts,
offsets or nodes. A prefix has no ``:``, so no deployment's names are inside
another's."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

DEFAULT_PREFIX = "ebbcast"


@dataclass(frozen=True)
class RedisNames:
    prefix: str = DEFAULT_PREFIX

    def _named(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    @property
    def channel(self) -> str:
        """Frames published as they are (the raw envelope, client frames)."""
        return self._named("broadcast")

    @property
    def sequenced_channel(self) -> str:
        """Sequenced broadcasts: ``<epoch>\\n<offset>\\n``, then an Envelope."""
        return self._named("sequenced")

    @property
    def stream(self) -> str:
        """The history: a capped stream, entry ids ``0-<offset>``."""
        return self._named("history")

    @property
    def keys(self) -> list[str]:
        """The sequencing scripts' KEYS: the epoch, the offset counter, the stream,
        and the replication id of the master the epoch was made on."""
        return [self._named("epoch"), self._named("offset"), self.stream,
                self._named("epoch:replid")]

    # -- channels (SPEC 14): a channel's names hold it after a "/", which no channel
    # name has, so that no channel's names are another's

    def channel_topic(self, channel: str) -> str:
        """The pub/sub channel of a channel: its messages (``m``), joins and leaves (``p``)."""
        return self._named(f"c/{channel}")

    def channel_keys(self, channel: str) -> list[str]:
        """A channel's sequencing keys, as ``keys`` are the global stream's; and the
        sorted set of every channel with a history, by when last published."""
        base = self._named(f"c/{channel}/")
        return [f"{base}epoch", f"{base}offset", f"{base}history", f"{base}epoch:replid",
                self._named("channels")]

    @property
    def channel_key_base(self) -> str:
        """What a channel's keys begin with, before its name (for the scripts)."""
        return self._named("c/")

    def presence_key(self, channel: str, instance: str) -> str:
        """One instance's subscribers to ``channel``: a JSON object, client id to count."""
        return f"{self.presence_keys}{channel}/{instance}"

    @property
    def presence_keys(self) -> str:
        """What every presence key begins with (``SCAN MATCH <this>*``)."""
        return self._named("p:")

    @property
    def direct_topic(self) -> str:
        """Direct messages, for every instance: ``<instance>\n<client id>\n<frame>``."""
        return self._named("direct")

    def node_key(self, instance: str, member: str) -> str:
        """Where one serving process of ``instance`` keeps the URL it advertises."""
        return f"{self.instance_keys(instance)}{member}"

    def instance_keys(self, instance: str) -> str:
        """What every node key of ``instance`` begins with."""
        return f"{self.node_keys}{instance}/"

    @property
    def node_keys(self) -> str:
        """What every node key begins with (``SCAN MATCH <this>*``)."""
        return self._named("node:")


def new_instance_id() -> str:
    """An id for one daemon: its main process and every serving process it starts,
    through upgrades. Host and pid, and a random part: two instances may share a
    pid (containers) or a process (tests)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
