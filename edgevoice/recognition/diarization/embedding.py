"""A light CPU backend: resemblyzer voice embeddings with online clustering.

Per stream, WebRTC VAD (30 ms frames) cuts the audio into speech regions (a pause of
``REGION_END_S`` ends one). Every ``HOP_S`` of a region the last ``WINDOW_S`` of it (never
crossing into the previous region) is embedded with resemblyzer's voice encoder, whose
weights ship in its PyPI package. The embedding joins the most similar known speaker when
the cosine similarity reaches ``diarization.similarity_threshold``; a window long enough
to trust that matches nobody founds a new speaker (up to ``max_speakers``). Each window
votes for its speaker over the frames it covers, weighted by its length; words take the
speaker with the most votes.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from edgevoice.config import DiarizationSettings
from edgevoice.metrics import Metrics
from edgevoice.recognition.diarization.align import FRAME_S, SpeakerTimeline
from edgevoice.recognition.diarization.types import DiarizationError
from edgevoice.recognition.diarization.worker import Worker, WorkerDiarizer, WorkerStream
from edgevoice.recognition.types import SAMPLE_RATE

log = logging.getLogger(__name__)

VAD_FRAME = 480
"""Samples per WebRTC VAD frame (30 ms)."""
REGION_END_S = 0.3
"""Non-speech that ends a speech region."""
WINDOW_S = 1.6
"""Longest audio embedded at once (resemblyzer's partial-utterance length)."""
HOP_S = 0.4
"""New region audio between embeddings."""
MIN_WINDOW_S = 0.4
"""Shortest window embedded at all."""
TRUST_S = 1.0
"""Shortest window allowed to found a speaker or move a centroid (shorter ones were measured unreliable)."""
SILENCE_RMS = 1e-3
"""Frames quieter than this (-60 dBFS) are never speech."""
CENTROID_MEMORY = 30
"""Windows a speaker centroid averages over before it starts to forget."""
READY_S = 0.2
"""Queued audio that wakes a stream's step."""


def load_embedding(settings: DiarizationSettings, metrics: Metrics) -> EmbeddingDiarizer:
    """Load resemblyzer's voice encoder and start the worker (blocking: a few seconds)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # webrtcvad imports the deprecated pkg_resources
            import torch
            import webrtcvad
            from resemblyzer import VoiceEncoder
    except ImportError as exc:
        raise DiarizationError(
            f"diarization.backend = 'embedding' needs resemblyzer (pip install 'edgevoice[embedding]'): {exc}"
        ) from None
    from edgevoice.recognition.diarization.sortformer import pick_device

    device = pick_device(settings.device)
    if device == "cpu" and settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    try:
        encoder = VoiceEncoder(device, verbose=False)
    except Exception as exc:
        raise DiarizationError(f"cannot load resemblyzer's voice encoder: {exc}") from None
    encoder.eval()
    log.info("embedding diarizer (resemblyzer) loaded on %s", device)
    return EmbeddingDiarizer(encoder, webrtcvad.Vad, settings, metrics)


class _Region:
    """A speech region being heard: its recent audio (pauses shorter than REGION_END_S included)."""

    KEEP = int(2 * WINDOW_S * SAMPLE_RATE)

    def __init__(self, start: int) -> None:
        self.start = start
        """Absolute sample of the oldest audio kept."""
        self.parts: list[np.ndarray] = []
        self.length = 0
        self.voiced_end = 0
        """Length kept up to the last speech frame."""
        self.embedded_at = 0
        """``voiced_end`` at the last embedding."""

    def add(self, frame: np.ndarray, speech: bool) -> None:
        self.parts.append(frame)
        self.length += len(frame)
        if speech:
            self.voiced_end = self.length
        if self.length > 2 * self.KEEP:  # a long region keeps only what a window can reach
            drop = self.length - self.KEEP
            self.parts = [np.concatenate(self.parts)[drop:]]
            self.start += drop
            self.length -= drop
            self.voiced_end -= drop
            self.embedded_at -= drop

    def tail(self, samples: int) -> tuple[int, np.ndarray]:
        """Absolute start and audio of the last ``samples`` up to the last speech frame."""
        if len(self.parts) > 1:
            self.parts = [np.concatenate(self.parts)]
        window = self.parts[0][max(0, self.voiced_end - samples) : self.voiced_end]
        return self.start + self.voiced_end - len(window), window


class EmbeddingStream(WorkerStream):
    """Per-stream VAD state, open region and speaker centroids."""

    def __init__(self, stream_id: str, diarizer: EmbeddingDiarizer) -> None:
        super().__init__(
            stream_id,
            diarizer.worker,
            SpeakerTimeline(diarizer.slots, FRAME_S),
            diarizer.max_lag_s,
            min_score=1e-3,
        )
        self.vad = diarizer.make_vad(3)
        self.pending = np.zeros(0, dtype=np.float32)
        self.pos = 0
        """Absolute sample of ``pending[0]``."""
        self.region: _Region | None = None
        self.centroids: list[np.ndarray] = []
        self.counts: list[int] = []


class EmbeddingDiarizer(WorkerDiarizer[EmbeddingStream]):
    """resemblyzer's encoder shared by every stream; one worker thread runs them all."""

    name = "embedding"

    def __init__(self, encoder: Any, make_vad: Any, settings: DiarizationSettings, metrics: Metrics) -> None:
        import librosa
        import torch
        from resemblyzer import hparams, normalize_volume

        self._torch = torch
        self._normalize = normalize_volume
        # resemblyzer's wav_to_mel_spectrogram, computed with torch: librosa's numpy/OpenBLAS path
        # spins extra threads that were measured to burn 5x the CPU on a loaded box.
        self._n_fft = hparams.sampling_rate * hparams.mel_window_length // 1000
        self._hop = hparams.sampling_rate * hparams.mel_window_step // 1000
        self._window = torch.hann_window(self._n_fft, periodic=True)
        self._mel_basis = torch.from_numpy(
            librosa.filters.mel(sr=hparams.sampling_rate, n_fft=self._n_fft, n_mels=hparams.mel_n_channels)
        ).float()
        self.encoder = encoder
        self.make_vad = make_vad
        self.slots = settings.max_speakers
        self.threshold = settings.similarity_threshold
        self.max_lag_s = settings.max_lag_s
        self.worker: Worker[EmbeddingStream] = Worker(self, self.name, metrics)

    def new_stream(self, stream_id: str) -> EmbeddingStream:
        return EmbeddingStream(stream_id, self)

    # -- worker side -------------------------------------------------------------------

    def absorb(self, s: EmbeddingStream, start: int, audio: np.ndarray) -> None:
        if start > s.pos + len(s.pending):  # audio was skipped: the open region ends where it stopped
            self._process(s)
            self._close_region(s)
            s.pending, s.pos = np.zeros(0, dtype=np.float32), start
        s.pending = np.concatenate([s.pending, audio]) if len(s.pending) else audio

    def ready(self, s: EmbeddingStream) -> bool:
        return len(s.pending) >= READY_S * SAMPLE_RATE

    def reset(self, s: EmbeddingStream) -> None:
        s.pos += len(s.pending)
        s.pending = np.zeros(0, dtype=np.float32)
        s.region = None

    def run(self, streams: Sequence[EmbeddingStream]) -> None:
        for s in streams:
            self._process(s)

    def _process(self, s: EmbeddingStream) -> None:
        n = len(s.pending) // VAD_FRAME * VAD_FRAME
        frames = s.pending[:n].reshape(-1, VAD_FRAME)
        start = s.pos
        s.pending, s.pos = s.pending[n:], s.pos + n
        pcm = (np.clip(frames, -1.0, 1.0) * 32767).astype("<i2")
        loud = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1)) >= SILENCE_RMS
        frame_len = int(FRAME_S * SAMPLE_RATE)
        s.timeline.mark_known(start // frame_len, (start + n) // frame_len)
        end_after = int(REGION_END_S * SAMPLE_RATE)
        for i, frame in enumerate(frames):
            speech = bool(loud[i]) and s.vad.is_speech(pcm[i].tobytes(), SAMPLE_RATE)
            if s.region is None:
                if not speech:
                    continue
                s.region = _Region(start + i * VAD_FRAME)
            region = s.region
            region.add(frame, speech)
            if region.length - region.voiced_end >= end_after:
                self._close_region(s)
            elif region.voiced_end - region.embedded_at >= HOP_S * SAMPLE_RATE:
                self._embed(s, region)

    def _close_region(self, s: EmbeddingStream) -> None:
        region, s.region = s.region, None
        if region is not None and region.voiced_end - region.embedded_at >= VAD_FRAME * 4:
            self._embed(s, region)

    def _embed(self, s: EmbeddingStream, region: _Region) -> None:
        region.embedded_at = region.voiced_end
        if region.voiced_end < MIN_WINDOW_S * SAMPLE_RATE:
            return
        first, window = region.tail(int(WINDOW_S * SAMPLE_RATE))
        length_s = len(window) / SAMPLE_RATE
        wav = self._normalize(window.astype(np.float32), -30, increase_only=True)
        embedding = self._embedding(np.asarray(wav, dtype=np.float32))
        if not np.isfinite(embedding).all():  # an all-zero encoder output cannot be normalised
            return
        speaker, weight = self._assign(s, embedding, length_s)
        if speaker is None:
            return
        frame_len = int(FRAME_S * SAMPLE_RATE)
        lo, hi = first // frame_len, -(-(first + len(window)) // frame_len)
        votes = np.zeros((hi - lo, self.slots), dtype=np.float32)
        votes[:, speaker] = weight
        s.timeline.write(lo, votes, add=True)

    def _embedding(self, wav: np.ndarray) -> np.ndarray:
        """resemblyzer's utterance embedding of ``wav`` (its mel spectrogram, then the voice encoder)."""
        torch = self._torch
        with torch.inference_mode():
            spec = torch.stft(
                torch.from_numpy(wav),
                n_fft=self._n_fft,
                hop_length=self._hop,
                window=self._window,
                center=True,
                pad_mode="constant",
                return_complex=True,
            )
            mel = (self._mel_basis @ spec.abs().pow(2)).T
            return np.asarray(self.encoder(mel[None].to(self.encoder.device))[0].cpu().numpy())

    def _assign(self, s: EmbeddingStream, e: np.ndarray, length_s: float) -> tuple[int | None, float]:
        """Online clustering: (speaker index, vote weight) for one window's embedding."""
        weight = min(1.0, length_s / WINDOW_S)
        trusted = length_s >= TRUST_S
        if s.centroids:
            sims = np.array([c @ e for c in s.centroids])
            best = int(np.argmax(sims))
            if sims[best] >= self.threshold:
                if trusted:
                    n = min(s.counts[best], CENTROID_MEMORY)
                    c = s.centroids[best] * n + e
                    s.centroids[best] = c / np.linalg.norm(c)
                    s.counts[best] += 1
                return best, weight
        if trusted and len(s.centroids) < self.slots:
            s.centroids.append(e / np.linalg.norm(e))
            s.counts.append(1)
            log.debug("stream %s: new speaker %d", s.stream_id, len(s.centroids))
            return len(s.centroids) - 1, weight
        if s.centroids:
            return best, weight / 2  # nobody matches and no new speaker may be founded: nearest, unsure
        return None, 0.0
