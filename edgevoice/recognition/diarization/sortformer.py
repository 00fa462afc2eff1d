"""NVIDIA's streaming Sortformer (NeMo) as a diarization backend.

The model is restored from a local ``.nemo`` file (a ``models/`` manifest name or a path;
never a hub). Each stream is cut into chunks of ``chunk_len`` 80 ms frames with left and
right context; the worker computes log-mel features for the chunk's audio window and runs
``forward_streaming_step`` with the stream's speaker cache and FIFO. Streams whose next
chunk has the same shape are stepped together as one batch (NeMo's asynchronous
streaming state keeps per-stream cache and FIFO lengths).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgevoice import modelstore
from edgevoice.config import DiarizationSettings
from edgevoice.metrics import Metrics
from edgevoice.recognition.diarization.align import SpeakerTimeline
from edgevoice.recognition.diarization.types import DiarizationError
from edgevoice.recognition.diarization.worker import Worker, WorkerDiarizer, WorkerStream
from edgevoice.recognition.types import SAMPLE_RATE

log = logging.getLogger(__name__)

MARGIN = 2
"""Feature frames of extra audio on each side of a window so every used frame sees a full STFT window."""
MAX_BATCH = 16
"""Most streams stepped in one call."""
MIN_SCORE = 0.3
"""Mean speaker probability over a word below which the word takes its neighbours' speaker."""
_STATE_FIELDS = (
    "spkcache",
    "spkcache_lengths",
    "spkcache_preds",
    "fifo",
    "fifo_lengths",
    "fifo_preds",
    "spk_perm",
    "mean_sil_emb",
    "n_sil_frames",
)


def resolve_model(name_or_path: str, models_dir: Path | None) -> Path:
    """The ``.nemo`` file for a manifest name (installed under ``models_dir``) or a path."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".nemo" or path.is_file() or "/" in name_or_path:
        if not path.is_file():
            raise DiarizationError(f"diarization.model = {name_or_path!r}: no such .nemo file")
        return path
    try:
        specs = modelstore.load_manifest()
    except modelstore.ModelError as exc:
        raise DiarizationError(f"diarization.model = {name_or_path!r}: {exc}") from None
    spec = specs.get(name_or_path)
    nemo_files = [f.name for f in spec.files if f.name.endswith(".nemo")] if spec and spec.kind == "sortformer" else []
    if not nemo_files:
        known = sorted(n for n, s in specs.items() if s.kind == "sortformer")
        raise DiarizationError(
            f"diarization.model = {name_or_path!r}: not a .nemo file and not a Sortformer model in the manifest "
            f"(known: {', '.join(known) or 'none'})"
        )
    if models_dir is None:
        raise DiarizationError(f"diarization.model = {name_or_path!r}: no models directory to look in")
    try:
        directory = modelstore.resolve(name_or_path, models_dir, auto_install=False)
    except modelstore.ModelError as exc:
        raise DiarizationError(f"diarization.model: {exc}") from None
    return directory / nemo_files[0]


def pick_device(setting: str) -> str:
    """``cuda`` or ``cpu`` for ``diarization.device``."""
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise DiarizationError("diarization.device = 'cuda' but torch sees no CUDA GPU")
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def load_sortformer(
    settings: DiarizationSettings, metrics: Metrics, *, models_dir: Path | None = None
) -> SortformerDiarizer:
    """Restore the configured model and start its worker (blocking: seconds to tens of seconds)."""
    path = resolve_model(settings.model, models_dir)
    device = pick_device(settings.device)
    import torch

    if device == "cpu" and settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    try:
        from nemo.collections.asr.models import SortformerEncLabelModel
    except ImportError as exc:
        raise DiarizationError(
            f"diarization.backend = 'sortformer' needs nemo_toolkit (pip install 'edgevoice[diarization]'): {exc}"
        ) from None
    try:
        model = SortformerEncLabelModel.restore_from(str(path), map_location=torch.device(device))
    except Exception as exc:
        raise DiarizationError(f"{path}: cannot restore a Sortformer model from it: {exc}") from None
    model.eval()
    log.info("sortformer model %s loaded on %s", path, device)
    return SortformerDiarizer(model, settings, metrics, device=device)


class SortformerStream(WorkerStream):
    """Per-stream audio window, chunk position and NeMo streaming state."""

    def __init__(self, stream_id: str, diarizer: SortformerDiarizer) -> None:
        super().__init__(
            stream_id,
            diarizer.worker,
            SpeakerTimeline(diarizer.slots, diarizer.frame_s),
            diarizer.max_lag_s,
            MIN_SCORE,
        )
        self.buf = np.zeros(0, dtype=np.float32)
        self.buf_start = 0
        """Absolute sample of ``buf[0]``."""
        self.stt = 0
        """Feature frame (10 ms) where the next chunk starts."""
        self.origin = 0
        """First feature frame with audio (0, or where audio resumed after a skip): no left context before it."""
        self.state: Any = None


class SortformerDiarizer(WorkerDiarizer[SortformerStream]):
    """A restored Sortformer shared by every stream; one worker thread steps them all."""

    name = "sortformer"

    def __init__(self, model: Any, settings: DiarizationSettings, metrics: Metrics, *, device: str) -> None:
        import torch

        self._torch = torch
        self.model = model
        self.device = device
        mods = model.sortformer_modules
        sizes = settings.streaming()
        for key, value in sizes.items():
            setattr(mods, key, value)
        try:
            mods._check_streaming_parameters()
        except (TypeError, ValueError) as exc:
            raise DiarizationError(f"diarization streaming sizes {sizes}: {exc}") from None
        model.streaming_mode = True
        model.async_streaming = True  # per-stream cache/FIFO lengths, so streams can share a batch
        self.sizes = sizes
        self.sub = int(mods.subsampling_factor)
        self.hop = round(float(model.cfg.preprocessor.window_stride) * SAMPLE_RATE)
        self.frame_s = self.sub * self.hop / SAMPLE_RATE
        self.n_spk = int(mods.n_spk)
        self.slots = min(self.n_spk, settings.max_speakers)
        self.max_lag_s = settings.max_lag_s
        self.chunk = sizes["chunk_len"] * self.sub
        self.left = sizes["chunk_left_context"] * self.sub
        self.right = sizes["chunk_right_context"] * self.sub
        self.latency_s = (sizes["chunk_len"] + sizes["chunk_right_context"]) * self.frame_s
        self.worker: Worker[SortformerStream] = Worker(self, self.name, metrics)

    def new_stream(self, stream_id: str) -> SortformerStream:
        return SortformerStream(stream_id, self)

    # -- worker side -------------------------------------------------------------------

    def absorb(self, s: SortformerStream, start: int, audio: np.ndarray) -> None:
        expected = s.buf_start + len(s.buf)
        if start > expected:
            # Audio was skipped: finish what the audio before the gap allows, then resume at the
            # next whole 80 ms frame, keeping the speaker cache.
            while self.ready(s):
                lo, _, margin, _ = self._window(s)
                self._step([s], lo, margin)
            frame = self.sub * self.hop
            resume = -(-start // frame) * frame
            audio = audio[resume - start :]
            s.buf, s.buf_start = np.zeros(0, dtype=np.float32), resume
            s.stt = s.origin = resume // self.hop
        s.buf = np.concatenate([s.buf, audio]) if len(s.buf) else audio

    def ready(self, s: SortformerStream) -> bool:
        return s.buf_start + len(s.buf) >= (s.stt + self.chunk + self.right + MARGIN) * self.hop

    def reset(self, s: SortformerStream) -> None:
        end = s.buf_start + len(s.buf)
        s.buf, s.buf_start = np.zeros(0, dtype=np.float32), end
        s.stt = s.origin = -(-end // (self.sub * self.hop)) * self.sub
        s.state = None

    def _window(self, s: SortformerStream) -> tuple[int, int, int, int]:
        """(left offset, first sample, leading margin frames, last sample) of the stream's next chunk."""
        lo = min(self.left, s.stt - s.origin)
        first_frame = max(s.origin, s.stt - lo - MARGIN)
        return (
            lo,
            first_frame * self.hop,
            s.stt - lo - first_frame,
            (s.stt + self.chunk + self.right + MARGIN) * self.hop,
        )

    def run(self, streams: Sequence[SortformerStream]) -> None:
        groups: dict[tuple[int, int], list[SortformerStream]] = defaultdict(list)
        for s in streams:
            lo, _, margin, _ = self._window(s)
            groups[(lo, margin)].append(s)
        for (lo, margin), members in groups.items():
            for i in range(0, len(members), MAX_BATCH):
                self._step(members[i : i + MAX_BATCH], lo, margin)

    def _step(self, streams: Sequence[SortformerStream], lo: int, margin: int) -> None:
        torch = self._torch
        windows = []
        for s in streams:
            _, first, _, last = self._window(s)
            windows.append(s.buf[first - s.buf_start : last - s.buf_start])
        n_frames = lo + self.chunk + self.right
        with torch.inference_mode():
            signal = torch.from_numpy(np.stack(windows)).to(self.device)
            lengths = torch.full((len(streams),), signal.shape[1], dtype=torch.long, device=self.device)
            feats, _ = self.model.preprocessor(input_signal=signal, length=lengths)
            feats = feats[:, :, margin : margin + n_frames].transpose(1, 2)
            feat_lengths = torch.full((len(streams),), n_frames, dtype=torch.long, device=self.device)
            state = self._stack([self._state(s) for s in streams])
            state, preds = self.model.forward_streaming_step(
                processed_signal=feats,
                processed_signal_length=feat_lengths,
                streaming_state=state,
                total_preds=torch.zeros((len(streams), 0, self.n_spk), device=self.device),
                left_offset=lo,
                right_offset=self.right,
            )
            probs = preds[:, :, : self.slots].float().cpu().numpy()
        for i, s in enumerate(streams):
            s.state = self._unstack(state, i, len(streams))
            s.timeline.write(s.stt // self.sub, probs[i])
            s.stt += self.chunk
            keep_from = max(s.origin, s.stt - self.left - MARGIN) * self.hop
            if keep_from > s.buf_start:
                s.buf = s.buf[keep_from - s.buf_start :]
                s.buf_start = keep_from

    def _state(self, s: SortformerStream) -> Any:
        if s.state is None:
            s.state = self.model.sortformer_modules.init_streaming_state(
                batch_size=1, async_streaming=True, device=self.device
            )
        return s.state

    def _stack(self, states: list[Any]) -> Any:
        if len(states) == 1:
            return states[0]
        merged = type(states[0])()
        for name in _STATE_FIELDS:
            values = [getattr(st, name) for st in states]
            if all(v is not None for v in values):
                setattr(merged, name, self._torch.cat(values, dim=0))
        return merged

    def _unstack(self, state: Any, index: int, size: int) -> Any:
        if size == 1:
            return state
        one = type(state)()
        for name in _STATE_FIELDS:
            value = getattr(state, name)
            if value is not None:
                setattr(one, name, value[index : index + 1].clone())
        return one
