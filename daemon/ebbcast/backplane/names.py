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
