"""One stream inside the shared recognizer: its inbox, endpointing, partials, finals and commit rule.

Thread model: ``feed``/``finish``/``close``/``lag_s`` are called on the event loop
and only touch the inbox (a deque) and a few flags. Every other method runs in the
recognizer's inference thread. Results go back to the loop through
``loop.call_soon_threadsafe``, in order; ``finish()``'s future is resolved the same
way after the last final, so a caller that awaited it has seen every final.

Bounds per stream: the utterance buffer holds at most ``asr.max_utterance_s``; when it
is full, the stream takes no more audio until the buffer has been committed (a forced
commit, decoded before anything else), so audio waits in the inbox; audio waiting for
recognition (inbox + queued finals) is at most ``asr.max_backlog_s``, beyond which the
oldest is dropped, counted and logged. Nothing is ever cut blind: every piece of a long
utterance ends at a word boundary chosen from a full-context decode.

What makes a final (all decoded with beam ``asr.beam_size`` in a 30 s window):

- an utterance that ends (``asr.min_silence_ms`` of silence) is decoded whole, as offline
  Whisper decodes a VAD chunk;
- during long speech, hypotheses of the whole buffer (from ``COMMIT_AFTER_S``) are compared:
  the words two successive ones agree on, through a sentence end and at least
  ``COMMIT_GUARD_S`` before the end of the buffer, are committed (the buffer is trimmed at
  the quietest point between the last committed word and the next; what follows is decoded
  conditioned on the committed text);
- a buffer that reaches ``asr.max_utterance_s`` without that is committed from one more
  decode of the whole buffer: every word ending ``FORCE_GUARD_S`` before its end (offline
  Whisper's 30 s seek). Under load hypotheses are skipped, so long speech is committed this
  way: later, never less accurately.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

from edgevoice.config import AsrSettings
from edgevoice.recognition.engine import Decoded, DecodedWord, DecodeRequest
from edgevoice.recognition.types import SAMPLE_RATE, Transcript, TranscriptCallback, Word
from edgevoice.recognition.vad import WINDOW, EndpointConfig, Endpointer, StreamingVad

if TYPE_CHECKING:
    from edgevoice.recognition.diarization import DiarizerStream

log = logging.getLogger(__name__)

PAD_S = 0.2
"""Audio kept after the last speech window of an utterance."""
PREROLL_S = 0.4
"""Audio kept before the first speech window (soft onsets such as "th" start below the VAD threshold;
offline faster-whisper pads 0.4 s)."""
MIN_SPEECH_S = 0.25
"""Shorter bursts of VAD speech are ignored (clicks, coughs)."""
COMMIT_AFTER_S = 12.0
"""Buffer length from which hypotheses carry words and may commit agreed words early. Shorter speech is
decoded whole at its end, as offline Whisper would: every piece costs the words after it their left context."""
HYPOTHESIS_INTERVAL_S = 1.0
"""Audio between two hypotheses (at least asr.partial_interval_s)."""
COMMIT_GUARD_S = 2.0
"""Agreed words ending this close to the end of the buffer are not committed (the next audio may change them)."""
FORCE_GUARD_S = 1.5
"""A forced commit keeps the words ending in the last this-many seconds of the buffer for the next piece."""
COMMIT_MIN_WORDS = 3
COMMIT_ANY_AT = 0.6
"""Fraction of asr.max_utterance_s from which agreed words are committed without a sentence end."""
CUT_SLACK_S = 0.1
"""A piece is cut at the quietest point between its last word's end and the next word's start, widened by
this much each side (word times from cross-attention are approximate)."""
CUT_AFTER_S = 0.25
"""Furthest a cut goes past the end of the last committed word."""
LEAD_IN_WINDOWS = 10
"""Windows of silence (0.32 s) the piece after a commit begins with."""
PREVIOUS_CHARS = 200
"""Committed text of the utterance the next piece is conditioned on (as offline Whisper's previous window)."""
_SENTENCE_END = frozenset(".?!。？！")
_NORM = re.compile(r"[^\w']+")

JobKind = Literal["final", "tentative", "commit", "partial"]


class StreamClosed(RuntimeError):
    """Audio was fed to a stream that is finishing or closed."""


@dataclass(slots=True)
class Job:
    """Audio of one stream waiting for a decode."""

    kind: JobKind
    """final: an ended utterance; tentative: its final decoded while the endpoint is awaited;
    commit: a full buffer to be committed; partial: a hypothesis of the buffer so far."""
    segment: int
    start: int
    """Stream sample where ``audio`` begins."""
    audio: np.ndarray
    speech_s: float
    """Seconds of VAD speech in ``audio``."""
    speech_end_s: float
    """Where the last VAD speech window ends in ``audio``."""
    previous: str
    """Committed text of the same utterance before ``audio`` (the decoder is conditioned on it)."""
    ready: float
    """time.monotonic() when it was queued (FIFO across streams)."""
    speech_end_wall: float | None = None
    """time.monotonic() when the last speech sample arrived (the latency metric); None when not an endpoint."""
    result: Decoded | None = None
    """Known text: emitted in order without a decode."""
    lead: int = 0
    """Samples of silence ``audio`` begins with after a commit (no word starts in them)."""
    doubted: Decoded | None = None
    """Its decode the final check doubted: the job waits for the vote of its views (a review)."""
    unverified: bool = False
    """Its decode failed verification: the job waits for its decode in the full window."""

    def request(self, language: str | None, beam: int, *, words: bool) -> DecodeRequest:
        """What the engine decodes: finals are verified (a second look deferred to a batch of its own);
        with words, a decode that stops before the speech does is continued (hypotheses must cover the
        buffer to be compared); a doubted one is reviewed, an unverified one decoded in the full window."""
        doubted = self.doubted
        return DecodeRequest(
            self.audio,
            language,
            beam,
            verify=self.kind != "partial",
            words=words,
            speech_s=self.speech_s,
            speech_end_s=self.speech_end_s if words else None,
            previous=self.previous,
            review=doubted is not None,
            first=doubted,
            defer=True,
            full_window=self.unverified,
        )


def _norm(word: str) -> str:
    return _NORM.sub("", word.casefold())


def _sentence_end(word: DecodedWord) -> bool:
    return word.text.rstrip()[-1:] in _SENTENCE_END


def _widest_gap(words: list[DecodedWord], lo: int, hi: int) -> int:
    """The k in [lo, hi] whose pause before words[k] is the longest (the latest of equals): where to cut."""

    def gap(k: int) -> float:
        return words[k].start - words[k - 1].end if k < len(words) else 1.0

    return max(range(lo, hi + 1), key=lambda k: (round(gap(k), 2), k))


class Stream:
    """A :class:`~edgevoice.recognition.types.RecognitionStream` served by a :class:`Scheduler`."""

    def __init__(
        self,
        stream_id: str,
        language: str | None,
        on_transcript: TranscriptCallback,
        loop: asyncio.AbstractEventLoop,
        settings: AsrSettings,
        wake: Callable[[], None],
        model: str = "",
    ) -> None:
        self.stream_id = stream_id
        self.language = language
        self.model = model
        """The engine (model name) this stream decodes with."""
        self._on_transcript = on_transcript
        self._loop = loop
        self._wake = wake
        self.settings = settings
        # --- shared with the loop (single writer each) ---
        self._inbox: deque[tuple[np.ndarray | None, int, float]] = deque()
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
        self._clock = 0  # samples through the endpointer
        self._held: deque[tuple[np.ndarray, np.ndarray, float]] = deque()
        """VAD-processed windows waiting while the buffer is full (a forced commit is pending)."""
        self._preroll: deque[tuple[np.ndarray, float]] = deque(maxlen=max(1, round(PREROLL_S * SAMPLE_RATE / WINDOW)))
        self._max_utt = int(settings.max_utterance_s * SAMPLE_RATE) // WINDOW * WINDOW
        cap = self._max_utt + 2 * WINDOW
        self._buf = np.zeros(cap, dtype=np.float32)
        self._probs = np.zeros(cap // WINDOW + 1, dtype=np.float32)  # VAD probability per buffered window
        self._len = 0
        self._utt_start = 0
        self._segment = 0
        self._next_segment = 0
        self._previous = ""
        self._lead = 0
        self._last_speech_wall = 0.0
        self._partial_len = 0  # buffer length at the last partial request
        self._speech_len = 0  # buffer length at the last speech window
        self.tentative: Job | None = None
        """The final this utterance will have if the silence that began goes on to the endpoint: decoded
        while the endpoint is awaited, emitted at once when it is confirmed (dropped if speech resumes)."""
        self.commit: Job | None = None
        """The forced commit of a full buffer (the stream takes no audio until it is applied)."""
        self.partial_due_since: float | None = None
        self._partial_covered = 0  # stream sample up to which the current piece has a partial
        self._partial_text: dict[int, str] = {}
        self._hyp: tuple[int, list[DecodedWord], float] | None = None
        """The last hypothesis with words: (segment, words, seconds of audio it heard)."""
        self.finals: deque[Job] = deque()
        interval = int(max(settings.partial_interval_s, HYPOTHESIS_INTERVAL_S) * SAMPLE_RATE)
        self.words_from = max(interval, int(COMMIT_AFTER_S * SAMPLE_RATE) - interval)
        """Partials of at least this many samples are hypotheses: beam, word timestamps, compared for commits."""
        self.flushed = False
        self.dropped_s = 0.0
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

    def post(self, fn: Callable[..., object], *args: object) -> None:
        """Run ``fn(*args)`` on the event loop (in order)."""
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            self._loop.call_soon_threadsafe(fn, *args)

    def emit(self, transcript: Transcript) -> None:
        self.post(self._deliver, transcript)

    @property
    def blocked(self) -> bool:
        """The buffer is full: no audio is taken until the forced commit is applied."""
        return self.commit is not None

    def ingest(self, on_drop: Callable[[Stream, float], None]) -> bool:
        """Take queued audio through VAD and endpointing; True when anything was taken."""
        if self._vad is None:
            self._vad = StreamingVad()
        took = False
        while self._held and not self.blocked:
            windows, probs, wall = self._held.popleft()
            self._windows(windows, probs, wall)
        while self._inbox and not self.blocked:
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
        if self.finishing and not self.flushed and not self._inbox and not self._held and not self.blocked:
            windows, probs = self._vad.flush()
            self._windows(windows, probs, time.monotonic())
            if not self.blocked:
                if self._ep.in_speech:
                    self._end_utterance(self._len, forced=True)
                self.flushed = True
        self._bound_backlog(on_drop)
        return took

    def _gap(self, n: int, on_drop: Callable[[Stream, float], None]) -> None:
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

    def _drop(self, seconds: float, on_drop: Callable[[Stream, float], None]) -> None:
        self.dropped_s += seconds
        on_drop(self, seconds)

    def _windows(self, windows: np.ndarray, probs: np.ndarray, wall: float) -> None:
        ep = self._ep
        for i, (window, p) in enumerate(zip(windows, probs, strict=True)):
            if ep.in_speech and self._len + WINDOW > self._max_utt:
                self._force_commit()
                self._held.appendleft((windows[i:], probs[i:], wall))
                return
            prob = float(p)
            state = ep.step(prob)
            if state == Endpointer.SILENCE:
                self._preroll.append((window, prob))
            elif state == Endpointer.START:
                pre = list(self._preroll)
                self._preroll.clear()
                self._utt_start = self._clock - len(pre) * WINDOW
                self._len = 0
                self._previous = ""
                self._lead = 0
                for w, q in pre:
                    self._append(w, q)
                self._append(window, prob)
                self._new_segment()
                self._last_speech_wall = wall
                self._speech_len = self._len
            else:
                self._append(window, prob)
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

    def _job(self, kind: JobKind, end: int | None = None, speech_end_wall: float | None = None) -> Job:
        """A job for the buffer's first ``end`` samples (all of it by default)."""
        end = self._len if end is None else end
        n = end // WINDOW
        speech = int(np.count_nonzero(self._probs[:n] >= self._ep.config.threshold)) * WINDOW
        return Job(
            kind,
            self._segment,
            self._utt_start,
            self._buf[:end].copy(),
            speech / SAMPLE_RATE,
            min(self._speech_len, end) / SAMPLE_RATE,
            self._previous,
            time.monotonic(),
            speech_end_wall,
            lead=self._lead,
        )

    def _speculate(self) -> None:
        """Speech may have ended: its final's audio (speech + pad) is known now; decode it early."""
        ep = self._ep
        if ep.speech_windows >= ep.config.min_speech_windows:
            self.tentative = self._job("tentative", speech_end_wall=self._last_speech_wall)

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
            tentative.kind = "final"
            self.finals.append(tentative)  # already decoded, or decoded as a final now
        elif ep.speech_windows >= ep.config.min_speech_windows and end > 0:
            self.finals.append(self._job("final", end, None if forced else self._last_speech_wall))
        elif self._partial_text.get(self._segment):
            # A partial was shown for what turned out to be no speech: withdraw it (in order, after
            # the finals still queued).
            job = self._job("final", 0)
            job.result = Decoded("")
            self.finals.append(job)
        self._len = 0
        self.partial_due_since = None
        self._hyp = None
        ep.reset()

    def _force_commit(self) -> None:
        """The buffer is full: decode it once more and commit it (see apply_commit)."""
        if self.commit is None:
            self.commit = self._job("commit")

    def _bound_backlog(self, on_drop: Callable[[Stream, float], None]) -> None:
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

    # --- partials and commits

    def partial_due(self, now: float, *, display: bool = True) -> bool:
        """Whether a fresh partial is wanted now (speaking, enough new audio since the last one).

        ``display=False`` (file transcription) wants only the hypotheses commits are made from.
        """
        ep = self._ep
        seconds = self.settings.partial_interval_s
        if self._len >= self.words_from:
            seconds = max(seconds, HYPOTHESIS_INTERVAL_S)
        interval = int(seconds * SAMPLE_RATE)
        due = (
            not self.closed
            and not self.blocked
            and ep.in_speech
            and ep.speech_windows >= ep.config.min_speech_windows
            and self._len // interval > self._partial_len // interval
            and self._speech_len > self._partial_len  # nothing new to hear in trailing silence
            and (display or self._len >= self.words_from)
        )
        if not due:
            self.partial_due_since = None
        elif self.partial_due_since is None:
            self.partial_due_since = now
        return due

    def partial_job(self) -> Job:
        self._partial_len = self._len
        self.partial_due_since = None
        return self._job("partial")

    def is_hypothesis(self, job: Job) -> bool:
        """A partial long enough to be compared for commits (decoded like a final, with words)."""
        return job.kind == "partial" and len(job.audio) >= self.words_from

    def apply_partial(self, job: Job, result: Decoded) -> None:
        if self.closed or job.segment != self._segment or not self._ep.in_speech or self.blocked:
            return
        self._partial_covered = job.start + len(job.audio)
        if result.text or self._partial_text.get(job.segment):
            self._partial_text[job.segment] = result.text
            self.emit(self._transcript(job, result.words, result.text, final=False))
        if not self.is_hypothesis(job):
            return
        prev, self._hyp = self._hyp, (job.segment, list(result.words), len(job.audio) / SAMPLE_RATE)
        if prev is not None and prev[0] == job.segment:
            self._agree(job, prev[1], prev[2], result.words)

    def _agree(self, job: Job, previous: list[DecodedWord], previous_s: float, current: list[DecodedWord]) -> None:
        """Commit the words two successive hypotheses agree on, through a sentence end both of them put there,
        each word heard with COMMIT_GUARD_S of audio after it in both (under load hypotheses are sparse: the
        earlier one may have ended just after a word it misheard for lack of what follows)."""
        agreed = 0
        for a, b in zip(previous, current, strict=False):
            if _norm(a.text) != _norm(b.text) or not _norm(b.text):
                break
            agreed += 1
        limit = min(previous_s, len(job.audio) / SAMPLE_RATE) - COMMIT_GUARD_S
        k = 0
        while k < agreed and max(current[k].end, previous[k].end) <= limit:
            k += 1
        ends = [
            j + 1 for j in range(COMMIT_MIN_WORDS - 1, k) if _sentence_end(current[j]) and _sentence_end(previous[j])
        ]
        if ends:
            self._commit_words(current, ends[-1])
        elif self._len >= COMMIT_ANY_AT * self._max_utt and k >= COMMIT_MIN_WORDS:
            self._commit_words(current, _widest_gap(current, COMMIT_MIN_WORDS, k))

    def apply_commit(self, job: Job, result: Decoded) -> None:
        """A full buffer's decode: commit through its last sentence end, else at its widest pause, among the
        words ending FORCE_GUARD_S before its end; what follows is the start of the next piece."""
        self.commit = None
        if self.closed or job.segment != self._segment:
            return
        words = result.words
        limit = len(job.audio) / SAMPLE_RATE - FORCE_GUARD_S
        k = 0
        while k < len(words) and words[k].end <= limit:
            k += 1
        if k:
            ends = [j + 1 for j in range(k // 2, k) if _sentence_end(words[j])]
            k = ends[-1] if ends else _widest_gap(words, max(1, k // 2), k)
        self._commit_words(words, k, limit)

    def _commit_words(self, words: list[DecodedWord], k: int, limit_s: float = 0.0) -> None:
        """Finalize ``words[:k]`` and trim the buffer at the quietest point after them; with k == 0, at the
        quietest point in the two seconds before ``limit_s`` (nothing was said there)."""
        if k:
            # Just after the last committed word, never into the next one: audio past the cut that no
            # committed word covers would be lost if the decoder skipped a word there, so the cut stays
            # within CUT_AFTER_S of the word's end; a clipped last word costs nothing (its text is known).
            lo = words[k - 1].end - CUT_SLACK_S / 2
            hi = words[k - 1].end + CUT_AFTER_S
            if k < len(words):
                hi = min(hi, words[k].start - CUT_SLACK_S / 2)
            hi = max(hi, lo + WINDOW / SAMPLE_RATE)
        else:
            lo, hi = max(0.0, limit_s - 2.0), limit_s
        cut = self._quietest(lo, hi, self._len / SAMPLE_RATE)
        if cut <= 0:
            return
        committed = words[:k]
        text = "".join(w.text for w in committed).strip()
        job = self._job("commit", cut)
        job.result = Decoded(text, committed, language=self.language)
        self.finals.append(job)
        # The next piece starts with LEAD_IN_S of silence: its first word is not at the very edge of the
        # audio (Whisper drops a word it hears starting there). The silence stands for the stream time
        # just before the cut, so word times stay stream times.
        lead = min(cut, LEAD_IN_WINDOWS * WINDOW)
        remaining = self._len - cut
        self._buf[lead : lead + remaining] = self._buf[cut : self._len].copy()
        self._buf[:lead] = 0.0
        self._probs[lead // WINDOW : (lead + remaining) // WINDOW] = self._probs[
            cut // WINDOW : self._len // WINDOW
        ].copy()
        self._probs[: lead // WINDOW] = 0.0
        self._len = lead + remaining
        self._speech_len = max(0, self._speech_len - cut) + lead
        self._utt_start += cut - lead
        self._lead = lead
        if text:
            self._previous = (self._previous + " " + text).strip()[-PREVIOUS_CHARS:]
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

    def apply_final(self, job: Job, result: Decoded) -> list[Transcript]:
        """Emit the final of ``job``; returns what was emitted (after diarization)."""
        text = result.text
        shown = self._partial_text.pop(job.segment, None)
        if not text and not shown:
            return []
        t = self._transcript(job, result.words, text, final=True)
        parts = [t]
        if self.diarizer is not None and text:
            try:
                parts = list(self.diarizer.split(t)) or [t]
            except Exception:
                log.exception("stream %s: diarizer split failed; final kept unlabelled", self.stream_id)
        for p in parts:
            self.emit(p)
        return parts

    def _transcript(self, job: Job, words: list[DecodedWord], text: str, *, final: bool) -> Transcript:
        offset = job.start / SAMPLE_RATE
        first = job.lead / SAMPLE_RATE  # nothing is said in the lead-in silence
        ws = tuple(
            Word(
                w.text.strip(),
                round(offset + max(w.start, first), 3),
                round(offset + max(w.end, first), 3),
                w.probability,
            )
            for w in words
        )
        t0 = ws[0].start if ws else offset + first
        t1 = ws[-1].end if ws else (job.start + len(job.audio)) / SAMPLE_RATE
        return Transcript(
            stream_id=self.stream_id,
            text=text,
            final=final,
            start=round(t0, 3),
            end=round(max(t1, t0), 3),
            words=ws,
            language=self.language,
            segment=job.segment,
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
                through = self._clock - (self._preroll.maxlen or 0) * WINDOW
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
