"""Speaker activity over time, and labelling a final segment's words from it.

A backend writes per-frame scores (one column per speaker slot) into a stream's
:class:`SpeakerTimeline` from its worker thread; :func:`split_final` reads it in the
recognizer's thread. Frames not computed yet are unknown (NaN): words there keep the
speaker already known, so a lagging diarizer never delays text.
"""

from __future__ import annotations

import math
import threading
from dataclasses import replace

import numpy as np

from edgevoice.recognition.types import Transcript, Word

FRAME_S = 0.08
"""Seconds per diarization frame (Sortformer's 8x-subsampled 10 ms features)."""


class SpeakerTimeline:
    """Per-frame speaker scores of one stream; frame ``i`` covers ``[i * frame_s, (i + 1) * frame_s)``.

    Thread-safe: one writer (the diarization worker), readers in the recognizer's thread.
    Frames older than ``keep_s`` before the newest are forgotten.
    """

    def __init__(self, slots: int, frame_s: float = FRAME_S, keep_s: float = 600.0) -> None:
        self.slots = slots
        self.frame_s = frame_s
        self._keep = max(1, int(keep_s / frame_s))
        self._lock = threading.Lock()
        self._rows = np.full((0, slots), np.nan, dtype=np.float32)
        self._base = 0
        """Absolute frame index of ``_rows[0]``."""
        self._end = 0
        """One past the newest frame written or marked known."""

    def _grow(self, end: int) -> None:
        have = self._base + len(self._rows)
        if end > have:
            grown = np.full((max(end - self._base, 2 * len(self._rows)), self.slots), np.nan, dtype=np.float32)
            grown[: len(self._rows)] = self._rows
            self._rows = grown
        if end - self._base > 2 * self._keep:
            drop = end - self._base - self._keep
            self._rows = self._rows[drop:].copy()
            self._base += drop

    def write(self, start: int, rows: np.ndarray, *, add: bool = False) -> None:
        """Set (or, with ``add``, add to) the scores of frames ``start .. start + len(rows)``."""
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.slots:
            raise ValueError(f"rows must have shape (frames, {self.slots}), got {rows.shape}")
        with self._lock:
            self._grow(start + len(rows))
            self._end = max(self._end, start + len(rows))
            lo = max(start, self._base)
            if lo >= start + len(rows):
                return
            view = self._rows[lo - self._base : start + len(rows) - self._base]
            part = rows[lo - start :]
            if add:
                np.copyto(view, np.where(np.isnan(view), part, view + part))
            else:
                view[:] = part

    def mark_known(self, start: int, end: int) -> None:
        """Frames ``start .. end`` were seen: unknown ones become zero (nobody spoke yet)."""
        if end <= start:
            return
        with self._lock:
            self._grow(end)
            self._end = max(self._end, end)
            view = self._rows[max(start, self._base) - self._base : end - self._base]
            view[np.isnan(view)] = 0.0

    @property
    def end_frame(self) -> int:
        """One past the newest frame written (unknown frames may lie before it)."""
        return self._end

    def frames(self, start: int, end: int) -> np.ndarray:
        """Copy of the scores of frames ``start .. end`` (NaN where unknown or forgotten)."""
        out = np.full((max(0, end - start), self.slots), np.nan, dtype=np.float32)
        with self._lock:
            lo, hi = max(start, self._base), min(end, self._base + len(self._rows))
            if hi > lo:
                out[lo - start : hi - start] = self._rows[lo - self._base : hi - self._base]
        return out

    def scores(self, start_s: float, end_s: float) -> np.ndarray | None:
        """Mean score per slot over the known frames overlapping ``[start_s, end_s]``; None if none is known."""
        first = max(0, math.floor(start_s / self.frame_s))
        last = max(first + 1, math.ceil(end_s / self.frame_s))
        rows = self.frames(first, last)
        known = rows[~np.isnan(rows[:, 0])]
        return known.mean(axis=0) if len(known) else None


class SpeakerLabels:
    """Stable names within one stream: slots become "Speaker 1", "Speaker 2", ... in order of first appearance."""

    def __init__(self) -> None:
        self._names: dict[int, str] = {}
        self.last: str | None = None
        """The speaker of the most recent labelled word."""

    def name(self, slot: int) -> str:
        if slot not in self._names:
            self._names[slot] = f"Speaker {len(self._names) + 1}"
        return self._names[slot]


def best_slot(scores: np.ndarray | None, min_score: float) -> int | None:
    """The slot with the highest score if it reaches ``min_score``."""
    if scores is None:
        return None
    slot = int(np.argmax(scores))
    return slot if scores[slot] >= min_score else None


def _fill(slots: list[int | None]) -> list[int | None]:
    """Unknown words take the speaker of the word before (or, at the start, the first known after)."""
    known = [s for s in slots if s is not None]
    if not known:
        return slots
    out: list[int | None] = []
    prev = known[0]
    for s in slots:
        prev = s if s is not None else prev
        out.append(prev)
    return out


def _smooth(slots: list[int | None]) -> list[int | None]:
    """A single word between two words of the same other speaker is theirs (a one-word turn is noise)."""
    out = list(slots)
    for i in range(1, len(out) - 1):
        if out[i - 1] == out[i + 1] != out[i]:
            out[i] = out[i - 1]
    return out


def _join(words: list[Word]) -> str:
    """Text of ``words``: faster-whisper's raw words carry their leading space, stripped ones get one."""
    if any(w.text[:1].isspace() for w in words):
        return "".join(w.text for w in words).strip()
    return " ".join(w.text for w in words)


def split_final(
    final: Transcript, timeline: SpeakerTimeline, labels: SpeakerLabels, *, min_score: float
) -> tuple[Transcript, ...]:
    """Label ``final`` (and its words) with speakers; split it where the speaker changes.

    Reads only what the timeline knows now. Pieces keep the segment number; their text is
    their words' text. Unknown stretches take the speaker already known in the stream.
    """
    if not final.words:
        slot = best_slot(timeline.scores(final.start, final.end), min_score)
        speaker = labels.name(slot) if slot is not None else (labels.last or final.speaker)
        labels.last = speaker
        return (replace(final, speaker=speaker),)

    slots = _smooth(_fill([best_slot(timeline.scores(w.start, w.end), min_score) for w in final.words]))
    fallback = labels.last or final.speaker
    names = [labels.name(s) if s is not None else fallback for s in slots]
    runs: list[list[Word]] = []
    run_names: list[str] = []
    for word, name in zip(final.words, names, strict=True):
        if not run_names or run_names[-1] != name:
            runs.append([])
            run_names.append(name)
        runs[-1].append(replace(word, speaker=name))
    labels.last = run_names[-1]
    if len(runs) == 1:
        return (replace(final, speaker=run_names[0], words=tuple(runs[0])),)
    pieces = []
    for i, (run, name) in enumerate(zip(runs, run_names, strict=True)):
        pieces.append(
            replace(
                final,
                text=_join(run),
                start=final.start if i == 0 else run[0].start,
                end=final.end if i == len(runs) - 1 else run[-1].end,
                words=tuple(run),
                speaker=name,
            )
        )
    return tuple(pieces)
