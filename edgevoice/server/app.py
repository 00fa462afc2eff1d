"""The application factory: one place that wires every component, in data-flow order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web

from edgevoice.config import Settings
from edgevoice.metrics import METRICS, Metrics
from edgevoice.server import health
from edgevoice.server.keys import HEALTH_CHECKS, HEALTH_SECTIONS, NOTIFIER, SETTINGS, WEBSOCKETS
from edgevoice.server.security import security_middleware
from edgevoice.systemd import Notifier

log = logging.getLogger(__name__)


async def _close_websockets(app: web.Application) -> None:
    """On shutdown, tell every WebSocket client we are going away."""
    sockets = list(app[WEBSOCKETS])
    if sockets:
        log.info("closing %d WebSocket connection(s)", len(sockets))
    await asyncio.gather(
        *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown") for ws in sockets),
        return_exceptions=True,
    )


def build_app(settings: Settings, notifier: Notifier | None = None) -> web.Application:
    """Create the aiohttp application with every component's routes and lifecycle."""
    server = settings.server
    app = web.Application(
        middlewares=[security_middleware(server)],
        client_max_size=max(server.max_frame_bytes, 1 << 20),
    )
    app[SETTINGS] = settings
    app[NOTIFIER] = notifier or Notifier(address="")
    app[HEALTH_SECTIONS] = {}
    app[HEALTH_CHECKS] = []
    app[WEBSOCKETS] = set()
    app[METRICS] = Metrics()
    app.on_shutdown.append(_close_websockets)

    # Data flow: delivery first (it must be up before anything can fire events),
    # then recognition, then the sources feeding it; the FunVoiceChat bridge beside.
    from edgevoice import dashboard, delivery, funvoice, recognition

    app.cleanup_ctx.append(_state_dir_ctx)
    funvoice.setup(app)  # first: /health leads with the FunVoiceChat document's sections, in its order
    delivery.setup(app)
    recognition.setup(app)
    from edgevoice.events import hub as stream_hub
    from edgevoice.sources import mic, multicam

    stream_hub.setup(app)  # every audio source opens its streams here; routes finals to customer events
    multicam.setup(app)
    mic.setup(app)  # local microphone arrays: one hub stream per seat, plus the seat binding endpoints
    health.setup(app)
    dashboard.setup(app)  # last: its feed subscribes to the hub and the queue set up above
    return app


async def _state_dir_ctx(app: web.Application) -> AsyncIterator[None]:
    """Create the state directory before anything writes to it."""
    path = app[SETTINGS].state.path()
    try:
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    except OSError as exc:
        raise RuntimeError(f"state.dir {path}: cannot create it ({exc.strerror})") from None
    yield
