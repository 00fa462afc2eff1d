"""SIGKILL a process mid-enqueue, again and again: no event it saw committed may ever go missing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from edgevoice.delivery import store

KILLS = 30

# A "zygote" imports everything once, then forks one writer per run (a fresh process that opens
# the spool itself, as a restarted daemon does); the test SIGKILLs the writer at a random moment.
ZYGOTE = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from edgevoice.config import EventsSettings
    from edgevoice.delivery.service import DeliveryService

    async def writer(out, state, run, window):
        svc = DeliveryService(EventsSettings(commit_window_ms=window), Path(state))
        await svc.start()
        os.write(out, f"ready {svc.spool.counts.waiting}\\n".encode())

        async def producer(p):
            i = 0
            while True:
                event_id = await svc.submit(f"cust-{p}", f"EV_{run}_{i:06d}")
                os.write(out, f"ok {event_id}\\n".encode())  # written only after submit returned: committed
                i += 1

        await asyncio.gather(*(producer(p) for p in range(4)))

    for line in sys.stdin:
        out_path, state, run, window = line.split()
        pid = os.fork()
        if pid == 0:
            out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            asyncio.run(writer(out, state, run, float(window)))
            os._exit(0)
        print(pid, flush=True)
        os.waitpid(pid, 0)
        print("reaped", flush=True)
    """
)


def _wait_for_ready(path: Path, deadline: float) -> None:
    while time.monotonic() < deadline:
        if path.exists() and b"ready" in path.read_bytes():
            return
        time.sleep(0.005)
    raise TimeoutError(
        f"{path}: the writer never got ready; zygote stderr:\n{(path.parent / 'zygote.err').read_text()}"
    )


def test_sigkill_mid_enqueue_loses_no_committed_event(tmp_path: Path):
    state = tmp_path / "state"
    rng = random.Random(os.getpid())
    committed: list[str] = []
    errors = (tmp_path / "zygote.err").open("wb")
    zygote = subprocess.Popen(
        [sys.executable, "-c", ZYGOTE],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        bufsize=1,
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    try:
        for run in range(KILLS):
            out = tmp_path / f"run-{run}.out"
            zygote.stdin.write(f"{out} {state} {run} {(0.0, 2.0, 5.0)[run % 3]}\n")
            zygote.stdin.flush()
            reply = zygote.stdout.readline()
            assert reply.strip().isdigit(), f"zygote failed: {(tmp_path / 'zygote.err').read_text()}"
            pid = int(reply)
            if run % 6 == 5:  # now and then, kill it while it opens/recovers the spool
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                _wait_for_ready(out, time.monotonic() + 30)
                time.sleep(rng.uniform(0.005, 0.2))
            os.kill(pid, signal.SIGKILL)
            assert zygote.stdout.readline().strip() == "reaped"

            lines = out.read_bytes().split(b"\n")[:-1] if out.exists() else []  # the last piece may be torn
            ready = [int(line.split()[1]) for line in lines if line.startswith(b"ready ")]
            if ready:
                assert ready[0] >= len(committed), f"run {run}: restart saw fewer events than were committed"
            committed.extend(line[3:].decode() for line in lines if line.startswith(b"ok "))

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
    finally:
        zygote.stdin.close()
        zygote.wait(30)
        errors.close()
    print(f"{KILLS} kills, {len(committed)} committed events, all present")
    assert len(committed) > KILLS * 5, "the kills landed while events were being committed"
