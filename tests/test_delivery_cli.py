"""`edgevoice spool …` against the spool of a running daemon that delivers to a real receiver."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from edgevoice.config import EventsSettings
from edgevoice.delivery import store
from edgevoice.delivery.service import DeliveryService
from tests.support.daemon import Daemon
from tests.support.receiver import Receiver


def spool_cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgevoice", "spool", *args], env=d.env, capture_output=True, text=True, timeout=60
    )


def spool_json(d: Daemon, *args: str) -> list[dict[str, object]]:
    out = spool_cli(d, *args, "--json")
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def eventually(check: Callable[[], bool], timeout: float = 15, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout} s: {what}")
        time.sleep(0.1)


def counts(d: Daemon) -> tuple[int, int]:
    """(waiting, dead) read straight from the daemon's spool file (cheap enough to poll)."""
    conn = store.connect(store.spool_path(d.tmp / "state"), create=False)
    try:
        s = store.stats(conn, store.spool_path(d.tmp / "state"))
    finally:
        conn.close()
    return s.waiting, s.dead


def health(d: Daemon) -> dict[str, object]:
    with urllib.request.urlopen(f"{d.url}/health", timeout=10) as resp:
        return json.loads(resp.read())


async def _prefill(state: Path, events: list[tuple[str, str]]) -> list[str]:
    svc = DeliveryService(EventsSettings(), state)
    await svc.start()
    try:
        return [await svc.submit(c, e, session_id="table_05") for c, e in events]
    finally:
        await svc.close()


def test_spool_cli_while_the_daemon_runs(daemon_factory: Callable[..., Daemon], receiver: Receiver):
    d = daemon_factory(
        env={
            "EDGEVOICE_EVENTS__URL": receiver.url,
            "EDGEVOICE_EVENTS__RETRY_BASE_S": "0.05",
            "EDGEVOICE_EVENTS__RETRY_CAP_S": "0.2",
        },
        start=False,
    )
    assert spool_cli(d, "stats").returncode == 1  # no spool yet: a clear error, nothing created
    assert not (d.tmp / "state" / "spool.sqlite3").exists()

    events = [("cust-a", "SAY_HELLO"), ("cust-b", "SAY_HELLO"), ("cust-a", "SESSION_END"), ("cust-c", "SAY_SORRY")]
    ids = asyncio.run(_prefill(d.tmp / "state", events))
    receiver.respond(400)
    d.start()

    # The daemon sends what waited from before; the API rejects all four: dead letters.
    eventually(lambda: counts(d) == (0, 4), what="4 dead letters")
    stats = spool_json(d, "stats")[0]
    assert (stats["waiting"], stats["dead"], stats["customers"]) == (0, 4, 0)
    dead = spool_json(d, "dead")
    assert sorted(r["id"] for r in dead) == sorted(ids)
    assert {r["status"] for r in dead} == {400} and all("HTTP 400" in str(r["response"]) for r in dead)
    table = spool_cli(d, "dead")
    assert table.returncode == 0 and "HTTP 400" in table.stdout and "cust-b" in table.stdout
    assert health(d)["spool"]["dead"] == 4  # type: ignore[index]
    with urllib.request.urlopen(f"{d.url}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert "edgevoice_spool_dead 4.0" in metrics and "edgevoice_spool_depth 0.0" in metrics
    assert 'edgevoice_deliveries_total{outcome="rejected"} 4.0' in metrics

    # Retry one while the API still rejects it: the running daemon picks it up, sends it, buries it again.
    assert spool_cli(d, "retry", ids[3]).returncode == 0
    eventually(lambda: sum(r.key == ids[3] for r in receiver.requests) == 2, what="the retried event re-sent")
    eventually(lambda: counts(d) == (0, 4), what="rejected again")

    # Retry all with the API healthy except for the very next request.
    receiver.script(400)
    receiver.respond(200)
    retry = spool_cli(d, "retry", "--all")
    assert retry.returncode == 0 and "re-queued 4 event(s)" in retry.stdout
    receiver.wait_accepted(3, timeout=15)
    eventually(lambda: counts(d)[1] == 1, what="one rejected again")
    (again,) = spool_json(d, "dead")
    assert set(receiver.accepted) == set(ids) - {again["id"]}
    expected_a = [e for (c, e), i in zip(events, ids, strict=True) if c == "cust-a" and i != again["id"]]
    assert receiver.events("cust-a") == expected_a

    purge = spool_cli(d, "purge-dead")
    assert purge.returncode == 0 and "deleted 1 dead letter(s)" in purge.stdout
    eventually(lambda: counts(d) == (0, 0), what="delivered events deleted")
    listed = spool_cli(d, "list")
    assert listed.returncode == 0 and len(listed.stdout.splitlines()) == 1  # the header: nothing waits

    missing = spool_cli(d, "retry", "no-such-id")
    assert missing.returncode == 1 and "no dead letter with id no-such-id" in missing.stderr
    both = spool_cli(d, "retry", "x", "--all")
    assert both.returncode == 2 and "not both" in both.stderr

    eventually(lambda: health(d)["spool"]["dead"] == 0, what="the daemon noticed the purge")  # type: ignore[index]
    spool = health(d)["spool"]
    assert (spool["waiting"], spool["writer_alive"]) == (0, True)  # type: ignore[index]
    assert d.stop() == 0
