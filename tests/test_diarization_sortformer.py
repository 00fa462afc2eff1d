"""The Sortformer backend through its real loading and streaming code, on a tiny random model.

The full model cannot be had here (no hub, no GPU): a ~22k-parameter Sortformer built from a
config with random weights is saved as ``.nemo``, restored by the daemon's loader on the CPU
and streamed through NeMo's ``forward_streaming_step``. Its probabilities are meaningless, so
these tests check shapes, frame timing, batching and labels' structure, not who spoke.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgevoice import modelstore
from edgevoice.config import AsrSettings, DiarizationSettings
from edgevoice.metrics import Metrics
from edgevoice.recognition.types import Transcript
from tests.support.speech import have_espeak, silence, synth

pytestmark = [
    pytest.mark.nemo,
    pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed"),
]
nemo = pytest.importorskip("nemo", reason="nemo_toolkit is not installed (extra: diarization)")

from edgevoice.recognition.diarization import DiarizationError, build_diarizer  # noqa: E402
from edgevoice.recognition.diarization.sortformer import SortformerDiarizer, SortformerStream  # noqa: E402
from edgevoice.recognition.diarization.tiny import save_tiny_sortformer  # noqa: E402

RATE = 16000
MODELS = Path(os.environ.get("EDGEVOICE_TEST_MODELS", Path(tempfile.gettempdir()) / "edgevoice-models"))


@pytest.fixture(scope="module")
def tiny_nemo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = save_tiny_sortformer(tmp_path_factory.mktemp("sortformer") / "tiny_sortformer.nemo")
    assert 50_000 < path.stat().st_size < 1_000_000
    return path


@pytest.fixture(scope="module")
def diarizer(tiny_nemo: Path) -> Iterator[SortformerDiarizer]:
    d = build_diarizer(
        DiarizationSettings(backend="sortformer", model=str(tiny_nemo), device="cpu", max_lag_s=600), Metrics()
    )
    assert isinstance(d, SortformerDiarizer)
    yield d
    d.close()


def speech() -> np.ndarray:
    return np.concatenate(
        [
            synth("Good evening, I would like a table for two please.", voice="en-us", pitch=10),
            silence(0.5),
            synth("Of course, right this way.", voice="en-us+f4", pitch=90),
            silence(0.7),
        ]
    )


def feed(stream: SortformerStream, audio: np.ndarray, block_s: float = 0.1) -> None:
    step = int(block_s * RATE)
    for i in range(0, len(audio), step):
        stream.feed(audio[i : i + step])


def expected_frames(seconds: float, sizes: dict[str, int]) -> int:
    """Whole chunks whose right context (and 20 ms of STFT margin) has arrived."""
    usable = seconds - sizes["chunk_right_context"] * 0.08 - 0.02
    return max(0, math.floor(usable / (sizes["chunk_len"] * 0.08) + 1e-9)) * sizes["chunk_len"]


def test_restored_model_streams_speech_in_80ms_frames(diarizer: SortformerDiarizer) -> None:
    assert diarizer.frame_s == pytest.approx(0.08) and diarizer.sub == 8 and diarizer.hop == 160
    assert diarizer.slots == 4 and diarizer.latency_s == pytest.approx(1.04)
    mods = diarizer.model.sortformer_modules
    assert (mods.chunk_len, mods.chunk_right_context, mods.fifo_len, mods.spkcache_len) == (6, 7, 188, 188)
    assert not diarizer.model.training
    audio = speech()
    s = diarizer.open_stream("t1")
    feed(s, audio[: 3 * RATE])
    assert diarizer.worker.wait_idle(60)
    n3 = s.timeline.end_frame
    assert n3 == expected_frames(3.0, diarizer.sizes) == 30  # 5 chunks of 6 frames: 2.4 s + 0.56 s look-ahead
    feed(s, audio[3 * RATE :])
    assert diarizer.worker.wait_idle(60)
    n = s.timeline.end_frame
    assert n == expected_frames(len(audio) / RATE, diarizer.sizes)
    probs = s.timeline.frames(0, n)
    assert probs.shape == (n, 4) and not np.isnan(probs).any()
    assert ((probs >= 0) & (probs <= 1)).all() and probs.std() > 0
    # frames past the last full chunk are unknown yet: diarization trails by chunk + right context at most
    assert np.isnan(s.timeline.frames(n, n + 6)).all()
    assert s.lag_s <= diarizer.latency_s + 0.48 + 0.02 + 1e-6
    # NeMo's asynchronous streaming state: fixed-size speaker cache and FIFO for this one stream
    d_model = diarizer.model.cfg.model_defaults.fc_d_model
    assert tuple(s.state.spkcache.shape) == (1, mods.spkcache_len, d_model)
    assert tuple(s.state.fifo.shape) == (1, mods.fifo_len, d_model)
    assert int(s.state.fifo_lengths[0]) == n  # < fifo_len: nothing moved to the cache yet
    s.close()


def test_streams_share_batches_without_changing_results(diarizer: SortformerDiarizer) -> None:
    a, b = speech(), np.concatenate([silence(0.3), synth("Right this way, sir.", voice="en-us+f4", pitch=90)] * 3)
    alone = {}
    for name, audio in (("a", a), ("b", b)):
        s = diarizer.open_stream(f"alone_{name}")
        s.feed(audio)
        assert diarizer.worker.wait_idle(60)
        alone[name] = s.timeline.frames(0, s.timeline.end_frame)
        s.close()
    batches: list[int] = []
    step = diarizer._step

    def spy(streams, lo, margin):  # type: ignore[no-untyped-def]
        batches.append(len(streams))
        return step(streams, lo, margin)

    diarizer._step = spy  # type: ignore[method-assign]
    try:
        sa, sb = diarizer.open_stream("together_a"), diarizer.open_stream("together_b")
        offset = RATE  # b starts a second later: different cache and FIFO fill in one batch
        for i in range(0, max(len(a), len(b) + offset), 1600):
            sa.feed(a[i : i + 1600])
            if i >= offset:
                sb.feed(b[i - offset : i - offset + 1600])
        assert diarizer.worker.wait_idle(60)
    finally:
        del diarizer._step
    assert max(batches) == 2, batches
    for name, s in (("a", sa), ("b", sb)):
        together = s.timeline.frames(0, s.timeline.end_frame)
        assert together.shape == alone[name].shape
        np.testing.assert_allclose(together, alone[name], atol=1e-5)
        s.close()


def test_skipped_audio_keeps_time_aligned(diarizer: SortformerDiarizer) -> None:
    s = diarizer.open_stream("gappy")
    audio = speech()
    s.feed(audio[: 2 * RATE])
    s.skip(int(1.25 * RATE))  # dropped upstream
    s.feed(audio[2 * RATE :])
    assert diarizer.worker.wait_idle(60)
    total = (len(audio) + int(1.25 * RATE)) / RATE
    frames = s.timeline.frames(0, s.timeline.end_frame)
    known = ~np.isnan(frames[:, 0])
    resume = math.ceil(3.25 / 0.08)  # audio resumes at 3.25 s: the next whole frame
    assert known[: expected_frames(2.0, diarizer.sizes)].all()
    assert not known[expected_frames(2.0, diarizer.sizes) : resume].any()
    assert known[resume:].all() and s.timeline.end_frame > resume
    assert s.timeline.end_frame * 0.08 <= total
    s.close()


def test_manifest_name_loads_the_pinned_installed_model(
    tiny_nemo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The operator's route for the production model: copy, pin, install, name it in the config."""
    name = "diar_streaming_sortformer_4spk-v2"
    copied = tmp_path / "copied"
    copied.mkdir()
    shutil.copy(tiny_nemo, copied / f"{name}.nemo")
    site = tmp_path / "models.toml"
    site.write_text(modelstore.pin_entry(name, copied))
    monkeypatch.setenv("EDGEVOICE_MODELS_SITE_MANIFEST", str(site))
    settings = DiarizationSettings(backend="sortformer", device="cpu")  # the default model name
    models_dir = tmp_path / "models"
    with pytest.raises(DiarizationError, match=f"edgevoice models install {name}"):
        build_diarizer(settings, Metrics(), models_dir=models_dir)
    modelstore.install(modelstore.get_spec(name), models_dir, [copied])
    d = build_diarizer(settings, Metrics(), models_dir=models_dir)
    try:
        assert isinstance(d, SortformerDiarizer)
        s = d.open_stream("m1")
        s.feed(speech())
        assert d.worker.wait_idle(60)
        assert s.timeline.end_frame > 0
    finally:
        d.close()
    (models_dir / name / f"{name}.nemo").write_bytes(b"tampered")
    assert modelstore.verify_dir(modelstore.get_spec(name), models_dir / name)  # `edgevoice models verify` catches it


async def test_recognizer_finals_all_carry_a_speaker(tiny_nemo: Path) -> None:
    from edgevoice.recognition.recognizer import WhisperRecognizer

    rec = await asyncio.to_thread(
        WhisperRecognizer.load,
        AsrSettings(cpu_threads=2),
        MODELS,
        Metrics(),
        DiarizationSettings(backend="sortformer", model=str(tiny_nemo), device="cpu"),
    )
    assert rec.diarizer.name == "sortformer"
    rec.start()
    got: list[Transcript] = []
    try:
        stream = rec.open_stream("sf1", language=None, on_transcript=got.append)
        audio = np.concatenate([speech(), speech()])
        for i in range(0, len(audio), RATE // 10):
            stream.feed(audio[i : i + RATE // 10])
            await asyncio.sleep(0)
        await stream.finish()
    finally:
        await asyncio.to_thread(rec.stop)
        rec.diarizer.close()
    finals = [t for t in got if t.final and t.text]
    assert len(finals) >= 4
    for piece in finals:
        assert re.fullmatch(r"Speaker [1-4]", piece.speaker), piece
        assert piece.words and all(w.speaker == piece.speaker for w in piece.words), piece
    # labels are handed out in order of appearance: the first final's speaker is Speaker 1
    assert finals[0].speaker == "Speaker 1"
    segments = [p.segment for p in finals]
    assert segments == sorted(segments)
