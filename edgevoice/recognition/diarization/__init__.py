"""Speaker diarization backends; ``none`` labels everyone "Speaker 1" at zero cost."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from edgevoice.config import DiarizationSettings
from edgevoice.metrics import Metrics
from edgevoice.recognition.types import Transcript

DEFAULT_SPEAKER = "Speaker 1"


class DiarizerStream(Protocol):
    """Speaker activity of one stream, computed beside recognition."""

    def feed(self, audio: np.ndarray) -> None:
        """Append 16 kHz mono float32 audio; never blocks (work happens off the loop)."""

    def split(self, final: Transcript) -> Sequence[Transcript]:
        """Label a final segment's words and split it where the speaker changes.

        Called by the recognizer OFF the event loop (its worker thread) just before the
        final is emitted. Must be quick and must never wait for lagging work: it uses
        what is known now (diarization never delays transcripts).
        """

    def close(self) -> None: ...


class Diarizer(Protocol):
    """A loaded diarization backend shared by all streams."""

    name: str

    def open_stream(self, stream_id: str) -> DiarizerStream: ...


class _NoneStream:
    def feed(self, audio: np.ndarray) -> None:
        pass

    def split(self, final: Transcript) -> Sequence[Transcript]:
        return (final,)

    def close(self) -> None:
        pass


class NoDiarizer:
    """Every stream has one speaker."""

    name = "none"

    def open_stream(self, stream_id: str) -> DiarizerStream:
        return _NoneStream()


def build_diarizer(settings: DiarizationSettings, metrics: Metrics) -> Diarizer:
    """Load the configured backend (blocking: call it off the event loop)."""
    if settings.backend == "none":
        return NoDiarizer()
    raise NotImplementedError(f"diarization.backend = {settings.backend!r} is not available yet")
