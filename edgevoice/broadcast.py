"""Fan-out of messages to subscribers, on the event loop.

Bounds and threads: :meth:`Broadcast.publish` runs on the loop and calls every
subscriber in turn; subscribers must not block (they queue what they need). A
subscriber that raises is logged and the others still get the message.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Broadcast(Generic[T]):
    """Subscribers of one kind of message; ``what`` names them in the log when one fails."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self._log = log
        self._what = what
        self._subscribers: list[Callable[[T], None]] = []

    def __bool__(self) -> bool:
        """Whether anyone listens (lets a publisher skip building a message nobody reads)."""
        return bool(self._subscribers)

    def subscribe(self, callback: Callable[[T], None]) -> Callable[[], None]:
        """Call ``callback`` with every message from now on; returns the unsubscribe function."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def publish(self, message: T) -> None:
        """Hand ``message`` to every subscriber (a snapshot of them: one may unsubscribe while called)."""
        for callback in list(self._subscribers):
            try:
                callback(message)
            except Exception:
                self._log.exception("%s failed", self._what)
