"""Keyword-to-POST latency: from the end of a spoken keyword to the experience API receiving the event.

    .venv/bin/python -m bench.bench_events [--streams 1 8] [--sessions 4] [--model tiny.en] [--match-partials]

A real daemon (subprocess), a real /asr-multicam client streaming espeak-ng speech
at real-time pace (20 ms frames) and a real HTTP receiver on 127.0.0.1. Each
stream runs ``--sessions`` customer sessions in turn; each says two sentences
ending in a keyword ("... hello." / "... sorry."). The clock starts when the
frame holding the keyword's last voiced sample is sent, and stops when the
receiver gets the POST for that customer and event (same process, same
monotonic clock). "heard" is the same clock stopped when the client gets the
``keyword`` message (recognition + matching); "POST" is keyword message to
POST (the durable spool commit and the HTTP send). Streams start staggered so
that keywords do not all end at the same instant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from edgevoice import modelstore
from edgevoice.sources.multicam_client import MulticamClient
from tests.support.daemon import Daemon
from tests.support.receiver import Receiver
from tests.support.speech import silence, synth

FRAME = 320  # 20 ms
LINES = [("Hi, hello.", "SAY_HELLO"), ("I am so sorry.", "SAY_SORRY")]


def voiced_end(audio: np.ndarray, threshold: float = 0.02) -> int:
    """Index just after the last sample louder than ``threshold``."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    return int(loud[-1]) + 1 if loud.size else len(audio)


def session_audio() -> tuple[np.ndarray, list[tuple[int, str]]]:
    """One customer's speech and, per keyword, the sample index where it ends."""
    parts, marks, pos = [silence(0.4)], [], int(0.4 * 16000)
    for text, event in LINES:
        clip = synth(text)
        marks.append((pos + voiced_end(clip), event))
        parts += [clip, silence(1.5)]
        pos += len(clip) + int(1.5 * 16000)
    return np.concatenate(parts), marks


async def run_stream(
    client: MulticamClient, ch: int, sessions: int, delay: float, sent_at: dict[tuple[str, str], float]
) -> None:
    audio, marks = session_audio()
    await asyncio.sleep(delay)
    for k in range(sessions):
        customer, stream_id = f"bench_c{ch}_{k}", f"bench_s{ch}_{k}"
        await client.start(stream_id, session_id="bench", customer_id=customer, channel=ch)
        t0 = time.monotonic()
        pending = sorted(marks)
        for i in range(0, len(audio), FRAME):
            await client.send_audio(ch, audio[i : i + FRAME])
            while pending and pending[0][0] <= i + FRAME:
                sent_at[(customer, pending.pop(0)[1])] = time.monotonic()
            wait = t0 + (i + FRAME) / 16000 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        await client.stop(stream_id, timeout=120)


async def measure(daemon: Daemon, receiver: Receiver, streams: int, sessions: int) -> dict[str, float]:
    sent_at: dict[tuple[str, str], float] = {}
    first = len(receiver.requests)
    async with MulticamClient.connect(daemon.ws_url) as client:
        keyword_at: dict[tuple[str, str], float] = {}
        client.keyword_at = keyword_at  # type: ignore[attr-defined]
        client.on_message = lambda m: (
            keyword_at.setdefault((m["customer_id"], m["event"]), m["_t"]) if m["type"] == "keyword" else None
        )
        rng = random.Random(streams)
        await asyncio.gather(*(run_stream(client, ch, sessions, rng.uniform(0, 2.0), sent_at) for ch in range(streams)))
    expected = streams * sessions * (len(LINES) + 1)
    with contextlib.suppress(TimeoutError):
        await receiver.until_requests(first + expected, timeout=60)
    arrived: dict[tuple[str, str], float] = {}
    for rec in receiver.requests[first:]:
        key = (rec.body.get("UUID"), rec.body.get("EVENT"))
        arrived.setdefault(key, rec.time)
    lat = sorted(arrived[k] - t for k, t in sent_at.items() if k in arrived)
    heard = [client.keyword_at[k] - t for k, t in sent_at.items() if k in client.keyword_at]
    delivered = [arrived[k] - client.keyword_at[k] for k in sent_at if k in arrived and k in client.keyword_at]
    return {
        "n": len(lat),
        "missed": len(sent_at) - len(lat),
        "p50": _median(lat),
        "p95": _p95(lat),
        "max": max(lat, default=float("nan")),
        "heard_p50": _median(heard),
        "post_p50": _median(delivered),
        "post_p95": _p95(delivered),
    }


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _p95(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=20, method="inclusive")[18] if len(xs) >= 2 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--sessions", type=int, default=4, help="customer sessions per stream")
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--match-partials", action="store_true", help="fire on stable partials too")
    args = ap.parse_args()
    models_dir = Path(tempfile.gettempdir()) / "edgevoice-test-models"
    model = modelstore.resolve(args.model, models_dir)
    with tempfile.TemporaryDirectory() as tmp, Receiver() as receiver:
        daemon = Daemon(
            Path(tmp),
            env={
                "EDGEVOICE_ASR__MODEL": str(model),
                "EDGEVOICE_EVENTS__URL": receiver.url,
                "EDGEVOICE_KEYWORDS__MATCH_PARTIALS": str(args.match_partials).lower(),
                "EDGEVOICE_LOGGING__LEVEL": "WARNING",
            },
        )
        daemon.start(timeout=120)
        try:
            print(f"model {args.model}, match_partials={args.match_partials}, {args.sessions} sessions per stream")
            print(
                f"{'streams':>7} {'events':>6} {'missed':>6} {'p50 s':>6} {'p95 s':>6} {'max s':>6}"
                f" | {'heard p50':>9} {'POST p50':>8} {'POST p95':>8}"
            )
            for n in args.streams:
                r = asyncio.run(measure(daemon, receiver, n, args.sessions))
                print(
                    f"{n:>7} {r['n']:>6} {r['missed']:>6} {r['p50']:>6.2f} {r['p95']:>6.2f} {r['max']:>6.2f}"
                    f" | {r['heard_p50']:>9.2f} {r['post_p50']:>8.3f} {r['post_p95']:>8.3f}"
                )
                sys.stdout.flush()
        finally:
            daemon.stop()


if __name__ == "__main__":
    main()
