"""The inference thread: VAD for every stream, then one batched decode of the most urgent work.

Each cycle, in ONE dedicated thread (CTranslate2 releases the GIL while it computes):

1. every stream's queued audio goes through Silero VAD and endpointing (cheap:
   about 2.5 ms per second of audio); a failure there is the stream's alone;
2. a batch is planned, at most ``asr.max_batch`` decodes: forced commits of full
   buffers first (those streams wait for them), then finals, oldest first across all
   streams (no stream starves); only when none waits, the early finals of utterances
   whose endpoint is being awaited (speech may resume and void them). A final the
   keyword check doubted is reviewed (its full-window views vote, see engine) in a
   batch of its own, and one that failed verification is decoded again in the full
   window in a batch of such second looks, each queued behind the finals already
   waiting, so the finals decoded beside it are emitted at once and wait for nobody's
   second look; then partials,
   the longest-waiting first, only as many as fit in a time budget of
   ``asr.partial_interval_s`` estimated from the measured cost per item.
   Under load partials are therefore skipped (``edgevoice_partials_skipped``) before
   finals wait, and nothing that makes a final is ever decoded differently;
3. the batch is decoded with one engine call per model and results are sent to the
   loop. A failing call is split and retried so one bad request costs only its own text.

:meth:`Scheduler.drain` runs the same cycles synchronously, without the thread and
without any decision taken by the clock (every hypothesis is decoded, no early finals):
``edgevoice transcribe`` gets the same text on every run, whatever the machine's load.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

from edgevoice.config import AsrSettings
from edgevoice.metrics import Metrics
from edgevoice.recognition.engine import Decoded, Engine
from edgevoice.recognition.stream import Job, Stream

log = logging.getLogger(__name__)

IDLE_CYCLE_S = 0.03
"""Shortest cycle when there is nothing to decode (audio arrives in small chunks; VAD them in bulk)."""
STALL_S = 60.0
"""A cycle older than this marks the recognizer unhealthy (a decode hung)."""
_URGENT = {"commit": 0, "final": 1, "tentative": 2}


@dataclass(slots=True)
class _Item:
    stream: Stream
    job: Job


class Scheduler:
    """Owns the streams' worker-side state and the single inference thread."""

    def __init__(self, engines: Mapping[str, Engine], settings: AsrSettings, metrics: Metrics) -> None:
        self.engines = dict(engines)
        """Model name -> engine; every stream names its model."""
        self.settings = settings
        self.metrics = metrics
        self._streams: dict[str, Stream] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="edgevoice-asr", daemon=True)
        self._cost = {"partial": 0.1, "final": 0.3}  # EMA of seconds per decoded item, refined as it runs
        self._paced = True
        self.last_cycle = time.monotonic()
        self.batches = 0
        self.partials_skipped = 0
        self.errors = 0
        self._failed_streams: set[str] = set()

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
        if stream.model not in self.engines:
            raise ValueError(f"stream {stream.stream_id!r}: no model {stream.model!r} is loaded")
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
        """The thread runs and its last cycle is recent (or the scheduler is driven by drain())."""
        if not self._paced:
            return True
        return self._thread.is_alive() and time.monotonic() - self.last_cycle < STALL_S

    def drain(self) -> None:
        """Run cycles in the calling thread until there is nothing left to decode (never on the loop).

        Deterministic: every due hypothesis is decoded and nothing is chosen by the clock. Do not
        combine with start().
        """
        self._paced = False
        while self._cycle():
            pass

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
        """One cycle; True when anything was decoded or taken (drain goes on while it is)."""
        streams = self.streams()
        took = False
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
            try:
                took = s.ingest(self._dropped) or took
            except Exception:
                self._stream_failed(s, "audio processing")
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
            if s.finishing and s.flushed and not s.finals and not s.blocked and not s.closed:
                s.resolve_finish()
                self._remove(s)
        return bool(items) or (took and not self._paced)

    def _stream_failed(self, s: Stream, what: str) -> None:
        """One stream's failure: counted and logged (once per stream), the other streams go on."""
        self.errors += 1
        if s.stream_id not in self._failed_streams:
            self._failed_streams.add(s.stream_id)
            log.exception("stream %s: %s failed; its audio of this cycle is lost", s.stream_id, what)

    def _remove(self, s: Stream) -> None:
        with self._lock:
            if self._streams.get(s.stream_id) is s:
                del self._streams[s.stream_id]
        self._failed_streams.discard(s.stream_id)
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
        urgent: list[tuple[int, float, int, Stream, Job]] = []
        for i, s in enumerate(streams):
            jobs = [j for j in s.finals if j.result is None]
            if s.commit is not None:
                jobs.append(s.commit)
            urgent += [(_URGENT[j.kind], j.ready, i, s, j) for j in jobs]
        if not urgent and self._paced:
            # Early finals only hide latency when there is time to spare: one that speech then voids is a
            # whole final's work lost, so while finals wait they are not decoded early (only at the endpoint).
            urgent = [
                (_URGENT["tentative"], s.tentative.ready, i, s, s.tentative)
                for i, s in enumerate(streams)
                if s.tentative is not None and s.tentative.result is None
            ]
        urgent.sort(key=lambda x: x[:3])
        limit = self.settings.max_batch
        if urgent and urgent[0][4].doubted is not None:
            return [_Item(urgent[0][3], urgent[0][4])]  # a review (VIEWS full-window decodes) goes alone
        if urgent and urgent[0][4].unverified:  # second looks in the full window go together, and only they
            return [_Item(s, job) for _, _, _, s, job in urgent if job.unverified][:limit]
        urgent = [u for u in urgent if u[4].doubted is None and not u[4].unverified]
        items = [_Item(s, job) for _, _, _, s, job in urgent[:limit]]
        due = [s for s in streams if not s.finishing and s.partial_due(now, display=self._paced)]
        if not due:
            return items
        if not self._paced:
            return items + [_Item(s, s.partial_job()) for s in due[: max(0, limit - len(items))]]
        due.sort(key=lambda s: s.partial_due_since or now)
        budget = self.settings.partial_interval_s - len(items) * self._cost["final"]
        room = min(limit - len(items), int(budget / max(self._cost["partial"], 1e-3)))
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
        by_model: dict[str, list[_Item]] = {}
        for it in items:
            by_model.setdefault(it.stream.model, []).append(it)
        n_final = sum(it.job.kind != "partial" for it in items)
        kind = "final" if n_final == len(items) else "partial" if n_final == 0 else "mixed"
        started = time.monotonic()
        results: dict[int, Decoded | None] = {}
        for model, group in by_model.items():
            for it, res in zip(group, self._decode_isolated(self.engines[model], group), strict=True):
                results[id(it)] = res
        elapsed = time.monotonic() - started
        self.batches += 1
        self.metrics.batch_size.labels(kind).observe(len(items))
        self.metrics.inference_seconds.labels(kind).observe(elapsed)
        if kind != "mixed" and not any(it.job.doubted or it.job.unverified for it in items):  # nor a second look's
            key = "partial" if kind == "partial" else "final"
            self._cost[key] = 0.7 * self._cost[key] + 0.3 * (elapsed / len(items))
        log.debug("decoded %d request(s) (%s) in %.3f s", len(items), kind, elapsed)
        for it in items:
            res = results[id(it)]
            job, s = it.job, it.stream
            if job.kind == "partial":
                continue
            if res is None:
                res = Decoded("")
            if res.doubted or res.unverified:  # not its text yet: a second look, a batch of its own behind older finals
                job.doubted, job.unverified, job.ready = res if res.doubted else None, res.unverified, time.monotonic()
                continue
            if job.kind == "commit":
                s.apply_commit(job, res)
            else:
                job.result = res
        for it in items:
            res = results[id(it)]
            if it.job.kind == "partial" and res is not None:
                self._emit_ready(it.stream)  # finals of earlier segments go first
                it.stream.apply_partial(it.job, res)

    def _decode_isolated(self, engine: Engine, items: list[_Item]) -> list[Decoded | None]:
        """Decode a batch; if the call fails, split it and retry the halves, so that one bad request
        loses only its own text (None)."""
        requests = []
        for it in items:
            hypothesis = it.job.kind != "partial" or it.stream.is_hypothesis(it.job)
            beam = self.settings.beam_size if hypothesis else 1
            requests.append(it.job.request(it.stream.language, beam, words=hypothesis))
        try:
            return list(engine.decode(requests))
        except Exception:
            self.errors += 1
            if len(items) == 1:
                it = items[0]
                log.exception(
                    "stream %s: decode of %.1f s (%s) failed; its text is lost",
                    it.stream.stream_id,
                    len(it.job.audio) / 16000,
                    it.job.kind,
                )
                return [None]
            log.warning("a batch of %d decodes failed; retrying it in halves", len(items))
            half = len(items) // 2
            return self._decode_isolated(engine, items[:half]) + self._decode_isolated(engine, items[half:])

    def _emit_ready(self, s: Stream) -> None:
        """Emit the stream's leading finals whose text is known, in order."""
        while s.finals and s.finals[0].result is not None and not s.closed:
            job = s.finals.popleft()
            assert job.result is not None
            emitted = s.apply_final(job, job.result)
            if emitted:
                self.metrics.words.inc(sum(len(t.words) for t in emitted))
                if job.speech_end_wall is not None:
                    self.metrics.final_latency.observe(time.monotonic() - job.speech_end_wall)
