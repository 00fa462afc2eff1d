"""SIGKILL a process mid-enqueue, again and again: no event it saw committed may ever go missing."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from edgevoice.delivery import store

KILLS = 24

CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from edgevoice.config import EventsSettings
    from edgevoice.delivery.service import DeliveryService

    async def main():
        run, window = sys.argv[2], float(sys.argv[3])
        svc = DeliveryService(EventsSettings(commit_window_ms=window), Path(sys.argv[1]))
        await svc.start()
        os.write(1, f"ready {svc.spool.counts.waiting}\\n".encode())

        async def producer(p):
            i = 0
            while True:
                event_id = await svc.submit(f"cust-{p}", f"EV_{run}_{i:06d}")
                os.write(1, f"ok {event_id}\\n".encode())  # printed only after submit returned: committed
                i += 1

        await asyncio.gather(*(producer(p) for p in range(4)))

    asyncio.run(main())
    """
)


def _read_until_ready(proc: subprocess.Popen[bytes], deadline: float) -> bytes:
    assert proc.stdout is not None
    buf = b""
    while b"ready" not in buf:
        if time.monotonic() > deadline or proc.poll() is not None:
            break
        ready, _, _ = select.select([proc.stdout], [], [], 0.05)
        if ready:
            buf += os.read(proc.stdout.fileno(), 65536)
    return buf


def test_sigkill_mid_enqueue_loses_no_committed_event(tmp_path: Path):
    state = tmp_path / "state"
    rng = random.Random(os.getpid())
    committed: list[str] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for run in range(KILLS):
        window = (0.0, 2.0, 5.0)[run % 3]
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state), str(run), str(window)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert proc.stdout is not None
        if run % 8 == 7:  # now and then, kill it while it opens/recovers the spool
            time.sleep(rng.uniform(0.0, 0.6))
            out = b""
        else:
            out = _read_until_ready(proc, time.monotonic() + 30)
            assert b"ready" in out, f"run {run}: child did not start"
            time.sleep(rng.uniform(0.005, 0.25))
        proc.send_signal(signal.SIGKILL)
        rest, _ = proc.communicate(timeout=30)
        lines = (out + rest).split(b"\n")[:-1]  # the last piece may be a torn line
        ready = [int(line.split()[1]) for line in lines if line.startswith(b"ready ")]
        new = [line[3:].decode() for line in lines if line.startswith(b"ok ")]
        if ready:
            assert ready[0] >= len(committed), f"run {run}: restart saw fewer events than were committed"
        committed.extend(new)

        conn = store.connect(store.spool_path(state), create=False)
        try:
            assert store.quick_check(conn) == "ok"
            stored = store.waiting(conn)
        finally:
            conn.close()
        ids = {e.id for e in stored}
        missing = [i for i in committed if i not in ids]
        assert not missing, f"after kill {run + 1}: {len(missing)} committed event(s) missing, e.g. {missing[:3]}"
        # Each customer's events stay in the order they were submitted.
        for p in range(4):
            names = [e.event for e in stored if e.customer_id == f"cust-{p}"]
            keys = [(int(n.split("_")[1]), n.split("_")[2]) for n in names]
            assert keys == sorted(keys), f"cust-{p}: order broken after kill {run + 1}"
    print(f"{KILLS} kills, {len(committed)} committed events, all present")
    assert len(committed) > KILLS * 5, "the kills landed while events were being committed"
