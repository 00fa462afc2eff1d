"""One worker thread per backend runs every stream's diarization steps, off the event loop.

``feed()`` (on the loop) only copies audio into the stream's queue and wakes the worker.
The worker moves queued audio into the backend's per-stream state, runs the steps that
have enough audio (the backend may batch streams together), and writes speaker scores
into each stream's timeline. ``split()`` reads the timeline and never waits for it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from edgevoice.metrics import Metrics
from edgevoice.recognition.diarization.align import SpeakerLabels, SpeakerTimeline, split_final
from edgevoice.recognition.types import SAMPLE_RATE, Transcript

log = logging.getLogger(__name__)


class StreamAudio:
    """Audio received but not yet taken by the worker; the oldest is dropped beyond ``max_samples``."""

    def __init__(self, max_samples: int) -> None:
        self._max = max_samples
        self._lock = threading.Lock()
        self._blocks: deque[tuple[int, np.ndarray]] = deque()
        self._pending = 0
        self.received = 0
        """Stream position (samples) after the newest audio, skipped audio included."""
        self.dropped = 0
        """Samples skipped because the worker lagged more than ``max_samples``."""

    def push(self, audio: np.ndarray) -> None:
        block = np.array(audio, dtype=np.float32, copy=True)
        if block.ndim != 1:
            raise ValueError(f"diarization takes mono 16 kHz audio (1-D), got shape {block.shape}")
        if not len(block):
            return
        with self._lock:
            self._blocks.append((self.received, block))
            self._pending += len(block)
            self.received += len(block)
            excess = self._pending - self._max
            while excess > 0:
                start, head = self._blocks[0]
                cut = min(excess, len(head))
                if cut == len(head):
                    self._blocks.popleft()
                else:
                    self._blocks[0] = (start + cut, head[cut:])
                self._pending -= cut
                self.dropped += cut
                excess -= cut

    def skip(self, samples: int) -> None:
        """The stream's clock moves past ``samples`` that will never be fed."""
        with self._lock:
            self.received += max(0, int(samples))

    def take(self) -> list[tuple[int, np.ndarray]]:
        """Everything queued, as contiguous runs of (absolute start sample, audio)."""
        with self._lock:
            blocks = list(self._blocks)
            self._blocks.clear()
            self._pending = 0
        runs: list[tuple[int, list[np.ndarray], int]] = []
        for start, block in blocks:
            if runs and runs[-1][2] == start:
                first, parts, _ = runs[-1]
                parts.append(block)
                runs[-1] = (first, parts, start + len(block))
            else:
                runs.append((start, [block], start + len(block)))
        return [(first, parts[0] if len(parts) == 1 else np.concatenate(parts)) for first, parts, _ in runs]

    @property
    def pending(self) -> int:
        return self._pending


class WorkerStream:
    """A stream of a worker-based backend: audio queue, speaker timeline and stable labels."""

    def __init__(
        self, stream_id: str, worker: Worker[Any], timeline: SpeakerTimeline, max_lag_s: float, min_score: float
    ):
        self.stream_id = stream_id
        self.audio = StreamAudio(int(max_lag_s * SAMPLE_RATE))
        self.timeline = timeline
        self.labels = SpeakerLabels()
        self._worker = worker
        self._min_score = min_score
        self._split_lock = threading.Lock()
        self._warned_drop = False
        self.closed = False

    def feed(self, audio: np.ndarray) -> None:
        """Queue a copy of ``audio`` for the worker (cheap; safe on the event loop)."""
        if self.closed:
            return
        before = self.audio.dropped
        self.audio.push(audio)
        if self.audio.dropped > before and not self._warned_drop:
            self._warned_drop = True
            log.warning(
                "diarization lags on stream %s: skipping its oldest audio (text keeps the known speaker)",
                self.stream_id,
            )
        self._worker.wake()

    def skip(self, samples: int) -> None:
        """Audio dropped upstream: the stream's clock moves on without it."""
        self.audio.skip(samples)

    def split(self, final: Transcript) -> tuple[Transcript, ...]:
        """Speaker-labelled pieces of ``final`` from what is known now (never waits for the worker)."""
        with self._split_lock:
            return split_final(final, self.timeline, self.labels, min_score=self._min_score)

    def close(self) -> None:
        self.closed = True
        self._worker.remove(self)

    @property
    def lag_s(self) -> float:
        """Seconds of received audio past the newest diarized frame."""
        done = self.timeline.end_frame * self.timeline.frame_s
        return max(0.0, self.audio.received / SAMPLE_RATE - done)


S = TypeVar("S", bound=WorkerStream)
S_contra = TypeVar("S_contra", bound=WorkerStream, contravariant=True)


class Backend(Protocol[S_contra]):
    """What a worker-based backend implements (all called in the worker thread)."""

    def absorb(self, stream: S_contra, start: int, audio: np.ndarray) -> None:
        """Append queued audio (starting at absolute sample ``start``; a jump means audio was skipped)."""

    def ready(self, stream: S_contra) -> bool:
        """Whether the stream has enough audio for a step."""

    def run(self, streams: Sequence[S_contra]) -> None:
        """Run one step for each ready stream (batched where possible) and write their timelines."""

    def reset(self, stream: S_contra) -> None:
        """Forget the stream's buffered audio after a failed step."""


class Worker(Generic[S]):
    """The thread running a backend's steps for all its streams."""

    def __init__(self, backend: Backend[S], name: str, metrics: Metrics) -> None:
        self._backend = backend
        self.name = name
        self._cost = metrics.diarization_seconds.labels(name)
        self._streams: list[S] = []
        self._cond = threading.Condition()
        self._work = False
        self._busy = False
        self._stop = False
        self._errors = 0
        self._thread = threading.Thread(target=self._loop, name=f"diarization-{name}", daemon=True)
        self._thread.start()

    def add(self, stream: S) -> None:
        with self._cond:
            self._streams.append(stream)

    def remove(self, stream: S) -> None:
        with self._cond:
            if stream in self._streams:
                self._streams.remove(stream)

    def wake(self) -> None:
        with self._cond:
            self._work = True
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every queued audio has been taken and no step is running (tests, benches)."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._work and not self._busy, timeout)

    def close(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._work or self._stop)
                if self._stop:
                    return
                self._work, self._busy = False, True
            try:
                self._drain()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _drain(self) -> None:
        while not self._stop:
            with self._cond:
                streams = list(self._streams)
            for s in streams:
                for start, audio in s.audio.take():
                    self._backend.absorb(s, start, audio)
            ready = [s for s in streams if not s.closed and self._backend.ready(s)]
            if not ready:
                return
            t0 = time.perf_counter()
            try:
                self._backend.run(ready)
            except Exception:
                self._errors += 1
                if self._errors <= 5 or self._errors % 100 == 0:
                    log.exception(
                        "diarization step failed (%s, streams %s; error %d); their buffered audio is skipped",
                        self.name,
                        ", ".join(s.stream_id for s in ready),
                        self._errors,
                    )
                for s in ready:
                    self._backend.reset(s)
            finally:
                self._cost.inc(time.perf_counter() - t0)


class WorkerDiarizer(Generic[S]):
    """The :class:`~edgevoice.recognition.diarization.types.Diarizer` side of a worker-based backend.

    Subclasses set :attr:`worker` and build their stream in :meth:`new_stream`; each stream
    opened joins the worker, and :meth:`close` stops it.
    """

    worker: Worker[S]

    def new_stream(self, stream_id: str) -> S:
        """The backend's state for a new stream (not yet known to the worker)."""
        raise NotImplementedError

    def open_stream(self, stream_id: str) -> S:
        stream = self.new_stream(stream_id)
        self.worker.add(stream)
        return stream

    def close(self) -> None:
        """Stop the worker thread."""
        self.worker.close()
