"""A real daemon SIGKILLed while an event is in flight: after restart it is sent again and nothing is lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from edgevoice.config import EventsSettings
from edgevoice.delivery.service import DeliveryService
from tests.support.daemon import Daemon
from tests.support.receiver import Receiver


async def _prefill(state: Path, events: list[tuple[str, str]]) -> list[str]:
    svc = DeliveryService(EventsSettings(), state)
    await svc.start()
    try:
        return [await svc.submit(c, e) for c, e in events]
    finally:
        await svc.close()


def test_daemon_killed_mid_delivery_resends_after_restart(daemon_factory: Callable[..., Daemon], receiver: Receiver):
    env = {"EDGEVOICE_EVENTS__URL": receiver.url, "EDGEVOICE_EVENTS__CONCURRENCY": "1"}
    first = daemon_factory(env=env, start=False)
    state = first.tmp / "state"
    events = [("cust-a", "SAY_HELLO"), ("cust-b", "SAY_HELLO"), ("cust-a", "SAY_SORRY"), ("cust-a", "SESSION_END")]
    ids = asyncio.run(_prefill(state, events))

    # The API records the first event, then never answers: the daemon dies with it in flight.
    receiver.respond("accept_hang")
    first.start()
    receiver.wait_requests(1, timeout=30)
    first.kill()  # SIGKILL
    assert [r.key for r in receiver.requests] == [ids[0]]

    receiver.respond(200)
    second = daemon_factory(env={**env, "EDGEVOICE_STATE__DIR": str(state)})
    receiver.wait_accepted(4, timeout=30)
    assert set(receiver.accepted) == set(ids)
    assert receiver.events("cust-a") == ["SAY_HELLO", "SAY_SORRY", "SESSION_END"]
    assert receiver.events("cust-b") == ["SAY_HELLO"]
    assert [r.key for r in receiver.requests].count(ids[0]) == 2, "the in-flight event was sent again, same key"
    assert receiver.duplicates == 1
    deadline = time.monotonic() + 15
    while "API SUCCESS: SESSION_END for customer cust-a" not in second.log():
        assert time.monotonic() < deadline, second.log()
        time.sleep(0.05)
    assert f"API REQUEST: Calling {receiver.url} with payload: " in second.log()
    assert second.stop() == 0
