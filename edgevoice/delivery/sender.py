"""The HTTP sender: POSTs waiting events to the experience-event API, in order per customer.

Each customer has a queue (events in spool order). Only the head of a queue is
ever in flight, so a customer's events arrive in the order they fired; heads of
different customers go out concurrently, at most ``events.concurrency`` at once.
A dispatcher picks the customer whose head is due soonest (oldest event first).

Thread model: everything runs on the event loop; the spool's writer thread
only reaches it through the spool's listener callbacks. Bounds: at most
``events.concurrency`` requests in flight, one per customer; response bodies
read up to 64 KiB.

Outcomes: 2xx deletes the event; timeouts, connection errors, 5xx, redirects
and the 4xx listed in ``events.retry_4xx`` are retried after a full-jitter
exponential backoff (``retry_base_s`` doubling up to ``retry_cap_s``), or after
``Retry-After`` when the API sends one (a 429 or 503 with Retry-After pauses
every customer, not just the one that got it); any other 4xx moves the event
to the dead-letter table with the response. Redirects are never followed: a
client following a 301/302/303 turns the POST into a bodyless GET, and a 200
from the page it lands on would count as delivered. An event that waited
longer than ``max_age_s`` (on the spool clock) is dead-lettered instead of
being sent.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Literal

import aiohttp

from edgevoice.config import EventsSettings
from edgevoice.delivery.api import DeliveryUpdate
from edgevoice.delivery.spool import Spool
from edgevoice.delivery.store import Event
from edgevoice.logs import fields
from edgevoice.metrics import Metrics

log = logging.getLogger("edgevoice.delivery")

RETRY_AFTER_MAX_S = 3600.0
"""Longest Retry-After honoured (a bogus header must not park events for days)."""
_BODY_LIMIT = 64 * 1024

Outcome = Literal["delivered", "http_error", "redirected", "timeout", "connection_error", "rejected", "expired"]


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one POST came to."""

    outcome: Outcome
    status: int | None = None
    response: str = ""
    retry_after: float | None = None
    error: str = ""


def _extra(**values: object) -> dict[str, str]:
    """journald fields for a log call's ``extra=``."""
    return fields(**values)["extra"]


def payload(ev: Event) -> str:
    """The request body: exactly ``{"UUID": customer_id, "EVENT": event}``."""
    return json.dumps({"UUID": ev.customer_id, "EVENT": ev.event}, ensure_ascii=False)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def backoff(attempts: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(cap, base * 2**(attempts-1)))."""
    return rng() * min(cap, base * 2.0 ** min(max(attempts - 1, 0), 62))


class Sender:
    """Delivers the events the spool holds; owns the in-memory view of who waits for what."""

    def __init__(
        self,
        settings: EventsSettings,
        spool: Spool,
        *,
        notify: Callable[[DeliveryUpdate], None] = lambda u: None,
        metrics: Metrics | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.notify = notify
        self.metrics = metrics
        self.rng = rng
        self.pending: dict[str, deque[Event]] = {}
        self.inflight: dict[str, Event] = {}
        self.paused_until = 0.0
        self.last_error: str | None = None
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._ids: set[str] = set()

    # -- the in-memory view --------------------------------------------------

    @property
    def depth(self) -> int:
        """Events waiting (in flight included)."""
        return len(self._ids)

    def oldest_enqueued(self) -> float | None:
        """Spool-clock time the oldest waiting event was queued (safe to call from the metrics thread)."""
        oldest: float | None = None
        for q in list(self.pending.values()):  # a copy: the loop may change the dict meanwhile
            try:
                enqueued = min(e.enqueued for e in list(q)[:8])  # a re-queued head may be younger than the next
            except ValueError:
                continue
            if oldest is None or enqueued < oldest:
                oldest = enqueued
        return oldest

    def known(self) -> list[Event]:
        """Every waiting event held in the in-memory view (in flight included)."""
        return [e for q in self.pending.values() for e in q]

    def add(self, events: list[Event]) -> None:
        """New waiting events (from the spool, in commit order)."""
        now = time.monotonic()
        for ev in events:
            if ev.id in self._ids:
                continue
            self._ids.add(ev.id)
            q = self.pending.get(ev.customer_id)
            if q is None:
                q = self.pending[ev.customer_id] = deque()
            if not q or q[-1].order < ev.order:
                q.append(ev)  # the usual case: spool order
            else:  # re-queued from the dead letters: back to its place (never ahead of the request in flight)
                pos = bisect.bisect([e.order for e in q], ev.order)
                q.insert(max(pos, 1 if ev.customer_id in self.inflight else 0), ev)
            self._schedule(ev.customer_id, now)

    def remove(self, events: list[Event]) -> None:
        """Events the spool removed itself (dropped, expired)."""
        for ev in events:
            self._forget(ev)

    def _forget(self, ev: Event) -> bool:
        q = self.pending.get(ev.customer_id)
        if not q:
            return False
        for i, e in enumerate(q):
            if e.id == ev.id:
                del q[i]
                self._ids.discard(ev.id)
                if not q:
                    del self.pending[ev.customer_id]
                    self._due.pop(ev.customer_id, None)
                return True
        return False

    def _schedule(self, customer: str, due: float, *, later: bool = False) -> None:
        """Make ``customer`` eligible at ``due`` (earlier wins unless ``later``: backoff replaces it)."""
        if customer in self.inflight or not self.pending.get(customer):
            return
        current = self._due.get(customer)
        if current is not None and not later and current <= due:
            return
        self._due[customer] = due
        heapq.heappush(self._heap, (due, self.pending[customer][0].order, customer))
        self._wake.set()

    # -- running -------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until cancelled."""
        s = self.settings
        assert s.url, "Sender.run needs events.url"
        connector = aiohttp.TCPConnector(limit=s.concurrency)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=s.timeout_s), raise_for_status=False
        )
        try:
            await self._dispatch()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._session.close()

    async def _dispatch(self) -> None:
        while True:
            self._wake.clear()
            now = time.monotonic()
            wait: float | None = None
            if self.paused_until > now:
                wait = self.paused_until - now
            elif len(self.inflight) >= self.settings.concurrency:
                wait = None
            else:
                while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
                    heapq.heappop(self._heap)  # stale entry
                if self._heap:
                    due, _, customer = self._heap[0]
                    if due <= now:
                        heapq.heappop(self._heap)
                        del self._due[customer]
                        self._start(customer)
                        continue
                    wait = due - now
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    def _start(self, customer: str) -> None:
        head = self.pending[customer][0]
        if self.spool.clock() - head.enqueued > self.settings.max_age_s:
            self._forget(head)
            reason = f"expired: waited longer than max_age_s={self.settings.max_age_s:g}"
            self.spool.bury(head.id, reason, None, head.last_error)
            self._count("expired")
            if self.metrics is not None:
                self.metrics.spool_events.labels("expired").inc()
            self.notify(DeliveryUpdate(head.id, head.customer_id, head.event, "dead", reason))
            self._schedule(customer, time.monotonic())
            return
        self.inflight[customer] = head
        task = asyncio.create_task(self._deliver(customer, head), name=f"deliver-{head.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, customer: str, ev: Event) -> None:
        try:
            result = await self.post(ev)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an odd client error: retry rather than lose the event
            log.exception("API REQUEST failed unexpectedly for %s - customer %s", ev.event, customer)
            result = Attempt("connection_error", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.inflight.pop(customer, None)
            self._wake.set()
        self._count(result.outcome)
        if result.outcome == "delivered":
            self._forget(ev)
            self.spool.delete(ev.id)
            self.notify(DeliveryUpdate(ev.id, customer, ev.event, "delivered", result.response))
            self._schedule(customer, time.monotonic())
        elif result.outcome == "rejected":
            self._forget(ev)
            self.spool.bury(ev.id, f"HTTP {result.status}", result.status, result.response)
            self.notify(DeliveryUpdate(ev.id, customer, ev.event, "dead", f"HTTP {result.status}: {result.response}"))
            self._schedule(customer, time.monotonic())
        else:
            self._retry_later(customer, ev, result)

    def _retry_later(self, customer: str, ev: Event, result: Attempt) -> None:
        ev.attempts += 1
        s = self.settings
        if result.retry_after is not None:
            delay = result.retry_after
            if result.status in (429, 503):
                self.paused_until = max(self.paused_until, time.monotonic() + delay)
        else:
            delay = backoff(ev.attempts, s.retry_base_s, s.retry_cap_s, self.rng)
        if result.outcome == "redirected":
            what = result.error
        else:
            what = f"HTTP {result.status}" if result.status is not None else result.error or result.outcome
        self.last_error = what
        ev.last_error = what
        self.spool.record_failure(ev.id, ev.attempts, what)
        log.info(
            "API RETRY: %s for customer %s in %.2f s (attempt %d failed: %s)",
            ev.event,
            customer,
            delay,
            ev.attempts,
            what,
            extra=_extra(customer_id=customer, event=ev.event),
        )
        self.notify(DeliveryUpdate(ev.id, customer, ev.event, "waiting", f"{what}; retry in {delay:.1f} s"))
        self._schedule(customer, time.monotonic() + delay, later=True)

    def _count(self, outcome: Outcome) -> None:
        if self.metrics is not None:
            self.metrics.deliveries.labels(outcome).inc()

    # -- one POST ------------------------------------------------------------

    async def post(self, ev: Event) -> Attempt:
        """POST one event and classify the answer; logs in the seed's form."""
        url = self.settings.url
        assert url and self._session is not None
        body = payload(ev)
        extra = _extra(customer_id=ev.customer_id, event=ev.event, event_id=ev.id)
        log.info("API REQUEST: Calling %s with payload: %s", url, body, extra=extra)
        headers = {"Content-Type": "application/json", "Idempotency-Key": ev.id}
        try:
            async with self._session.post(url, data=body.encode(), headers=headers, allow_redirects=False) as resp:
                raw = await resp.content.read(_BODY_LIMIT)
                text = raw.decode(resp.get_encoding() if resp.charset else "utf-8", errors="replace")
                status = resp.status
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                location = resp.headers.get("Location")
        except asyncio.TimeoutError:
            log.warning(
                "API TIMEOUT: %s for customer %s - Request took longer than %g seconds",
                ev.event,
                ev.customer_id,
                self.settings.timeout_s,
                extra=extra,
            )
            return Attempt("timeout", error=f"timeout after {self.settings.timeout_s:g} s")
        except aiohttp.ClientError as exc:
            log.warning(
                "API CONNECTION ERROR: %s for customer %s - Error: %s", ev.event, ev.customer_id, exc, extra=extra
            )
            return Attempt("connection_error", error=str(exc) or type(exc).__name__)
        shown = text.strip()[:500]
        if 200 <= status < 300:
            log.info("API SUCCESS: %s for customer %s - Response: %s", ev.event, ev.customer_id, shown, extra=extra)
            return Attempt("delivered", status, shown)
        if 300 <= status < 400:
            log.warning(
                "API REDIRECT: HTTP %d for %s - customer %s - Location: %s (not followed: event POSTs never follow "
                "redirects; retrying - if the API moved, set events.url to its new address)",
                status,
                ev.event,
                ev.customer_id,
                location,
                extra=extra,
            )
            return Attempt("redirected", status, shown, retry_after, f"HTTP {status} redirect to {location}")
        log.warning(
            "API ERROR: HTTP %d for %s - customer %s - Response: %s",
            status,
            ev.event,
            ev.customer_id,
            shown,
            extra=extra,
        )
        if 400 <= status < 500 and status not in self.settings.retry_4xx:
            log.error(
                "API REJECTED: %s for customer %s moved to dead-letter (HTTP %d is not in events.retry_4xx; "
                "see `edgevoice spool dead`)",
                ev.event,
                ev.customer_id,
                status,
                extra=extra,
            )
            return Attempt("rejected", status, text[:2000])
        return Attempt("http_error", status, shown, retry_after)
