"""systemd's sd_notify protocol, spoken directly over the datagram socket.

See sd_notify(3): when ``NOTIFY_SOCKET`` is set, each notification is one datagram
of newline-separated ``KEY=VALUE`` assignments sent to that AF_UNIX socket (a name
starting with ``@`` is in the abstract namespace). When it is not set, every method
does nothing. Failures to send are logged, never raised: systemd going away must
not take the daemon down.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

from tornado.ioloop import PeriodicCallback

log = logging.getLogger(__name__)


class SystemdNotifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._sock: socket.socket | None = None
        self._failed = False
        self.watchdog_interval = _watchdog_interval(env)
        self._watchdog: PeriodicCallback | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; True if it was sent."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            if not self._failed:
                log.warning("sd_notify to %s failed: %s", self._address.lstrip("\0"), exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def stopping(self, status: str) -> bool:
        return self.notify("STOPPING=1", f"STATUS={status}")

    def progress(self, status: str, extend_seconds: float) -> bool:
        """STATUS plus EXTEND_TIMEOUT_USEC, so systemd keeps waiting for the drain."""
        return self.notify(f"STATUS={status}",
                           f"EXTEND_TIMEOUT_USEC={int(extend_seconds * 1_000_000)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def start_watchdog(self) -> None:
        """WATCHDOG=1 every ``watchdog_interval`` from the event loop itself (when
        systemd asks for it), so that a stuck loop is what systemd sees."""
        if self.watchdog_interval and self._watchdog is None:
            self._watchdog = PeriodicCallback(self._beat, self.watchdog_interval * 1000)
            self._watchdog.start()

    def _beat(self) -> None:
        self.watchdog()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of WATCHDOG_USEC, when it is for us."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000
