"""Fault suite for delivery, against the real daemon: a redirecting API, a locked, a corrupt and a full spool.

Each test runs ``python -m edgevoice serve`` in a subprocess, makes customers
come and go over ``/asr-multicam`` (a customer whose last stream stops fires
SESSION_END) and checks what reaches a real HTTP API on 127.0.0.1, what
``/health`` and ``/metrics`` say meanwhile, and that nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import re
import sqlite3
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgevoice.config import EventsSettings
from edgevoice.delivery import store
from edgevoice.delivery.service import DeliveryService
from edgevoice.sources.multicam_client import MulticamClient
from tests.support.daemon import Daemon
from tests.support.receiver import Receiver
from tests.support.redirector import Redirector

FAST_RETRY = {
    "EDGEVOICE_EVENTS__RETRY_BASE_S": "0.05",
    "EDGEVOICE_EVENTS__RETRY_CAP_S": "0.3",
    # Models outside the state directory (shared by the test daemons; never on the small disk of the full-disk test).
    "EDGEVOICE_ASR__MODELS_DIR": str(Path(tempfile.gettempdir()) / "edgevoice-test-models"),
}


def eventually(check: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def health(d: Daemon) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"{d.url}/health", timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503: degraded, still a JSON answer
        return exc.code, json.loads(exc.read())


def spool_section(d: Daemon) -> dict[str, object]:
    section = health(d)[1]["spool"]
    assert isinstance(section, dict)
    return section


def metrics(d: Daemon) -> str:
    with urllib.request.urlopen(f"{d.url}/metrics", timeout=10) as resp:
        return resp.read().decode()


def stored(state: Path) -> tuple[int, int]:
    """(waiting, dead) straight from the spool file."""
    conn = store.connect(store.spool_path(state), create=False)
    try:
        s = store.stats(conn, store.spool_path(state))
    finally:
        conn.close()
    return s.waiting, s.dead


def leave(d: Daemon, customers: list[str], session: str = "table_05") -> None:
    """Each customer sits down with a camera stream and leaves: one SESSION_END each, in this order."""

    async def run() -> None:
        async with MulticamClient.connect(d.ws_url) as c:
            for i, customer in enumerate(customers):
                await c.start(f"cam_{i}", session_id=session, customer_id=customer, channel=i % 256)
                await c.stop(f"cam_{i}")

    asyncio.run(run())


def test_redirecting_api_loses_nothing_and_delivers_once_it_answers(daemon_factory: Callable[..., Daemon]):
    with Redirector() as api:
        api.redirect(302)
        d = daemon_factory(env={"EDGEVOICE_EVENTS__URL": api.url, **FAST_RETRY})
        leave(d, ["cust-a", "cust-b"])
        api.wait(lambda: api.redirected() >= 6, what="redirects answered and retried")
        assert api.seen.moved == [], "the redirect was never followed (no GET of the page it points at)"
        assert stored(d.tmp / "state") == (2, 0), "both events still waiting on disk"
        log = d.log()
        assert f"API REDIRECT: HTTP 302 for SESSION_END - customer cust-a - Location: {api.moved_url}" in log
        section = spool_section(d)
        assert section["last_error"] == f"HTTP 302 redirect to {api.moved_url}"

        api.redirect(None)  # the API is back at its address
        api.wait(lambda: len(api.accepted()) == 2, what="both delivered")
        time.sleep(0.3)
        assert sum(1 for key, status in api.seen.posts if status == 200) == 2, "each delivered exactly once"
        assert api.seen.moved == []
        eventually(lambda: stored(d.tmp / "state") == (0, 0), what="delivered events deleted")
        assert 'edgevoice_deliveries_total{outcome="redirected"}' in metrics(d)
        assert d.stop() == 0


def test_locked_spool_degrades_keeps_events_and_delivers_after_release(
    daemon_factory: Callable[..., Daemon], receiver: Receiver
):
    env = {
        "EDGEVOICE_EVENTS__URL": receiver.url,
        "EDGEVOICE_EVENTS__LOCK_TIMEOUT_S": "0.5",
        "WATCHDOG_USEC": "1000000",  # the daemon pings WATCHDOG=1 every 0.5 s while its liveness checks pass
        **FAST_RETRY,
    }
    d = daemon_factory(env=env)
    assert health(d)[0] == 200
    leave(d, ["cust-0"])
    receiver.wait_accepted(1, timeout=30)
    path = store.spool_path(d.tmp / "state")
    other = sqlite3.connect(path, isolation_level=None)  # another process takes the write lock and keeps it
    other.execute("BEGIN EXCLUSIVE")
    try:
        leave(d, ["cust-a", "cust-b", "cust-c"])
        eventually(lambda: health(d)[0] == 503, what="/health degraded")
        body = health(d)[1]
        reasons = body["reasons"]
        assert isinstance(reasons, list) and "spool locked by another process for more than 0.5 s" in reasons[0]
        eventually(lambda: spool_section(d)["held_in_memory"] == 3, what="three events held in memory")
        text = metrics(d)
        assert "edgevoice_spool_degraded 1.0" in text and "edgevoice_spool_held 3.0" in text
        pings = d.messages.count("WATCHDOG=1")
        # Degraded is not dead: the watchdog is still fed (no restart that would lose the held events).
        eventually(lambda: d.messages.count("WATCHDOG=1") >= pings + 3, what="watchdog pings while degraded")
        assert health(d)[0] == 503 and len(receiver.accepted) == 1
        assert "keeping new events in memory" in d.log()
    finally:
        other.execute("ROLLBACK")
        other.close()
    receiver.wait_accepted(4, timeout=30)
    assert [receiver.events(c) for c in ("cust-a", "cust-b", "cust-c")] == [["SESSION_END"]] * 3
    eventually(lambda: health(d)[0] == 200, what="/health healthy again")
    assert "can be written again" in d.log()
    eventually(lambda: stored(d.tmp / "state") == (0, 0), what="delivered events deleted")
    assert d.stop() == 0


async def _prefill(state: Path, n: int) -> list[tuple[str, str, str]]:
    svc = DeliveryService(EventsSettings(), state)
    await svc.start()
    try:
        made: list[tuple[str, str, str]] = []
        for i in range(n):
            customer, event = f"cust-{i % 20:02d}", f"EV_{i:05d}"
            made.append((await svc.submit(customer, event, session_id="s" * 60), customer, event))
        return made
    finally:
        await svc.close()


def test_corrupt_spool_at_start_requeues_what_it_holds_and_delivers_it(
    daemon_factory: Callable[..., Daemon], receiver: Receiver
):
    d = daemon_factory(env={"EDGEVOICE_EVENTS__URL": receiver.url, **FAST_RETRY}, start=False)
    state = d.tmp / "state"
    original = asyncio.run(_prefill(state, 1500))
    path = store.spool_path(state)
    data = bytearray(path.read_bytes())
    rng = random.Random(11)
    for page in range(2, len(data) // 4096, 3):  # torn pages, as a power cut on a cheap SD card leaves them
        off = page * 4096 + 100
        data[off : off + 200] = rng.randbytes(200)
    path.write_bytes(bytes(data))

    d.start()
    found = re.search(r"recovered from the damaged file (\d+) waiting event\(s\)", d.log())
    assert found, d.log()
    n = int(found.group(1))
    assert 0 < n < len(original)
    receiver.wait_accepted(n, timeout=60)
    by_id = {i: (c, e) for i, c, e in original}
    assert set(receiver.accepted) <= set(by_id), "only events that were accepted before the damage"
    for c in {c for _, c, _ in original}:
        sent = receiver.events(c)
        assert sent == sorted(sent), f"{c}: delivered in the order they fired"
    eventually(lambda: stored(state) == (0, 0), what="all delivered, none left as dead letters")
    assert spool_section(d)["moved_aside"] is not None
    assert d.stop() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs for the daemon's state directory (skipped when this process cannot mount one)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("the full-disk test mounts a small tmpfs: needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the disk is full (ENOSPC); return it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 512):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def test_full_disk_degrades_keeps_events_and_delivers_after_space_is_freed(
    daemon_factory: Callable[..., Daemon], receiver: Receiver, small_disk: Path
):
    env = {
        "EDGEVOICE_EVENTS__URL": receiver.url,
        "EDGEVOICE_STATE__DIR": str(small_disk),
        "EDGEVOICE_STATE__MIN_FREE_MB": "0",  # no floor: the disk really fills up
        **FAST_RETRY,
    }
    d = daemon_factory(env=env)
    leave(d, ["before"])
    receiver.wait_accepted(1, timeout=30)
    filler = fill(small_disk)
    fired: list[str] = []
    for i in range(40):  # until a commit needs a block the disk does not have
        fired.append(f"cust-{i:02d}")
        leave(d, fired[-1:], session=f"table_{i}")
        if health(d)[0] == 503:
            break
    status, body = health(d)
    assert status == 503, body
    reasons = body["reasons"]
    assert isinstance(reasons, list) and ("disk full" in reasons[0] or "cannot be written" in reasons[0]), reasons
    assert "keeping new events in memory" in d.log()
    more = [f"late-{i}" for i in range(3)]
    leave(d, more, session="table_late")  # accepted meanwhile, into memory
    eventually(lambda: int(str(spool_section(d)["held_in_memory"])) >= 3, what="events held in memory")

    filler.unlink()  # space is back
    receiver.wait_accepted(1 + len(fired) + len(more), timeout=60)
    assert {k for k in receiver.events() if k == "SESSION_END"} == {"SESSION_END"}
    delivered = {r.body["UUID"] for r in receiver.accepted.values()}
    assert delivered == {"before", *fired, *more}, "every customer's SESSION_END, none lost"
    eventually(lambda: health(d)[0] == 200, what="/health healthy again")
    assert "can be written again" in d.log()
    assert d.stop() == 0
