"""The interface between customer events and durable delivery."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from aiohttp import web

DeliveryState = Literal["waiting", "delivered", "dead", "dropped"]


class SpoolFull(Exception):
    """The spool is at a bound and its policy is to refuse new events."""


@dataclass(frozen=True, slots=True)
class DeliveryUpdate:
    """A change in an event's delivery state (for the dashboard and logs)."""

    event_id: str
    customer_id: str
    event: str
    state: DeliveryState
    detail: str = ""


class EventQueue(Protocol):
    """Accepts experience events durably; delivers them in the background."""

    async def submit(self, customer_id: str, event: str, *, session_id: str | None = None) -> str:
        """Commit ``{"UUID": customer_id, "EVENT": event}`` to disk; return its id once durable. Raises SpoolFull."""

    def subscribe(self, callback: Callable[[DeliveryUpdate], None]) -> Callable[[], None]:
        """Call ``callback`` on the loop for every state change; returns an unsubscribe function."""


EVENT_QUEUE = web.AppKey("event_queue", EventQueue)
"""The daemon's event queue."""
