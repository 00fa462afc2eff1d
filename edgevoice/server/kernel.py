"""The bare application: shared keys, the security middleware, state directory, WebSocket closing.

Runs on the event loop at start-up and shutdown only. Features are added to it by
the composition root (:mod:`edgevoice.app`); nothing here knows which.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web

from edgevoice.config import Settings
from edgevoice.metrics import METRICS, Metrics
from edgevoice.server.keys import HEALTH_CHECKS, HEALTH_SECTIONS, NOTIFIER, ROUTE_SURFACES, SETTINGS, WEBSOCKETS
from edgevoice.server.security import security_middleware, warn_if_exposed
from edgevoice.systemd import Notifier

log = logging.getLogger(__name__)


def new_app(settings: Settings, notifier: Notifier | None = None) -> web.Application:
    """An application with the shared keys set, no feature yet; its first cleanup context makes the state dir."""
    server = settings.server
    warn_if_exposed(settings)
    app = web.Application(
        middlewares=[security_middleware(settings)],
        client_max_size=max(server.max_frame_bytes, 1 << 20),
    )
    app[SETTINGS] = settings
    app[NOTIFIER] = notifier or Notifier(address="")
    app[HEALTH_SECTIONS] = {}
    app[HEALTH_CHECKS] = []
    app[WEBSOCKETS] = set()
    app[ROUTE_SURFACES] = {}
    app[METRICS] = Metrics()
    app.on_shutdown.append(_close_websockets)
    app.cleanup_ctx.append(_state_dir_ctx)
    return app


async def _close_websockets(app: web.Application) -> None:
    """On shutdown, tell every WebSocket client we are going away."""
    open_sockets = app[WEBSOCKETS]
    sockets = list(open_sockets)
    if sockets:
        log.info("closing %d WebSocket connection(s)", len(sockets))
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets),
        return_exceptions=True,
    )


async def _state_dir_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create the state directory before anything writes to it."""
    path = app[SETTINGS].state.path()
    try:
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"state.dir {path}: cannot create it ({exc.strerror})") from None
    yield
