"""The inference thread: VAD for every stream, then one batched decode of the most urgent work.

Each cycle, in ONE dedicated thread (CTranslate2 releases the GIL while it computes):

1. every stream's queued audio goes through Silero VAD and endpointing (cheap:
   about 2.5 ms per second of audio);
2. a batch is planned: finals first, oldest first across all streams (no stream
   starves, at most ``asr.max_batch`` decodes), then the early finals of
   utterances whose endpoint is being awaited; then partials, the longest-waiting
   first, only as many as fit in a time budget of ``asr.partial_interval_s``
   estimated from the measured cost per item. Under load partials are therefore
   skipped (counted in ``edgevoice_partials_skipped``) before finals wait;
3. the batch is decoded with one engine call and results are sent to the loop.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from edgevoice.config import AsrSettings
from edgevoice.metrics import Metrics
from edgevoice.recognition.engine import DecodeRequest, Engine
from edgevoice.recognition.stream import FinalJob, PartialJob, Stream

log = logging.getLogger(__name__)

FULL_SHARE = 0.4
"""window = auto: most of the time finals in full windows may take at their recent rate."""
RETRY_SHARE = 0.1
"""Most of the time full-window retries of looping finals may take."""
RATE_WINDOW_S = 10.0
"""The recent rate of finals is measured over this many seconds."""
IDLE_CYCLE_S = 0.03
"""Shortest cycle when there is nothing to decode (audio arrives in small chunks; VAD them in bulk)."""
STALL_S = 60.0
"""A cycle older than this marks the recognizer unhealthy (a decode hung)."""


@dataclass(slots=True)
class _Item:
    stream: Stream
    job: FinalJob | PartialJob
    full: bool = False
    """Decode in Whisper's full 30 s window."""


class Scheduler:
    """Owns the streams' worker-side state and the single inference thread."""

    def __init__(self, engine: Engine, settings: AsrSettings, metrics: Metrics) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="edgevoice-asr", daemon=True)
        self._item_cost = 0.15  # EMA of seconds per decoded item, refined from measurements
        self.last_cycle = time.monotonic()
        self._final_times: deque[float] = deque()  # when recent finals were decoded (arrival rate)
        self._retry_times: deque[float] = deque()  # when recent full-window retries ran
        self.batches = 0
        self.partials_skipped = 0
        self.errors = 0

    # -- control (event loop) ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread (blocking: call it off the loop); unfinished streams are closed."""
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for s in streams:
            s.closed = True
            s.resolve_finish()

    def wake(self) -> None:
        self._wake.set()

    def add(self, stream: Stream) -> None:
        with self._lock:
            old = self._streams.get(stream.stream_id)
            if old is not None and not old.closed:
                raise ValueError(f"stream {stream.stream_id!r} is already open")
            # A closed stream not yet reaped by the thread gives its id to the new one.
            self._streams[stream.stream_id] = stream
        self._wake.set()

    def streams(self) -> list[Stream]:
        with self._lock:
            return list(self._streams.values())

    @property
    def alive(self) -> bool:
        """The thread runs and its last cycle is recent."""
        return self._thread.is_alive() and time.monotonic() - self.last_cycle < STALL_S

    # -- the thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            started = time.monotonic()
            try:
                decoded = self._cycle()
            except Exception:
                self.errors += 1
                log.exception("recognition cycle failed")
                decoded = False
            self.last_cycle = time.monotonic()
            if not decoded:
                self._wake.wait(timeout=0.25)
                self._wake.clear()
                rest = IDLE_CYCLE_S - (time.monotonic() - started)
                if rest > 0 and not self._stop:
                    time.sleep(rest)

    def _cycle(self) -> bool:
        streams = self.streams()
        for s in streams:
            if s.closed:
                self._remove(s)
                continue
            if s.diarizer is None and s.diarizer_factory is not None:
                factory, s.diarizer_factory = s.diarizer_factory, None
                try:
                    s.diarizer = factory()
                except Exception:
                    log.exception("stream %s: diarizer failed to open; speakers are not labelled", s.stream_id)
            s.ingest(self._dropped)
        streams = [s for s in streams if not s.closed]
        for s in streams:
            self._emit_ready(s)
        items = self._plan(streams, time.monotonic())
        if items:
            self._decode(items)
        for s in streams:
            self._emit_ready(s)
            s.settle()
            self.metrics.recognition_lag.labels(s.stream_id).set(s.lag_s)
            if s.finishing and s.flushed and not s.finals and not s.closed:
                s.resolve_finish()
                self._remove(s)
        return bool(items)

    def _remove(self, s: Stream) -> None:
        with self._lock:
            if self._streams.get(s.stream_id) is s:
                del self._streams[s.stream_id]
        if s.diarizer is not None:
            try:
                s.diarizer.close()
            except Exception:
                log.exception("stream %s: diarizer close failed", s.stream_id)
        with contextlib.suppress(KeyError):
            self.metrics.recognition_lag.remove(s.stream_id)

    def _dropped(self, stream: Stream, seconds: float) -> None:
        self.metrics.recognition_dropped.inc(seconds)

    def _plan(self, streams: list[Stream], now: float) -> list[_Item]:
        limit = self.settings.max_batch
        finals = sorted(
            ((job.ready, i, s, job) for i, s in enumerate(streams) for job in s.finals if job.result is None),
            key=lambda x: (x[0], x[1]),
        )
        # Then the finals of utterances whose endpoint is being awaited (decoded during the wait).
        finals += sorted(
            ((s.tentative.ready, i, s, s.tentative) for i, s in enumerate(streams) if s.tentative is not None),
            key=lambda x: (x[0], x[1]),
        )
        finals = [f for f in finals if f[3].result is None]
        items = [_Item(s, job) for _, _, s, job in finals[:limit]]
        spare = self.settings.window != "fit" and self._spare(len(finals))
        n_full = self._full_finals(len(items), spare)
        for k, it in enumerate(items):
            it.full = k < n_full
        due = [s for s in streams if not s.finishing and s.partial_due(now)]
        if not due:
            return items
        due.sort(key=lambda s: s.partial_due_since or now)
        finals_cost = n_full * self.engine.full_window_s + (len(items) - n_full) * self._item_cost
        budget = self.settings.partial_interval_s - finals_cost
        room = min(limit - len(items), int(budget / max(self._item_cost, 1e-3)))
        if not items:
            room = max(room, 1)
        chosen = due[: max(0, room)]
        items += [_Item(s, s.partial_job()) for s in chosen]
        interval = self.settings.partial_interval_s
        for s in due[len(chosen) :]:
            if s.partial_due_since is not None and now - s.partial_due_since >= interval:
                self.partials_skipped += 1
                self.metrics.partials_skipped.inc()
                s.partial_due_since = now
        return items

    def _decode(self, items: list[_Item]) -> None:
        beam = self.settings.beam_size
        requests = []
        for it in items:
            if isinstance(it.job, FinalJob):
                requests.append(
                    DecodeRequest(it.job.audio, it.stream.language, beam, retry=True, words=True, full=it.full)
                )
            else:
                words = len(it.job.audio) >= it.stream.words_from
                requests.append(
                    DecodeRequest(
                        it.job.audio,
                        it.stream.language,
                        1,
                        retry=False,
                        words=words,
                        full=self.settings.window == "full",
                    )
                )
        n_final = sum(isinstance(it.job, FinalJob) for it in items)
        kind = "final" if n_final == len(items) else "partial" if n_final == 0 else "mixed"
        started = time.monotonic()
        retries = self.engine.window_retries
        try:
            results = self.engine.decode(requests, max_retries=self._retries_allowed())
        except Exception:
            self.errors += 1
            log.exception("decode of %d window(s) failed; their finals are dropped", len(items))
            for it in items:
                if isinstance(it.job, FinalJob):
                    it.job.result = _empty()
            return
        elapsed = time.monotonic() - started
        self.batches += 1
        self.metrics.batch_size.labels(kind).observe(len(items))
        self.metrics.inference_seconds.labels(kind).observe(elapsed)
        if kind == "partial":  # the partial budget is in partial (fitted, greedy) windows
            self._item_cost = 0.7 * self._item_cost + 0.3 * (elapsed / len(items))
        log.debug(
            "decoded %d window(s) (%s, longest %.1f s) in %.3f s",
            len(items),
            kind,
            max(len(r.audio) for r in requests) / 16000,
            elapsed,
        )
        done = time.monotonic()
        self._retry_times.extend([done] * (self.engine.window_retries - retries))
        for it, res in zip(items, results, strict=True):
            if isinstance(it.job, FinalJob):
                it.job.result = res
                self._final_times.append(done)
        for it, res in zip(items, results, strict=True):
            if isinstance(it.job, PartialJob):
                self._emit_ready(it.stream)  # finals of earlier segments go first
                it.stream.apply_partial(it.job, res)

    def _spare(self, pending: int) -> bool:
        """Whether full-window decodes fit: finals at their recent rate (plus those waiting now), each in
        a full window, would take at most FULL_SHARE of the time. Otherwise they would starve partials
        and then delay finals."""
        cost = self.engine.full_window_s
        if cost <= 0:
            return False
        now = time.monotonic()
        while self._final_times and now - self._final_times[0] > RATE_WINDOW_S:
            self._final_times.popleft()
        return (len(self._final_times) + pending) / RATE_WINDOW_S * cost <= FULL_SHARE

    def _retries_allowed(self) -> int:
        """Full-window retries of looping finals are rare; they may take RETRY_SHARE of the time over
        the last RATE_WINDOW_S (many streams looping at once get their loops cut instead)."""
        if self.settings.window == "fit":
            return 0
        now = time.monotonic()
        while self._retry_times and now - self._retry_times[0] > RATE_WINDOW_S:
            self._retry_times.popleft()
        budget = RETRY_SHARE * RATE_WINDOW_S / max(self.engine.full_window_s, 1e-3)
        return max(0, int(budget) - len(self._retry_times))

    def _full_finals(self, finals: int, spare: bool) -> int:
        """How many of this batch's finals (oldest first) get Whisper's full 30 s window."""
        window = self.settings.window
        if window != "auto":
            return finals if window == "full" else 0
        if not finals or not spare:
            return 0
        return min(finals, int(self.settings.final_budget_s / self.engine.full_window_s))

    def _emit_ready(self, s: Stream) -> None:
        """Emit the stream's leading finals whose text is known, in order."""
        while s.finals and s.finals[0].result is not None and not s.closed:
            job = s.finals.popleft()
            emitted = s.apply_final(job, job.result)
            if emitted:
                self.metrics.words.inc(sum(len(t.words) for t in emitted))
                if job.speech_end_wall is not None:
                    self.metrics.final_latency.observe(time.monotonic() - job.speech_end_wall)


def _empty() -> object:
    from edgevoice.recognition.engine import Decoded

    return Decoded("")
