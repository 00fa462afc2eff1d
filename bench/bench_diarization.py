"""Cost of each diarization backend per second of audio, and of labelling one final.

    .venv/bin/python -m bench.bench_diarization [--seconds 60] [--streams 1 4] [--runs 3] [--no-sortformer]

Audio: espeak-ng speech, two voices alternating with pauses. Each run feeds every stream
its audio in 100 ms blocks as fast as it can (no real-time pacing) and waits until the
backend's worker is idle. Reported per backend and stream count (medians over runs):
wall seconds and process CPU seconds per second of audio (below 1 keeps up with real
time; the main thread only waits, so CPU is the worker's), and ``split()`` time per final.

The full Sortformer (diar_streaming_sortformer_4spk-v2, 117.7M parameters) cannot be had
here (no hub); ``sortformer-tiny`` is the ~22k-parameter random model from
``edgevoice.recognition.diarization.tiny`` on the same code path: its figure is the
pipeline's own overhead (features, streaming state, batching), not the real model's cost.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from edgevoice.config import DiarizationSettings
from edgevoice.metrics import Metrics
from edgevoice.recognition.diarization import build_diarizer
from edgevoice.recognition.types import Transcript, Word
from tests.support.speech import silence, synth

RATE = 16000
LINES = [
    ("en-us", 10, "Good evening, I would like a table for two please."),
    ("en-us+f4", 90, "Of course, right this way."),
    ("en-us", 10, "Could we see the wine list and some water?"),
    ("en-us+f4", 90, "Here it is, the specials today are fish and soup."),
]


def conversation(seconds: float) -> np.ndarray:
    parts: list[np.ndarray] = []
    total = 0
    while total < seconds * RATE:
        for voice, pitch, text in LINES:
            parts += [synth(text, voice=voice, pitch=pitch), silence(0.6)]
            total += len(parts[-2]) + len(parts[-1])
    return np.concatenate(parts)[: int(seconds * RATE)]


def run_once(settings: DiarizationSettings, audio: np.ndarray, streams: int) -> tuple[float, float, float]:
    """(wall s, CPU s, split µs median) for ``streams`` streams of ``audio``."""
    d = build_diarizer(settings, Metrics())
    try:
        warm = d.open_stream("warm")  # first-call costs (JIT, allocator) are not per-second costs
        warm.feed(audio[: 3 * RATE])
        if hasattr(d, "worker"):
            d.worker.wait_idle(120)
        warm.close()
        opened = [d.open_stream(f"s{i}") for i in range(streams)]
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(audio), RATE // 10):
            for s in opened:
                s.feed(audio[i : i + RATE // 10])
        if hasattr(d, "worker"):
            d.worker.wait_idle(3600)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        words = tuple(Word(f"w{k}", k * 0.4, k * 0.4 + 0.3) for k in range(int(len(audio) / RATE / 0.4) - 1))
        times = []
        for k in range(0, len(words) - 10, 10):
            final = Transcript("s0", "x", True, words[k].start, words[k + 9].end, words[k : k + 10])
            t = time.perf_counter()
            opened[0].split(final)
            times.append(time.perf_counter() - t)
        for s in opened:
            s.close()
        return wall, cpu, statistics.median(times) * 1e6
    finally:
        d.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-sortformer", action="store_true", help="skip the tiny Sortformer (NeMo import takes 10-25 s)")
    args = ap.parse_args()
    audio = conversation(args.seconds)
    seconds = len(audio) / RATE
    configs: list[tuple[str, DiarizationSettings]] = [
        ("none", DiarizationSettings(backend="none")),
        ("embedding", DiarizationSettings(backend="embedding", device="cpu", max_lag_s=600)),
    ]
    tmp = tempfile.TemporaryDirectory()
    if not args.no_sortformer:
        from edgevoice.recognition.diarization.tiny import save_tiny_sortformer

        t = time.perf_counter()
        model = save_tiny_sortformer(Path(tmp.name) / "tiny.nemo")
        print(f"NeMo import + tiny model build: {time.perf_counter() - t:.1f} s")
        for preset in ("low_latency", "high_accuracy"):
            configs.append(
                (
                    f"sortformer-tiny {preset}",
                    DiarizationSettings(
                        backend="sortformer", model=str(model), device="cpu", preset=preset, max_lag_s=600
                    ),
                )
            )
    print(
        f"{seconds:.0f} s of audio per stream, {args.runs} runs, medians; torch threads = 1 (diarization.cpu_threads)"
    )
    print(f"{'backend':34} {'streams':>7} {'wall s/s':>9} {'CPU s/s':>8} {'split µs':>9}")
    for name, settings in configs:
        for n in args.streams:
            results = [run_once(settings, audio, n) for _ in range(args.runs)]
            wall = statistics.median(r[0] for r in results) / (seconds * n)
            cpu = statistics.median(r[1] for r in results) / (seconds * n)
            split = statistics.median(r[2] for r in results)
            print(f"{name:34} {n:7d} {wall:9.4f} {cpu:8.4f} {split:9.0f}", flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
