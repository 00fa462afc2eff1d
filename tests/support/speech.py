"""Real synthesized speech for tests and benches: espeak-ng, resampled to 16 kHz float32."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np
import soxr

CACHE = Path(os.environ.get("EDGEVOICE_SPEECH_CACHE", Path(tempfile.gettempdir()) / "edgevoice-speech"))
RATE = 16000


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of a 16-bit PCM WAV file."""
    with wave.open(str(path), "rb") as w:
        rate, channels = w.getframerate(), w.getnchannels()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    return data, rate


def synth(text: str, voice: str = "en-us", pitch: int = 50, speed: int = 150, rate: int = RATE) -> np.ndarray:
    """Speak ``text`` with espeak-ng and return float32 mono samples at ``rate``."""
    key = hashlib.sha256(f"{text}|{voice}|{pitch}|{speed}|{rate}".encode()).hexdigest()[:24]
    cached = CACHE / f"{key}.npy"
    if cached.is_file():
        return np.load(cached)
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "s.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(wav), text],
            check=True,
            capture_output=True,
        )
        audio, native = read_wav(wav)
    if native != rate:
        audio = soxr.resample(audio, native, rate).astype(np.float32)
    tmp_file = cached.with_suffix(f".{os.getpid()}.npy")
    np.save(tmp_file, audio)
    tmp_file.replace(cached)
    return audio


def silence(seconds: float, rate: int = RATE) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.float32)


def noise(seconds: float, level: float = 0.05, seed: int = 0, rate: int = RATE) -> np.ndarray:
    """Pink-ish room noise at ``level`` RMS: reproducible."""
    rng = np.random.default_rng(seed)
    white = rng.standard_normal(int(seconds * rate)).astype(np.float32)
    pink = np.convolve(white, np.ones(8, dtype=np.float32) / 8, mode="same")
    return (pink / (np.sqrt(np.mean(pink**2)) + 1e-9) * level).astype(np.float32)


def to_s16le(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()


def wer(reference: str, hypothesis: str) -> float:
    """Word error rate after lower-casing and stripping punctuation."""
    import jiwer

    tf = jiwer.Compose(
        [
            jiwer.ToLowerCase(),
            jiwer.RemovePunctuation(),
            jiwer.RemoveMultipleSpaces(),
            jiwer.Strip(),
            jiwer.ReduceToListOfListOfWords(),
        ]
    )
    return float(jiwer.wer(reference, hypothesis, reference_transform=tf, hypothesis_transform=tf))


def trim(audio: np.ndarray, threshold: float = 0.01, keep_s: float = 0.05) -> np.ndarray:
    """``audio`` without its leading and trailing silence (``keep_s`` kept each side)."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if not loud.size:
        return audio
    keep = int(keep_s * RATE)
    return audio[max(0, loud[0] - keep) : loud[-1] + 1 + keep]


def continuous_turn(lines: list[tuple[str, dict[str, object]]], gap_s: float = 0.12) -> np.ndarray:
    """Lines spoken back to back by their voices (``synth`` keyword arguments), with gaps too short
    for any endpoint: one utterance however long."""
    gap = silence(gap_s)
    parts = []
    for text, voice in lines:
        parts += [trim(synth(text, **voice)), gap]  # type: ignore[arg-type]
    return np.concatenate([silence(0.3), *parts[:-1], silence(1.0)])


def offline_text(model_dir: Path, audio: np.ndarray, language: str, beam_size: int = 5) -> str:
    """What plain offline faster-whisper (its own VAD, same int8 model) writes for ``audio``."""
    from faster_whisper import WhisperModel

    model = WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=2)
    segments, _ = model.transcribe(audio, beam_size=beam_size, language=language, vad_filter=True)
    return " ".join(s.text.strip() for s in segments)
