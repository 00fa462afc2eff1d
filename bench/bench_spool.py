"""Durable enqueue and delivery throughput of the event spool.

    .venv/bin/python -m bench.bench_spool [--runs 3] [--dir DIR]

0. baseline: bare SQLite, one insert per transaction, same pragmas (what the disk allows);
1. one event per commit: ``commit_window_ms = 0``, each submit awaited before the next
   (one fsync per event);
2. group commit: 64 producers submitting concurrently, ``commit_window_ms`` 0 (batches form
   while the previous fsync runs) and 2 (the default);
3. delivery: events waiting on disk for 50 customers, sent to a local receiver
   (a separate process on 127.0.0.1) with ``concurrency`` 8 and 32, until the spool is empty.

Every figure is the median of ``--runs``; "events/s" counts events whose submit
returned, i.e. committed with ``synchronous=FULL`` in WAL mode.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from edgevoice.config import EventsSettings
from edgevoice.delivery import store
from edgevoice.delivery.api import DeliveryUpdate
from edgevoice.delivery.service import DeliveryService

RECEIVER = """
import sys
from tests.support.receiver import Receiver
rx = Receiver().start()
print(rx.url, flush=True)
sys.stdin.read()
rx.stop()
"""


async def enqueue(state: Path, n: int, window_ms: float, producers: int) -> tuple[float, float]:
    """Events/s and mean events per commit."""
    svc = DeliveryService(EventsSettings(commit_window_ms=window_ms), state)
    await svc.start()
    await svc.spool.barrier()
    commits0 = svc.spool.stats.commits

    async def producer(p: int) -> None:
        for i in range(n // producers):
            await svc.submit(f"customer_{p:03d}", "SAY_HELLO", session_id=f"table_{i % 20:02d}")

    t0 = time.perf_counter()
    await asyncio.gather(*(producer(p) for p in range(producers)))
    elapsed = time.perf_counter() - t0
    commits = svc.spool.stats.commits - commits0
    await svc.close()
    total = n // producers * producers
    return total / elapsed, total / max(commits, 1)


def raw_sqlite(state: Path, n: int) -> float:
    """Baseline: bare SQLite transactions of one insert each, same file settings, no queue or thread."""
    state.mkdir(parents=True)
    conn = store.connect(store.spool_path(state), create=True)
    store.ensure_schema(conn)
    t0 = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO events (id, customer_id, event, session_id, created, size) VALUES (?, ?, ?, ?, ?, 0)",
            (str(uuid.uuid4()), "customer_000", "SAY_HELLO", f"table_{i % 20:02d}", time.time()),
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return n / elapsed


async def deliver(state: Path, url: str, n: int, customers: int, concurrency: int) -> float:
    """Deliveries/s from a full spool to the receiver."""
    filler = DeliveryService(EventsSettings(), state)
    await filler.start()
    await asyncio.gather(*(filler.submit(f"customer_{i % customers:03d}", f"EV_{i}") for i in range(n)))
    await filler.close()
    svc = DeliveryService(EventsSettings(url=url, concurrency=concurrency), state)
    done = asyncio.Event()
    delivered = 0

    def on_update(u: DeliveryUpdate) -> None:
        nonlocal delivered
        delivered += u.state == "delivered"
        if delivered == n:
            done.set()

    svc.subscribe(on_update)
    t0 = time.perf_counter()
    await svc.start()
    await asyncio.wait_for(done.wait(), 600)
    elapsed = time.perf_counter() - t0
    await svc.spool.barrier()
    assert svc.spool.counts.waiting == 0, svc.spool.counts
    await svc.close()
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=None, help="where the spool files go (default: a temporary directory)")
    ap.add_argument("--single", type=int, default=2000, help="events in the one-per-commit test")
    ap.add_argument("--grouped", type=int, default=20000, help="events in the group-commit test")
    ap.add_argument("--deliveries", type=int, default=3000, help="events in the delivery test")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)

    rx = subprocess.Popen(
        [sys.executable, "-c", RECEIVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    assert rx.stdout is not None
    url = rx.stdout.readline().strip()
    results: dict[str, list[float]] = {}
    try:
        for run in range(args.runs):
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                root = Path(tmp)
                rate = raw_sqlite(root / "raw", args.single)
                results.setdefault("baseline: bare SQLite, one insert per commit: events/s", []).append(rate)
                rate, per = asyncio.run(enqueue(root / "a", args.single, 0, 1))
                results.setdefault("one event per commit: events/s", []).append(rate)
                results.setdefault("one event per commit: events per commit", []).append(per)
                rate, per = asyncio.run(enqueue(root / "b0", args.grouped, 0, 64))
                results.setdefault("group commit (0 ms, 64 producers): events/s", []).append(rate)
                results.setdefault("group commit (0 ms, 64 producers): events per commit", []).append(per)
                rate, per = asyncio.run(enqueue(root / "b", args.grouped, 2, 64))
                results.setdefault("group commit (2 ms, 64 producers): events/s", []).append(rate)
                results.setdefault("group commit (2 ms, 64 producers): events per commit", []).append(per)
                for conc in (8, 32):
                    rate = asyncio.run(deliver(root / f"c{conc}", url, args.deliveries, 50, conc))
                    results.setdefault(f"delivery to local receiver, concurrency {conc}: events/s", []).append(rate)
            print(f"run {run + 1}/{args.runs} done", file=sys.stderr)
    finally:
        assert rx.stdin is not None
        rx.stdin.close()
        rx.wait(10)
    for name, values in results.items():
        print(f"{name:62} median {statistics.median(values):10,.1f}   (runs: {', '.join(f'{v:,.0f}' for v in values)})")


if __name__ == "__main__":
    main()
