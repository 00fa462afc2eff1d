"""The interface between customer events and durable delivery."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from aiohttp import web

from edgevoice.delivery.store import OpenSession

__all__ = ["EVENT_QUEUE", "DeliveryState", "DeliveryUpdate", "EventQueue", "OpenSession", "SessionEffect", "SpoolFull"]

DeliveryState = Literal["waiting", "delivered", "dead", "dropped"]

SessionEffect = Literal["keyword", "end"]
"""What an event does to its customer session's record, in the same commit as the event:
``keyword`` remembers the event as fired in the session; ``end`` forgets the session."""


class SpoolFull(Exception):
    """The event was not accepted: the spool is at a bound (and its policy is to refuse new events), or the disk
    cannot be written and ``events.memory_max_events`` events are already held in memory."""


@dataclass(frozen=True, slots=True)
class DeliveryUpdate:
    """A change in an event's delivery state (for the dashboard and logs)."""

    event_id: str
    customer_id: str
    event: str
    state: DeliveryState
    detail: str = ""


class EventQueue(Protocol):
    """Accepts experience events durably; delivers them in the background; remembers open customer sessions."""

    async def submit(
        self, customer_id: str, event: str, *, session_id: str | None = None, effect: SessionEffect | None = None
    ) -> str:
        """Accept ``{"UUID": customer_id, "EVENT": event}``; return its id once it is on disk (or, while the disk
        cannot be written, held in memory and retried). Raises SpoolFull, ValueError (bad ids)."""

    def subscribe(self, callback: Callable[[DeliveryUpdate], None]) -> Callable[[], None]:
        """Call ``callback`` on the loop for every state change; returns an unsubscribe function."""

    def stream_attached(self, session_id: str, customer_id: str, stream_id: str) -> None:
        """Record that a stream now feeds this customer session (committed with the next group)."""

    def stream_detached(self, session_id: str, customer_id: str, stream_id: str) -> None:
        """Record that a stream no longer feeds this customer session (the session stays open until ``end``)."""

    def open_sessions(self) -> list[OpenSession]:
        """The customer sessions that were open when the daemon last stopped (after a crash: still seated)."""


EVENT_QUEUE = web.AppKey("event_queue", EventQueue)
"""The daemon's event queue."""
