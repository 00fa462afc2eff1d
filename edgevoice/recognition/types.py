"""What recognition produces, and the interface every audio source uses."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

SAMPLE_RATE = 16000
"""Every stream is fed 16 kHz mono float32."""


@dataclass(frozen=True, slots=True)
class Word:
    """One recognized word with times in seconds from the stream start."""

    text: str
    start: float
    end: float
    probability: float = 1.0
    speaker: str | None = None


@dataclass(frozen=True, slots=True)
class Transcript:
    """A partial hypothesis (may change) or a final segment (never changes)."""

    stream_id: str
    text: str
    final: bool
    start: float
    """Seconds from the stream start."""
    end: float
    words: tuple[Word, ...] = ()
    speaker: str = "Speaker 1"
    language: str | None = None
    segment: int = 0
    """Per-stream counter; the partials of an utterance share the number of the final(s) they become."""


TranscriptCallback = Callable[[Transcript], None]
"""Called on the event loop for every partial and final of a stream."""


class FinalCheck(Protocol):
    """What finals are checked against (the keyword rules: a keyword missed is an event lost); called in
    the inference thread, so both methods must be cheap and pure."""

    def doubt(self, text: str, alternatives: Sequence[str], language: str | None = None) -> str:
        """Why a final (its text, the decoder's other beam hypotheses) needs a closer look ("" if not)."""

    def match(self, text: str, language: str | None = None) -> list[str]:
        """The events ``text`` fires: what the views of a doubted final vote on."""


class RecognitionStream(Protocol):
    """One audio stream inside the shared recognizer."""

    stream_id: str

    def feed(self, audio: np.ndarray) -> None:
        """Append 16 kHz mono float32 samples; cheap, called on the event loop, never blocks."""

    async def finish(self) -> None:
        """Flush buffered audio; every final has been emitted when this returns."""

    def close(self) -> None:
        """Drop the stream without flushing."""

    async def recognized(self, sample: int) -> None:
        """Return once every final whose audio begins before stream sample ``sample`` has been delivered.

        Samples count from the stream start (``Transcript.start * SAMPLE_RATE``). Returns at once
        when the stream is finished or closed. Speech still going on at ``sample`` waits for its
        utterance to end (at most ``asr.max_utterance_s``); audio that stops arriving never gets
        there, so callers bound the wait.
        """

    @property
    def lag_s(self) -> float:
        """Seconds of received audio not yet recognized."""


class Recognizer(Protocol):
    """The shared engine: one model, a batching scheduler, many streams."""

    def open_stream(
        self, stream_id: str, *, language: str | None, on_transcript: TranscriptCallback
    ) -> RecognitionStream:
        """Start recognizing a new stream; refusals are :class:`~edgevoice.errors.RecognizerError` subclasses."""

    def check_finals(self, check: FinalCheck | None) -> None:
        """Have every final ``check`` doubts decided by a vote of full-window views of its audio (the keyword
        rules: a keyword missed is an event lost); None: no such check."""
