"""The stream hub: every audio source opens its streams here, and the hub routes what they say.

Runs on the event loop, never blocks. It opens a recognition stream per audio
stream, routes transcripts to the customer's session, fires keyword events at
most once per customer session and ``SESSION_END`` when the customer's last
stream ends, logs as the seed did, and hands the events to an
:class:`~edgevoice.events.submission.EventSubmitter` (ordered per customer) and
a live copy of everything to a :class:`~edgevoice.broadcast.Broadcast` of
subscribers (the dashboard). Bounded by ``server.max_streams``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import Counter

from edgevoice.broadcast import Broadcast
from edgevoice.config import KeywordSettings, Settings
from edgevoice.delivery.api import EVENT_QUEUE, DeliveryUpdate, EventQueue
from edgevoice.errors import CodedError, RecognizerError
from edgevoice.events.keywords import KeywordMatcher
from edgevoice.events.sessions import CustomerSession, SessionRegistry
from edgevoice.events.submission import EventSubmitter
from edgevoice.metrics import METRICS, Metrics
from edgevoice.recognition import RECOGNIZER
from edgevoice.recognition.types import SAMPLE_RATE, RecognitionStream, Recognizer, Transcript
from edgevoice.server.keys import HEALTH_SECTIONS, SETTINGS

log = logging.getLogger("edgevoice.events")

Message = dict[str, Any]
StreamListener = Callable[[Message], None]
"""Receives the ``transcript`` and ``keyword`` messages of one stream (called on the loop; must not block)."""
Subscriber = Callable[[Message], None]
"""Receives every hub message with ``source``, ``lag_s`` and ``level`` added (called on the loop; must not block)."""

SILENCE_DBFS = -100.0


class StreamError(CodedError):
    """A stream cannot be opened or changed; ``code`` is the /asr-multicam error code."""


def _dbfs(audio: np.ndarray) -> float:
    if audio.size == 0:
        return SILENCE_DBFS
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return max(SILENCE_DBFS, 20 * math.log10(rms)) if rms > 0 else SILENCE_DBFS


class HubStream:
    """One open audio stream; sources feed it 16 kHz mono float32 and stop it once."""

    def __init__(
        self,
        stream_id: str,
        source: str,
        language: str | None,
        listener: StreamListener | None,
        *,
        audio_seconds: Counter,
        on_stop: Callable[[HubStream], Awaitable[str]],
    ) -> None:
        self.stream_id = stream_id
        self.source = source
        self.language = language
        self.listener = listener
        self.customer: CustomerSession | None = None
        self.recognition: RecognitionStream | None = None
        self.parts: list[str] = []
        self.level = SILENCE_DBFS
        self.audio_s = 0.0
        self.started = time.time()
        self.stopping = False
        self._audio_seconds = audio_seconds
        self._on_stop = on_stop
        self._partial_hits: tuple[int, frozenset[str]] = (-1, frozenset())
        self._stop_task: asyncio.Future[str] | None = None

    @property
    def session_id(self) -> str | None:
        return self.customer.session_id if self.customer else None

    @property
    def customer_id(self) -> str | None:
        return self.customer.customer_id if self.customer else None

    @property
    def lag_s(self) -> float:
        return self.recognition.lag_s if self.recognition is not None else 0.0

    @property
    def transcript(self) -> str:
        """Every final text of this stream so far."""
        return " ".join(self.parts)

    def ids(self) -> Message:
        """The stream's customer ids (None when no customer is bound) for hub messages."""
        return {"session_id": self.session_id, "customer_id": self.customer_id}

    def feed(self, audio: np.ndarray) -> None:
        """Append 16 kHz mono float32 samples (cheap; on the loop). Ignored once the stream is stopping."""
        if self.stopping or self.recognition is None or audio.size == 0:
            return
        self.level = _dbfs(audio)
        seconds = audio.size / SAMPLE_RATE
        self.audio_s += seconds
        self._audio_seconds.inc(seconds)
        self.recognition.feed(audio)

    def stable_partial_events(self, segment: int, events: Sequence[str]) -> list[str]:
        """The events of a partial already heard in the previous partial of the same segment (stable enough)."""
        seen_segment, seen = self._partial_hits
        self._partial_hits = (segment, frozenset(events))
        return [e for e in events if seen_segment == segment and e in seen]

    async def stop(self) -> str:
        """Flush recognition, end the customer's stream (SESSION_END if it was the last) and return the transcript."""
        if self._stop_task is None:
            self.stopping = True
            self._stop_task = asyncio.ensure_future(self._on_stop(self))
        return await asyncio.shield(self._stop_task)

    def info(self) -> Message:
        return {
            "stream_id": self.stream_id,
            "source": self.source,
            "session_id": self.session_id,
            "customer_id": self.customer_id,
            "language": self.language,
            "lag_s": round(self.lag_s, 3),
            "level": round(self.level, 1),
            "audio_s": round(self.audio_s, 3),
            "started": self.started,
        }


class StreamHub:
    """Routes every stream's transcripts to customer sessions, keyword events and subscribers."""

    def __init__(
        self,
        settings: Settings,
        recognizer: Recognizer,
        event_queue: EventQueue | None,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.recognizer = recognizer
        self.metrics = metrics
        self.matcher = KeywordMatcher(settings.keywords)
        self.sessions = SessionRegistry()
        self.events = EventSubmitter(event_queue)
        self.subscribers = Broadcast[Message](log, "hub subscriber")
        self._streams: dict[str, HubStream] = {}

    # -- streams ------------------------------------------------------------

    def open_stream(
        self,
        stream_id: str,
        *,
        source: str,
        language: str | None = None,
        session_id: str | None = None,
        customer_id: str | None = None,
        listener: StreamListener | None = None,
    ) -> HubStream:
        """Open a stream (and, with ids, the customer's stream); raises StreamError."""
        if stream_id in self._streams:
            raise StreamError("duplicate_stream", f"stream_id {stream_id!r} is already open")
        limit = self.settings.server.max_streams
        if len(self._streams) >= limit:
            raise StreamError("too_many_streams", f"server.max_streams ({limit}) streams are already open")
        if (session_id is None) != (customer_id is None):
            raise StreamError("missing_field", "session_id and customer_id go together")
        stream = HubStream(
            stream_id,
            source,
            language,
            listener,
            audio_seconds=self.metrics.audio_seconds.labels(source),
            on_stop=self._stop,
        )
        try:
            stream.recognition = self.recognizer.open_stream(
                stream_id, language=language, on_transcript=lambda t: self._on_transcript(stream, t)
            )
        except RecognizerError as exc:  # a bad id or language, or the recognizer still holds the id
            raise StreamError(exc.code, exc.message) from None
        self._streams[stream_id] = stream
        self.metrics.streams.labels(source).inc()
        if session_id is not None and customer_id is not None:
            self._attach(stream, session_id, customer_id)
        else:
            self._publish(stream, {"type": "stream_started", "stream_id": stream_id, **stream.ids()})
        log.debug("stream %s opened (%s)", stream_id, source)
        return stream

    def get(self, stream_id: str) -> HubStream | None:
        return self._streams.get(stream_id)

    def streams(self) -> list[Message]:
        """Open streams with their session, customer, lag and level."""
        return [s.info() for s in self._streams.values()]

    def bind(self, stream_id: str, session_id: str, customer_id: str) -> None:
        """Attach a customer to an open stream (a local mic seat); raises StreamError."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.stopping:
            raise StreamError("unknown_stream", f"stream_id {stream_id!r} is not open")
        if stream.customer is not None:
            if stream.customer.key == (session_id, customer_id):
                return
            raise StreamError("stream_bound", f"stream_id {stream_id!r} already belongs to {stream.customer_id!r}")
        self._attach(stream, session_id, customer_id)

    def _attach(self, stream: HubStream, session_id: str, customer_id: str) -> None:
        stream.customer = self.sessions.attach(session_id, customer_id, stream.stream_id)
        log.info("Audio stream started - Session: %s, Customer: %s", session_id, customer_id)
        self._publish(stream, {"type": "stream_started", "stream_id": stream.stream_id, **stream.ids()})

    async def unbind(self, stream_id: str) -> None:
        """End the customer's use of an open stream, like a stop (the stream stays open)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.customer is None:
            return
        customer, stream.customer = stream.customer, None
        self._publish_stopped(stream, customer, customer.transcript)
        self._detach(customer, stream_id)

    async def _stop(self, stream: HubStream) -> str:
        try:
            if stream.recognition is not None:
                try:
                    await stream.recognition.finish()
                except Exception:
                    log.exception("stream %s: flushing recognition failed", stream.stream_id)
                finally:
                    stream.recognition.close()
        finally:
            self._streams.pop(stream.stream_id, None)
            self.metrics.streams.labels(stream.source).dec()
            with contextlib.suppress(KeyError):
                self.metrics.recognition_lag.remove(stream.stream_id)
            customer, stream.customer = stream.customer, None
            self._publish_stopped(stream, customer, stream.transcript)
            if customer is not None:
                log.info("Audio stream stop - Session: %s, Customer: %s", customer.session_id, customer.customer_id)
                self._detach(customer, stream.stream_id)
        return stream.transcript

    def _publish_stopped(self, stream: HubStream, customer: CustomerSession | None, transcript: str) -> None:
        self._publish(
            stream,
            {
                "type": "stream_stopped",
                "stream_id": stream.stream_id,
                "session_id": customer.session_id if customer else None,
                "customer_id": customer.customer_id if customer else None,
                "full_transcript": transcript,
            },
        )

    def _detach(self, customer: CustomerSession, stream_id: str) -> None:
        ended = self.sessions.detach(customer.session_id, customer.customer_id, stream_id)
        if ended is None:
            return
        event = self.matcher.settings.session_end_event
        log.info("SESSION END: Calling API for customer %s", ended.customer_id)
        log.info("FULL TRANSCRIPT [%s]: %s", ended.customer_id, ended.transcript)
        self.metrics.keyword_events.labels(event).inc()
        self.events.submit(ended, event)
        log.info("Cleaned up customer data for %s", ended.customer_id)

    async def stop_all(self) -> None:
        """Stop every open stream (flushing each), then wait for their events to be committed."""
        await asyncio.gather(*(s.stop() for s in list(self._streams.values())), return_exceptions=True)
        await self.drain()

    async def drain(self) -> None:
        """Wait until every event fired so far has been handed to the queue."""
        await self.events.drain()

    # -- transcripts and keywords -------------------------------------------

    def _on_transcript(self, stream: HubStream, t: Transcript) -> None:
        try:
            self._route(stream, t)
        except Exception:
            log.exception("stream %s: routing a transcript failed", stream.stream_id)

    def _route(self, stream: HubStream, t: Transcript) -> None:
        text = t.text.strip()
        if not text:
            return
        customer = stream.customer
        msg: Message = {
            "type": "transcript",
            "stream_id": stream.stream_id,
            **stream.ids(),
            "speaker": t.speaker,
            "text": text,
            "final": t.final,
            "start": round(t.start, 3),
            "end": round(t.end, 3),
        }
        self._publish(stream, msg, listener=True)
        if t.final:
            stream.parts.append(text)
            if customer is not None:
                customer.add_final(text)
            if self.settings.logging.transcripts:
                log.info(
                    "TRANSCRIPT [%s][%s][%s] %s: %s",
                    customer.session_id if customer else "-",
                    customer.customer_id if customer else "-",
                    stream.stream_id,
                    t.speaker,
                    text,
                )
        if customer is None:
            return
        language = t.language or stream.language or self.settings.asr.language
        events = self.matcher.match(text, language)
        if not t.final:
            if not self.matcher.settings.match_partials:
                return
            events = stream.stable_partial_events(t.segment, events)
        for event in customer.fire(events):
            self._fire(stream, customer, event, text)

    def _fire(self, stream: HubStream, customer: CustomerSession, event: str, text: str) -> None:
        log.info("KEYWORD DETECTED: %s - Session: %s, Customer: %s", event, customer.session_id, customer.customer_id)
        self.metrics.keyword_events.labels(event).inc()
        self._publish(
            stream,
            {
                "type": "keyword",
                "stream_id": stream.stream_id,
                "session_id": customer.session_id,
                "customer_id": customer.customer_id,
                "event": event,
                "text": text,
            },
            listener=True,
        )
        self.events.submit(customer, event)

    # -- live feed -------------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Get every hub message (plus ``delivery`` updates); returns the unsubscribe function."""
        return self.subscribers.subscribe(callback)

    def _publish(self, stream: HubStream, msg: Message, *, listener: bool = False) -> None:
        if listener and stream.listener is not None:
            try:
                stream.listener(msg)
            except Exception:
                log.exception("stream %s: listener failed", stream.stream_id)
        if self.subscribers:
            self.subscribers.publish(
                {**msg, "source": stream.source, "lag_s": round(stream.lag_s, 3), "level": round(stream.level, 1)}
            )

    def on_delivery(self, update: DeliveryUpdate) -> None:
        """Relay a delivery state change to subscribers."""
        if self.subscribers:
            self.subscribers.publish(
                {
                    "type": "delivery",
                    "event_id": update.event_id,
                    "customer_id": update.customer_id,
                    "event": update.event,
                    "state": update.state,
                    "detail": update.detail,
                }
            )

    # -- configuration -----------------------------------------------------------

    def reload_keywords(self, keywords: KeywordSettings) -> None:
        """Swap the keyword rules; open streams and fired events are kept."""
        self.matcher = KeywordMatcher(keywords)
        log.info("keyword rules reloaded: %s", ", ".join(self.matcher.events) or "none")

    def health(self) -> Message:
        return {
            "streams": len(self._streams),
            "customers": len(self.sessions),
            "events_pending": len(self.events),
            "keyword_events": self.matcher.events,
        }


STREAM_HUB = web.AppKey("stream_hub", StreamHub)
"""The daemon's stream hub."""


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    queue = app.get(EVENT_QUEUE)
    hub = StreamHub(app[SETTINGS], app[RECOGNIZER], queue, app[METRICS])
    app[STREAM_HUB] = hub
    unsubscribe = queue.subscribe(hub.on_delivery) if queue is not None else None
    app[HEALTH_SECTIONS]["events"] = hub.health
    try:
        yield
    finally:
        await hub.stop_all()
        if unsubscribe is not None:
            unsubscribe()


def setup(app: web.Application) -> None:
    """Build the hub once recognition and delivery are up; stop every stream on shutdown."""
    app.cleanup_ctx.append(_hub_ctx)
