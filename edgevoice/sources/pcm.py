"""Raw PCM to the recognizer's input: 16 kHz mono float32.

:class:`PcmDecoder` turns a stream of byte chunks of any size (samples may be
split across chunks) into recognizer input; :class:`Resampler` and
:func:`downmix` serve sources that already have float samples (microphones).
"""

from __future__ import annotations

import numpy as np
import soxr

from edgevoice.recognition.types import SAMPLE_RATE

FORMATS: dict[str, np.dtype] = {"pcm_s16le": np.dtype("<i2"), "pcm_f32le": np.dtype("<f4")}
MIN_RATE = 8000
MAX_RATE = 48000


def downmix(frames: np.ndarray) -> np.ndarray:
    """Average the channels of ``(n, channels)`` float samples into mono float32 (1-D input passes through)."""
    if frames.ndim == 1:
        return frames.astype(np.float32, copy=False)
    if frames.shape[1] == 1:
        return np.asarray(frames[:, 0], dtype=np.float32)
    return np.asarray(frames.mean(axis=1, dtype=np.float32))


class Resampler:
    """Streaming mono resampler to 16 kHz (soxr, state kept across chunks; identity at 16 kHz)."""

    def __init__(self, rate: int, out_rate: int = SAMPLE_RATE, quality: str = "HQ") -> None:
        self.rate = rate
        self.out_rate = out_rate
        self._stream = (
            None if rate == out_rate else soxr.ResampleStream(rate, out_rate, 1, dtype="float32", quality=quality)
        )

    def process(self, audio: np.ndarray) -> np.ndarray:
        """Resample the next chunk of mono float32 samples."""
        audio = np.ascontiguousarray(audio, dtype=np.float32)
        if self._stream is None:
            return audio
        return np.asarray(self._stream.resample_chunk(audio), dtype=np.float32)

    def flush(self) -> np.ndarray:
        """The samples still held by the filter; call once at the end of the stream."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = np.asarray(self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True), dtype=np.float32)
        self._stream = soxr.ResampleStream(self.rate, self.out_rate, 1, dtype="float32")
        return out


class PcmDecoder:
    """Decode one stream's PCM bytes (``pcm_s16le``/``pcm_f32le``, mono or stereo, 8–48 kHz) to 16 kHz mono float32."""

    def __init__(self, fmt: str = "pcm_s16le", sample_rate: int = SAMPLE_RATE, channels: int = 1) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r} is not supported; use one of {', '.join(FORMATS)}")
        if not MIN_RATE <= sample_rate <= MAX_RATE:
            raise ValueError(f"sample_rate {sample_rate} is outside {MIN_RATE}–{MAX_RATE} Hz")
        if channels not in (1, 2):
            raise ValueError(f"channels {channels} is not 1 or 2")
        self.format = fmt
        self.sample_rate = sample_rate
        self.channels = channels
        self._dtype = FORMATS[fmt]
        self._frame_bytes = self._dtype.itemsize * channels
        self._rest = b""
        self._resampler = Resampler(sample_rate)
        self.input_seconds = 0.0
        """Seconds of audio decoded so far (at the input rate)."""

    def decode(self, data: bytes | bytearray | memoryview) -> np.ndarray:
        """Decode the next chunk; a partial sample at its end waits for the next chunk."""
        buf = self._rest + bytes(data) if self._rest else bytes(data)
        usable = len(buf) - len(buf) % self._frame_bytes
        self._rest = buf[usable:]
        if usable == 0:
            return np.zeros(0, dtype=np.float32)
        raw = np.frombuffer(buf, dtype=self._dtype, count=usable // self._dtype.itemsize)
        if self._dtype.kind == "i":
            samples = raw.astype(np.float32) / 32768.0
        else:
            samples = np.nan_to_num(raw.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
            np.clip(samples, -1.0, 1.0, out=samples)
        if self.channels > 1:
            samples = downmix(samples.reshape(-1, self.channels))
        self.input_seconds += len(samples) / self.sample_rate
        return self._resampler.process(samples)

    def flush(self) -> np.ndarray:
        """The resampler's tail at the end of the stream (an incomplete last sample is dropped)."""
        self._rest = b""
        return self._resampler.flush()
