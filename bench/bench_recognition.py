"""N concurrent real-time streams through one recognizer: final-text latency, WER, CPU, RSS, lag.

    .venv/bin/python -m bench.bench_recognition [--streams 1,2,4,8,16,32] [--model tiny.en]
        [--device auto] [--seconds 30] [--json]

Every stream plays the same espeak-ng monologue (sentences separated by 0.8 s
pauses) in 100 ms chunks at real-time pace, each starting at its own offset in
[0, 2) s so that streams do not end sentences in lockstep. Latency is measured
per sentence, from the moment its last sample was fed to the arrival (on the
event loop) of the first final that ends at or after it; it includes the
endpoint silence (asr.min_silence_ms). Lag is "bounded" when the worst stream's
lag over the last quarter of the run is under 5 s and either under 3 s or no
more than 1 s above the second quarter's (it does not grow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevoice.config import AsrSettings, KeywordSettings
from edgevoice.events.keywords import KeywordMatcher
from edgevoice.metrics import Metrics
from edgevoice.recognition.recognizer import WhisperRecognizer
from edgevoice.recognition.types import Transcript
from tests.support.speech import silence, synth, wer

RATE = 16000
CHUNK_S = 0.1
MODELS = Path(os.environ.get("EDGEVOICE_TEST_MODELS", Path(tempfile.gettempdir()) / "edgevoice-models"))

SENTENCES = [
    "Good evening, welcome to our restaurant.",
    "Can we have two glasses of water and some bread?",
    "We are celebrating my sister's birthday tonight.",
    "Please bring the bill when you have a moment.",
    "My son is allergic to peanuts and shellfish.",
    "How long will the pizza take to arrive?",
    "The steak was cooked perfectly, thank you.",
    "Do you have any vegetarian dishes today?",
    "Could we sit by the window, please?",
    "I would like a cup of green tea with lemon.",
    "Is the soup of the day spicy?",
    "We will share the chocolate cake for dessert.",
]


def monologue(seconds: float) -> tuple[np.ndarray, list[float], str]:
    parts, ends, t, used = [silence(0.5)], [], 0.5, []
    for s in SENTENCES:
        a = synth(s)
        parts += [a, silence(0.8)]
        voiced = np.nonzero(np.abs(a) > 0.01)[0]
        ends.append(t + (voiced[-1] + 1) / RATE)  # the last audible sample, not espeak's trailing silence
        used.append(s)
        t += len(a) / RATE + 0.8
        if t >= seconds:
            break
    return np.concatenate(parts), ends, " ".join(used)


@dataclass
class StreamRun:
    offset: float
    finals: list[tuple[float, Transcript]] = field(default_factory=list)
    fed_at: list[float] = field(default_factory=list)
    """Wall time at which each chunk was fed."""


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def run_n(n: int, audio: np.ndarray, ends: list[float], reference: str, settings: AsrSettings) -> dict[str, Any]:
    metrics = Metrics()
    rec = await asyncio.to_thread(WhisperRecognizer.load, settings, MODELS, metrics)
    rec.check_finals(KeywordMatcher(KeywordSettings()))  # as the daemon's stream hub does
    rec.start()
    rng = random.Random(n)
    runs = [StreamRun(offset=0.0 if i == 0 else rng.uniform(0, 2)) for i in range(n)]
    streams = []
    for i, r in enumerate(runs):
        streams.append(
            rec.open_stream(
                f"bench-{i}",
                language=None,
                on_transcript=lambda t, r=r: r.finals.append((time.monotonic(), t)) if t.final and t.text else None,
            )
        )
    chunk = int(CHUNK_S * RATE)
    lags: list[tuple[float, float]] = []
    rss_peak = rss_mb()
    cpu0 = time.process_time()
    t0 = time.monotonic()

    async def feed(r: StreamRun, stream: Any) -> None:
        await asyncio.sleep(r.offset)
        start = time.monotonic()
        for k, i in enumerate(range(0, len(audio), chunk)):
            delay = start + k * CHUNK_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            stream.feed(audio[i : i + chunk])
            r.fed_at.append(time.monotonic())

    async def sample() -> None:
        nonlocal rss_peak
        while True:
            await asyncio.sleep(0.5)
            lags.append((time.monotonic() - t0, max(s.lag_s for s in streams)))
            rss_peak = max(rss_peak, rss_mb())

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(feed(r, s) for r, s in zip(runs, streams, strict=True)))
    fed_end = time.monotonic()
    await asyncio.gather(*(s.finish() for s in streams))
    drain = time.monotonic() - fed_end
    sampler.cancel()
    wall = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    await asyncio.to_thread(rec.stop)

    latencies: list[float] = []
    missed = 0
    wers = []
    for r in runs:
        for end in ends:
            idx = min(int(end / CHUNK_S), len(r.fed_at) - 1)
            fed = r.fed_at[idx]
            hit = next((at for at, t in r.finals if t.end >= end - 0.5), None)  # word ends are approximate
            if hit is None:
                missed += 1
            else:
                latencies.append(hit - fed)
        wers.append(wer(reference, " ".join(t.text for _, t in r.finals)))
    q = max(1, len(lags) // 4)
    second = [lag for _, lag in lags[q : 2 * q]] or [0.0]
    last = [lag for _, lag in lags[-q:]] or [0.0]
    bounded = max(last) < 5.0 and max(last) <= max(3.0, max(second) + 1.0)
    size_sum = sum(
        metrics.registry.get_sample_value("edgevoice_inference_batch_size_sum", {"kind": k}) or 0
        for k in ("final", "partial", "mixed")
    )
    size_count = sum(
        metrics.registry.get_sample_value("edgevoice_inference_batch_size_count", {"kind": k}) or 0
        for k in ("final", "partial", "mixed")
    )
    lat = sorted(latencies)
    busy = sum(
        metrics.registry.get_sample_value("edgevoice_inference_seconds_sum", {"kind": k}) or 0
        for k in ("final", "partial", "mixed")
    )
    return {
        "streams": n,
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
        "missed": missed,
        "wer": round(statistics.mean(wers), 3),
        "cpu_cores": round(cpu / wall, 2),
        "rss_mb": round(rss_peak),
        "max_lag_s": round(max((lag for _, lag in lags), default=0.0), 2),
        "bounded": bounded,
        "drain_s": round(drain, 2),
        "batches": int(size_count),
        "decode_busy": round(busy / wall, 2),
        "mean_batch": round(size_sum / size_count, 2) if size_count else 0,
        "partials_skipped": rec.scheduler.partials_skipped,
        "window_retries": rec.engine.window_retries,
        "check_retries": rec.engine.check_retries,
        "continuations": rec.engine.continuations,
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,2,4,8,16,32")
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--compute-type", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="CTranslate2 CPU threads (0: all cores)")
    ap.add_argument("--window", default="shared", choices=["shared", "full"])
    ap.add_argument("--beam", type=int, default=5, help="asr.beam_size")
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the monologue")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    settings = AsrSettings(
        model=args.model,
        device=args.device,
        compute_type=args.compute_type,
        cpu_threads=args.threads,
        window=args.window,
        beam_size=args.beam,
        multilingual_model=None,
    )
    audio, ends, reference = monologue(args.seconds)
    print(
        f"# {args.model} ({args.device}, {args.compute_type}, window {args.window}), {len(ends)} sentences, "
        f"{len(audio) / RATE:.1f} s per stream, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    header = "streams  p50_s  p95_s  missed  WER    cpu   rss_MB  max_lag  bounded  batch  skipped  retried  checked"
    if not args.json:
        print(header, flush=True)
    results = []
    for n in (int(x) for x in args.streams.split(",")):
        r = await run_n(n, audio, ends, reference, settings)
        r["load"] = round(os.getloadavg()[0], 1)
        results.append(r)
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            print(
                f"{n:>7}  {r['p50_s'] or float('nan'):5.2f}  {r['p95_s'] or float('nan'):5.2f}  {r['missed']:>6}  "
                f"{r['wer']:.3f}  {r['cpu_cores']:4.2f}  {r['rss_mb']:>6}  {r['max_lag_s']:7.2f}  "
                f"{'yes' if r['bounded'] else 'NO':>7}  {r['mean_batch']:5.2f}  {r['partials_skipped']:>7}  "
                f"{r['window_retries']:>7}  {r['check_retries']:>7}",
                flush=True,
            )
    print(f"# peak RSS of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    asyncio.run(main())
