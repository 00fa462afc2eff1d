"""Ordered hand-off of fired events to the event queue: one customer's events in the order they fired.

Runs on the event loop. :meth:`EventSubmitter.submit` never waits: it chains a
task behind the customer's previous one, so a slow disk commit delays only
that customer's later events, never recognition or other customers. Bounded by
the event queue (a full spool refuses, and that is logged); a task finished is
forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from edgevoice.delivery.api import EventQueue, SpoolFull
from edgevoice.events.sessions import CustomerKey, CustomerSession

log = logging.getLogger("edgevoice.events")


class EventSubmitter:
    """Submits events to ``queue`` (None: logged as not delivered) in per-customer order."""

    def __init__(self, queue: EventQueue | None) -> None:
        self.queue = queue
        self._chains: dict[CustomerKey, asyncio.Future[None]] = {}
        self._pending: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        """Events fired but not yet handed to the queue."""
        return len(self._pending)

    def submit(self, customer: CustomerSession, event: str) -> None:
        """Hand the event to the queue after the customer's earlier events (order kept per customer)."""
        key = customer.key
        previous = self._chains.get(key)
        task = asyncio.ensure_future(self._submit_after(previous, customer, event))
        self._chains[key] = task
        self._pending.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._pending.discard(t)
            if self._chains.get(key) is t:
                del self._chains[key]

        task.add_done_callback(done)

    async def drain(self) -> None:
        """Wait until every event submitted so far has been handed to the queue."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _submit_after(self, previous: asyncio.Future[None] | None, customer: CustomerSession, event: str) -> None:
        if previous is not None:
            with contextlib.suppress(BaseException):
                await previous
        if self.queue is None:
            log.error("no event queue: %s for customer %s is not delivered", event, customer.customer_id)
            return
        try:
            event_id = await self.queue.submit(customer.customer_id, event, session_id=customer.session_id)
            log.debug("event %s (%s for %s) committed", event_id, event, customer.customer_id)
        except SpoolFull as exc:
            log.error("EVENT REFUSED: %s for customer %s - spool full: %s", event, customer.customer_id, exc)
        except Exception:
            log.exception("EVENT LOST: %s for customer %s could not be queued", event, customer.customer_id)
