"""The spool when the disk does not answer (a held lock, a file damaged while running), and how events age."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from edgevoice.config import EventsSettings
from edgevoice.delivery import store
from edgevoice.delivery.api import DeliveryUpdate, SpoolFull
from edgevoice.delivery.service import DeliveryService
from edgevoice.metrics import Metrics
from tests.support.receiver import Receiver

MakeService = Callable[..., Awaitable[DeliveryService]]


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[MakeService]:
    made: list[DeliveryService] = []

    async def make(*, state_dir: Path | None = None, **kw: object) -> DeliveryService:
        defaults: dict[str, object] = {"commit_window_ms": 1, "retry_base_s": 0.02, "retry_cap_s": 0.1}
        settings = EventsSettings(**{**defaults, **kw})  # type: ignore[arg-type]
        svc = DeliveryService(settings, state_dir or tmp_path / "state", metrics=Metrics())
        await svc.start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        await svc.close()


def rows(path: Path) -> list[store.Event]:
    conn = store.connect(path, create=False)
    try:
        return store.waiting(conn)
    finally:
        conn.close()


def gauge(svc: DeliveryService, name: str) -> float:
    assert svc.metrics is not None
    value = svc.metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


async def until(check: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


def hold_lock(path: Path) -> sqlite3.Connection:
    """Another process's connection holding the spool's write lock (as a stuck `sqlite3` shell would)."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    other.execute("INSERT INTO meta (key, value) VALUES ('held-by-test', 1)")
    return other


async def test_a_lock_held_past_the_timeout_keeps_events_in_memory_until_it_is_released(
    make_service: MakeService, receiver: Receiver, caplog: pytest.LogCaptureFixture
):
    receiver.respond("down")
    svc = await make_service(url=receiver.url, lock_timeout_s=0.3)
    before = await svc.submit("cust-a", "SAY_HELLO")
    updates: list[DeliveryUpdate] = []
    svc.subscribe(updates.append)
    other = hold_lock(svc.spool.path)
    try:
        ids = [await svc.submit("cust-a", f"EV_{i}") for i in range(3)]
        ids += [await svc.submit("cust-b", "EV_0")]
        reason = svc.degraded()
        assert reason is not None and "spool locked by another process for more than 0.3 s" in reason
        assert "4 event(s) held in memory" in reason
        h = svc.health()
        assert (h["held_in_memory"], h["waiting"], h["degraded"], h["error"]) == (4, 1, reason, reason)
        assert gauge(svc, "edgevoice_spool_degraded") == 1 and gauge(svc, "edgevoice_spool_held") == 4
        assert svc.alive, "the liveness check (watchdog) still passes: a restart would lose what is held"
        accepts = [u for u in updates if u.detail.startswith("accepted")]
        assert len(accepts) == 4 and all(u.detail.startswith("accepted, held in memory: spool locked") for u in accepts)
        assert "keeping new events in memory (at most events.memory_max_events=10000) and retrying" in caplog.text
        assert [r.id for r in rows(svc.spool.path)] == [before], "not on disk yet"
        await asyncio.sleep(0.5)  # a few retries meet the lock
        assert svc.spool.held == 4
    finally:
        other.execute("ROLLBACK")
        other.close()
    await until(lambda: svc.spool.degraded is None, what="the spool writable again")
    assert [r.id for r in rows(svc.spool.path)] == [before, *ids], "all on disk, in order"
    assert svc.health()["degraded"] is None and gauge(svc, "edgevoice_spool_degraded") == 0
    assert "can be written again" in caplog.text
    assert gauge(svc, "edgevoice_spool_write_failures_total") >= 2
    receiver.respond(200)
    await receiver.until_accepted(5, timeout=20)
    assert receiver.events("cust-a") == ["SAY_HELLO", "EV_0", "EV_1", "EV_2"]


async def test_memory_is_bounded_and_what_is_still_held_at_close_is_logged_with_its_payload(
    make_service: MakeService, caplog: pytest.LogCaptureFixture
):
    svc = await make_service(lock_timeout_s=0.2, memory_max_events=10)
    other = hold_lock(svc.spool.path)
    try:
        accepted = [await svc.submit("cust", f"EV_{i}") for i in range(10)]
        with pytest.raises(SpoolFull, match=r"events.memory_max_events=10 events already held in memory; event EV_X"):
            await svc.submit("cust", "EV_X")
        assert svc.spool.held == 10 and svc.spool.stats.refused == 1
        await svc.close()  # the lock is still held: close retries for a few seconds, then says what is lost
    finally:
        other.execute("ROLLBACK")
        other.close()
    lost = [r for r in caplog.records if r.getMessage().startswith("EVENT LOST at shutdown")]
    assert len(lost) == 10
    assert '{"UUID": cust, "EVENT": EV_3}' in lost[3].getMessage() and accepted[3] in lost[3].getMessage()


async def test_a_file_damaged_while_running_is_replaced_and_nothing_waiting_is_lost(
    make_service: MakeService, caplog: pytest.LogCaptureFixture
):
    svc = await make_service()
    ids = list(await asyncio.gather(*(svc.submit(f"cust-{i % 5}", f"EV_{i:04d}") for i in range(600))))
    other = sqlite3.connect(svc.spool.path, isolation_level=None)
    other.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # every page in the main file, where the damage goes
    other.close()
    path = svc.spool.path
    data = bytearray(path.read_bytes())
    rng = random.Random(3)
    for page in range(1, len(data) // 4096):
        data[page * 4096 : page * 4096 + 4096] = rng.randbytes(4096)
    path.write_bytes(bytes(data))

    new = await svc.submit("cust-0", "AFTER")  # the write meets the damage
    await until(lambda: svc.spool.degraded is None and svc.spool.moved_aside is not None, what="replaced")
    await svc.spool.barrier()
    await svc.spool.barrier()
    moved = svc.spool.moved_aside
    assert moved is not None and moved.exists() and moved.name.startswith("spool.sqlite3.corrupt-")
    assert "was damaged while running" in caplog.text
    stored = rows(path)
    assert sorted(r.id for r in stored) == sorted([*ids, new]), "every waiting event is in the fresh file"
    for c in range(5):
        mine = [r.event for r in stored if r.customer_id == f"cust-{c}"]
        assert mine == sorted(mine, key=lambda e: (e == "AFTER", e)), f"cust-{c} keeps its order"
    assert svc.health()["moved_aside"] == str(moved)
    assert svc.spool.counts.waiting == 601


async def test_age_uses_the_spool_clock_not_the_wall_clock(
    make_service: MakeService, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    """An NTP step of 30 days (a box without RTC syncing after boot) expires nothing; waiting time does."""
    receiver.respond(500)
    svc = await make_service(url=receiver.url, max_age_s=3600)
    ids = [await svc.submit("cust", f"EV_{i}") for i in range(3)]
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 30 * 86400)
    await receiver.until_requests(3)  # the sender checks the head's age before each attempt
    await svc.spool.barrier()  # the maintenance tick checks every age
    assert svc.spool.counts.dead == 0 and [r.id for r in rows(svc.spool.path)] == ids
    assert svc.health()["oldest_age_s"] < 600
    monkeypatch.setattr(time, "time", lambda: real() - 30 * 86400)  # and back, past the creation time
    await svc.spool.barrier()
    assert svc.spool.counts.dead == 0
    await svc.close()


async def test_waiting_time_adds_up_across_restarts(
    make_service: MakeService, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The clock is saved at close and goes on from there: time waited counts, time switched off does not."""
    state = tmp_path / "aging"
    svc = await make_service(state_dir=state, max_age_s=3600)
    event_id = await svc.submit("cust", "SAY_HELLO")
    await asyncio.sleep(0.6)
    await svc.close()
    conn = store.connect(store.spool_path(state), create=False)
    try:
        saved = store.read_clock(conn)
        (ev,) = store.waiting(conn)
    finally:
        conn.close()
    assert saved - ev.enqueued >= 0.6, "the waiting time is on disk"
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 10 * 86400)  # ten days switched off
    again = await make_service(state_dir=state, max_age_s=3600)
    assert again.spool.clock() >= saved, "the clock goes on from where it stopped, not from 0"
    assert 0.6 <= again.health()["oldest_age_s"] < 3600, "switched-off time does not count"
    await again.spool.barrier()
    assert again.spool.counts.dead == 0
    await again.close()
    third = await make_service(state_dir=state, max_age_s=1.0)  # 0.6 s waited before: 0.4 s more will do
    for _ in range(400):
        await third.spool.barrier()
        if third.spool.counts.dead:
            break
        await asyncio.sleep(0.05)
    conn = store.connect(third.spool.path, create=False)
    (dead,) = store.dead_letters(conn)
    conn.close()
    assert dead.id == event_id and dead.reason == "expired: waited longer than max_age_s=1"


V1_SCHEMA = """
CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, customer_id TEXT NOT NULL,
    event TEXT NOT NULL, session_id TEXT, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT, size INTEGER NOT NULL);
CREATE INDEX events_customer ON events (customer_id, seq);
CREATE INDEX events_created ON events (created);
CREATE TABLE dead (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, customer_id TEXT NOT NULL,
    event TEXT NOT NULL, session_id TEXT, created REAL NOT NULL, attempts INTEGER NOT NULL, died REAL NOT NULL,
    reason TEXT NOT NULL, status INTEGER, response TEXT, size INTEGER NOT NULL);
"""


async def test_a_spool_written_by_the_previous_version_is_migrated(make_service: MakeService, tmp_path: Path):
    state = tmp_path / "v1"
    state.mkdir()
    conn = sqlite3.connect(state / store.SPOOL_FILE, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(V1_SCHEMA)
    now = time.time()
    for i, age in enumerate((7200.0, 60.0)):
        conn.execute(
            "INSERT INTO events (id, customer_id, event, session_id, created, attempts, size) VALUES (?, ?, ?, ?, ?, 0, 200)",
            (f"old-{i}", "cust", f"EV_{i}", "s1", now - age),
        )
    conn.execute(
        "INSERT INTO dead (id, customer_id, event, created, attempts, died, reason, size) VALUES (?, ?, ?, ?, 1, ?, ?, 200)",
        ("dead-0", "cust", "EV_D", now, now, "HTTP 400"),
    )
    conn.close()
    svc = await make_service(state_dir=state)
    assert [e.id for e in svc.sender.pending["cust"]] == ["old-0", "old-1"]
    assert 7000 < svc.health()["oldest_age_s"] < 7400, "an upgraded box keeps the ages it had"
    assert svc.spool.counts.dead == 1
    new = await svc.submit("cust", "EV_NEW")
    assert [r.id for r in rows(svc.spool.path)] == ["old-0", "old-1", new]
    check = sqlite3.connect(svc.spool.path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    check.close()


async def test_degraded_health_answers_503_with_the_reason_and_keeps_the_watchdog(tmp_path: Path) -> None:
    """The readiness hook the server reads: /health 503 while degraded; liveness (HEALTH_CHECKS) unaffected."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from edgevoice.server.health import get_health
    from edgevoice.server.keys import HEALTH_CHECKS, HEALTH_DEGRADED, HEALTH_SECTIONS

    svc = DeliveryService(EventsSettings(lock_timeout_s=0.2, commit_window_ms=1), tmp_path / "s", metrics=Metrics())
    await svc.start()
    app = web.Application()
    app[HEALTH_SECTIONS] = {"spool": svc.health}
    app[HEALTH_CHECKS] = [lambda: svc.alive]
    app[HEALTH_DEGRADED] = [svc.degraded]
    app.router.add_get("/health", get_health)
    try:
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            r = await client.get("/health")
            assert r.status == 200 and (await r.json())["status"] == "healthy"
            other = hold_lock(svc.spool.path)
            try:
                await svc.submit("cust", "SAY_HELLO")
                r = await client.get("/health")
                body = await r.json()
                assert r.status == 503 and body["status"] == "degraded"
                assert body["reasons"] == [svc.degraded()] and "locked" in body["reasons"][0]
                assert body["spool"]["held_in_memory"] == 1
                assert all(check() for check in app[HEALTH_CHECKS])
            finally:
                other.execute("ROLLBACK")
                other.close()
            await until(lambda: svc.spool.degraded is None)
            assert (await client.get("/health")).status == 200
    finally:
        await svc.close()
