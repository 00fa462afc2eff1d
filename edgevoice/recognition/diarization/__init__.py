"""Speaker diarization backends; ``none`` labels everyone "Speaker 1" at zero cost.

``sortformer``: NVIDIA's streaming Sortformer through NeMo (GPU); ``embedding``: resemblyzer
voice embeddings with online clustering (light, CPU); ``auto``: the best the box sustains.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgevoice.config import DiarizationSettings
from edgevoice.metrics import Metrics
from edgevoice.recognition.diarization.types import DiarizationError, Diarizer, DiarizerStream
from edgevoice.recognition.types import Transcript

__all__ = ["DiarizationError", "Diarizer", "DiarizerStream", "NoDiarizer", "build_diarizer", "pick_backend"]

log = logging.getLogger(__name__)


class _NoneStream:
    def feed(self, audio: np.ndarray) -> None:
        pass

    def skip(self, samples: int) -> None:
        pass

    def split(self, final: Transcript) -> Sequence[Transcript]:
        return (final,)

    def close(self) -> None:
        pass

    lag_s = 0.0


class NoDiarizer:
    """Every stream has one speaker."""

    name = "none"

    def open_stream(self, stream_id: str) -> DiarizerStream:
        return _NoneStream()

    def close(self) -> None:
        pass


def build_diarizer(settings: DiarizationSettings, metrics: Metrics, *, models_dir: Path | None = None) -> Diarizer:
    """Load the configured backend (blocking: call it off the event loop).

    ``models_dir`` is where manifest models are installed (needed when ``diarization.model``
    is a manifest name rather than a ``.nemo`` path). Raises :class:`DiarizationError`.
    """
    if settings.backend != "auto":
        return _load(settings.backend, settings, metrics, models_dir)
    choice, why = pick_backend(settings, models_dir)
    log.info("diarization: auto chose %s (%s)", choice, why)
    order = _AUTO_ORDER[_AUTO_ORDER.index(choice) :]
    for backend in order[:-1]:
        try:
            return _load(backend, settings, metrics, models_dir)
        except DiarizationError as exc:
            log.warning("diarization: auto could not start %s (%s); trying the next backend", backend, exc)
    return NoDiarizer()


_AUTO_ORDER = ("sortformer", "embedding", "none")


def _load(backend: str, settings: DiarizationSettings, metrics: Metrics, models_dir: Path | None) -> Diarizer:
    if backend == "sortformer":
        from edgevoice.recognition.diarization.sortformer import load_sortformer

        return load_sortformer(settings, metrics, models_dir=models_dir)
    if backend == "embedding":
        from edgevoice.recognition.diarization.embedding import load_embedding

        return load_embedding(settings, metrics)
    return NoDiarizer()


def pick_backend(settings: DiarizationSettings, models_dir: Path | None) -> tuple[str, str]:
    """What ``auto`` runs here, and why: Sortformer on a CUDA GPU with NeMo and the model, else embeddings, else none."""
    reasons = []
    if importlib.util.find_spec("nemo") is None:
        reasons.append("sortformer: nemo_toolkit is not installed")
    elif settings.device == "cpu" or not _cuda():
        reasons.append("sortformer: no CUDA GPU (the full model runs ~2.6x slower than real time on a 2-core CPU)")
    else:
        from edgevoice.recognition.diarization.sortformer import resolve_model

        try:
            resolve_model(settings.model, models_dir)
        except DiarizationError as exc:
            reasons.append(f"sortformer: {exc}")
        else:
            return "sortformer", "CUDA GPU, NeMo and the model are available"
    if importlib.util.find_spec("resemblyzer") is not None and importlib.util.find_spec("webrtcvad") is not None:
        return "embedding", "; ".join(reasons)
    reasons.append("embedding: resemblyzer is not installed (pip install 'edgevoice[embedding]')")
    return "none", "; ".join(reasons)


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
