"""One stream inside the shared recognizer: its inbox, endpointing, partials, finals and commit rule.

Thread model: ``feed``/``finish``/``close``/``lag_s`` are called on the event loop
and only touch the inbox (a deque) and a few flags. Every other method runs in the
recognizer's inference thread. Results go back to the loop through
``loop.call_soon_threadsafe``, in order; ``finish()``'s future is resolved the same
way after the last final, so a caller that awaited it has seen every final.

Per stream the memory is bounded: the utterance buffer holds at most
``asr.max_utterance_s`` (longer speech is committed by the stability rule or cut),
and audio waiting for recognition (inbox + queued finals) at most
``asr.max_backlog_s``; beyond that the oldest is dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edgevoice.config import AsrSettings
from edgevoice.recognition.engine import Decoded, DecodedWord
from edgevoice.recognition.types import SAMPLE_RATE, Transcript, TranscriptCallback, Word
from edgevoice.recognition.vad import WINDOW, EndpointConfig, Endpointer, StreamingVad

if TYPE_CHECKING:
    from edgevoice.recognition.diarization import DiarizerStream

log = logging.getLogger(__name__)

PAD_S = 0.2
"""Audio kept before the first and after the last speech window of an utterance."""
MIN_SPEECH_S = 0.25
"""Shorter bursts of VAD speech are ignored (clicks, coughs)."""
COMMIT_AFTER_S = 4.0
"""Utterance length from which the stability rule may commit agreed words early."""
COMMIT_GUARD_S = 1.0
"""Words ending this close to the end of the buffer are never committed (the next audio may change them)."""
COMMIT_MIN_WORDS = 3
COMMIT_ANY_AT = 0.6
"""Fraction of asr.max_utterance_s from which agreed words are committed without a sentence end."""
_SENTENCE_END = frozenset(".?!。？！")
_NORM = re.compile(r"[^\w']+")


class StreamClosed(RuntimeError):
    """Audio was fed to a stream that is finishing or closed."""


@dataclass(slots=True)
class FinalJob:
    """A finished utterance (or committed piece) waiting for its final decode."""

    segment: int
    start: int
    """Stream sample where ``audio`` begins."""
    audio: np.ndarray
    speech_end_wall: float | None
    """time.monotonic() when the last speech sample arrived (for the latency metric); None for cuts."""
    ready: float
    """time.monotonic() when it was queued (FIFO across streams)."""
    result: Decoded | None = None
    """Already known (committed by the stability rule from a partial): emitted without a decode."""


@dataclass(slots=True)
class PartialJob:
    segment: int
    start: int
    audio: np.ndarray


@dataclass(slots=True)
class _Hypothesis:
    segment: int
    words: list[DecodedWord] = field(default_factory=list)


def _norm(word: str) -> str:
    return _NORM.sub("", word.casefold())


class Stream:
    """A :class:`~edgevoice.recognition.types.RecognitionStream` served by a :class:`Scheduler`."""

    def __init__(
        self,
        stream_id: str,
        language: str | None,
        on_transcript: TranscriptCallback,
        loop: asyncio.AbstractEventLoop,
        settings: AsrSettings,
        wake: object,
    ) -> None:
        self.stream_id = stream_id
        self.language = language
        self._on_transcript = on_transcript
        self._loop = loop
        self._wake = wake
        self.settings = settings
        # --- shared with the loop (single writer each) ---
        self._inbox: deque[tuple[np.ndarray | None, int, float]] = deque()
        self._inbox_samples = 0  # written by the loop only (approximate for the backlog check)
        self._received = 0  # loop
        self._taken = 0  # worker: samples popped from the inbox
        self._done = 0  # worker: samples recognized (final, silence, or covered by a partial)
        self.closed = False
        self.finishing = False
        self._finish_future: asyncio.Future[None] | None = None
        # --- worker only ---
        self.diarizer: DiarizerStream | None = None
        self.diarizer_factory: Callable[[], DiarizerStream] | None = None
        """Opens the diarizer stream in the inference thread on the first cycle."""
        self._vad: StreamingVad | None = None
        self._ep = Endpointer(
            EndpointConfig(
                threshold=settings.vad_threshold,
                min_silence_windows=max(1, round(settings.min_silence_ms / 1000 * SAMPLE_RATE / WINDOW)),
                min_speech_windows=max(1, round(MIN_SPEECH_S * SAMPLE_RATE / WINDOW)),
                pad_windows=max(1, round(PAD_S * SAMPLE_RATE / WINDOW)),
            )
        )
        self._clock = 0  # samples through the VAD
        self._preroll: deque[tuple[np.ndarray, float]] = deque(maxlen=self._ep.config.pad_windows)
        cap = int((settings.max_utterance_s + 2 * PAD_S) * SAMPLE_RATE) + 2 * WINDOW
        self._buf = np.zeros(cap, dtype=np.float32)
        self._probs = np.zeros(cap // WINDOW + 1, dtype=np.float32)  # VAD probability per buffered window
        self._max_utt = int(settings.max_utterance_s * SAMPLE_RATE)
        self._len = 0
        self._utt_start = 0
        self._segment = 0
        self._next_segment = 0
        self._last_speech_wall = 0.0
        self._partial_len = 0  # buffer length at the last partial request
        self._speech_len = 0  # buffer length at the last speech window
        self.tentative: FinalJob | None = None
        """The final this utterance will have if the silence that began goes on to the endpoint: decoded
        while the endpoint is awaited, emitted at once when it is confirmed (dropped if speech resumes)."""
        self.partial_due_since: float | None = None
        self._partial_covered = 0  # stream sample up to which the current piece has a partial
        self._partial_text: dict[int, str] = {}
        self._hyp: _Hypothesis | None = None
        self.finals: deque[FinalJob] = deque()
        self.words_from = int(max(0.0, COMMIT_AFTER_S - 2 * settings.partial_interval_s) * SAMPLE_RATE)
        """Partials of at least this many samples get word timestamps (the stability rule compares them)."""
        self.flushed = False
        self.dropped_s = 0.0
        self.words_emitted = 0
        # --- recognized(): the loop asks for a sample, the worker posts how far finals are complete ---
        self._through_wanted = 0  # loop writes (smallest sample waited for; 0: none), worker reads
        self._through = 0  # loop: finals are complete up to this sample
        self._through_waiters: list[tuple[int, asyncio.Future[None]]] = []  # loop only

    # ---------------------------------------------------------------- event loop side

    def feed(self, audio: np.ndarray) -> None:
        """Queue 16 kHz mono float32 samples (never blocks)."""
        if self.closed or self.finishing:
            raise StreamClosed(f"stream {self.stream_id!r} is {'closed' if self.closed else 'finishing'}")
        arr = np.asarray(audio)
        if arr.ndim != 1:
            raise ValueError(f"stream {self.stream_id!r}: audio must be mono (1-D), got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"stream {self.stream_id!r}: audio must be float32 in [-1, 1], got {arr.dtype}")
        if not len(arr):
            return
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ValueError(f"stream {self.stream_id!r}: audio contains NaN or infinite samples")
        n = len(arr)
        self._received += n
        if self._received - self._taken > self.settings.max_backlog_s * SAMPLE_RATE:
            # The inference thread has not taken audio for max_backlog_s: keep the clock, drop the samples.
            self._inbox.append((None, n, time.monotonic()))
        else:
            self._inbox.append((arr, n, time.monotonic()))
        self._wake()

    async def finish(self) -> None:
        """Flush: every final of the audio fed so far has been delivered when this returns."""
        if self.closed:
            return
        if self._finish_future is None:
            self._finish_future = self._loop.create_future()
            self.finishing = True
            self._wake()
        await asyncio.shield(self._finish_future)

    def close(self) -> None:
        """Drop the stream without flushing; nothing is delivered after this returns."""
        if not self.closed:
            self.closed = True
            self._wake()
            if self._finish_future is not None and not self._finish_future.done():
                self._finish_future.set_result(None)
            self._release(float("inf"))

    async def recognized(self, sample: int) -> None:
        """Return once every final whose audio begins before stream sample ``sample`` has been delivered."""
        done = self._finish_future is not None and self._finish_future.done()
        if self.closed or done or sample <= self._through:
            return
        fut = self._loop.create_future()
        self._through_waiters.append((sample, fut))
        self._want_through()
        await fut

    def _want_through(self) -> None:
        waiting = [s for s, f in self._through_waiters if not f.done()]
        self._through_wanted = min(waiting, default=0)
        if waiting:
            self._wake()

    def _release(self, through: float) -> None:
        """On the loop: finals are complete up to ``through`` (inf: the stream is done)."""
        self._through = max(self._through, int(min(through, 1 << 62)))
        keep = []
        for s, f in self._through_waiters:
            if s <= through:
                if not f.done():
                    f.set_result(None)
            elif not f.done():
                keep.append((s, f))
        self._through_waiters = keep
        self._want_through()

    @property
    def lag_s(self) -> float:
        """Seconds of received audio not yet recognized (final, silence, or covered by a partial)."""
        return max(0, self._received - self._done) / SAMPLE_RATE

    def _deliver(self, transcript: Transcript) -> None:
        if self.closed:
            return
        try:
            self._on_transcript(transcript)
        except Exception:
            log.exception("stream %s: transcript callback failed", self.stream_id)

    # ---------------------------------------------------------------- inference thread side

    def post(self, fn: object, *args: object) -> None:
        """Run ``fn(*args)`` on the event loop (in order)."""
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(fn, *args)

    def emit(self, transcript: Transcript) -> None:
        self.post(self._deliver, transcript)

    def ingest(self, on_drop: object) -> bool:
        """Take queued audio through VAD and endpointing; True when anything was taken."""
        if self._vad is None:
            self._vad = StreamingVad()
        took = False
        while self._inbox:
            audio, n, wall = self._inbox.popleft()
            self._taken += n
            took = True
            if audio is None:
                self._gap(n, on_drop)
                continue
            if self.diarizer is not None:
                try:
                    self.diarizer.feed(audio)
                except Exception:
                    log.exception("stream %s: diarizer failed; speakers are no longer labelled", self.stream_id)
                    self.diarizer = None
            windows, probs = self._vad.process(audio)
            self._windows(windows, probs, wall)
        if self.finishing and not self.flushed and not self._inbox:
            windows, probs = self._vad.flush()
            self._windows(windows, probs, time.monotonic())
            if self._ep.in_speech:
                self._end_utterance(self._len, forced=True)
            self.flushed = True
        self._bound_backlog(on_drop)
        return took

    def _gap(self, n: int, on_drop: object) -> None:
        """Samples dropped at feed time: end any utterance and move the clock past them."""
        if self._ep.in_speech:
            self._end_utterance(self._len, forced=True)
        lost = self._vad.pending if self._vad is not None else 0
        self._vad = StreamingVad()
        self._clock += n + lost
        self._preroll.clear()
        if self.diarizer is not None:
            self.diarizer.skip(n)  # keep speaker times aligned with the stream clock
        self._drop(n / SAMPLE_RATE, on_drop)

    def _drop(self, seconds: float, on_drop: object) -> None:
        self.dropped_s += seconds
        on_drop(self, seconds)

    def _windows(self, windows: np.ndarray, probs: np.ndarray, wall: float) -> None:
        ep = self._ep
        for window, prob in zip(windows, probs, strict=True):
            state = ep.step(float(prob))
            if state == Endpointer.SILENCE:
                self._preroll.append((window, float(prob)))
            elif state == Endpointer.START:
                pre = list(self._preroll)
                self._preroll.clear()
                self._utt_start = self._clock - len(pre) * WINDOW
                self._len = 0
                for w, p in pre:
                    self._append(w, p)
                self._append(window, float(prob))
                self._new_segment()
                self._last_speech_wall = wall
                self._speech_len = self._len
            else:
                self._append(window, float(prob))
                if prob >= ep.config.threshold:
                    self._last_speech_wall = wall
                    self._speech_len = self._len
                if ep.silence_run == 0:
                    self.tentative = None  # still speaking
                elif ep.silence_run == ep.config.pad_windows and state != Endpointer.END:
                    self._speculate()
                if state == Endpointer.END:
                    keep = (ep.silence_run - ep.config.pad_windows) * WINDOW
                    tail = self._tail_windows(ep.config.pad_windows)
                    self._end_utterance(self._len - max(0, keep), forced=False)
                    self._preroll.extend(tail)
                elif self._len >= self._max_utt:
                    self._cut()
            self._clock += WINDOW

    def _append(self, window: np.ndarray, prob: float) -> None:
        self._buf[self._len : self._len + WINDOW] = window
        self._probs[self._len // WINDOW] = prob
        self._len += WINDOW

    def _tail_windows(self, n: int) -> list[tuple[np.ndarray, float]]:
        start = max(0, self._len - n * WINDOW)
        return [
            (self._buf[i : i + WINDOW].copy(), float(self._probs[i // WINDOW]))
            for i in range(start, self._len - WINDOW + 1, WINDOW)
        ]

    def _new_segment(self) -> None:
        self.tentative = None
        self._segment = self._next_segment
        self._next_segment += 1
        self._partial_len = 0
        self.partial_due_since = None
        self._hyp = None
        self._partial_covered = self._utt_start

    def _speculate(self) -> None:
        """Speech may have ended: its final's audio (speech + pad) is known now; decode it early."""
        ep = self._ep
        if ep.speech_windows >= ep.config.min_speech_windows:
            self.tentative = FinalJob(
                self._segment, self._utt_start, self._buf[: self._len].copy(), self._last_speech_wall, time.monotonic()
            )

    def _end_utterance(self, end: int, *, forced: bool) -> None:
        """Queue the current utterance for its final decode (or drop a blip)."""
        ep = self._ep
        tentative, self.tentative = self.tentative, None
        if (
            not forced
            and tentative is not None
            and tentative.segment == self._segment
            and tentative.start == self._utt_start
            and len(tentative.audio) == end
        ):
            self.finals.append(tentative)  # already decoded, or decoded as a final now
        elif ep.speech_windows >= ep.config.min_speech_windows and end > 0:
            self.finals.append(
                FinalJob(
                    self._segment,
                    self._utt_start,
                    self._buf[:end].copy(),
                    None if forced else self._last_speech_wall,
                    time.monotonic(),
                )
            )
        elif self._partial_text.get(self._segment):
            # A partial was shown for what turned out to be no speech: withdraw it (in order, after
            # the finals still queued).
            self.finals.append(
                FinalJob(self._segment, self._utt_start, self._buf[:0].copy(), None, time.monotonic(), Decoded(""))
            )
        self._len = 0
        self.partial_due_since = None
        self._hyp = None
        ep.reset()

    def _cut(self) -> None:
        """The utterance reached asr.max_utterance_s without a commit: finalize it and go on."""
        ep = self._ep
        self.finals.append(
            FinalJob(self._segment, self._utt_start, self._buf[: self._len].copy(), None, time.monotonic())
        )
        self._utt_start += self._len
        self._len = 0
        self._speech_len = 0
        self._new_segment()
        ep.speech_windows = 0

    def _bound_backlog(self, on_drop: object) -> None:
        limit = self.settings.max_backlog_s * SAMPLE_RATE
        while self.finals and sum(len(j.audio) for j in self.finals) > limit:
            job = self.finals.popleft()
            log.warning(
                "stream %s: recognition backlog above %.0f s, dropped %.1f s of speech at %.1f s",
                self.stream_id,
                self.settings.max_backlog_s,
                len(job.audio) / SAMPLE_RATE,
                job.start / SAMPLE_RATE,
            )
            self._drop(len(job.audio) / SAMPLE_RATE, on_drop)

    # --- partials

    def partial_due(self, now: float) -> bool:
        """Whether a fresh partial is wanted now (speaking, enough new audio since the last one)."""
        ep = self._ep
        interval = int(self.settings.partial_interval_s * SAMPLE_RATE)
        due = (
            not self.closed
            and ep.in_speech
            and ep.speech_windows >= ep.config.min_speech_windows
            and self._len - self._partial_len >= interval
            and self._speech_len > self._partial_len  # nothing new to hear in trailing silence
        )
        if not due:
            self.partial_due_since = None
        elif self.partial_due_since is None:
            self.partial_due_since = now
        return due

    def partial_job(self) -> PartialJob:
        self._partial_len = self._len
        self.partial_due_since = None
        return PartialJob(self._segment, self._utt_start, self._buf[: self._len].copy())

    def apply_partial(self, job: PartialJob, result: Decoded) -> None:
        if self.closed or job.segment != self._segment or not self._ep.in_speech:
            return
        self._partial_covered = job.start + len(job.audio)
        words = result.words
        if result.text or self._partial_text.get(job.segment):
            self._partial_text[job.segment] = result.text
            self.emit(self._transcript(job.segment, job.start, words, result.text, len(job.audio), final=False))
        prev = self._hyp
        self._hyp = _Hypothesis(job.segment, list(words))
        if prev is None or prev.segment != job.segment or len(job.audio) < COMMIT_AFTER_S * SAMPLE_RATE:
            return
        self._commit(job, prev.words, words)

    def _commit(self, job: PartialJob, previous: list[DecodedWord], current: list[DecodedWord]) -> None:
        """Stability rule: words two successive partials agree on, and not near the end, become final."""
        agreed = 0
        for a, b in zip(previous, current, strict=False):
            if _norm(a.text) != _norm(b.text) or not _norm(b.text):
                break
            agreed += 1
        limit = len(job.audio) / SAMPLE_RATE - COMMIT_GUARD_S
        k = 0
        while k < agreed and k + 1 < len(current) and current[k].end <= limit:
            k += 1
        # Commit through the last sentence end; any agreed words only when the buffer nears its limit.
        ends = [j + 1 for j in range(k) if current[j].text.rstrip()[-1:] in _SENTENCE_END]
        if ends and ends[-1] >= COMMIT_MIN_WORDS:
            k = ends[-1]
        elif self._len < COMMIT_ANY_AT * self._max_utt or k < COMMIT_MIN_WORDS:
            return
        committed, following = current[:k], current[k]
        cut = self._quietest(committed[-1].end - 0.15, following.start + 0.15, limit)
        if cut <= 0:
            return
        text = "".join(w.text for w in committed).strip()
        result = Decoded(text, list(committed), language=self.language)
        self.finals.append(
            FinalJob(self._segment, self._utt_start, self._buf[:cut].copy(), None, time.monotonic(), result)
        )
        remaining = self._len - cut
        self._buf[:remaining] = self._buf[cut : self._len]
        self._probs[: remaining // WINDOW] = self._probs[cut // WINDOW : self._len // WINDOW]
        self._len = remaining
        self._speech_len = max(0, self._speech_len - cut)
        self._utt_start += cut
        self._new_segment()
        self._ep.speech_windows = max(self._ep.speech_windows, self._ep.config.min_speech_windows)

    def _quietest(self, lo_s: float, hi_s: float, limit_s: float) -> int:
        """Buffer offset (window-aligned) of the lowest VAD probability between two times: where to cut."""
        lo = max(1, int(lo_s * SAMPLE_RATE) // WINDOW)
        hi = min(self._len // WINDOW, int(min(hi_s, limit_s) * SAMPLE_RATE) // WINDOW + 1)
        if hi <= lo:
            return min(self._len, lo * WINDOW)
        best = lo + int(np.argmin(self._probs[lo:hi]))
        return best * WINDOW

    # --- finals

    def apply_final(self, job: FinalJob, result: Decoded) -> list[Transcript]:
        """Emit the final of ``job``; returns what was emitted (after diarization)."""
        end = job.start + len(job.audio)
        emitted = self._emit_final(job.segment, job.start, result.words, result.text, job.start, end)
        self._partial_text.pop(job.segment, None)
        return emitted

    def _emit_final(
        self, segment: int, start: int, words: list[DecodedWord], text: str, first: int, last: int
    ) -> list[Transcript]:
        if not text and not self._partial_text.get(segment):
            return []
        t = self._transcript(segment, start, words, text, last - start, final=True)
        parts = [t]
        if self.diarizer is not None and text:
            try:
                parts = list(self.diarizer.split(t)) or [t]
            except Exception:
                log.exception("stream %s: diarizer split failed; final kept unlabelled", self.stream_id)
        for p in parts:
            self.emit(p)
        self.words_emitted += len(t.words)
        return parts

    def _transcript(
        self, segment: int, start: int, words: list[DecodedWord], text: str, length: int, *, final: bool
    ) -> Transcript:
        offset = start / SAMPLE_RATE
        ws = tuple(
            Word(w.text.strip(), round(offset + w.start, 3), round(offset + w.end, 3), w.probability) for w in words
        )
        t0 = ws[0].start if ws else offset
        t1 = ws[-1].end if ws else (start + length) / SAMPLE_RATE
        return Transcript(
            stream_id=self.stream_id,
            text=text,
            final=final,
            start=round(t0, 3),
            end=round(max(t1, t0), 3),
            words=ws,
            language=self.language,
            segment=segment,
        )

    def settle(self) -> None:
        """Update the recognized position after a cycle."""
        if self.finals:
            self._done = max(self._done, self.finals[0].start)
        elif self._ep.in_speech:
            self._done = max(self._done, self._utt_start, self._partial_covered)
        else:
            self._done = max(self._done, self._clock)
        self._done = min(self._done, self._taken)
        wanted = self._through_wanted
        if wanted:
            # Finals are complete before the first one still queued, the utterance still open, or
            # (in silence) the VAD clock less the pre-roll a new utterance may still claim.
            if self.finals:
                through = self.finals[0].start
            elif self._ep.in_speech:
                through = self._utt_start
            else:
                through = self._clock - self._ep.config.pad_windows * WINDOW
            if through >= wanted:
                self._through_wanted = 0  # the loop sets it again if more is waited for
                self.post(self._release, through)

    def resolve_finish(self) -> None:
        fut = self._finish_future
        if fut is not None:
            self.post(_set_done, fut)
        self.post(self._release, float("inf"))


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
