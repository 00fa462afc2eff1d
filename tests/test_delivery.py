"""The sender against a real HTTP receiver on 127.0.0.1 that fails in every way the field does."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from edgevoice.config import EventsSettings
from edgevoice.delivery import store
from edgevoice.delivery.api import DeliveryUpdate
from edgevoice.delivery.sender import backoff, parse_retry_after
from edgevoice.delivery.service import DeliveryService
from edgevoice.metrics import Metrics
from tests.support.receiver import Receiver

MakeService = Callable[..., Awaitable[DeliveryService]]


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[MakeService]:
    """Open delivery services on a real spool in tmp_path/state (fast retries); all closed at teardown."""
    made: list[DeliveryService] = []

    async def make(**kw: object) -> DeliveryService:
        state = Path(str(kw.pop("state_dir", tmp_path / "state")))
        defaults: dict[str, object] = {"timeout_s": 2, "retry_base_s": 0.02, "retry_cap_s": 0.2, "commit_window_ms": 1}
        svc = DeliveryService(EventsSettings(**{**defaults, **kw}), state, metrics=Metrics())  # type: ignore[arg-type]
        await svc.start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        await svc.close()


async def submit_interleaved(svc: DeliveryService, customers: int, per_customer: int) -> dict[str, list[str]]:
    """Submit ``per_customer`` events for each customer, interleaved; return customer -> [(event, id)] in order."""
    order: dict[str, list[str]] = {f"cust-{c}": [] for c in range(customers)}
    ids: dict[str, str] = {}
    for i in range(per_customer):
        for c in range(customers):
            name = f"EV_{i:03d}"
            ids[f"cust-{c}/{name}"] = await svc.submit(f"cust-{c}", name, session_id="table_05")
            order[f"cust-{c}"].append(name)
    svc.expected_ids = set(ids.values())  # type: ignore[attr-defined]
    return order


def assert_exactly_once_in_order(rx: Receiver, expected: dict[str, list[str]], ids: set[str]) -> None:
    assert set(rx.accepted) == ids, "every accepted event arrives (and nothing else)"
    for customer, events in expected.items():
        assert rx.events(customer) == events, f"{customer}'s events in the order they fired"
    for rec in rx.accepted.values():
        assert json.loads(rec.raw) == {"UUID": rec.body["UUID"], "EVENT": rec.body["EVENT"]}
        assert rec.content_type == "application/json"
    for rec in rx.requests:  # a retry is the same event under the same key
        assert rec.key in ids and rec.raw == rx.accepted[rec.key].raw


async def test_healthy_endpoint_gets_exact_body_and_idempotency_key(make_service: MakeService, receiver: Receiver):
    svc = await make_service(url=receiver.url)
    event_id = await svc.submit("customer_nguyen_van_a", "SAY_HELLO", session_id="restaurant_table_05_evening")
    await receiver.until_accepted(1)
    rec = receiver.accepted[event_id]
    assert rec.key == event_id
    assert rec.raw == b'{"UUID": "customer_nguyen_van_a", "EVENT": "SAY_HELLO"}'
    await svc.spool.barrier()
    assert svc.spool.counts.waiting == 0
    assert svc.sender.depth == 0


async def test_recovers_from_every_failure_mode_exactly_once_in_order(
    make_service: MakeService, receiver: Receiver, caplog: pytest.LogCaptureFixture
):
    """Down, 500, 429+Retry-After, hanging past the timeout, answered-but-lost, then healthy: nothing lost or doubled."""
    caplog.set_level(logging.INFO, logger="edgevoice.delivery")
    receiver.respond("down")
    svc = await make_service(url=receiver.url, timeout_s=0.3, concurrency=3)
    expected = await submit_interleaved(svc, customers=5, per_customer=6)
    await asyncio.sleep(0.3)
    for mode in (500, "hang", "accept_hang"):
        receiver.respond(mode)
        await receiver.until_requests(receiver.count() + 3, timeout=10)
        if mode != 500:
            await asyncio.sleep(0.5)  # past the client's timeout
    receiver.respond(429, retry_after=0.2)
    await receiver.until_requests(receiver.count() + 1, timeout=10)
    receiver.respond(200)
    await receiver.until_accepted(30, timeout=20)
    await asyncio.sleep(0.2)  # let the deletes commit and any stray retry arrive
    await svc.spool.barrier()

    assert_exactly_once_in_order(receiver, expected, svc.expected_ids)  # type: ignore[attr-defined]
    assert receiver.duplicates >= 1, "accept_hang made the client resend an event the receiver already had"
    assert svc.spool.counts.waiting == 0 and svc.spool.counts.dead == 0
    text = caplog.text
    assert "API CONNECTION ERROR: EV_000 for customer cust-0 - Error: Cannot connect to host 127.0.0.1" in text
    assert "API ERROR: HTTP 500 for EV_" in text and '- Response: {"error": "HTTP 500 from test receiver"}' in text
    assert "API TIMEOUT: EV_" in text and "Request took longer than 0.3 seconds" in text
    assert "API ERROR: HTTP 429 for EV_" in text
    assert f'API REQUEST: Calling {receiver.url} with payload: {{"UUID": "cust-0", "EVENT": "EV_000"}}' in text
    assert 'API SUCCESS: EV_005 for customer cust-4 - Response: {"status": "success"}' in text
    outcomes = {
        s.labels["outcome"]: s.value
        for m in svc.metrics.deliveries.collect()
        for s in m.samples
        if s.name.endswith("_total")
    }  # type: ignore[union-attr]
    assert outcomes["delivered"] >= 30 and outcomes["connection_error"] >= 1 and outcomes["timeout"] >= 1
    assert outcomes["http_error"] >= 4


async def test_api_going_down_mid_operation(
    make_service: MakeService, receiver: Receiver, caplog: pytest.LogCaptureFixture
):
    """A kept-alive connection does not hide an outage; events wait and go out when the API is back."""
    caplog.set_level(logging.INFO, logger="edgevoice.delivery")
    svc = await make_service(url=receiver.url)
    first = await svc.submit("cust-a", "SAY_HELLO")
    await receiver.until_accepted(1)
    receiver.respond("down")
    second = await svc.submit("cust-a", "SESSION_END")
    await asyncio.sleep(0.3)
    assert list(receiver.accepted) == [first]
    assert "API CONNECTION ERROR: SESSION_END for customer cust-a" in caplog.text
    assert [e.id for e in svc.sender.pending["cust-a"]] == [second]
    receiver.respond(200)
    await receiver.until_accepted(2)
    assert list(receiver.accepted) == [first, second]


async def test_400_goes_to_dead_letter_with_the_response_and_the_rest_continue(
    make_service: MakeService, receiver: Receiver
):
    updates: list[DeliveryUpdate] = []
    receiver.respond("down")
    svc = await make_service(url=receiver.url)
    svc.subscribe(updates.append)
    ids = [await svc.submit("cust-a", name) for name in ("SAY_HELLO", "BAD_ONE", "SESSION_END")]
    receiver.script(200, 400)
    receiver.respond(200)
    await receiver.until_accepted(2)
    await asyncio.sleep(0.2)  # a 400 must not be retried
    await svc.spool.barrier()

    assert receiver.events("cust-a") == ["SAY_HELLO", "SESSION_END"]
    assert [r.key for r in receiver.requests if r.key == ids[1]] == [ids[1]], "the 400 was sent once, not retried"
    assert svc.spool.counts.dead == 1 and svc.spool.counts.waiting == 0
    conn = store.connect(svc.spool.path, create=False)
    try:
        (dead,) = store.dead_letters(conn)
    finally:
        conn.close()
    assert (dead.id, dead.event, dead.status, dead.reason) == (ids[1], "BAD_ONE", 400, "HTTP 400")
    assert "HTTP 400 from test receiver" in (dead.response or "")
    assert [(u.event, u.state) for u in updates if u.state != "waiting"] == [
        ("SAY_HELLO", "delivered"),
        ("BAD_ONE", "dead"),
        ("SESSION_END", "delivered"),
    ]


async def test_retry_after_is_honoured_for_every_customer(make_service: MakeService, receiver: Receiver):
    receiver.respond("down")
    svc = await make_service(url=receiver.url, retry_base_s=0.01, retry_cap_s=0.02)
    for c in ("a", "b", "c"):
        await svc.submit(f"cust-{c}", "SAY_HELLO")
    receiver.script(429, retry_after=1)
    receiver.respond(200)
    await receiver.until_accepted(3, timeout=10)
    first_429 = next(r for r in receiver.requests if r.answer == 429)
    later = [r for r in receiver.requests if r.time > first_429.time]
    assert later, "the others were sent after the pause"
    # The 429 paused everyone; requests already in flight when it came back may land just after it.
    paused = [r for r in later if r.time - first_429.time > 0.2]
    assert all(r.time - first_429.time >= 0.95 for r in paused)
    retried = next(r for r in later if r.key == first_429.key)
    assert retried.time - first_429.time >= 0.95


async def test_one_in_flight_per_customer_and_concurrency_across_customers(
    make_service: MakeService, receiver: Receiver
):
    receiver.respond("down")
    svc = await make_service(url=receiver.url, concurrency=3, timeout_s=30)
    for c in range(5):
        for i in range(3):
            await svc.submit(f"cust-{c}", f"EV_{i}")
    receiver.respond("hang")
    await receiver.until_requests(3)
    await asyncio.sleep(0.4)
    hung = list(receiver.requests)
    assert len(hung) == 3, "at most `concurrency` requests in flight"
    assert len({r.body["UUID"] for r in hung}) == 3, "never two of one customer at once"
    assert all(r.body["EVENT"] == "EV_0" for r in hung), "only a customer's head is sent"
    receiver.respond(200)
    await receiver.until_accepted(15, timeout=20)
    for c in range(5):
        assert receiver.events(f"cust-{c}") == ["EV_0", "EV_1", "EV_2"]


async def test_without_url_events_wait_on_disk_and_go_out_after_restart(
    make_service: MakeService, receiver: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger="edgevoice.delivery")
    svc = await make_service(url=None)
    ids = [await svc.submit("cust-a", f"EV_{i}") for i in range(5)]
    await asyncio.sleep(0.1)
    assert receiver.count() == 0
    assert caplog.text.count("events.url is not set") == 1
    await svc.close()

    svc2 = await make_service(url=receiver.url)
    await receiver.until_accepted(5)
    assert list(receiver.accepted) == ids
    assert svc2.spool.counts.waiting in (0, 1, 2, 3, 4, 5)  # deletes commit in the background
    await asyncio.sleep(0.1)
    await svc2.spool.barrier()
    assert svc2.spool.counts.waiting == 0


async def test_in_flight_event_is_resent_after_restart(make_service: MakeService, receiver: Receiver):
    """An event whose request was cut by shutdown is still on disk and goes out again (same key)."""
    receiver.respond("accept_hang")
    svc = await make_service(url=receiver.url, timeout_s=30)
    event_id = await svc.submit("cust-a", "SESSION_END")
    await receiver.until_requests(1)
    await svc.close()
    receiver.respond(200)
    await make_service(url=receiver.url)
    await receiver.until_requests(2)
    assert [r.key for r in receiver.requests] == [event_id, event_id]
    assert list(receiver.accepted) == [event_id] and receiver.duplicates == 1


async def test_bad_input_is_refused_with_a_clear_error(make_service: MakeService):
    svc = await make_service(url=None)
    with pytest.raises(ValueError, match="customer_id must be a non-empty string"):
        await svc.submit("", "SAY_HELLO")
    with pytest.raises(ValueError, match="event must be a non-empty string"):
        await svc.submit("cust", None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="session_id is 300 characters long"):
        await svc.submit("cust", "SAY_HELLO", session_id="s" * 300)
    assert svc.spool.counts.waiting == 0


def test_full_jitter_backoff_bounds():
    assert backoff(1, 0.5, 60, rng=lambda: 0.999) == pytest.approx(0.4995)
    assert backoff(4, 0.5, 60, rng=lambda: 1.0) == 4.0
    assert backoff(30, 0.5, 60, rng=lambda: 1.0) == 60.0
    assert backoff(10_000, 0.5, 60, rng=lambda: 1.0) == 60.0
    assert backoff(3, 0.5, 60, rng=lambda: 0.0) == 0.0


def test_retry_after_parsing():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("999999") == 3600.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    now = time.time()
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now + 30))
    assert 28 <= (parse_retry_after(date, now) or 0) <= 31
