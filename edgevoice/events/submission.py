"""Ordered hand-off of fired events to the event queue: one customer's events in the order they fired, none lost.

Runs on the event loop. :meth:`EventSubmitter.submit` never waits: it chains a
task behind the customer's previous one, so a slow disk commit delays only that
customer's later events, never recognition or other customers. A submit the queue
refuses (``SpoolFull``) or fails (a spool error) is retried in place with backoff
(``retry_base_s`` doubling to ``retry_cap_s``): the customer's later events wait
behind it, so order is kept and nothing is lost; every failure is counted, the
first of each event logged. Only a ``ValueError`` (the queue rejects the event
itself) is final. Bounds: at most :data:`MAX_UNQUEUED` events waiting for the
queue at once; beyond that new events are refused and logged as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from edgevoice.delivery.api import EventQueue, SessionEffect, SpoolFull
from edgevoice.events.sessions import CustomerKey, CustomerSession

log = logging.getLogger("edgevoice.events")

MAX_UNQUEUED = 10_000
"""Events fired but not yet accepted by the queue (a spool refusing for long); more are lost, logged."""
RETRY_BASE_S = 0.5
RETRY_CAP_S = 30.0

Accepted = Callable[[CustomerSession, str, str], None]
"""Called on the loop with (customer, event, event_id) once the queue accepted an event."""


@dataclass(frozen=True, slots=True)
class Unqueued:
    """An event fired but not (yet) accepted by the queue."""

    customer_id: str
    session_id: str
    event: str
    attempts: int


@dataclass(slots=True)
class _Pending:
    customer: CustomerSession
    event: str
    effect: SessionEffect | None = None
    attempts: int = 0


class EventSubmitter:
    """Submits events to ``queue`` (None: logged as not delivered) in per-customer order, retrying failures."""

    def __init__(
        self,
        queue: EventQueue | None,
        *,
        on_accepted: Accepted | None = None,
        on_failure: Callable[[str], None] | None = None,
        retry_base_s: float = RETRY_BASE_S,
        retry_cap_s: float = RETRY_CAP_S,
        max_unqueued: int = MAX_UNQUEUED,
    ) -> None:
        self.queue = queue
        self.on_accepted = on_accepted
        self.on_failure = on_failure
        """Called with the failure's kind ("full" or "error") for every failed submit (metrics)."""
        self.retry_base_s = retry_base_s
        self.retry_cap_s = retry_cap_s
        self.max_unqueued = max_unqueued
        self.failures = 0
        self.lost = 0
        self._chains: dict[CustomerKey, asyncio.Future[None]] = {}
        self._pending: dict[asyncio.Task[None], _Pending] = {}

    def __len__(self) -> int:
        """Events fired but not yet accepted by the queue."""
        return len(self._pending)

    def unqueued(self) -> list[Unqueued]:
        """The events not accepted yet (in firing order per customer)."""
        return [
            Unqueued(p.customer.customer_id, p.customer.session_id, p.event, p.attempts) for p in self._pending.values()
        ]

    def submit(self, customer: CustomerSession, event: str, effect: SessionEffect | None = None) -> None:
        """Hand the event to the queue after the customer's earlier events (order kept per customer); ``effect``
        says what it does to the persisted session record, in the same commit (see EventQueue.submit)."""
        if len(self._pending) >= self.max_unqueued:
            self.lost += 1
            log.error(
                "EVENT LOST: %s for customer %s - %d events are already waiting for the event queue",
                event,
                customer.customer_id,
                len(self._pending),
            )
            return
        key = customer.key
        previous = self._chains.get(key)
        state = _Pending(customer, event, effect)
        task = asyncio.ensure_future(self._submit_after(previous, state))
        self._chains[key] = task
        self._pending[task] = state

        def done(t: asyncio.Task[None]) -> None:
            self._pending.pop(t, None)
            if self._chains.get(key) is t:
                del self._chains[key]

        task.add_done_callback(done)

    async def drain(self) -> None:
        """Wait until every event submitted so far has been accepted by the queue (or rejected as invalid)."""
        while self._pending:
            await asyncio.wait(list(self._pending))  # cancelling the wait leaves the submits running

    async def _submit_after(self, previous: asyncio.Future[None] | None, state: _Pending) -> None:
        if previous is not None:
            with contextlib.suppress(BaseException):
                await previous
        customer, event = state.customer, state.event
        if self.queue is None:
            log.error("no event queue: %s for customer %s is not delivered", event, customer.customer_id)
            return
        delay = self.retry_base_s
        while True:
            try:
                event_id = await self.queue.submit(
                    customer.customer_id, event, session_id=customer.session_id, effect=state.effect
                )
            except ValueError as exc:
                log.error(
                    "EVENT REJECTED: %s for customer %s - the event queue refuses it: %s",
                    event,
                    customer.customer_id,
                    exc,
                )
                return
            except Exception as exc:
                state.attempts += 1
                attempts = state.attempts
                self.failures += 1
                if self.on_failure is not None:
                    self.on_failure("full" if isinstance(exc, SpoolFull) else "error")
                if attempts == 1:
                    log.error(
                        "EVENT NOT QUEUED YET: %s for customer %s - %s: %s; retrying, the customer's later events wait",
                        event,
                        customer.customer_id,
                        "spool full" if isinstance(exc, SpoolFull) else "event queue failed",
                        exc or type(exc).__name__,
                    )
                else:
                    log.debug("event %s for %s: attempt %d failed: %s", event, customer.customer_id, attempts, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_cap_s)
                continue
            if state.attempts:
                log.warning(
                    "event %s (%s for customer %s) queued after %d failed attempt(s)",
                    event_id,
                    event,
                    customer.customer_id,
                    state.attempts,
                )
            else:
                log.debug("event %s (%s for %s) committed", event_id, event, customer.customer_id)
            if self.on_accepted is not None:
                self.on_accepted(customer, event, event_id)
            return
