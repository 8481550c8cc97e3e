"""The exit statuses of ``ebbcast`` commands (the command line and ``ebbcast client``)."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0             # a normal stop, or a drain however it ended
    FAILURE = 1        # an unexpected failure
    USAGE = 2          # invalid usage or configuration
    BIND = 3           # a listener could not be bound
