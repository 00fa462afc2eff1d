"""Diarization without models: configuration, the factory, the speaker timeline and splitting finals."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from edgevoice.config import SORTFORMER_PRESETS, DiarizationSettings
from edgevoice.metrics import Metrics
from edgevoice.recognition.diarization import DiarizationError, NoDiarizer, build_diarizer, pick_backend
from edgevoice.recognition.diarization.align import SpeakerLabels, SpeakerTimeline, split_final
from edgevoice.recognition.diarization.sortformer import resolve_model
from edgevoice.recognition.diarization.worker import StreamAudio
from edgevoice.recognition.types import Transcript, Word


def test_presets_are_nvidias_published_latencies() -> None:
    for name, latency in (("low_latency", 1.04), ("balanced", 2.0), ("high_accuracy", 10.0)):
        sizes = DiarizationSettings(preset=name).streaming()
        assert sizes == SORTFORMER_PRESETS[name]
        assert (sizes["chunk_len"] + sizes["chunk_right_context"]) * 0.08 == pytest.approx(latency)


def test_overrides_replace_one_size() -> None:
    sizes = DiarizationSettings(preset="low_latency", chunk_frames=3, right_context_frames=1).streaming()
    assert sizes == {**SORTFORMER_PRESETS["low_latency"], "chunk_len": 3, "chunk_right_context": 1}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"cache_update_frames": 3}, "cache_update_frames (3) must be between chunk_frames (6)"),
        ({"fifo_frames": 0, "cache_update_frames": 100}, "fifo_frames + chunk_frames (6)"),
        ({"cache_frames": 8}, "greater than or equal to 16"),
        ({"chunk_frames": 0}, "greater than or equal to 1"),
    ],
)
def test_bad_streaming_sizes_are_refused(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        DiarizationSettings(**overrides)  # type: ignore[arg-type]


def test_none_is_speaker_one_at_zero_cost() -> None:
    d = build_diarizer(DiarizationSettings(backend="none"), Metrics())
    assert isinstance(d, NoDiarizer)
    s = d.open_stream("s1")
    s.feed(np.ones(16000, dtype=np.float32))
    final = Transcript("s1", "hello there", True, 0.0, 1.0, (Word("hello", 0.0, 0.4), Word("there", 0.5, 1.0)))
    assert s.split(final) == (final,)
    assert final.speaker == "Speaker 1"


def test_auto_without_a_gpu_picks_embeddings_and_says_why() -> None:
    backend, why = pick_backend(DiarizationSettings(backend="auto", device="cpu"), None)
    assert backend == "embedding"
    assert "no CUDA GPU" in why


def test_sortformer_model_must_exist(tmp_path: Path) -> None:
    with pytest.raises(DiarizationError, match=r"no such \.nemo file"):
        resolve_model(str(tmp_path / "missing.nemo"), tmp_path)
    with pytest.raises(DiarizationError, match="not a Sortformer model in the manifest"):
        resolve_model("tiny.en", tmp_path)
    with pytest.raises(DiarizationError, match=r"is not installed in .*edgevoice models install diar_streaming"):
        resolve_model("diar_streaming_sortformer_4spk-v2", tmp_path)
    with pytest.raises(DiarizationError, match=r"no such \.nemo file"):
        build_diarizer(DiarizationSettings(backend="sortformer", model=str(tmp_path / "x.nemo")), Metrics())


# --- the timeline ------------------------------------------------------------------------


def onehot(slot: int, frames: int, slots: int = 4, p: float = 0.9) -> np.ndarray:
    rows = np.full((frames, slots), 0.05, dtype=np.float32)
    rows[:, slot] = p
    return rows


def test_timeline_scores_unknown_and_known() -> None:
    tl = SpeakerTimeline(4)
    assert tl.scores(0.0, 1.0) is None
    tl.write(0, onehot(1, 10))  # 0.0 - 0.8 s
    assert tl.end_frame == 10
    assert np.argmax(tl.scores(0.1, 0.5)) == 1
    assert tl.scores(0.9, 1.5) is None  # not computed yet
    tl.mark_known(10, 20)
    assert tl.scores(0.9, 1.5).max() == 0.0


def test_timeline_adds_votes_and_forgets_old_frames() -> None:
    tl = SpeakerTimeline(2, keep_s=8.0)  # 100 frames
    tl.write(0, np.ones((5, 2), np.float32) * [0.5, 0], add=True)
    tl.write(2, np.ones((5, 2), np.float32) * [0.5, 0], add=True)
    assert tl.frames(0, 7)[:, 0].tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 0.5, 0.5]
    tl.write(1000, np.ones((1, 2), np.float32))
    assert np.isnan(tl.frames(0, 7)).all()  # forgotten
    assert tl.frames(1000, 1001)[0].tolist() == [1.0, 1.0]


def test_timeline_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"shape \(frames, 4\)"):
        SpeakerTimeline(4).write(0, np.zeros((3, 2)))


# --- splitting finals --------------------------------------------------------------------


def words(*spans: tuple[str, float, float]) -> tuple[Word, ...]:
    return tuple(Word(t, a, b) for t, a, b in spans)


def final(ws: tuple[Word, ...], segment: int = 3) -> Transcript:
    return Transcript("s1", " ".join(w.text for w in ws), True, ws[0].start, ws[-1].end, ws, segment=segment)


def test_split_where_the_speaker_changes_with_stable_labels() -> None:
    tl, labels = SpeakerTimeline(4), SpeakerLabels()
    tl.write(0, onehot(2, 25))  # slot 2 speaks 0 - 2 s
    tl.write(25, onehot(0, 25))  # slot 0 speaks 2 - 4 s
    ws = words(("good", 0.2, 0.6), ("evening", 0.7, 1.5), ("hello", 2.2, 2.8), ("sir", 2.9, 3.5))
    pieces = split_final(final(ws), tl, labels, min_score=0.3)
    assert [p.speaker for p in pieces] == ["Speaker 1", "Speaker 2"]  # order of appearance, not slot number
    assert [p.text for p in pieces] == ["good evening", "hello sir"]
    assert [(p.start, p.end) for p in pieces] == [(0.2, 1.5), (2.2, 3.5)]
    assert all(w.speaker == p.speaker for p in pieces for w in p.words)
    assert {p.segment for p in pieces} == {3}
    assert sum((p.words for p in pieces), ()) == tuple(w for p in pieces for w in p.words)
    # later: slot 0 alone is still "Speaker 2", slot 2 still "Speaker 1"
    tl.write(50, onehot(0, 25))
    (later,) = split_final(final(words(("yes", 4.1, 4.5)), 4), tl, labels, min_score=0.3)
    assert later.speaker == "Speaker 2"
    tl.write(75, onehot(2, 25))
    (again,) = split_final(final(words(("thanks", 6.1, 6.5)), 5), tl, labels, min_score=0.3)
    assert again.speaker == "Speaker 1"


def test_faster_whisper_raw_words_keep_their_spacing() -> None:
    tl = SpeakerTimeline(4)
    tl.write(0, np.concatenate([onehot(0, 10), onehot(1, 10)]))
    ws = words((" Hi", 0.1, 0.4), (" there.", 0.4, 0.7), (" Bye", 0.9, 1.2), (" now.", 1.2, 1.5))
    pieces = split_final(final(ws), tl, SpeakerLabels(), min_score=0.3)
    assert [p.text for p in pieces] == ["Hi there.", "Bye now."]


def test_lagging_diarization_keeps_the_known_speaker() -> None:
    tl, labels = SpeakerTimeline(4), SpeakerLabels()
    tl.write(0, onehot(1, 10))  # only 0 - 0.8 s known
    ws = words(("one", 0.1, 0.5), ("two", 1.0, 1.4), ("three", 1.5, 2.0))
    (piece,) = split_final(final(ws), tl, labels, min_score=0.3)
    assert piece.speaker == "Speaker 1" and all(w.speaker == "Speaker 1" for w in piece.words)
    # nothing known at all for the next final: the stream's last speaker, not a new one
    (nxt,) = split_final(final(words(("four", 5.0, 5.5)), 4), tl, labels, min_score=0.3)
    assert nxt.speaker == "Speaker 1"


def test_a_single_word_flip_is_smoothed_away() -> None:
    tl = SpeakerTimeline(4)
    tl.write(0, np.concatenate([onehot(0, 5), onehot(1, 2), onehot(0, 10)]))
    ws = words(("a", 0.0, 0.35), ("b", 0.42, 0.5), ("c", 0.6, 1.0))
    (piece,) = split_final(final(ws), tl, SpeakerLabels(), min_score=0.3)
    assert piece.speaker == "Speaker 1"


def test_a_final_without_words_gets_the_covering_speaker() -> None:
    tl, labels = SpeakerTimeline(4), SpeakerLabels()
    tl.write(0, onehot(0, 10))
    tl.write(10, onehot(3, 10))
    split_final(final(words(("x", 0.1, 0.5))), tl, labels, min_score=0.3)
    (piece,) = split_final(Transcript("s1", "mm", True, 0.9, 1.5), tl, labels, min_score=0.3)
    assert piece.speaker == "Speaker 2"


# --- the worker's queue ------------------------------------------------------------------


def test_stream_audio_copies_drops_oldest_and_keeps_positions() -> None:
    q = StreamAudio(max_samples=100)
    block = np.arange(60, dtype=np.float32)
    q.push(block)
    block[:] = -1  # the caller's buffer may be reused: the queue holds a copy
    q.push(np.arange(60, 120, dtype=np.float32))
    assert q.dropped == 20 and q.pending == 100
    ((start, audio),) = q.take()
    assert start == 20 and audio[0] == 20 and audio[-1] == 119
    q.push(np.zeros(10, np.float32))
    q.skip(30)  # dropped upstream
    q.push(np.ones(5, np.float32))
    assert [(s, len(a)) for s, a in q.take()] == [(120, 10), (160, 5)]
    assert q.take() == []
    with pytest.raises(ValueError, match=r"mono 16 kHz audio \(1-D\), got shape \(10, 2\)"):
        q.push(np.zeros((10, 2), np.float32))
    assert q.pending == 0
