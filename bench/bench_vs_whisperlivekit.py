"""edgevoice /asr-multicam vs WhisperLiveKit 0.2.26 /asr, side by side on the same audio and stream counts.

    .venv/bin/python -m bench.bench_vs_whisperlivekit [--streams 1,2,4] [--seconds 30] [--model tiny.en]

WhisperLiveKit is installed (once) into its own venv under ``.bench/wlk-venv``
and started as ``whisperlivekit-server --backend faster-whisper
--backend-policy localagreement --model_dir <the same tiny.en directory>
--pcm-input`` on 127.0.0.1. edgevoice runs as a real daemon subprocess with
its defaults. Both get the recognition bench's espeak-ng monologue as s16le
16 kHz in 100 ms chunks at real-time pace, N streams at once (one WebSocket per
stream, each starting at its own offset in [0, 2) s), one server at a time.

Measured the same way for both, from the client side:

- final-text latency per sentence: from sending its last voiced sample to the
  first message whose committed text (edgevoice finals; WhisperLiveKit
  ``lines``) reaches the sentence's end time (within 0.25 s);
- lag: audio sent minus the end time of the committed text, sampled at every
  chunk sent; it saw-tooths with each sentence, so its floor is compared:
  growth = the lowest lag in the last quarter of the run minus the lowest in
  the second quarter (about 0 = keeps up, > 0 = falls behind; worst stream);
- WER of the whole committed text against the script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

from bench.bench_recognition import monologue
from edgevoice import modelstore
from edgevoice.sources.multicam_client import MulticamClient, to_s16le
from tests.support.daemon import Daemon, free_port
from tests.support.speech import wer

RATE = 16000
CHUNK = 1600
WLK_VERSION = "0.2.26"
ROOT = Path(__file__).resolve().parent.parent
WLK_VENV = ROOT / ".bench" / "wlk-venv"


@dataclass
class Run:
    offset: float
    sent: list[tuple[float, float]] = field(default_factory=list)
    """(wall time, audio seconds sent so far)."""
    committed: list[tuple[float, float]] = field(default_factory=list)
    """(wall time, end of committed text in audio seconds)."""
    text: str = ""
    done: bool = False


def ensure_wlk() -> Path:
    """The whisperlivekit-server of the bench venv, installed on first use."""
    exe = WLK_VENV / "bin" / "whisperlivekit-server"
    if exe.exists():
        return exe
    WLK_VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(WLK_VENV)], check=True)
    subprocess.run(
        [str(WLK_VENV / "bin" / "pip"), "install", f"whisperlivekit=={WLK_VERSION}", "faster-whisper==1.2.1"],
        check=True,
    )
    return exe


def _hms(value: str) -> float:
    h, m, s = value.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)


async def _pace(run: Run, audio: np.ndarray, send: object) -> None:
    await asyncio.sleep(run.offset)
    t0 = time.monotonic()
    for i in range(0, len(audio), CHUNK):
        await send(audio[i : i + CHUNK])  # type: ignore[operator]
        run.sent.append((time.monotonic(), min(len(audio), i + CHUNK) / RATE))
        delay = t0 + (i + CHUNK) / RATE - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def edgevoice_stream(url: str, k: int, audio: np.ndarray, run: Run) -> None:
    async with MulticamClient.connect(url) as client:
        finals: list[str] = []

        def on_message(m: dict[str, object]) -> None:
            if m["type"] == "transcript" and m["final"]:
                finals.append(str(m["text"]))
                run.committed.append((float(m["_t"]), float(m["end"])))  # type: ignore[arg-type]

        client.on_message = on_message
        await client.start(f"bench_{k}", session_id="bench", customer_id=f"bench_{k}")
        await _pace(run, audio, lambda a: client.send_audio(0, a))
        with contextlib.suppress(TimeoutError):
            await client.stop(f"bench_{k}", timeout=90)
            run.done = True
        run.text = " ".join(finals)


async def wlk_stream(url: str, audio: np.ndarray, run: Run) -> None:
    async with aiohttp.ClientSession() as session, session.ws_connect(url, max_msg_size=0) as ws:
        last_text = ""

        async def read() -> None:
            nonlocal last_text
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if data.get("type") == "ready_to_stop":
                    run.done = True
                    return
                lines = [ln for ln in data.get("lines", []) if ln.get("text")]
                if lines:
                    run.committed.append((time.monotonic(), max(_hms(ln["end"]) for ln in lines)))
                    last_text = " ".join(ln["text"].strip() for ln in lines)

        reader = asyncio.create_task(read())
        await _pace(run, audio, lambda a: ws.send_bytes(to_s16le(a)))
        await ws.send_bytes(b"")  # end of audio
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reader, 90)
        reader.cancel()
        run.text = last_text


def summarize(runs: list[Run], ends: list[float], script: str) -> dict[str, float]:
    lat: list[float] = []
    growth: list[float] = []
    for run in runs:
        for end in ends:
            sent_at = next((t for t, s in run.sent if s >= end), None)
            got = next((t for t, e in run.committed if e >= end - 0.25), None)
            if sent_at is not None and got is not None:
                lat.append(max(0.0, got - sent_at))
        # Lag sampled at each send: audio sent minus committed end known at that moment.
        lags, j, best = [], 0, 0.0
        for t, s in run.sent:
            while j < len(run.committed) and run.committed[j][0] <= t:
                best = max(best, run.committed[j][1])
                j += 1
            lags.append(s - best)
        q = len(lags) // 4
        if q:
            growth.append(min(lags[3 * q :]) - min(lags[q : 2 * q]))
    missing = len(runs) * len(ends) - len(lat)
    return {
        "p50": statistics.median(lat) if lat else float("nan"),
        "p95": statistics.quantiles(lat, n=20, method="inclusive")[18] if len(lat) > 1 else float("nan"),
        "missing": missing,
        "growth": max(growth) if growth else float("nan"),
        "wer": statistics.mean(wer(script, r.text) for r in runs),
        "unfinished": sum(not r.done for r in runs),
    }


async def run_system(name: str, url: str, n: int, audio: np.ndarray) -> list[Run]:
    rng = random.Random(n)
    runs = [Run(rng.uniform(0, 2.0)) for _ in range(n)]
    if name == "edgevoice":
        await asyncio.gather(*(edgevoice_stream(url, k, audio, r) for k, r in enumerate(runs)))
    else:
        await asyncio.gather(*(wlk_stream(url, audio, r) for r in runs))
    return runs


def start_wlk(exe: Path, model_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    args = [
        str(exe),
        "--host", "127.0.0.1", "--port", str(port),
        "--backend", "faster-whisper", "--backend-policy", "localagreement",
        "--model_dir", str(model_dir), "--pcm-input", "--lan", "en",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"WhisperLiveKit exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read())
            if body.get("ready"):
                return proc, port
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"WhisperLiveKit not ready in 180 s:\n{log.read_text()[-3000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--model", default="tiny.en")
    args = ap.parse_args()
    counts = [int(x) for x in args.streams.split(",")]
    model_dir = modelstore.resolve(args.model, Path(tempfile.gettempdir()) / "edgevoice-test-models")
    audio, ends, script = monologue(args.seconds)
    exe = ensure_wlk()
    results: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        daemon = Daemon(Path(tmp), env={"EDGEVOICE_ASR__MODEL": str(model_dir), "EDGEVOICE_LOGGING__LEVEL": "WARNING"})
        daemon.start(timeout=120)
        try:
            for n in counts:
                runs = asyncio.run(run_system("edgevoice", daemon.ws_url, n, audio))
                results[("edgevoice", n)] = summarize(runs, ends, script)
        finally:
            daemon.stop()
        wlk, port = start_wlk(exe, model_dir, Path(tmp) / "wlk.log")
        try:
            for n in counts:
                runs = asyncio.run(run_system("wlk", f"ws://127.0.0.1:{port}/asr", n, audio))
                results[("WhisperLiveKit", n)] = summarize(runs, ends, script)
        finally:
            wlk.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                wlk.wait(15)
            if wlk.poll() is None:
                wlk.kill()
    print(f"model {args.model}, {len(audio) / RATE:.0f} s monologue, {len(ends)} sentences per stream")
    print(
        f"{'system':<15} {'streams':>7} {'p50 s':>6} {'p95 s':>6} {'missing':>7} "
        f"{'lag growth s':>12} {'WER':>6} {'unfinished':>10}"
    )
    for n in counts:
        for name in ("edgevoice", "WhisperLiveKit"):
            r = results[(name, n)]
            print(
                f"{name:<15} {n:>7} {r['p50']:>6.2f} {r['p95']:>6.2f} {r['missing']:>7} "
                f"{r['growth']:>12.2f} {r['wer']:>6.3f} {r['unfinished']:>10}"
            )


if __name__ == "__main__":
    main()
