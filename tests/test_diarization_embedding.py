"""The light backend on real espeak-ng voices: resemblyzer's shipped weights, online clustering, real recognizer."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from edgevoice.config import AsrSettings, DiarizationSettings
from edgevoice.metrics import Metrics
from edgevoice.recognition.diarization import build_diarizer
from edgevoice.recognition.diarization.embedding import EmbeddingDiarizer
from edgevoice.recognition.recognizer import WhisperRecognizer
from edgevoice.recognition.types import Transcript
from tests.support.speech import have_espeak, silence, synth

pytestmark = pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed")

RATE = 16000
MODELS = Path(os.environ.get("EDGEVOICE_TEST_MODELS", Path(tempfile.gettempdir()) / "edgevoice-models"))
VOICES = {"A": {"voice": "en-us", "pitch": 10}, "B": {"voice": "en-us+f4", "pitch": 90}}
TURNS = [
    ("A", "Good evening, I would like a table for two please."),
    ("B", "Of course, right this way."),
    ("A", "Could we see the wine list and some water?"),
    ("B", "Here it is, the specials today are fish and soup."),
    ("A", "Thank you, that sounds wonderful."),
    ("B", "Enjoy your meal, call me when you are ready."),
]


def conversation(pause_s: float = 1.0) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """The two voices alternating, and (voice, start, end) of each turn."""
    parts, spans, t = [silence(0.3)], [], 0.3
    for who, text in TURNS:
        audio = synth(text, **VOICES[who])  # type: ignore[arg-type]
        parts += [audio, silence(pause_s)]
        spans.append((who, t, t + len(audio) / RATE))
        t += len(audio) / RATE + pause_s
    return np.concatenate(parts), spans


@pytest.fixture(scope="module")
def diarizer() -> Iterator[EmbeddingDiarizer]:
    d = build_diarizer(DiarizationSettings(backend="embedding"), Metrics())
    assert isinstance(d, EmbeddingDiarizer)
    yield d
    d.close()


def test_auto_starts_embeddings_on_a_cpu_box(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="edgevoice.recognition.diarization")
    d = build_diarizer(DiarizationSettings(backend="auto", device="cpu"), Metrics())
    try:
        assert d.name == "embedding"
        assert "auto chose embedding (sortformer: no CUDA GPU" in caplog.text
    finally:
        d.close()


def test_two_alternating_voices_are_two_consistent_speakers(diarizer: EmbeddingDiarizer) -> None:
    audio, spans = conversation()
    s = diarizer.open_stream("table1")
    for i in range(0, len(audio), 1600):
        s.feed(audio[i : i + 1600])
    assert diarizer.worker.wait_idle(120)
    assert len(s.centroids) == 2, f"{len(s.centroids)} speakers founded"
    winners: dict[str, set[int]] = {"A": set(), "B": set()}
    for who, start, end in spans:
        scores = s.timeline.scores(start + 0.2, end - 0.2)
        assert scores is not None and scores.max() > 0, (who, start, scores)
        winners[who].add(int(np.argmax(scores)))
        # frame by frame too: at most a few frames at the edges may lean the other way
        rows = s.timeline.frames(round((start + 0.2) / 0.08), round((end - 0.2) / 0.08))
        voted = rows[rows.max(axis=1) > 0]
        majority = np.bincount(voted.argmax(axis=1)).argmax()
        assert (voted.argmax(axis=1) == majority).mean() > 0.9, (who, start, voted.argmax(axis=1))
    assert len(winners["A"]) == 1 and len(winners["B"]) == 1 and winners["A"] != winners["B"], winners
    s.close()


def test_streams_are_independent_and_silence_founds_nobody(diarizer: EmbeddingDiarizer) -> None:
    quiet = diarizer.open_stream("quiet")
    quiet.feed(silence(3.0))
    b = diarizer.open_stream("b_only")
    b.feed(np.concatenate([synth(TURNS[1][1], **VOICES["B"]), silence(0.5)]))  # type: ignore[arg-type]
    assert diarizer.worker.wait_idle(60)
    assert quiet.centroids == [] and quiet.timeline.scores(0, 3.0).max() == 0.0
    assert len(b.centroids) == 1  # its own first speaker, whatever other streams heard
    quiet.close()
    b.close()


def test_lag_is_bounded_and_split_never_waits() -> None:
    d = build_diarizer(DiarizationSettings(backend="embedding", max_lag_s=5), Metrics())
    try:
        s = d.open_stream("burst")
        audio, _ = conversation()
        s.feed(audio)  # ~20 s at once: far more than 5 s of lag allowed
        assert s.audio.dropped >= len(audio) - 5 * RATE - 1
        # a final arriving now is labelled from what is known (maybe nothing): it is not held back
        t = Transcript("burst", "hello", True, 1.0, 1.5)
        (piece,) = s.split(t)
        assert re.fullmatch(r"Speaker [1-4]", piece.speaker)
        assert d.worker.wait_idle(60)
        assert s.lag_s < 0.3
        assert np.isnan(s.timeline.frames(0, 10)).all()  # the skipped start was never diarized
    finally:
        d.close()


async def test_recognizer_finals_carry_the_speakers() -> None:
    audio, spans = conversation()
    rec = await asyncio.to_thread(
        WhisperRecognizer.load,
        AsrSettings(cpu_threads=2),
        MODELS,
        Metrics(),
        DiarizationSettings(backend="embedding"),
    )
    rec.start()
    try:
        got: list[Transcript] = []
        stream = rec.open_stream("table2", language=None, on_transcript=got.append)
        step = RATE // 10
        for i in range(0, len(audio), step):
            stream.feed(audio[i : i + step])
            await asyncio.sleep(0)
            # keep recognition and diarization near real time whatever the load of the box (a live
            # stream arrives at 1x; feeding faster than the box diarizes only tests the fallback)
            deadline = time.monotonic() + 30
            while stream.lag_s > 1.2 or stream.diarizer is None or stream.diarizer.lag_s > 0.5:
                assert time.monotonic() < deadline, (stream.lag_s, stream.diarizer and stream.diarizer.lag_s)
                await asyncio.sleep(0.02)
        await stream.finish()
    finally:
        await asyncio.to_thread(rec.stop)
        rec.diarizer.close()
    finals = [t for t in got if t.final and t.text]
    assert finals
    by_turn: dict[str, set[str]] = {"A": set(), "B": set()}
    for piece in finals:
        assert re.fullmatch(r"Speaker [12]", piece.speaker), piece
        assert piece.words and all(w.speaker == piece.speaker for w in piece.words), piece
        middle = (piece.words[0].start + piece.words[-1].end) / 2
        who = next(w for w, start, end in spans if start - 0.5 <= middle <= end + 0.5)
        by_turn[who].add(piece.speaker)
    assert by_turn == {"A": {"Speaker 1"}, "B": {"Speaker 2"}}, [(p.speaker, p.start, p.text) for p in finals]
