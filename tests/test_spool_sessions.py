"""Customer sessions recorded in the spool, for a hub that restarts after SIGKILL with customers seated."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from edgevoice.config import EventsSettings
from edgevoice.delivery import store
from edgevoice.delivery.api import OpenSession
from edgevoice.delivery.service import DeliveryService

MakeService = Callable[..., Awaitable[DeliveryService]]


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[MakeService]:
    made: list[DeliveryService] = []

    async def make() -> DeliveryService:
        svc = DeliveryService(EventsSettings(commit_window_ms=1), tmp_path / "state")
        await svc.start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        await svc.close()


async def test_open_sessions_streams_and_fired_keywords_are_read_back_at_start(make_service: MakeService):
    svc = await make_service()
    assert svc.open_sessions() == []
    svc.stream_attached("table_05", "cust-a", "cam-1")
    svc.stream_attached("table_05", "cust-a", "cam-2")
    svc.stream_attached("table_05", "cust-b", "cam-3")
    svc.stream_attached("table_07", "cust-c", "cam-9")
    await svc.submit("cust-a", "SAY_HELLO", session_id="table_05", effect="keyword")
    await svc.submit("cust-a", "SAY_SORRY", session_id="table_05", effect="keyword")
    svc.stream_detached("table_05", "cust-a", "cam-2")
    await svc.submit("cust-c", "SESSION_END", session_id="table_07", effect="end")
    await svc.submit("cust-b", "NOT_A_KEYWORD_RECORD", session_id="table_05")  # no effect: nothing recorded
    await svc.close()

    again = await make_service()
    got = {(s.session_id, s.customer_id): s for s in again.open_sessions()}
    assert set(got) == {("table_05", "cust-a"), ("table_05", "cust-b")}, "the ended session is gone"
    a, b = got["table_05", "cust-a"], got["table_05", "cust-b"]
    assert a.streams == ("cam-1",) and a.keywords == frozenset({"SAY_HELLO", "SAY_SORRY"})
    assert b.streams == ("cam-3",) and b.keywords == frozenset()
    assert isinstance(a, OpenSession) and a.opened <= time.time()

    # "End them at start": one SESSION_END each, and the records go with it.
    for s in again.open_sessions():
        await again.submit(s.customer_id, "SESSION_END", session_id=s.session_id, effect="end")
    await again.close()
    third = await make_service()
    assert third.open_sessions() == []
    ends = [(e.customer_id, e.event) for e in third.sender.known() if e.event == "SESSION_END"]
    assert sorted(ends) == [("cust-a", "SESSION_END"), ("cust-b", "SESSION_END"), ("cust-c", "SESSION_END")]


async def test_an_effect_needs_a_session(make_service: MakeService):
    svc = await make_service()
    with pytest.raises(ValueError, match="effect='keyword' needs a session_id"):
        await svc.submit("cust", "SAY_HELLO", effect="keyword")
    with pytest.raises(ValueError, match="effect must be 'keyword', 'end' or None"):
        await svc.submit("cust", "SAY_HELLO", session_id="s", effect="later")  # type: ignore[arg-type]


# A child plays the hub: customers sit down (stream attached), say hello (keyword), some leave (SESSION_END);
# it is SIGKILLed at a random moment, again and again, on the same spool.
CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from edgevoice.config import EventsSettings
    from edgevoice.delivery.service import DeliveryService

    async def seat(svc, run, k):
        sid, cid = f"table_{run}_{k}", f"cust_{run}_{k}"
        svc.stream_attached(sid, cid, f"cam_{k}")
        await svc.submit(cid, "SAY_HELLO", session_id=sid, effect="keyword")
        if k % 2:
            svc.stream_detached(sid, cid, f"cam_{k}")
            await svc.submit(cid, "SESSION_END", session_id=sid, effect="end")

    async def main(state, run):
        svc = DeliveryService(EventsSettings(commit_window_ms=float(run % 3)), Path(state))
        await svc.start()
        os.write(1, b"ready\\n")
        k = 0
        while True:
            await asyncio.gather(*(seat(svc, run, k + j) for j in range(4)))
            k += 4

    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    """
)


def test_sigkill_never_splits_an_event_from_its_session_record(tmp_path: Path):
    """After any kill: a session is open iff its SESSION_END is not stored; its keywords are exactly its stored events."""
    state = tmp_path / "state"
    rng = random.Random(os.getpid())
    for run in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state), str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n", child.stderr.read() if child.stderr else ""
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()

        conn = store.connect(store.spool_path(state), create=False)
        try:
            events = store.waiting(conn)
            sessions = {(s.session_id, s.customer_id): s for s in store.open_sessions(conn)}
        finally:
            conn.close()
        fired: dict[tuple[str, str], set[str]] = {}
        for e in events:
            assert e.session_id is not None
            fired.setdefault((e.session_id, e.customer_id), set()).add(e.event)
        for key, names in fired.items():
            if "SESSION_END" in names:
                assert key not in sessions, f"run {run}: {key} ended but still recorded open"
            else:
                assert key in sessions, f"run {run}: {key} said hello, not ended, but not recorded open"
                assert sessions[key].keywords == names, f"run {run}: {key} keywords {sessions[key].keywords} vs {names}"
        for key, s in sessions.items():
            assert s.keywords <= fired.get(key, set()), f"run {run}: {key} has a keyword whose event is not stored"
    assert len(events) >= 8 and sessions, "the kills landed while customers came and went"
