"""The bare application: shared keys, the security middleware, state directory, WebSocket closing.

Runs on the event loop at start-up and shutdown only. Features are added to it by
the composition root (:mod:`edgevoice.app`); nothing here knows which. At shutdown
(:mod:`edgevoice.server.lifecycle`) the kernel refuses new WebSocket upgrades once
stopping and closes every WebSocket in the ``close`` phase with a bounded close:
a close frame and two thirds of ``shutdown.close_s`` for the handshake, then the
connections that did not finish (a client that stopped reading) are aborted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, hdrs, web
from aiohttp.typedefs import Handler

from edgevoice.config import Settings
from edgevoice.metrics import METRICS, Metrics
from edgevoice.server.keys import HEALTH_CHECKS, HEALTH_SECTIONS, NOTIFIER, ROUTE_SURFACES, SETTINGS, WEBSOCKETS
from edgevoice.server.lifecycle import LIFECYCLE, Lifecycle, Phase
from edgevoice.server.security import security_middleware, warn_if_exposed
from edgevoice.systemd import Notifier

log = logging.getLogger(__name__)

HANDSHAKE_SHARE = 2 / 3
"""Of shutdown.close_s, the time close handshakes get; the rest is for aborting the connections that did not finish."""


def new_app(settings: Settings, notifier: Notifier | None = None) -> web.Application:
    """An application with the shared keys set, no feature yet; its first cleanup context makes the state dir."""
    server = settings.server
    warn_if_exposed(settings)
    app = web.Application(
        middlewares=[security_middleware(settings), _upgrade_middleware],
        client_max_size=max(server.max_frame_bytes, 1 << 20),
    )
    app[SETTINGS] = settings
    app[NOTIFIER] = notifier or Notifier(address="")
    app[HEALTH_SECTIONS] = {}
    app[HEALTH_CHECKS] = []
    app[WEBSOCKETS] = set()
    app[ROUTE_SURFACES] = {}
    app[METRICS] = Metrics()
    lifecycle = app[LIFECYCLE] = Lifecycle()
    handshake = settings.shutdown.close_s * HANDSHAKE_SHARE
    lifecycle.on(Phase.CLOSE, "websockets", lambda: close_websockets(app, handshake))
    app.on_shutdown.append(_close_websockets)
    app.cleanup_ctx.append(_state_dir_ctx)
    return app


def _is_upgrade(request: web.BaseRequest) -> bool:
    return "websocket" in request.headers.get(hdrs.UPGRADE, "").lower()


@web.middleware
async def _upgrade_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse WebSocket upgrades once stopping; track the open ones (their transports are aborted if need be)."""
    if not _is_upgrade(request):
        return await handler(request)
    lifecycle = request.app[LIFECYCLE]
    if lifecycle.stopping:
        return web.json_response(
            {"error": "shutting_down", "message": "the daemon is shutting down; reconnect after it restarts"},
            status=503,
            headers={"Retry-After": "5"},
        )
    transport = request.transport
    if transport is None:  # the client is already gone
        return await handler(request)
    lifecycle.upgrades.add(transport)
    try:
        return await handler(request)
    finally:
        lifecycle.upgrades.discard(transport)


async def close_websockets(app: web.Application, timeout: float) -> str:
    """Close every WebSocket (1001 going away) within ``timeout``; abort the connections that did not finish."""
    open_sockets = app[WEBSOCKETS]
    sockets = list(open_sockets)
    results = await asyncio.gather(
        *(
            asyncio.wait_for(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown"), timeout)
            for ws in sockets
        ),
        return_exceptions=True,
    )
    slow = sum(isinstance(r, (asyncio.TimeoutError, TimeoutError)) for r in results)
    aborted = 0
    for transport in list(app[LIFECYCLE].upgrades):
        # A completed close handshake means the client has everything; what is still buffered
        # for a client that stopped reading is dropped with its connection.
        if transport.get_write_buffer_size() or not transport.is_closing():
            aborted += 1
        transport.abort()
    if slow or aborted:
        log.warning(
            "%d WebSocket client(s) did not finish the close handshake within %.1f s; %d connection(s) aborted",
            slow,
            timeout,
            aborted,
        )
    return f"{len(sockets) - slow} of {len(sockets)} WebSocket(s) closed cleanly, {aborted} connection(s) aborted"


async def _close_websockets(app: web.Application) -> None:
    """aiohttp's on_shutdown (the daemon has closed them already; an embedding application relies on this)."""
    sockets = app[WEBSOCKETS]
    if sockets:
        log.info("closing %d WebSocket connection(s)", len(sockets))
        await close_websockets(app, app[SETTINGS].shutdown.close_s * HANDSHAKE_SHARE)


async def _state_dir_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create the state directory before anything writes to it."""
    path = app[SETTINGS].state.path()
    try:
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"state.dir {path}: cannot create it ({exc.strerror})") from None
    yield
