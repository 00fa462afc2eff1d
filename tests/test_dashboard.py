"""The dashboard's page, assets and live feed on a real aiohttp server (in process)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edgevoice import dashboard
from edgevoice.config import DashboardSettings, ServerSettings, Settings
from edgevoice.dashboard import FEED
from edgevoice.dashboard.feed import MAX_PENDING, _Page
from edgevoice.metrics import METRICS, Metrics
from edgevoice.server.keys import HEALTH_CHECKS, HEALTH_SECTIONS, SETTINGS, WEBSOCKETS
from edgevoice.server.security import security_middleware

TOKEN = "s3cret-token"


def make_app(token: str | None = TOKEN, **dash: Any) -> web.Application:
    """The daemon's server skeleton (security middleware, keys) with only the dashboard set up."""
    settings = Settings(server=ServerSettings(token=token), dashboard=DashboardSettings(**dash))
    app = web.Application(middlewares=[security_middleware(settings.server)])
    app[SETTINGS] = settings
    app[HEALTH_SECTIONS] = {}
    app[HEALTH_CHECKS] = []
    app[WEBSOCKETS] = set()
    app[METRICS] = Metrics()
    dashboard.setup(app)
    return app


async def frames(ws: aiohttp.ClientWebSocketResponse, timeout: float = 5) -> list[dict[str, Any]]:
    """The messages of the next frame (every frame is a JSON array)."""
    msg = await ws.receive(timeout)
    assert msg.type == aiohttp.WSMsgType.TEXT, msg
    data = json.loads(msg.data)
    assert isinstance(data, list)
    return data


async def next_of(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 5) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        for m in await frames(ws, max(0.01, deadline - loop.time())):
            if m["type"] == kind:
                return m


async def test_page_and_assets_are_public_but_feed_and_metrics_need_the_token(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app())
    r = await client.get("/")
    assert r.status == 200
    html = await r.text()
    assert "/dashboard/static/app.js" in html and "try-start" in html
    for asset, kind in (("app.js", "javascript"), ("style.css", "css"), ("worklet.js", "javascript")):
        r = await client.get(f"/dashboard/static/{asset}")
        assert r.status == 200, asset
        assert kind in r.headers["Content-Type"]
        assert r.headers["Cache-Control"] == "no-cache"  # revalidated: an upgrade never leaves a stale app.js
    assert (await client.get("/dashboard/static/nope.js")).status == 404

    for path in ("/dashboard/feed", "/metrics"):
        r = await client.get(path)
        assert r.status == 401, path
        assert (await r.json())["error"] == "unauthorized"
        assert (await client.get(path, params={"token": "wrong"})).status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await client.ws_connect("/dashboard/feed")
    assert exc.value.status == 401
    ws = await client.ws_connect("/dashboard/feed", params={"token": TOKEN})
    assert (await frames(ws))[0]["type"] == "hello"
    await ws.close()
    ws = await client.ws_connect("/dashboard/feed", headers={"Authorization": f"Bearer {TOKEN}"})
    assert (await frames(ws))[0]["type"] == "hello"
    await ws.close()


@pytest.mark.parametrize(
    "path",
    [
        "/dashboard/static/../metrics",
        "/dashboard/static/%2e%2e/metrics",
        "/dashboard/static/../feed.py",
        "/dashboard/static/%2e%2e/feed.py",
        "/dashboard/static/..%2f__init__.py",
    ],
)
async def test_static_prefix_opens_nothing_else(aiohttp_client: Any, path: str) -> None:
    client = await aiohttp_client(make_app())
    reader, writer = await asyncio.open_connection(client.host, client.port)  # raw: no client-side normalization
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    response = (await reader.read()).decode(errors="replace")
    writer.close()
    status = int(response.split()[1])
    assert status in (401, 403, 404), response[:300]
    assert "edgevoice_" not in response and "import" not in response


async def test_feed_hello_carries_status_then_live_messages(aiohttp_client: Any) -> None:
    app = make_app()
    app[HEALTH_SECTIONS]["spool"] = lambda: {"depth": 3, "dead": 1}
    app[HEALTH_SECTIONS]["broken"] = lambda: 1 / 0
    app[HEALTH_CHECKS].append(lambda: True)
    client = await aiohttp_client(app)
    ws = await client.ws_connect("/dashboard/feed", params={"token": TOKEN})
    [hello] = await frames(ws)
    assert hello["type"] == "hello" and hello["history"] == []
    snap = hello["snapshot"]
    assert snap["status"] == "healthy"
    assert snap["health"]["spool"] == {"depth": 3, "dead": 1}
    assert "ZeroDivisionError" in snap["health"]["broken"]["error"]
    assert len(app[WEBSOCKETS]) == 1  # counted against server.max_connections, closed on shutdown

    feed = app[FEED]
    sent = [
        {"type": "stream_started", "stream_id": "mic_1", "session_id": "s1", "customer_id": "c1", "level": -30.0},
        {"type": "transcript", "stream_id": "mic_1", "text": "hel", "final": False, "speaker": "Speaker 1"},
        {"type": "transcript", "stream_id": "mic_1", "text": "hello there", "final": True, "speaker": "Speaker 1"},
        {"type": "keyword", "stream_id": "mic_1", "customer_id": "c1", "event": "SAY_HELLO", "text": "hello there"},
        {"type": "delivery", "event_id": "e1", "customer_id": "c1", "event": "SAY_HELLO", "state": "waiting"},
    ]
    for m in sent:
        feed.publish(m)
    got: list[dict[str, Any]] = []
    while len(got) < len(sent):
        got += [m for m in await frames(ws) if m["type"] != "snapshot"]
    assert got == sent
    await ws.close()
    await asyncio.sleep(0.05)
    assert len(app[WEBSOCKETS]) == 0 and feed.pages == 0


async def test_late_page_gets_recent_history_and_open_partials(aiohttp_client: Any) -> None:
    app = make_app(history=4)
    client = await aiohttp_client(app)
    feed = app[FEED]
    feed.publish({"type": "stream_started", "stream_id": "a"})
    feed.publish({"type": "transcript", "stream_id": "a", "text": "one", "final": False})
    feed.publish({"type": "transcript", "stream_id": "a", "text": "one two", "final": True})
    feed.publish({"type": "transcript", "stream_id": "a", "text": "three", "final": False})
    feed.publish({"type": "stream_started", "stream_id": "b"})
    feed.publish({"type": "transcript", "stream_id": "b", "text": "gone", "final": False})
    feed.publish({"type": "stream_stopped", "stream_id": "b", "full_transcript": ""})
    feed.publish({"type": "keyword", "stream_id": "a", "event": "SAY_HELLO"})
    ws = await client.ws_connect("/dashboard/feed", params={"token": TOKEN})
    [hello] = await frames(ws)
    history = [(m["type"], m.get("stream_id"), m.get("text")) for m in hello["history"]]
    # At most `history` remembered messages (oldest dropped), then the latest partial of each open stream.
    assert history == [
        ("transcript", "a", "one two"),
        ("stream_started", "b", None),
        ("stream_stopped", "b", None),
        ("keyword", "a", None),
        ("transcript", "a", "three"),
    ]
    await ws.close()


async def test_snapshots_flow_while_a_page_is_open(aiohttp_client: Any) -> None:
    app = make_app(snapshot_interval_s=0.1)
    depth = {"n": 0}
    app[HEALTH_SECTIONS]["spool"] = lambda: {"depth": depth["n"]}
    app[HEALTH_CHECKS].append(lambda: depth["n"] < 2)
    client = await aiohttp_client(app)
    ws = await client.ws_connect("/dashboard/feed", params={"token": TOKEN})
    assert (await frames(ws))[0]["type"] == "hello"
    first = await next_of(ws, "snapshot")
    assert first["health"]["spool"] == {"depth": 0} and first["status"] == "healthy"
    depth["n"] = 5
    later = await next_of(ws, "snapshot")
    assert later["health"]["spool"] == {"depth": 5} and later["status"] == "degraded"
    assert later["time"] > first["time"]
    await ws.close()


async def test_ping_is_answered(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app())
    ws = await client.ws_connect("/dashboard/feed", params={"token": TOKEN})
    await frames(ws)
    await ws.send_str('{"type":"ping"}')
    assert (await next_of(ws, "pong"))["type"] == "pong"
    await ws.close()


async def test_slow_page_is_bounded_and_resynchronized(aiohttp_client: Any) -> None:
    page = _Page(web.WebSocketResponse())
    for i in range(MAX_PENDING):
        page.push(json.dumps({"n": i}))
    assert len(page.pending) == MAX_PENDING and not page.resync
    page.push("{}")
    assert len(page.pending) == 0 and page.resync  # memory stays bounded; the page gets a fresh hello

    # On a real connection: a burst far larger than the bound still ends in a consistent page.
    app = make_app(history=10)
    client = await aiohttp_client(app)
    ws = await client.ws_connect("/dashboard/feed", params={"token": TOKEN})
    await frames(ws)
    feed = app[FEED]
    for i in range(3 * MAX_PENDING):
        feed.publish({"type": "transcript", "stream_id": "a", "text": f"t{i}", "final": True})
    last = f"t{3 * MAX_PENDING - 1}"
    seen: list[str] = []
    while last not in seen:
        for m in await frames(ws):
            if m["type"] == "hello":
                seen += [h["text"] for h in m["history"]]
            elif m["type"] == "transcript":
                seen.append(m["text"])
    assert len(seen) <= 3 * MAX_PENDING
    await ws.close()


async def test_disabled_dashboard_and_metrics(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app(enabled=False))
    assert (await client.get("/", params={"token": TOKEN})).status == 404
    assert (await client.get("/dashboard/feed", params={"token": TOKEN})).status == 404
    assert (await client.get("/dashboard/static/app.js")).status in (401, 404)
    assert (await client.get("/metrics", params={"token": TOKEN})).status == 200

    client = await aiohttp_client(make_app(metrics=False))
    assert (await client.get("/metrics", params={"token": TOKEN})).status == 404
    assert (await client.get("/")).status == 200


async def test_without_a_token_everything_is_open(aiohttp_client: Any) -> None:
    client = await aiohttp_client(make_app(token=None))
    assert (await client.get("/metrics")).status == 200
    ws = await client.ws_connect("/dashboard/feed")
    assert (await frames(ws))[0]["type"] == "hello"
    await ws.close()


async def test_a_page_queue_and_the_history_are_bounded_by_bytes(aiohttp_client: Any) -> None:
    """Few but large messages (long finals, full transcripts) cannot pile up either: the bounds count bytes."""
    big = json.dumps({"type": "transcript", "text": "x" * 20_000})
    page = _Page(web.WebSocketResponse(), max_bytes=100_000)
    for _ in range(4):  # 4 x 20 kB: within the bound
        page.push(big)
    assert not page.resync and 80_000 < page.pending_bytes <= 100_000
    page.push(big)
    assert page.resync and not page.pending and page.pending_bytes == 0
    viet = _Page(web.WebSocketResponse(), max_bytes=100_000)
    viet.push("à" * 40_000)  # 80 000 bytes in UTF-8
    viet.push("à" * 15_000)
    assert viet.resync, "the bound counts UTF-8 bytes, not characters"

    app = make_app(history=300, history_bytes=64 * 1024)
    client = await aiohttp_client(app)
    for i in range(50):
        app[FEED].publish({"type": "transcript", "stream_id": "a", "text": f"{i} " + "x" * 20_000, "final": True})
    ws = await client.ws_connect("/dashboard/feed", params={"token": TOKEN})
    [hello] = await frames(ws)
    texts = [m["text"] for m in hello["history"]]
    assert 1 <= len(texts) <= 3 and texts[-1].startswith("49 ")
    await ws.close()
