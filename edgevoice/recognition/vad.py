"""Streaming Silero VAD (the ONNX model bundled with faster-whisper) and utterance endpointing.

faster-whisper runs its Silero model over a whole file at once; here the same model
is stepped chunk by chunk with its recurrent state (h, c) and 64-sample context
carried between calls, which gives exactly the probabilities of the one-shot run.
The ONNX session is shared (one process-wide instance); calls are made only from
the recognizer's inference thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

WINDOW = 512
"""Samples per VAD decision (32 ms at 16 kHz)."""
_CONTEXT = 64


def _session() -> Any:
    from faster_whisper.vad import get_vad_model

    return get_vad_model().session


class StreamingVad:
    """Silero speech probabilities for one stream, fed in arbitrary chunk sizes."""

    def __init__(self) -> None:
        self._session = _session()
        self._h = np.zeros((1, 1, 128), dtype=np.float32)
        self._c = np.zeros((1, 1, 128), dtype=np.float32)
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._rest = np.zeros(0, dtype=np.float32)

    def process(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(windows, probabilities) for every complete 512-sample window now available.

        ``windows`` has shape (n, 512); samples of an incomplete window wait for the next call.
        """
        data = np.concatenate([self._rest, audio]) if len(self._rest) else audio
        n = len(data) // WINDOW
        self._rest = data[n * WINDOW :].copy()
        if n == 0:
            return np.zeros((0, WINDOW), dtype=np.float32), np.zeros(0, dtype=np.float32)
        windows = data[: n * WINDOW].reshape(n, WINDOW)
        prev = np.concatenate([self._context[None, :], windows[:-1, -_CONTEXT:]], axis=0)
        x = np.ascontiguousarray(np.concatenate([prev, windows], axis=1), dtype=np.float32)
        probs, self._h, self._c = self._session.run(None, {"input": x, "h": self._h, "c": self._c})
        self._context = windows[-1, -_CONTEXT:].copy()
        return windows, np.asarray(probs, dtype=np.float32).reshape(-1)

    @property
    def pending(self) -> int:
        """Samples waiting for a complete window."""
        return len(self._rest)

    def flush(self) -> tuple[np.ndarray, np.ndarray]:
        """Pad the incomplete window with silence and process it (end of stream)."""
        if not len(self._rest):
            return np.zeros((0, WINDOW), dtype=np.float32), np.zeros(0, dtype=np.float32)
        return self.process(np.zeros(WINDOW - len(self._rest), dtype=np.float32))


@dataclass(frozen=True, slots=True)
class EndpointConfig:
    threshold: float = 0.5
    """Probability at or above which a window is speech."""
    min_silence_windows: int = 16
    """Windows below ``threshold - 0.15`` that end an utterance."""
    min_speech_windows: int = 8
    """Speech windows an utterance needs to be kept (shorter blips are dropped)."""
    pad_windows: int = 6
    """Windows of audio kept before the first and after the last speech window."""

    @property
    def neg_threshold(self) -> float:
        return max(self.threshold - 0.15, 0.01)


class Endpointer:
    """Silero's hysteresis as a per-window state machine: speech starts, continues, ends."""

    START, SPEECH, END, SILENCE = "start", "speech", "end", "silence"

    def __init__(self, config: EndpointConfig) -> None:
        self.config = config
        self.in_speech = False
        self.silence_run = 0
        """Trailing windows of silence inside the current utterance."""
        self.speech_windows = 0
        """Speech windows in the current utterance."""

    def step(self, prob: float) -> str:
        """Classify one window: START (speech begins here), SPEECH, END (the utterance ended), SILENCE."""
        cfg = self.config
        if not self.in_speech:
            if prob >= cfg.threshold:
                self.in_speech, self.silence_run, self.speech_windows = True, 0, 1
                return self.START
            return self.SILENCE
        if prob >= cfg.threshold:
            self.silence_run = 0
            self.speech_windows += 1
        elif prob < cfg.neg_threshold or self.silence_run:
            self.silence_run += 1
            if self.silence_run >= cfg.min_silence_windows:
                self.in_speech = False
                return self.END
        return self.SPEECH

    def reset(self) -> None:
        self.in_speech, self.silence_run, self.speech_windows = False, 0, 0
