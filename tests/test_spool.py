"""The disk spool on real SQLite files: durability, group commit, bounds, age, damaged files, a cut WAL."""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from edgevoice.config import EventsSettings
from edgevoice.delivery import store
from edgevoice.delivery.api import DeliveryUpdate, SpoolFull
from edgevoice.delivery.service import DeliveryService
from edgevoice.delivery.spool import open_file
from edgevoice.metrics import Metrics

MakeService = Callable[..., Awaitable[DeliveryService]]


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[MakeService]:
    """Delivery services (no URL unless given) on a real spool in tmp_path/state; closed at teardown."""
    made: list[DeliveryService] = []

    async def make(*, state_dir: Path | None = None, min_free_mb: int = 0, **kw: object) -> DeliveryService:
        settings = EventsSettings(**{"commit_window_ms": 1, **kw})  # type: ignore[arg-type]
        svc = DeliveryService(settings, state_dir or tmp_path / "state", min_free_mb=min_free_mb, metrics=Metrics())
        await svc.start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        await svc.close()


def counter(svc: DeliveryService, name: str, outcome: str) -> float:
    metric = getattr(svc.metrics, name)
    return sum(
        s.value
        for m in metric.collect()
        for s in m.samples
        if s.labels.get("outcome") == outcome and s.name.endswith("_total")
    )


def rows(path: Path) -> list[store.Event]:
    conn = store.connect(path, create=False)
    try:
        return store.waiting(conn)
    finally:
        conn.close()


async def test_submit_returns_after_commit_and_survives_reopen(make_service: MakeService, tmp_path: Path):
    svc = await make_service()
    ids = [await svc.submit("cust-a", f"EV_{i}", session_id="s1") for i in range(5)]
    # Another connection sees every returned id at once: it was committed before submit returned.
    assert [r.id for r in rows(svc.spool.path)] == ids
    await svc.close()
    svc2 = await make_service()
    assert [e.id for e in svc2.sender.pending["cust-a"]] == ids
    assert [e.event for e in svc2.sender.pending["cust-a"]] == [f"EV_{i}" for i in range(5)]
    conn = sqlite3.connect(svc2.spool.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_group_commit_shares_one_fsync_and_window_zero_commits_each(make_service: MakeService, tmp_path: Path):
    grouped = await make_service(commit_window_ms=5)
    before = grouped.spool.stats.commits
    ids = await asyncio.gather(*(grouped.submit(f"cust-{i % 7}", "SAY_HELLO") for i in range(300)))
    assert len(set(ids)) == 300
    assert grouped.spool.stats.commits - before <= 30, "300 concurrent submits share a handful of commits"

    single = await make_service(state_dir=tmp_path / "single", commit_window_ms=0)
    await single.spool.barrier()
    before = single.spool.stats.commits
    for i in range(20):
        await single.submit("cust", f"EV_{i}")
    assert single.spool.stats.commits - before == 20, "awaited one by one: one commit each"


async def test_refuse_new_when_max_events_reached(make_service: MakeService, caplog: pytest.LogCaptureFixture):
    updates: list[DeliveryUpdate] = []
    svc = await make_service(max_events=10)
    svc.subscribe(updates.append)
    ids = [await svc.submit("cust", f"EV_{i}") for i in range(10)]
    with pytest.raises(SpoolFull, match=r"max_events=10 reached.*EV_X for customer cust refused"):
        await svc.submit("cust", "EV_X")
    assert "spool full (max_events=10 reached): refused 1 new event(s)" in caplog.text
    assert counter(svc, "spool_events", "refused") == 1 and counter(svc, "spool_events", "accepted") == 10
    assert updates[-1].state == "dropped" and updates[-1].event == "EV_X"
    assert [r.id for r in rows(svc.spool.path)] == ids, "nothing already accepted was touched"
    await svc.spool.delete(ids[0])
    await svc.submit("cust", "EV_Y")  # room again


async def test_drop_oldest_drops_and_reports_the_oldest(make_service: MakeService, caplog: pytest.LogCaptureFixture):
    updates: list[DeliveryUpdate] = []
    svc = await make_service(max_events=10, full_policy="drop_oldest")
    svc.subscribe(updates.append)
    ids = [await svc.submit(f"cust-{i % 3}", f"EV_{i}") for i in range(15)]
    assert [r.id for r in rows(svc.spool.path)] == ids[5:]
    assert [u.event_id for u in updates if u.state == "dropped"] == ids[:5]
    assert counter(svc, "spool_events", "dropped") == 5
    assert svc.spool.counts.waiting == 10 and svc.sender.depth == 10
    assert caplog.text.count("(full_policy=drop_oldest)") == 5
    assert ids[0] in caplog.text


async def test_max_bytes_bound(make_service: MakeService):
    svc = await make_service(max_bytes=1 << 16)
    accepted = 0
    with pytest.raises(SpoolFull, match=r"max_bytes=65536 reached"):
        for i in range(10_000):
            await svc.submit(f"customer_{i:06d}", "SAY_HELLO", session_id="restaurant_table_05_evening")
            accepted += 1
    assert 100 < accepted < 400
    assert svc.spool.counts.waiting_bytes <= 1 << 16
    assert len(rows(svc.spool.path)) == accepted


async def test_free_disk_floor(make_service: MakeService, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    state = tmp_path / "state"
    svc = await make_service(state_dir=state)
    kept = [await svc.submit("cust", f"EV_{i}") for i in range(5)]
    await svc.close()
    floor = shutil.disk_usage(tmp_path).free // 2**20 + 10_000  # more than the disk has free
    # refuse_new: below the floor the event is held in memory (degraded), never lost, and written once there is room.
    holding = await make_service(state_dir=state, min_free_mb=floor)
    held = await holding.submit("cust", "EV_NEW")
    assert holding.spool.held == 1 and [r.id for r in rows(holding.spool.path)] == kept
    reason = holding.degraded()
    assert (
        reason is not None and "free disk below state.min_free_mb" in reason and "1 event(s) held in memory" in reason
    )
    assert holding.health()["degraded"] == reason
    holding.spool.min_free_bytes = 0  # room again
    for _ in range(200):
        if holding.spool.degraded is None:
            break
        await asyncio.sleep(0.05)
    assert holding.spool.degraded is None and holding.spool.held == 0
    assert [r.id for r in rows(holding.spool.path)] == [*kept, held]
    await holding.close()
    dropping = await make_service(state_dir=state, min_free_mb=floor, full_policy="drop_oldest")
    new = await dropping.submit("cust", "EV_NEW2")
    assert [r.id for r in rows(dropping.spool.path)] == [*kept[1:], held, new], (
        "one out, one in: the file does not grow"
    )


DISK_FULL_CHILD = textwrap.dedent(
    """
    import asyncio, json, resource, signal, sys
    from pathlib import Path
    from edgevoice.config import EventsSettings
    from edgevoice.delivery.service import DeliveryService

    async def main():
        svc = DeliveryService(EventsSettings(commit_window_ms=0), Path(sys.argv[1]))
        await svc.start()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG/short writes instead
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), hard))
        accepted, errors, reasons, held_after = [], [], set(), 0
        for i in range(5000):
            try:
                accepted.append(await svc.submit("cust", f"EV_{i:05d}", session_id="x" * 200))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            if svc.spool.degraded:
                reasons.add(svc.spool.degraded)
                held_after += 1
                if held_after >= 50:
                    break
        degraded = svc.degraded()
        held = svc.spool.held
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
        for _ in range(400):
            if svc.spool.degraded is None:
                break
            await asyncio.sleep(0.05)
        accepted.append(await svc.submit("cust", "AFTER"))
        recovered = svc.spool.degraded is None
        await svc.close()
        print(json.dumps({"accepted": accepted, "errors": errors, "reasons": sorted(reasons), "held": held,
                          "degraded": degraded, "recovered": recovered}))

    asyncio.run(main())
    """
)


def test_disk_full_keeps_events_in_memory_and_writes_them_once_there_is_room(tmp_path: Path):
    """A real write failure (RLIMIT_FSIZE: the WAL cannot grow): submits go on, held in memory; then all reach disk."""
    state = tmp_path / "state"
    out = subprocess.run(
        [sys.executable, "-c", DISK_FULL_CHILD, str(state), str(1 << 20)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["errors"] == [], "nothing accepted was refused or lost"
    assert result["reasons"], "the size limit was hit"
    assert all(r.startswith(("disk full", "spool cannot be written")) for r in result["reasons"]), result["reasons"]
    assert result["held"] >= 40 and "event(s) held in memory, retrying" in result["degraded"]
    assert result["recovered"]
    assert "keeping new events in memory" in out.stderr and "can be written again" in out.stderr
    conn = store.connect(store.spool_path(state), create=False)
    assert store.quick_check(conn) == "ok"
    assert [r.id for r in store.waiting(conn)] == result["accepted"], "every accepted event on disk, in order"
    conn.close()


async def test_events_older_than_max_age_go_to_dead_letter(make_service: MakeService):
    updates: list[DeliveryUpdate] = []
    svc = await make_service(max_age_s=0.2)
    svc.subscribe(updates.append)
    event_id = await svc.submit("cust", "SAY_HELLO")
    await asyncio.sleep(0.3)
    await svc.spool.barrier()  # runs the maintenance tick
    assert svc.spool.counts.waiting == 0 and svc.spool.counts.dead == 1
    conn = store.connect(svc.spool.path, create=False)
    (dead,) = store.dead_letters(conn)
    conn.close()
    assert dead.id == event_id and dead.reason.startswith("expired")
    assert updates[-1].state == "dead" and svc.sender.depth == 0
    assert counter(svc, "spool_events", "expired") == 1


@pytest.mark.parametrize("damage", ["garbage", "torn_pages"])
async def test_damaged_spool_is_moved_aside_and_a_fresh_one_started(
    make_service: MakeService, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
):
    state = tmp_path / "state"
    path = store.spool_path(state)
    original: list[str] = []
    if damage == "garbage":
        state.mkdir()
        path.write_bytes(b"this is not a database, it is a power cut" * 200)
    else:
        svc = await make_service(state_dir=state)
        original = await asyncio.gather(
            *(svc.submit(f"customer_{i}", "SAY_HELLO", session_id="s" * 50) for i in range(2000))
        )
        await svc.close()
        data = bytearray(path.read_bytes())
        rng = random.Random(7)
        for page in range(2, len(data) // 4096, 3):
            off = page * 4096 + 100
            data[off : off + 200] = rng.randbytes(200)
        path.write_bytes(bytes(data))
    svc = await make_service(state_dir=state)
    moved = svc.spool.moved_aside
    assert moved is not None and moved.exists()
    assert re.fullmatch(r"spool\.sqlite3\.corrupt-\d{8}T\d{6}\.\d{6}Z", moved.name)
    assert "is damaged" in caplog.text and str(moved) in caplog.text
    assert svc.health()["moved_aside"] == str(moved)
    # What could still be read is waiting again, in its order (never put aside as dead letters).
    salvaged = [r.id for r in rows(path)]
    assert svc.spool.counts.dead == 0
    assert set(salvaged) <= set(original)
    assert salvaged == [i for i in original if i in set(salvaged)], "in the order they were accepted"
    assert svc.sender.depth == len(salvaged), "and handed to the sender"
    if damage == "torn_pages":
        assert 0 < len(salvaged) < len(original), "some rows readable, some lost to the damage"
        assert f"recovered from the damaged file {len(salvaged)} waiting event(s)" in caplog.text
    event_id = await svc.submit("cust", "SAY_HELLO")  # a working spool
    assert [r.id for r in rows(path)] == [*salvaged, event_id]
    assert max((r.seq for r in rows(path) if r.id != event_id), default=0) < rows(path)[-1].seq


async def test_wal_cut_at_any_byte_reopens_with_every_fully_committed_event(make_service: MakeService, tmp_path: Path):
    """Copy the live files mid-run (as a power cut would leave them), cut the WAL anywhere, reopen."""
    state = tmp_path / "state"
    svc = await make_service(state_dir=state, commit_window_ms=0)
    wal = svc.spool.path.with_name(store.SPOOL_FILE + "-wal")
    commits: list[tuple[int, list[str]]] = []  # (WAL bytes once committed, ids of that commit)
    for k in range(40):
        before = svc.spool.stats.commits
        ids = [await svc.submit(f"cust-{k % 4}", f"EV_{k}")]
        assert svc.spool.stats.commits == before + 1
        commits.append((wal.stat().st_size, ids))
    sizes = [c[0] for c in commits]
    assert sizes == sorted(sizes), "no checkpoint reset the WAL during the test"
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    shutil.copy(svc.spool.path, frozen / store.SPOOL_FILE)  # no -shm: a fresh boot rebuilds it
    shutil.copy(wal, frozen / wal.name)

    rng = random.Random(1234)
    cuts = sorted({32, sizes[-1], *(rng.randrange(32, sizes[-1]) for _ in range(40)), *(s - 1 for s in sizes[::5])})
    for cut in cuts:
        trial = tmp_path / f"cut-{cut}"
        trial.mkdir()
        shutil.copy(frozen / store.SPOOL_FILE, trial / store.SPOOL_FILE)
        with (frozen / wal.name).open("rb") as src, (trial / wal.name).open("wb") as dst:
            dst.write(src.read(cut))
        conn, moved = open_file(trial / store.SPOOL_FILE)
        try:
            assert moved is None, f"cut at {cut}: a torn WAL is not corruption"
            assert store.quick_check(conn) == "ok"
            got = [r.id for r in store.waiting(conn)]
        finally:
            conn.close()
        expected = [i for size, ids in commits if size <= cut for i in ids]
        assert got == expected, f"cut at byte {cut} of {sizes[-1]}: every commit wholly inside the cut, in order"


async def test_health_and_gauges(make_service: MakeService):
    svc = await make_service()
    await svc.submit("cust-a", "SAY_HELLO")
    await svc.submit("cust-b", "SAY_HELLO")
    h = svc.health()
    assert (h["waiting"], h["customers"], h["dead"], h["sending"], h["writer_alive"]) == (2, 2, 0, False, True)
    assert 0 <= h["oldest_age_s"] < 60
    assert svc.metrics.spool_depth.collect()[0].samples[0].value == 2  # type: ignore[union-attr]
    assert svc.metrics.spool_oldest_age.collect()[0].samples[0].value >= 0  # type: ignore[union-attr]
    await svc.close()
    assert not svc.spool.alive
    with pytest.raises(Exception, match="closed"):
        await svc.submit("cust-a", "LATE")
