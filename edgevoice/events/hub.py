"""The stream hub: every audio source opens its streams here, and the hub routes what they say.

Runs on the event loop, never blocks. It opens a recognition stream per audio
stream, routes transcripts to the customer's session, fires keyword events at
most once per customer session and ``SESSION_END`` when the customer's last
stream ends, logs as the seed did, and hands the events to an
:class:`~edgevoice.events.submission.EventSubmitter` (ordered per customer) and
a live copy of everything to a :class:`~edgevoice.broadcast.Broadcast` of
subscribers (the dashboard). Bounded by ``server.max_streams``; each stream and
customer session keeps at most ``sessions.max_transcript_chars`` of final text.

A customer's time on a stream is a :class:`Binding` from one stream sample to
another: finals are attributed by their audio time (word by word when the words
have times), so when a mic seat is unbound and rebound the last words of the old
customer, still being decoded, are theirs, and their ``SESSION_END`` fires only once
recognition has passed the unbind point (``RecognitionStream.recognized``, bounded
by ``sessions.unbind_flush_s``).

Shutdown (:mod:`edgevoice.server.lifecycle`): the hub refuses new streams and
bindings (``stop_accepting``), flushes every recognition stream (``flush``), ends
every stream and customer (``end_sessions``) and waits for every event to be
committed, then gives delivery ``shutdown.deliver_s`` to send this run's events
(``drain``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import Counter

from edgevoice.broadcast import Broadcast
from edgevoice.config import KeywordSettings, Settings
from edgevoice.delivery.api import EVENT_QUEUE, DeliveryUpdate, EventQueue
from edgevoice.errors import CodedError, RecognizerError
from edgevoice.events.keywords import KeywordMatcher
from edgevoice.events.sessions import BoundedText, CustomerSession, SessionJournal, SessionRegistry
from edgevoice.events.submission import EventSubmitter
from edgevoice.metrics import METRICS, Metrics
from edgevoice.recognition import RECOGNIZER
from edgevoice.recognition.types import SAMPLE_RATE, RecognitionStream, Recognizer, Transcript, Word
from edgevoice.server.keys import HEALTH_SECTIONS, SETTINGS
from edgevoice.server.lifecycle import LIFECYCLE, Phase

log = logging.getLogger("edgevoice.events")

Message = dict[str, Any]
StreamListener = Callable[[Message], None]
"""Receives the ``transcript`` and ``keyword`` messages of one stream (called on the loop; must not block)."""
Subscriber = Callable[[Message], None]
"""Receives every hub message with ``source``, ``lag_s`` and ``level`` added (called on the loop; must not block)."""

SILENCE_DBFS = -100.0
FINAL_STATES = frozenset({"delivered", "dead", "dropped"})
"""Delivery states after which an event no longer waits to be sent."""
MAX_TRACKED = 10_000
"""This run's undelivered events followed for the shutdown's delivery wait (beyond: not waited for)."""


class StreamError(CodedError):
    """A stream cannot be opened or changed; ``code`` is the /asr-multicam error code."""


def _dbfs(audio: np.ndarray) -> float:
    if audio.size == 0:
        return SILENCE_DBFS
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    return max(SILENCE_DBFS, 20 * math.log10(rms)) if rms > 0 else SILENCE_DBFS


@dataclass(eq=False, slots=True)
class Binding:
    """A customer on a stream from stream sample ``start`` to ``end`` (None while bound)."""

    customer: CustomerSession
    token: str
    """Unique per binding: the customer session counts its open bindings by it."""
    start: int
    end: int | None = None

    def covers(self, sample: int) -> bool:
        return self.start <= sample and (self.end is None or sample < self.end)


class HubStream:
    """One open audio stream; sources feed it 16 kHz mono float32 and stop it once."""

    def __init__(
        self,
        stream_id: str,
        source: str,
        language: str | None,
        listener: StreamListener | None,
        *,
        max_chars: int,
        audio_seconds: Counter,
        on_stop: Callable[[HubStream], Awaitable[str]],
    ) -> None:
        self.stream_id = stream_id
        self.source = source
        self.language = language
        self.listener = listener
        self.bindings: list[Binding] = []
        """The current binding (last, open) and ended ones whose last words are still being recognized."""
        self.recognition: RecognitionStream | None = None
        self.text = BoundedText(max_chars)
        self.level = SILENCE_DBFS
        self.samples = 0
        """Samples fed so far: the stream clock that bindings and transcript times count in."""
        self.started = time.time()
        self.stopping = False
        self._audio_seconds = audio_seconds
        self._on_stop = on_stop
        self._partial_hits: tuple[int, frozenset[str]] = (-1, frozenset())
        self._stop_task: asyncio.Future[str] | None = None

    @property
    def binding(self) -> Binding | None:
        """The customer bound now, if any."""
        if self.bindings and self.bindings[-1].end is None:
            return self.bindings[-1]
        return None

    @property
    def customer(self) -> CustomerSession | None:
        binding = self.binding
        return binding.customer if binding else None

    @property
    def session_id(self) -> str | None:
        customer = self.customer
        return customer.session_id if customer else None

    @property
    def customer_id(self) -> str | None:
        customer = self.customer
        return customer.customer_id if customer else None

    @property
    def audio_s(self) -> float:
        return self.samples / SAMPLE_RATE

    @property
    def lag_s(self) -> float:
        return self.recognition.lag_s if self.recognition is not None else 0.0

    @property
    def transcript(self) -> str:
        """The stream's final text (the oldest dropped beyond ``sessions.max_transcript_chars``)."""
        return str(self.text)

    def ids(self) -> Message:
        """The stream's customer ids (None when no customer is bound) for hub messages."""
        return {"session_id": self.session_id, "customer_id": self.customer_id}

    def feed(self, audio: np.ndarray) -> None:
        """Append 16 kHz mono float32 samples (cheap; on the loop). Ignored once the stream is stopping."""
        if self.stopping or self.recognition is None or audio.size == 0:
            return
        self.level = _dbfs(audio)
        self.recognition.feed(audio)  # raises on bad audio: then it is not on the stream clock either
        self.samples += audio.size
        self._audio_seconds.inc(audio.size / SAMPLE_RATE)

    def attribute(self, t: Transcript) -> list[tuple[Binding | None, str]]:
        """Split a transcript's text between the bindings its audio lies in (word times; else its start)."""
        text = t.text.strip()
        bindings = self.bindings
        if not bindings:
            return [(None, text)]
        if len(bindings) == 1 and bindings[0].start == 0 and bindings[0].end is None:
            return [(bindings[0], text)]  # bound for the stream's whole life (an /asr-multicam stream)
        if not t.words:
            return [(self._binding_at(t.start), text)]
        groups: list[tuple[Binding | None, list[Word]]] = []
        for word in t.words:
            owner = self._binding_at((word.start + word.end) / 2)
            if groups and groups[-1][0] is owner:
                groups[-1][1].append(word)
            else:
                groups.append((owner, [word]))
        if len(groups) == 1:
            return [(groups[0][0], text)]
        return [(owner, " ".join(w.text for w in ws if w.text)) for owner, ws in groups]

    def _binding_at(self, seconds: float) -> Binding | None:
        sample = round(seconds * SAMPLE_RATE)
        return next((b for b in self.bindings if b.covers(sample)), None)

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
        *,
        journal: SessionJournal | None = None,
    ) -> None:
        self.settings = settings
        self.recognizer = recognizer
        self.metrics = metrics
        self.matcher = KeywordMatcher(settings.keywords)
        recognizer.check_finals(self.matcher)
        recovered = event_queue.open_sessions() if event_queue is not None else []
        self.sessions = SessionRegistry(
            settings.sessions.max_transcript_chars,
            journal,
            {(o.session_id, o.customer_id): o.keywords for o in recovered},
        )
        if recovered:
            log.warning(
                "%d customer session(s) were open when the daemon last stopped: resumed if their streams come "
                "back within %.0f s, else ended (SESSION_END)",
                len(recovered),
                settings.sessions.resume_s,
            )
        self.events = EventSubmitter(
            event_queue,
            on_accepted=self._accepted,
            on_failure=lambda kind: metrics.event_submit_failures.labels(kind).inc(),
        )
        self.subscribers = Broadcast[Message](log, "hub subscriber")
        self.accepting = True
        """False once the shutdown began: new streams and bindings are refused."""
        self._streams: dict[str, HubStream] = {}
        self._tokens = itertools.count(1)
        self._ending: set[asyncio.Task[None]] = set()
        self._undelivered: set[str] = set()
        """Ids of this run's events accepted by the queue and not delivered (or dead) yet."""
        self._settled_early: deque[str] = deque(maxlen=1024)
        self._all_delivered = asyncio.Event()
        self._all_delivered.set()

    # -- streams ------------------------------------------------------------

    def _refuse_when_stopping(self) -> None:
        if not self.accepting:
            raise StreamError("shutting_down", "the daemon is shutting down; try again once it has restarted")

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
        self._refuse_when_stopping()
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
            max_chars=self.settings.sessions.max_transcript_chars,
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
        """Attach a customer to an open stream (a local mic seat) from its next sample on; raises StreamError."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.stopping:
            raise StreamError("unknown_stream", f"stream_id {stream_id!r} is not open")
        if stream.customer is not None:
            if stream.customer.key == (session_id, customer_id):
                return
            raise StreamError("stream_bound", f"stream_id {stream_id!r} already belongs to {stream.customer_id!r}")
        self._refuse_when_stopping()
        self._attach(stream, session_id, customer_id)

    def _attach(self, stream: HubStream, session_id: str, customer_id: str) -> None:
        token = f"{stream.stream_id}#{next(self._tokens)}"
        customer = self.sessions.attach(session_id, customer_id, token)
        stream.bindings.append(Binding(customer, token, stream.samples))
        log.info("Audio stream started - Session: %s, Customer: %s", session_id, customer_id)
        self._publish(stream, {"type": "stream_started", "stream_id": stream.stream_id, **stream.ids()})

    async def unbind(self, stream_id: str) -> CustomerSession | None:
        """End the customer's use of an open stream at its current sample (the stream stays open).

        Returns once recognition has passed that sample (the customer's last words are theirs)
        and SESSION_END was fired if it was the customer's last stream; at most
        ``sessions.unbind_flush_s``. The stream can be bound to the next customer at once.
        """
        stream = self._streams.get(stream_id)
        binding = stream.binding if stream is not None else None
        if stream is None or binding is None:
            return None
        binding.end = stream.samples
        task = asyncio.ensure_future(self._end_binding(stream, binding))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        await asyncio.shield(task)  # a cancelled request does not cancel the customer's end
        return binding.customer

    async def _end_binding(self, stream: HubStream, binding: Binding) -> None:
        assert binding.end is not None
        recognition = stream.recognition
        if recognition is not None:
            limit = self.settings.sessions.unbind_flush_s
            try:
                await asyncio.wait_for(recognition.recognized(binding.end), limit)
            except asyncio.TimeoutError:
                log.warning(
                    "stream %s: recognition has not reached the unbind point (%.1f s) within %.0f s; "
                    "ending customer %s now (words after this are attributed to nobody)",
                    stream.stream_id,
                    binding.end / SAMPLE_RATE,
                    limit,
                    binding.customer.customer_id,
                )
            except Exception:
                log.exception("stream %s: waiting for recognition to reach the unbind point failed", stream.stream_id)
        with contextlib.suppress(ValueError):
            stream.bindings.remove(binding)
        self._publish_stopped(stream, binding.customer, binding.customer.transcript)
        self._detach(binding)

    async def _stop(self, stream: HubStream, *, flush: bool = True) -> str:
        try:
            if stream.recognition is not None:
                try:
                    if flush:
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
            binding = stream.binding
            if binding is not None:
                binding.end = stream.samples
                stream.bindings.remove(binding)
            customer = binding.customer if binding else None
            self._publish_stopped(stream, customer, stream.transcript, listener=True)
            if binding is not None:
                log.info(
                    "Audio stream stop - Session: %s, Customer: %s",
                    binding.customer.session_id,
                    binding.customer.customer_id,
                )
                self._detach(binding)
        return stream.transcript

    def _publish_stopped(
        self, stream: HubStream, customer: CustomerSession | None, transcript: str, *, listener: bool = False
    ) -> None:
        self._publish(
            stream,
            {
                "type": "stream_stopped",
                "stream_id": stream.stream_id,
                "session_id": customer.session_id if customer else None,
                "customer_id": customer.customer_id if customer else None,
                "full_transcript": transcript,
            },
            listener=listener,
        )

    def _detach(self, binding: Binding) -> None:
        customer = binding.customer
        ended = self.sessions.detach(customer.session_id, customer.customer_id, binding.token)
        if ended is None:
            return
        event = self.matcher.settings.session_end_event
        log.info("SESSION END: Calling API for customer %s", ended.customer_id)
        log.info("FULL TRANSCRIPT [%s]: %s", ended.customer_id, ended.transcript)
        self.metrics.keyword_events.labels(event).inc()
        self.events.submit(ended, event, effect="end")
        log.info("Cleaned up customer data for %s", ended.customer_id)

    async def stop_all(self) -> None:
        """Stop every open stream (flushing each), then wait for their events to be committed."""
        await self.flush()
        await self.end_sessions()
        await self.drain()

    async def drain(self) -> None:
        """Wait until every event fired so far has been accepted by the queue."""
        await self.events.drain()

    # -- shutdown phases ------------------------------------------------------

    async def stop_accepting(self) -> str:
        """Refuse new streams and bindings from now on."""
        self.accepting = False
        return f"new streams refused; {len(self._streams)} stream(s) and {len(self.sessions)} customer(s) open"

    async def flush(self) -> str:
        """Recognize what every open stream received (its last finals and keywords); nothing more is fed."""
        streams = list(self._streams.values())
        lag = sum(s.lag_s for s in streams)
        for s in streams:
            s.stopping = True
        await asyncio.gather(
            *(s.recognition.finish() for s in streams if s.recognition is not None), return_exceptions=True
        )
        return f"{len(streams)} stream(s) flushed ({lag:.1f} s of audio was waiting)"

    async def end_unresumed(self, after_s: float) -> None:
        """``after_s`` from now, end the sessions of the last run that no stream resumed: SESSION_END each."""
        await asyncio.sleep(after_s)
        left, self.sessions.resumable = self.sessions.resumable, {}
        event = self.matcher.settings.session_end_event
        for (session_id, customer_id), _fired in left.items():
            log.info(
                "SESSION END: customer %s (session %s) did not come back after the restart", customer_id, session_id
            )
            gone = CustomerSession(session_id, customer_id, ended=True)
            self.metrics.keyword_events.labels(event).inc()
            self.events.submit(gone, event, effect="end")

    async def end_sessions(self) -> str:
        """End every stream (without waiting for recognition any more) and every customer: SESSION_END each."""
        streams = list(self._streams.values())
        customers = len(self.sessions)
        for s in streams:
            if s.recognition is not None:
                if s.lag_s > 0:
                    log.warning("stream %s: %.1f s of audio left unrecognized at shutdown", s.stream_id, s.lag_s)
                s.recognition.close()
        await asyncio.gather(*(s.stop() for s in streams), return_exceptions=True)
        while self._ending:
            await asyncio.wait(list(self._ending))
        return f"{len(streams)} stream(s) ended, SESSION_END for {customers - len(self.sessions)} customer(s)"

    async def commit_and_deliver(self, deliver_s: float) -> str:
        """Wait until every fired event is committed, then at most ``deliver_s`` for this run's to be delivered."""
        fired = len(self.events)
        try:
            await self.events.drain()
        except asyncio.CancelledError:
            for u in self.events.unqueued():
                log.error(
                    "EVENT NOT COMMITTED at shutdown: %s for customer %s (session %s); %d earlier attempt(s) failed",
                    u.event,
                    u.customer_id,
                    u.session_id,
                    u.attempts,
                )
            raise
        if self._undelivered and deliver_s > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._all_delivered.wait(), deliver_s)
        left = len(self._undelivered)
        if left:
            log.info("%d event(s) not delivered yet stay in the spool; they are sent after the next start", left)
        return f"{fired} event(s) committed; {left} of this run's events wait in the spool"

    def _accepted(self, customer: CustomerSession, event: str, event_id: str) -> None:
        self.sessions.accepted(customer, event, event_id)
        if event_id in self._settled_early or len(self._undelivered) >= MAX_TRACKED:
            return  # delivered before the submit returned, or too many to follow
        self._undelivered.add(event_id)
        self._all_delivered.clear()

    # -- transcripts and keywords -------------------------------------------

    def _on_transcript(self, stream: HubStream, t: Transcript) -> None:
        try:
            self._route(stream, t)
        except Exception:
            log.exception("stream %s: routing a transcript failed", stream.stream_id)

    def _route(self, stream: HubStream, t: Transcript) -> None:
        if not t.text.strip():
            return
        parts = stream.attribute(t)
        for binding, text in parts:
            if text:
                self._route_part(stream, t, binding, text, whole=len(parts) == 1)

    def _route_part(self, stream: HubStream, t: Transcript, binding: Binding | None, text: str, *, whole: bool) -> None:
        customer = binding.customer if binding else None
        msg: Message = {
            "type": "transcript",
            "stream_id": stream.stream_id,
            "session_id": customer.session_id if customer else None,
            "customer_id": customer.customer_id if customer else None,
            "speaker": t.speaker,
            "text": text,
            "final": t.final,
            "start": round(t.start, 3),
            "end": round(t.end, 3),
        }
        self._publish(stream, msg, listener=True)
        if t.final:
            stream.text.add(text)
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
            # Early firing only for a partial wholly of the customer bound now; the rest waits for its final.
            if not self.matcher.settings.match_partials or not whole or binding is not stream.binding:
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
        self.events.submit(customer, event, effect="keyword")

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
        """Relay a delivery state change to subscribers (and note this run's events no longer waiting)."""
        if update.state in FINAL_STATES:
            if update.event_id in self._undelivered:
                self._undelivered.discard(update.event_id)
                if not self._undelivered:
                    self._all_delivered.set()
            else:
                self._settled_early.append(update.event_id)
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
        self.recognizer.check_finals(self.matcher)
        log.info("keyword rules reloaded: %s", ", ".join(self.matcher.events) or "none")

    def health(self) -> Message:
        return {
            "streams": len(self._streams),
            "customers": len(self.sessions),
            "events_pending": len(self.events),
            "submit_failures": self.events.failures,
            "accepting": self.accepting,
            "keyword_events": self.matcher.events,
        }


class QueueJournal:
    """Persists open customer sessions in the event queue's spool (the keywords and the end are written in
    the same commit as their events: EventQueue.submit's ``effect``), so that a restart after a crash can
    resume or end them."""

    def __init__(self, queue: EventQueue) -> None:
        self.queue = queue

    def began(self, session: CustomerSession) -> None:
        self.queue.stream_attached(session.session_id, session.customer_id, "customer")

    def fired(self, session: CustomerSession, event: str, event_id: str) -> None:
        """Already on disk with its event."""

    def ended(self, session: CustomerSession) -> None:
        """Forgotten in the commit of its SESSION_END."""


STREAM_HUB = web.AppKey("stream_hub", StreamHub)
"""The daemon's stream hub."""


async def _hub_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    queue = app.get(EVENT_QUEUE)
    hub = StreamHub(settings, app[RECOGNIZER], queue, app[METRICS], journal=QueueJournal(queue) if queue else None)
    app[STREAM_HUB] = hub
    resume = asyncio.create_task(hub.end_unresumed(settings.sessions.resume_s)) if hub.sessions.resumable else None
    unsubscribe = queue.subscribe(hub.on_delivery) if queue is not None else None
    app[HEALTH_SECTIONS]["events"] = hub.health
    lifecycle = app[LIFECYCLE]
    lifecycle.on(Phase.STOP_ACCEPTING, "hub", hub.stop_accepting)
    lifecycle.on(Phase.FLUSH, "hub", hub.flush)
    lifecycle.on(Phase.END_SESSIONS, "hub", hub.end_sessions)
    lifecycle.on(Phase.DRAIN, "hub", lambda: hub.commit_and_deliver(settings.shutdown.deliver_s))
    try:
        yield
    finally:
        if resume is not None:
            resume.cancel()  # not resumed yet: they stay open on disk, for the next start
        await hub.stop_all()  # nothing left after the daemon's phases; an embedding application relies on it
        if unsubscribe is not None:
            unsubscribe()


def setup(app: web.Application) -> None:
    """Build the hub once recognition and delivery are up; its shutdown phases; stop every stream on cleanup."""
    app.cleanup_ctx.append(_hub_ctx)
