"""The live dashboard page at ``/``, its feed at ``/dashboard/feed`` and Prometheus metrics at ``/metrics``.

The page and its assets are static files (no build step) and carry no data; the
feed is guarded by the ``dashboard`` surface's token and ``/metrics`` by the
``metrics`` surface's (docs/security.md; the page passes the ``?token=`` of its
own URL on to the feed and to ``/asr-multicam``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from edgevoice.dashboard.feed import Feed
from edgevoice.delivery.api import EVENT_QUEUE, DeliveryUpdate
from edgevoice.events.hub import STREAM_HUB, StreamHub
from edgevoice.metrics import METRICS
from edgevoice.server.keys import SETTINGS, WEBSOCKETS
from edgevoice.server.security import set_surface

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("static")
STATIC_PREFIX = "/dashboard/static/"
FEED = web.AppKey("dashboard_feed", Feed)
"""The dashboard's live feed (present when ``dashboard.enabled``)."""


async def get_index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


async def _revalidate_assets(request: web.Request, response: web.StreamResponse) -> None:
    """Browsers revalidate the page's assets (cheap 304s), so an upgraded daemon never runs a stale app.js."""
    if request.path.startswith(STATIC_PREFIX):
        response.headers["Cache-Control"] = "no-cache"


async def get_feed(request: web.Request) -> web.StreamResponse:
    """``/dashboard/feed``: the live feed WebSocket (token checked by the security middleware)."""
    ws = web.WebSocketResponse(heartbeat=30, max_msg_size=4096)
    await ws.prepare(request)
    sockets = request.app[WEBSOCKETS]
    sockets.add(ws)
    try:
        await request.app[FEED].serve(ws)
    finally:
        sockets.discard(ws)
    return ws


async def get_metrics(request: web.Request) -> web.Response:
    """``/metrics``: every ``edgevoice_*`` metric in Prometheus text (or OpenMetrics when asked for)."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = await asyncio.to_thread(encoder, request.app[METRICS].registry)  # reads /proc for process metrics
    return web.Response(body=body, headers={"Content-Type": content_type})


def _delivery_message(update: DeliveryUpdate) -> dict[str, Any]:
    return {"type": "delivery", **dataclasses.asdict(update)}


async def _feed_ctx(app: web.Application) -> AsyncIterator[None]:
    """Subscribe the feed to the stream hub and the event queue; send snapshots while pages are open."""
    feed = app[FEED]
    settings = app[SETTINGS].dashboard
    unsubscribe: list[Callable[[], None]] = []
    hub: StreamHub | None = app.get(STREAM_HUB)
    if hub is not None:
        unsubscribe.append(hub.subscribe(feed.publish))
        feed.set_streams(hub.streams)
    else:
        log.warning("dashboard: no stream hub; the page will show status only")
    queue = app.get(EVENT_QUEUE)
    if queue is None:
        log.warning("dashboard: no event queue; delivery states will not be shown")
    elif hub is None:
        # The hub relays the queue's DeliveryUpdates itself; without it the feed listens to the queue.
        unsubscribe.append(queue.subscribe(lambda update: feed.publish(_delivery_message(update))))

    async def snapshots() -> None:
        while True:
            await asyncio.sleep(settings.snapshot_interval_s)
            try:
                feed.broadcast_snapshot()
            except Exception:
                log.exception("dashboard snapshot failed")

    task = asyncio.create_task(snapshots())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for unsub in unsubscribe:
            unsub()


def setup(app: web.Application) -> None:
    """Add the page, its feed and ``/metrics`` as ``settings.dashboard`` asks. Call after the hub and queue."""
    settings = app[SETTINGS].dashboard
    if settings.enabled:
        app[FEED] = Feed(
            app,
            history=settings.history,
            history_bytes=settings.history_bytes,
            max_queue_bytes=settings.max_queue_bytes,
        )
        app.router.add_get("/", get_index)
        app.router.add_static(STATIC_PREFIX, STATIC_DIR, follow_symlinks=False, show_index=False)
        app.router.add_get("/dashboard/feed", get_feed)
        app.on_response_prepare.append(_revalidate_assets)
        app.cleanup_ctx.append(_feed_ctx)
    if settings.metrics:
        set_surface(app, app.router.add_get("/metrics", get_metrics), "metrics")
