"""What a diarization backend is: the protocols the recognizer uses, and the one error it raises.

Backends (:mod:`.sortformer`, :mod:`.embedding`) import this module, never the
package, so that the package may load them lazily without an import cycle.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from edgevoice.recognition.types import Transcript


class DiarizationError(Exception):
    """The configured diarization backend cannot be used; the message names what is missing."""


class DiarizerStream(Protocol):
    """Speaker activity of one stream, computed beside recognition."""

    def feed(self, audio: np.ndarray) -> None:
        """Append 16 kHz mono float32 audio; never blocks (work happens off the loop)."""

    def skip(self, samples: int) -> None:
        """Audio dropped upstream (never fed): the stream's clock moves past ``samples`` so times stay aligned."""

    def split(self, final: Transcript) -> Sequence[Transcript]:
        """Label a final segment's words and split it where the speaker changes.

        Called by the recognizer OFF the event loop (its worker thread) just before the
        final is emitted. Must be quick and must never wait for lagging work: it uses
        what is known now (diarization never delays transcripts).
        """

    def close(self) -> None: ...

    @property
    def lag_s(self) -> float:
        """Seconds of received audio not yet diarized."""


class Diarizer(Protocol):
    """A loaded diarization backend shared by all streams."""

    name: str

    def open_stream(self, stream_id: str) -> DiarizerStream: ...

    def close(self) -> None:
        """Stop the backend's worker (at shutdown)."""
