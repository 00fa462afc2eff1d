"""CPU cost of local mic capture: PortAudio callback, ring buffer, per-seat downmix and resampling.

    .venv/bin/python -m bench.bench_mic [--channels 8] [--rate 48000] [--seconds 10]

One array (a FIFO-fed ALSA ``file`` device, see tests/support/fakemic.py) with one
seat per channel, captured through the real PortAudio path for ``--seconds``;
the capture's CPU is the process's minus the feeding thread's. Also times the
two steps alone: the callback's copy into the ring, and the worker's
downmix + 16 kHz resampling of one 50 ms poll.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgevoice.config import MicSettings
from edgevoice.metrics import Metrics
from edgevoice.sources.mic import POLL_S, MicCapture, Ring, block_frames
from edgevoice.sources.pcm import Resampler, downmix


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def step_costs(channels: int, rate: int) -> tuple[float, float]:
    """Median µs per callback copy and ms per worker poll."""
    block = np.random.default_rng(0).standard_normal((block_frames(rate), channels)).astype(np.float32) * 0.1
    ring = Ring(rate * 5, channels)
    copies = []
    for _ in range(2000):
        t = time.perf_counter()
        ring.write(block)
        copies.append(time.perf_counter() - t)
        if ring.pending > rate:
            ring.read()
    seats = [([c], Resampler(rate)) for c in range(channels)]
    poll = np.tile(block, (round(POLL_S / 0.02), 1))
    polls = []
    for _ in range(200):
        t = time.perf_counter()
        [res.process(downmix(poll[:, chans])) for chans, res in seats]
        polls.append(time.perf_counter() - t)
    return statistics.median(copies) * 1e6, statistics.median(polls) * 1e3


async def through_portaudio(channels: int, rate: int, seconds: float) -> tuple[float, float]:
    """Capture CPU as a fraction of one core, and seconds of 16 kHz audio delivered per seat."""
    from tests.support.fakemic import FakeMic, write_asoundrc

    home = Path(tempfile.mkdtemp(prefix="bench-mic-"))
    os.environ["HOME"] = str(home)
    mic = FakeMic(home, "bench_array", channels, rate, block_frames(rate)).plug()
    write_asoundrc(home, [mic])
    t = np.arange(int(rate * (seconds + 5))) / rate
    mic.play(np.stack([0.1 * np.sin(2 * np.pi * (200 + 50 * c) * t) for c in range(channels)], axis=1))
    settings = MicSettings.model_validate(
        {
            "devices": [
                {
                    "match": "^bench_array$",
                    "samplerate": rate,
                    "seats": [{"stream_id": f"seat_{c}", "channels": [c]} for c in range(channels)],
                }
            ]
        }
    )
    got = [0]

    def route(device: object) -> Callable[[list[np.ndarray]], None]:
        def feed(chunks: list[np.ndarray]) -> None:
            got[0] += len(chunks[0])

        return feed

    capture = MicCapture(settings, Metrics())
    await capture.start(route)
    await asyncio.sleep(2.0)  # open and settle
    if capture.devices[0].state != "up":
        raise SystemExit(f"the device did not open: {capture.health()}")
    c0, w0, g0, t0 = cpu_s(), mic.writer_cpu_s, got[0], time.monotonic()
    await asyncio.sleep(seconds)
    c1, w1, g1, t1 = cpu_s(), mic.writer_cpu_s, got[0], time.monotonic()
    await capture.stop()
    mic.close()
    return (c1 - c0 - (w1 - w0)) / (t1 - t0), (g1 - g0) / 16000 / (t1 - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--channels", type=int, default=8)
    ap.add_argument("--rate", type=int, default=48000)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    copy_us, poll_ms = step_costs(args.channels, args.rate)
    print(f"{args.channels} ch at {args.rate} Hz, one seat per channel")
    print(f"callback copy into the ring (20 ms block): median {copy_us:.1f} µs")
    print(f"worker poll (50 ms: downmix + resample {args.channels} seats): median {poll_ms:.2f} ms")
    core, rt = asyncio.run(through_portaudio(args.channels, args.rate, args.seconds))
    print(
        f"through PortAudio for {args.seconds:g} s: capture CPU {core * 100:.1f}% of one core, {rt:.3f} s audio/s per seat"
    )
    print(f"load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
