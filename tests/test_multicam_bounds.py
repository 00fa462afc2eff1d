"""/asr-multicam bounds on the daemon's real application (in process, 127.0.0.1): floods of tiny frames, start/stop
churn, clients that go silent or neither read nor send. Limits are asserted as lower bounds or with deadlines only,
so a slow machine can make a test slower, never wrong."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgevoice import modelstore
from edgevoice.config import AsrSettings, DashboardSettings, FunVoiceSettings, ServerSettings, Settings, StateSettings
from edgevoice.server.keys import WEBSOCKETS
from edgevoice.sources.multicam import PeerStartLimiter, TokenBucket
from edgevoice.sources.multicam_client import MulticamClient
from tests.support.appthread import AppThread
from tests.test_hostile_input import _raw_ws, _read_until_closed

MODELS = Path(tempfile.gettempdir()) / "edgevoice-test-models"
FRAMES_PER_S = 20
STARTS_PER_MIN = 3
IDLE_S = 2
PER_PEER = 3


def _app(tmp: Path, **server: Any) -> AppThread:
    return AppThread(
        Settings(
            server=ServerSettings(**server),
            state=StateSettings(dir=tmp),
            asr=AsrSettings(model=str(modelstore.resolve("tiny.en", MODELS))),
            funvoice=FunVoiceSettings(enabled=False),
            dashboard=DashboardSettings(enabled=False, metrics=False),
        )
    )


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    with _app(
        tmp_path_factory.mktemp("limited"),
        max_frames_per_s=FRAMES_PER_S,
        max_stream_starts_per_min=STARTS_PER_MIN,
        max_connections_per_peer=PER_PEER,
    ) as a:
        yield a


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    with _app(tmp_path_factory.mktemp("impatient"), idle_timeout_s=IDLE_S) as a:
        yield a


def _clean(a: AppThread) -> None:
    failures = a.records.failures()
    a.records.records.clear()
    assert not failures, "\n".join(failures)


# -- the limiters, on a clock the test moves ------------------------------------------------------------------
def test_token_bucket_paces_and_refills() -> None:
    now = [0.0]
    bucket = TokenBucket(rate=10, capacity=10, clock=lambda: now[0])
    assert [bucket.take() for _ in range(10)] == [0.0] * 10
    assert bucket.take() == pytest.approx(0.1)  # owed: wait a tenth of a second
    now[0] += 0.1
    assert bucket.take() == pytest.approx(0.1)
    now[0] += 100
    assert bucket.full and bucket.try_take() == 0.0


def test_peer_start_limiter_counts_per_peer() -> None:
    now = [0.0]
    limiter = PeerStartLimiter(per_minute=2, clock=lambda: now[0])
    assert [limiter.check("10.0.0.5"), limiter.check("10.0.0.5")] == [0.0, 0.0]
    assert limiter.check("10.0.0.5") == pytest.approx(30.0)  # one start per 30 s once the burst is spent
    assert limiter.check("10.0.0.6") == 0.0  # another peer has its own allowance
    now[0] += 30
    assert limiter.check("10.0.0.5") == 0.0


# -- floods and churn --------------------------------------------------------------------------------------------
def test_a_flood_of_tiny_frames_is_slowed_down_and_told_nothing_is_lost(limited: AppThread) -> None:
    pings = FRAMES_PER_S * 3

    async def run() -> tuple[float, list[dict[str, Any]]]:
        async with MulticamClient.connect(limited.ws_url) as c:
            t0 = time.monotonic()
            for _ in range(pings):
                await c.send_json({"type": "ping"})
            for _ in range(100):
                if len(c.of("pong")) == pings:
                    break
                await c.wait_for(lambda m: m["type"] == "pong", 30, since=len(c.messages))
            return time.monotonic() - t0, list(c.messages)

    took, messages = limited.call(run())
    assert [m["type"] for m in messages].count("pong") == pings  # every frame was read, none dropped
    errors = [m for m in messages if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["rate_limited"], errors  # told once
    assert "server.max_frames_per_s (20)" in errors[0]["message"] and not errors[0].get("fatal")
    # a second's worth passes at once, the rest at the configured rate (a lower bound: a slow machine only adds)
    assert took >= (pings - FRAMES_PER_S) / FRAMES_PER_S * 0.9, took
    _clean(limited)


def _waiting_events(a: AppThread) -> int:
    async def get() -> int:
        async with aiohttp.ClientSession() as http, http.get(a.url + "/health") as r:
            return int((await r.json())["spool"]["waiting"])

    return a.call(get())


def test_start_stop_churn_is_refused_per_peer_and_cannot_fill_the_spool(limited: AppThread) -> None:
    async def run() -> list[dict[str, Any]]:
        refused: list[dict[str, Any]] = []
        async with MulticamClient.connect(limited.ws_url) as a, MulticamClient.connect(limited.ws_url) as b:
            for i in range(STARTS_PER_MIN + 6):  # two connections of one peer share the allowance
                c = (a, b)[i % 2]
                try:
                    await c.start(f"churn_{i}", session_id="t", customer_id=f"churner_{i}")
                except RuntimeError as exc:
                    refused.append({"i": i, "error": str(exc)})
                    continue
                await c.stop(f"churn_{i}")
        return refused

    before = _waiting_events(limited)
    refused = limited.call(run())
    assert len(refused) >= 6 and all(r["error"].startswith("start_rate_limited:") for r in refused), refused
    assert "server.max_stream_starts_per_min (3)" in refused[0]["error"]
    accepted = STARTS_PER_MIN + 6 - len(refused)
    deadline = time.monotonic() + 30
    while _waiting_events(limited) < before + accepted and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _waiting_events(limited) == before + accepted  # one SESSION_END per accepted stream, none for the rest
    _clean(limited)


def test_one_peer_cannot_take_every_connection_slot(limited: AppThread) -> None:
    assert limited.app is not None
    sockets = limited.app[WEBSOCKETS]
    deadline = time.monotonic() + 30
    while sockets and time.monotonic() < deadline:  # earlier tests' connections finish closing
        time.sleep(0.05)

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            held = [await http.ws_connect(limited.ws_url + "/asr-multicam") for _ in range(PER_PEER)]
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(limited.ws_url + "/asr-multicam")
            assert refused.value.status == 503
            async with http.get(limited.url + "/health") as r:  # plain requests are not counted
                assert r.status in (200, 503)
            await held.pop().close()
            for _ in range(100):  # the server side of that close finishes
                try:
                    held.append(await http.ws_connect(limited.ws_url + "/asr-multicam"))
                    break
                except aiohttp.WSServerHandshakeError:
                    await asyncio.sleep(0.05)
            assert len(held) == PER_PEER
            for ws in held:
                await ws.close()

    limited.call(run())
    _clean(limited)


# -- silent clients ----------------------------------------------------------------------------------------------
def test_a_silent_client_is_told_and_closed_and_its_streams_stop(impatient: AppThread) -> None:
    async def run() -> tuple[list[dict[str, Any]], int | None]:
        async with MulticamClient.connect(impatient.ws_url) as c:
            await c.start("silent_1", session_id="t", customer_id="quiet")
            with pytest.raises(ConnectionError):
                await c.wait_for(lambda m: False, 30)  # nothing more to send: the daemon closes within the deadline
            return list(c.messages), c.ws.close_code

    messages, code = impatient.call(run())
    assert code == 1008
    error = messages[-1]
    assert error["type"] == "error" and error["code"] == "idle_timeout" and error["fatal"] is True, messages
    assert "server.idle_timeout_s" in error["message"]

    async def streams() -> int:
        async with aiohttp.ClientSession() as http, http.get(impatient.url + "/health") as r:
            return int((await r.json())["events"]["streams"])

    deadline = time.monotonic() + 30
    while impatient.call(streams()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert impatient.call(streams()) == 0  # stopped (and flushed) as on any disconnect
    _clean(impatient)


def test_a_client_that_neither_reads_nor_sends_is_cut_off(impatient: AppThread) -> None:
    """Long before the 30 s heartbeat would notice: the idle limit, a close bounded by CLOSE_TIMEOUT_S, done."""
    assert impatient.app is not None
    sockets = impatient.app[WEBSOCKETS]
    deadline = time.monotonic() + 30
    while sockets and time.monotonic() < deadline:  # earlier tests' connections finish closing
        time.sleep(0.05)
    s = _raw_ws(impatient.port, rcvbuf=4096)  # from here on it reads nothing and sends nothing
    t0 = time.monotonic()
    while not sockets and time.monotonic() < deadline:
        time.sleep(0.01)
    while sockets and time.monotonic() < t0 + 40:
        time.sleep(0.05)
    took = time.monotonic() - t0
    s.settimeout(10)
    data = _read_until_closed(s)  # now see what the daemon said before it let go
    s.close()
    assert not sockets and took < 25, took  # the heartbeat alone would have taken 30 + 15 s
    assert b"idle_timeout" in data and b"\x03\xf0" in data  # the error message, then a close frame with 1008
    _clean(impatient)
