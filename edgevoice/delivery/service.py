"""The daemon's :class:`~edgevoice.delivery.api.EventQueue`: the spool plus the sender, metrics and health; its wiring.

Thread model: everything here runs on the event loop; the spool's writer
thread reports through the :class:`~edgevoice.delivery.spool.SpoolListener`
callbacks, called on the loop. Bounds: those of the spool and the sender.

Health: ``/health`` ``spool`` section; ``degraded`` (also ``error``) says why
the spool cannot be written, while events are held in memory. That answers
``/health`` with 503 (through ``HEALTH_DEGRADED``) and sets
``edgevoice_spool_degraded``, but keeps the systemd watchdog ping: a restart
cures neither a held lock nor a full disk, and would lose the events held in
memory. A dead writer thread or sender fails ``HEALTH_CHECKS`` (no watchdog
ping: systemd restarts the daemon, which resends everything on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edgevoice.broadcast import Broadcast
from edgevoice.config import EventsSettings
from edgevoice.delivery import store
from edgevoice.delivery.api import EVENT_QUEUE, DeliveryState, DeliveryUpdate, SessionEffect, SpoolFull
from edgevoice.delivery.sender import Sender
from edgevoice.delivery.spool import Spool
from edgevoice.delivery.store import Event, OpenSession
from edgevoice.metrics import METRICS, Metrics
from edgevoice.server.keys import HEALTH_CHECKS, HEALTH_DEGRADED, HEALTH_SECTIONS, NOTIFIER, SETTINGS
from edgevoice.systemd import Notifier

log = logging.getLogger("edgevoice.delivery")

MAX_ID_CHARS = 256


def _check(name: str, value: object, limit: int) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if len(value) > limit:
        raise ValueError(f"{name} is {len(value)} characters long; at most {limit} are allowed")


class _SpoolMetrics(Collector):
    """The spool's degraded-mode metrics, on the daemon's registry (read at scrape time)."""

    def __init__(self, metrics: Metrics, service: DeliveryService) -> None:
        self.service = service
        metrics.registry.register(self)

    def collect(self) -> Iterable[Metric]:
        sp = self.service.spool
        yield GaugeMetricFamily(
            "edgevoice_spool_degraded",
            "1 while the spool cannot be written (events held in memory)",
            sp.degraded is not None,
        )
        yield GaugeMetricFamily("edgevoice_spool_held", "Events held in memory, not yet on disk", sp.held)
        yield CounterMetricFamily(
            "edgevoice_spool_write_failures",
            "Spool commits the disk did not take (kept and retried)",
            sp.stats.write_failures,
        )


class DeliveryService:
    """Accepts events durably (:meth:`submit`) and delivers them in the background."""

    def __init__(
        self,
        settings: EventsSettings,
        state_dir: Path,
        *,
        min_free_mb: int = 0,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.notifier = notifier
        self.spool = Spool(store.spool_path(state_dir), settings, min_free_mb=min_free_mb, listener=self)
        self.sender = Sender(settings, self.spool, notify=self._notify, metrics=metrics)
        self._updates = Broadcast[DeliveryUpdate](log, "delivery subscriber")
        self._spool_metrics = _SpoolMetrics(metrics, self) if metrics is not None else None
        self._task: asyncio.Task[None] | None = None
        self._started = False

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (off the loop), load what waits, start sending when a URL is configured."""
        waiting = await self.spool.open()
        self.sender.add(waiting)
        self._started = True
        if waiting:
            log.info("spool %s: %d event(s) waiting from before", self.spool.path, len(waiting))
        sessions = self.spool.open_sessions()
        if sessions:
            log.info("spool: %d customer session(s) were open when the daemon last stopped", len(sessions))
        if self.settings.url:
            self._task = asyncio.create_task(self.sender.run(), name="event-sender")
            self._task.add_done_callback(self._sender_done)
        else:
            log.warning(
                "events.url is not set: experience events are kept on disk in %s and not sent (%d waiting)",
                self.spool.path,
                len(waiting),
            )
        m = self.metrics
        if m is not None:
            m.spool_depth.set_function(lambda: self.spool.counts.waiting)
            m.spool_dead.set_function(lambda: self.spool.counts.dead)
            m.spool_oldest_age.set_function(self._oldest_age)

    @staticmethod
    def _sender_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("event sender stopped: %r (events stay on disk; /health reports degraded)", task.exception())

    async def close(self) -> None:
        """Stop sending (in-flight requests are abandoned and resent after restart), commit and close the spool."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.spool.close()

    @property
    def alive(self) -> bool:
        """False when the writer thread or the sender died (withholds the watchdog ping)."""
        if not self._started:
            return True
        return self.spool.alive and (self._task is None or not self._task.done())

    def degraded(self) -> str | None:
        """Why events are not safe on disk now (for ``/health``), or None."""
        reason = self.spool.degraded
        if reason is None:
            return None
        return f"event spool: {reason}; {self.spool.held} event(s) held in memory, retrying"

    # -- EventQueue ----------------------------------------------------------

    async def submit(
        self, customer_id: str, event: str, *, session_id: str | None = None, effect: SessionEffect | None = None
    ) -> str:
        """Accept the event; return its id once on disk (or held in memory while the disk does not answer).

        Raises SpoolFull (bounds), ValueError (bad input), SpoolError (closed spool).
        """
        _check("customer_id", customer_id, MAX_ID_CHARS)
        _check("event", event, MAX_ID_CHARS)
        if session_id is not None:
            _check("session_id", session_id, MAX_ID_CHARS)
        if effect not in (None, "keyword", "end"):
            raise ValueError(f"effect must be 'keyword', 'end' or None, got {effect!r}")
        if effect is not None and session_id is None:
            raise ValueError(f"effect={effect!r} needs a session_id")
        event_id = str(uuid.uuid4())
        try:
            ev = await self.spool.append(event_id, customer_id, event, session_id, effect=effect)
        except SpoolFull as exc:
            self._spool_count("refused")
            self._notify(DeliveryUpdate(event_id, customer_id, event, "dropped", str(exc)))
            raise
        self._spool_count("accepted")
        detail = "accepted" if ev.seq else f"accepted, held in memory: {self.spool.degraded}"
        self._notify(DeliveryUpdate(event_id, customer_id, event, "waiting", detail))
        return event_id

    def subscribe(self, callback: Callable[[DeliveryUpdate], None]) -> Callable[[], None]:
        return self._updates.subscribe(callback)

    def stream_attached(self, session_id: str, customer_id: str, stream_id: str) -> None:
        self.spool.attach_stream(session_id, customer_id, stream_id)

    def stream_detached(self, session_id: str, customer_id: str, stream_id: str) -> None:
        self.spool.detach_stream(session_id, customer_id, stream_id)

    def open_sessions(self) -> list[OpenSession]:
        return self.spool.open_sessions()

    def _notify(self, update: DeliveryUpdate) -> None:
        self._updates.publish(update)

    # -- SpoolListener ---------------------------------------------------------

    def spool_added(self, events: list[Event]) -> None:
        self.sender.add(events)

    def spool_removed(self, events: list[Event], state: DeliveryState, detail: str) -> None:
        self.sender.remove(events)
        self._spool_count("dropped" if state == "dropped" else "expired", len(events))
        for ev in events:
            self._notify(DeliveryUpdate(ev.id, ev.customer_id, ev.event, state, detail))

    def spool_state(self, degraded: str | None) -> None:
        if self.notifier is not None:
            self.notifier.status(f"degraded: {self.degraded()}" if degraded else "serving")

    def spool_replaced(self, moved_aside: Path) -> None:
        known = self.sender.known()
        log.error(
            "spool %s was damaged while running: moved aside to %s; writing back the %d waiting event(s) known in memory",
            self.spool.path,
            moved_aside,
            len(known),
        )
        self.spool.restore(known)

    # -- observability ---------------------------------------------------------

    def _spool_count(self, outcome: str, n: int = 1) -> None:
        if self.metrics is not None:
            self.metrics.spool_events.labels(outcome).inc(n)

    def _oldest_age(self) -> float:
        oldest = self.sender.oldest_enqueued()
        return 0.0 if oldest is None else max(0.0, self.spool.clock() - oldest)

    def health(self) -> dict[str, Any]:
        """The ``spool`` section of ``/health``."""
        sp, se = self.spool, self.sender
        oldest = se.oldest_enqueued()
        degraded = self.degraded()
        return {
            "path": str(sp.path),
            "waiting": sp.counts.waiting,
            "dead": sp.counts.dead,
            "held_in_memory": sp.held,
            "customers": len(se.pending),
            "in_flight": len(se.inflight),
            "oldest_age_s": None if oldest is None else round(max(0.0, sp.clock() - oldest), 3),
            "data_bytes": sp.counts.waiting_bytes + sp.counts.dead_bytes,
            "sending": bool(self.settings.url),
            "paused_s": round(max(0.0, se.paused_until - time.monotonic()), 3),
            "degraded": degraded,
            "error": degraded,
            "last_error": se.last_error or sp.stats.last_error,
            "commits": sp.stats.commits,
            "refused": sp.stats.refused,
            "dropped": sp.stats.dropped,
            "expired": sp.stats.expired,
            "write_failures": sp.stats.write_failures,
            "full": sp.stats.full_reason,
            "moved_aside": str(sp.moved_aside) if sp.moved_aside else None,
            "writer_alive": sp.alive,
        }


DELIVERY = web.AppKey("delivery", DeliveryService)
"""The concrete service behind ``app[EVENT_QUEUE]`` (spool and sender internals for health and tests)."""


async def _ctx(app: web.Application) -> AsyncIterator[None]:
    service = app[DELIVERY]
    await service.start()
    try:
        yield
    finally:
        await service.close()


def setup_app(app: web.Application) -> None:
    """Wire the service into the application (see :func:`edgevoice.delivery.setup`)."""
    settings = app[SETTINGS]
    service = DeliveryService(
        settings.events,
        settings.state.path(),
        min_free_mb=settings.state.min_free_mb,
        metrics=app[METRICS],
        notifier=app.get(NOTIFIER),
    )
    app[DELIVERY] = service
    app[EVENT_QUEUE] = service
    app[HEALTH_SECTIONS]["spool"] = service.health
    app[HEALTH_CHECKS].append(lambda: service.alive)
    app.setdefault(HEALTH_DEGRADED, []).append(service.degraded)
    app.cleanup_ctx.append(_ctx)
