"""What the sender does with each kind of answer: redirects, the 4xx policy, and order across dead-letter retries."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from pydantic import ValidationError

from edgevoice.config import RETRY_4XX_DEFAULT, EventsSettings
from edgevoice.delivery import store
from edgevoice.delivery.service import DeliveryService
from edgevoice.metrics import Metrics
from tests.support.receiver import Receiver
from tests.support.redirector import Redirector

MakeService = Callable[..., Awaitable[DeliveryService]]


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[MakeService]:
    made: list[DeliveryService] = []

    async def make(**kw: object) -> DeliveryService:
        state = Path(str(kw.pop("state_dir", tmp_path / "state")))
        defaults: dict[str, object] = {"timeout_s": 2, "retry_base_s": 0.02, "retry_cap_s": 0.1, "commit_window_ms": 1}
        svc = DeliveryService(EventsSettings(**{**defaults, **kw}), state, metrics=Metrics())  # type: ignore[arg-type]
        await svc.start()
        made.append(svc)
        return svc

    yield make
    for svc in made:
        await svc.close()


def dead_letters(svc: DeliveryService) -> list[store.DeadEvent]:
    conn = store.connect(svc.spool.path, create=False)
    try:
        return store.dead_letters(conn)
    finally:
        conn.close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_a_redirect_is_never_followed_and_the_event_waits_until_the_api_answers(
    make_service: MakeService, status: int, caplog: pytest.LogCaptureFixture
):
    """Following a 302 turns the POST into a GET of a page that answers 200: the event would be deleted unsent."""
    caplog.set_level(logging.INFO, logger="edgevoice.delivery")
    with Redirector() as api:
        api.redirect(status)
        svc = await make_service(url=api.url)
        ids = [await svc.submit("cust-a", name) for name in ("SAY_HELLO", "SESSION_END")]
        await api.until(lambda: api.redirected() >= 3, what="the head retried after redirects")
        await svc.spool.barrier()
        assert api.seen.moved == [], "nothing was sent to the page the redirect points at"
        assert svc.spool.counts.waiting == 2 and svc.spool.counts.dead == 0, "still waiting, not delivered nor dead"
        assert [e.id for e in svc.sender.pending["cust-a"]] == ids
        assert f"API REDIRECT: HTTP {status} for SAY_HELLO - customer cust-a - Location: {api.moved_url}" in caplog.text
        assert "not followed" in caplog.text
        assert svc.health()["last_error"] == f"HTTP {status} redirect to {api.moved_url}"

        api.redirect(None)
        await api.until(lambda: len(api.accepted()) == 2, what="both delivered")
        assert api.accepted() == ids, "in order, each once"
        assert api.seen.moved == []

        def outcomes() -> dict[str, float]:
            return {
                s.labels["outcome"]: s.value
                for m in svc.metrics.deliveries.collect()  # type: ignore[union-attr]
                for s in m.samples
                if s.name.endswith("_total")
            }

        await api.until(lambda: outcomes().get("delivered") == 2 and svc.spool.counts.waiting == 0, what="deleted")
        assert outcomes()["redirected"] >= 3


async def test_proxy_4xx_during_a_deploy_is_retried_and_delivered_in_order(
    make_service: MakeService, receiver: Receiver, caplog: pytest.LogCaptureFixture
):
    """404 (ingress without a backend), 409, 425, 429, 499 from a proxy: retried, not dead-lettered."""
    caplog.set_level(logging.INFO, logger="edgevoice.delivery")
    receiver.respond("down")
    svc = await make_service(url=receiver.url)
    ids = [await svc.submit("cust-a", f"EV_{i}") for i in range(3)]
    receiver.script(404, 404, 409, 425, 429, 499, 401, 403)
    receiver.respond(200)
    await receiver.until_accepted(3, timeout=20)
    await svc.spool.barrier()
    assert list(receiver.accepted) == ids
    assert receiver.events("cust-a") == ["EV_0", "EV_1", "EV_2"]
    assert svc.spool.counts.dead == 0
    assert "API REJECTED" not in caplog.text
    assert "API RETRY: EV_0 for customer cust-a" in caplog.text and "HTTP 404" in caplog.text


async def test_a_4xx_about_the_event_itself_dead_letters_it_once(make_service: MakeService, receiver: Receiver):
    """400 and 422 (the request itself is refused): dead-lettered at the first answer; the customer's next goes on."""
    receiver.respond("down")
    svc = await make_service(url=receiver.url)
    ids = [await svc.submit("cust-a", name) for name in ("BAD_400", "BAD_422", "GOOD")]
    receiver.script(400, 422)
    receiver.respond(200)
    await receiver.until_accepted(1)
    await asyncio.sleep(0.2)
    await svc.spool.barrier()
    assert [(d.id, d.status) for d in dead_letters(svc)] == [(ids[0], 400), (ids[1], 422)]
    assert [r.key for r in receiver.requests] == ids, "each sent exactly once"


async def test_the_4xx_policy_is_configurable(make_service: MakeService, receiver: Receiver, tmp_path: Path):
    receiver.respond("down")
    strict = await make_service(url=receiver.url, retry_4xx=[], state_dir=tmp_path / "strict")
    (gone,) = [await strict.submit("cust-a", "SAY_HELLO")]
    receiver.script(404)
    receiver.respond(200)
    for _ in range(600):
        if strict.spool.counts.dead:
            break
        await asyncio.sleep(0.05)
    assert [d.id for d in dead_letters(strict)] == [gone], "retry_4xx=[]: a 404 is permanent"
    assert gone not in receiver.accepted
    await strict.close()

    receiver.respond("down")
    lenient = await make_service(url=receiver.url, retry_4xx=[400], state_dir=tmp_path / "lenient")
    kept = await lenient.submit("cust-b", "SAY_HELLO")
    receiver.script(400, 400)
    receiver.respond(200)
    await receiver.until_accepted(1)
    assert kept in receiver.accepted and dead_letters(lenient) == [], "retry_4xx=[400]: a 400 is retried"


def test_retry_4xx_setting_is_checked():
    assert EventsSettings().retry_4xx == sorted(RETRY_4XX_DEFAULT)
    assert {408, 409, 425, 429} <= set(EventsSettings().retry_4xx)
    assert not {400, 413, 415, 422} & set(EventsSettings().retry_4xx)
    assert EventsSettings(retry_4xx=[429, 404, 429]).retry_4xx == [404, 429]
    with pytest.raises(ValidationError, match=r"must list 4xx status codes \(400-499\), got \[500, 302\]"):
        EventsSettings(retry_4xx=[404, 500, 302])


async def test_a_retried_dead_letter_takes_back_its_place_before_the_customers_later_events(
    make_service: MakeService, receiver: Receiver, tmp_path: Path
):
    """The head dead-letters (400); an operator re-queues it while the rest wait: it goes out first again."""
    state = tmp_path / "state"
    receiver.respond(400)
    svc = await make_service(url=receiver.url, state_dir=state)
    first = await svc.submit("cust-a", "SAY_HELLO")
    for _ in range(600):
        if svc.spool.counts.dead:
            break
        await asyncio.sleep(0.05)
    assert [d.id for d in dead_letters(svc)] == [first]
    await svc.close()

    # The API is away; the customer's later events wait. (No sender: nothing in flight to race with.)
    waiting = await make_service(url=None, state_dir=state)
    later = [await waiting.submit("cust-a", name) for name in ("SAY_SORRY", "SESSION_END")]
    other = await waiting.submit("cust-b", "SAY_HELLO")
    conn = store.connect(waiting.spool.path, create=False)  # as `edgevoice spool retry` does, from another process
    try:
        assert store.retry_dead(conn, [first]) == [first]
        assert [e.id for e in store.waiting(conn, customer="cust-a")] == [first, *later]
    finally:
        conn.close()
    await waiting.spool.barrier()  # the running daemon picks the re-queued event up
    assert [e.id for e in waiting.sender.pending["cust-a"]] == [first, *later], "back in its place, not behind"
    await waiting.close()

    receiver.respond(200)
    sending = await make_service(url=receiver.url, state_dir=state)  # and after a restart the order holds
    await receiver.until_accepted(4, timeout=30)
    assert receiver.events("cust-a") == ["SAY_HELLO", "SAY_SORRY", "SESSION_END"]
    assert other in receiver.accepted
    await sending.spool.barrier()
