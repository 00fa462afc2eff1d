"""The systemd notify protocol, written directly to ``$NOTIFY_SOCKET``.

Without ``$NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same
under systemd, in a terminal and in tests.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)


class Notifier:
    """Sends ``READY=1``, ``STATUS=``, ``WATCHDOG=1``, ``EXTEND_TIMEOUT_USEC=`` and ``STOPPING=1``."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self._address = ("\0" + address[1:]) if address and address.startswith("@") else (address or "")
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        """Whether a notify socket is configured."""
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """Send one datagram of newline-separated ``KEY=VALUE`` fields; never raises."""
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:  # systemd gone or socket full: never fatal
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str = "serving") -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval() -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, when the watchdog is on for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2_000_000, 0.05)
    except ValueError:
        return None


async def run_watchdog(notifier: Notifier, interval: float, healthy: Callable[[], bool]) -> None:
    """Ping ``WATCHDOG=1`` from the event loop itself while ``healthy()`` holds."""
    while True:
        if healthy():
            notifier.send("WATCHDOG=1")
        else:
            log.error("health check failing: withholding the systemd watchdog ping")
        await asyncio.sleep(interval)


async def extend_while(notifier: Notifier, status: str, every_s: float = 5.0) -> None:
    """While cancelled-not, keep extending the start timeout (long model loads)."""
    notifier.status(status)
    while True:
        notifier.extend_timeout(every_s * 3)
        await asyncio.sleep(every_s)
