"""Real human speech for accuracy benchmarks: the eval clips, and long turns joined from them.

Sources (nothing here is shipped in the product; licences differ per clip):

- ``../shared/eval`` (``--eval-dir``): 43 real recordings (en, vi, de) with references;
  see its README.md for packages and licences.
- pocketsphinx 5.1.1's sdist from PyPI (fetched once with ``pip download`` into
  ``.bench/``): five LibriVox sentences read by one speaker, with references.

Long conversational turns are built as the eval README asks: clips trimmed of their
leading and trailing silence (Silero VAD) and joined back to back with 120 ms gaps,
alternating two speakers, until 20-30 s; no pause is long enough for the endpoint, so
the whole turn is one utterance for a streaming recognizer.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgevoice.recognition.types import SAMPLE_RATE

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".bench"
DEFAULT_EVAL = ROOT.parent / "shared" / "eval"
JOIN_GAP_S = 0.12
"""Gap between joined clips: shorter than any endpoint (asr.min_silence_ms >= 100 ms, default 500)."""
POCKETSPHINX = "pocketsphinx==5.1.1"


@dataclass(frozen=True)
class Clip:
    name: str
    language: str
    audio: np.ndarray
    """16 kHz mono float32."""
    reference: str
    kind: str
    """"read" (a recording as it is) or "long" (a joined 20-30 s turn)."""

    @property
    def seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def read_audio(path: Path) -> np.ndarray:
    from edgevoice.transcribe import read_audio as read

    return read(path)


def eval_clips(eval_dir: Path = DEFAULT_EVAL) -> list[Clip]:
    """The recordings listed in ``eval_dir/README.md`` with their reference texts."""
    readme = eval_dir / "README.md"
    if not readme.is_file():
        raise FileNotFoundError(f"{readme}: no evaluation set there (pass --eval-dir)")
    clips = []
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.split("|")]
        if len(cells) < 10 or not cells[1].endswith(".wav"):
            continue
        name, language, reference = cells[1], cells[2], cells[7]
        clips.append(Clip(name, language, read_audio(eval_dir / "audio" / name), reference, "read"))
    return clips


def librivox_clips() -> list[Clip]:
    """pocketsphinx's LibriVox test sentences (fetched from PyPI once); empty when pip cannot get them."""
    folder = CACHE / "pocketsphinx"
    data = folder / "pocketsphinx-5.1.1" / "test" / "data" / "librivox"
    if not data.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(folder)]
        if subprocess.run([*cmd, POCKETSPHINX], capture_output=True).returncode != 0:
            print(f"# {POCKETSPHINX} could not be downloaded; LibriVox clips left out", file=sys.stderr)
            return []
        with tarfile.open(next(folder.glob("pocketsphinx-*.tar.gz"))) as tar:
            members = [m for m in tar.getmembers() if "/test/data/librivox/" in m.name]
            tar.extractall(folder, members=members, filter="data")
    refs = {}
    for line in (data / "transcription").read_text().splitlines():
        m = re.match(r"<s>(.*)</s> \((.*)\)", line.strip())
        if m:
            refs[m.group(2)] = m.group(1).strip()
    return [
        Clip(f"librivox_{name[-4:]}.wav", "en", read_audio(data / f"{name}.wav"), text, "read")
        for name, text in sorted(refs.items())
    ]


def trim(audio: np.ndarray) -> np.ndarray:
    """The clip from its first to its last speech window (Silero VAD), 60 ms kept each side."""
    from edgevoice.recognition.vad import WINDOW, StreamingVad

    _, probs = StreamingVad().process(np.concatenate([audio, np.zeros(WINDOW, np.float32)]))
    speech = np.nonzero(probs >= 0.5)[0]
    if not len(speech):
        return audio
    pad = int(0.06 * SAMPLE_RATE)
    return audio[max(0, speech[0] * WINDOW - pad) : min(len(audio), (speech[-1] + 1) * WINDOW + pad)]


def long_turns(clips: list[Clip], *, min_s: float = 20.0, max_s: float = 30.0) -> list[Clip]:
    """Continuous 20-30 s turns of one language: trimmed clips joined with short gaps.

    Clips of one language are interleaved across their sources (so that voices alternate) and
    taken in that order, then in reverse, then odd and even places (each clip is in up to three turns,
    next to other clips each time); a turn that cannot reach ``min_s`` is dropped.
    """
    gap = np.zeros(int(JOIN_GAP_S * SAMPLE_RATE), dtype=np.float32)
    by_lang: dict[str, dict[str, list[Clip]]] = {}
    for c in clips:
        if c.kind == "read" and c.seconds <= max_s / 2:
            by_lang.setdefault(c.language, {}).setdefault(_source(c.name), []).append(c)
    turns = []
    for language, sources in by_lang.items():
        queues = [sources[k] for k in sorted(sources)]
        once = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
        order = once + once[::-1] + once[1::2] + once[::2]  # each clip in up to three turns, in other company each time
        parts: list[np.ndarray] = []
        texts: list[str] = []
        for clip in order:
            audio = trim(clip.audio)
            parts += [audio, gap]
            texts.append(clip.reference)
            if sum(map(len, parts)) / SAMPLE_RATE >= min_s:
                turn = np.concatenate(parts[:-1])[: int(max_s * SAMPLE_RATE)]
                if len(turn) == sum(map(len, parts[:-1])):  # nothing cut off
                    turns.append(Clip(f"{language}_turn_{len(turns)}", language, turn, " ".join(texts), "long"))
                parts, texts = [], []
    return turns


def _source(name: str) -> str:
    """The package a clip came from (its voice), e.g. en_alsa, en_ktuberling, librivox."""
    return "_".join(name.split("_")[:2]) if not name.startswith("librivox") else "librivox"


def corpus(eval_dir: Path = DEFAULT_EVAL, *, librivox: bool = True) -> list[Clip]:
    """Every read clip, then the long turns made from them."""
    clips = eval_clips(eval_dir) + (librivox_clips() if librivox else [])
    return clips + long_turns(clips)
