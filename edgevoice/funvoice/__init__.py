"""The FunVoiceChat endpoints on the LAN, backed by Gemini Live (see docs/funvoice.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from edgevoice.funvoice.catalogue import Catalogue, CatalogueError
from edgevoice.funvoice.channels import Channels
from edgevoice.funvoice.gemini import GeminiService
from edgevoice.funvoice.routes import EXAMPLE_PAGE, FUNVOICE, FunVoice, add_routes, health_sections
from edgevoice.funvoice.tools import Toolbox
from edgevoice.metrics import METRICS
from edgevoice.server.keys import HEALTH_SECTIONS, SETTINGS

__all__ = ["EXAMPLE_PAGE", "FUNVOICE", "FunVoice", "setup"]

log = logging.getLogger(__name__)


async def _ctx(app: web.Application) -> AsyncIterator[None]:
    fv = app[FUNVOICE]
    try:
        count = await asyncio.to_thread(fv.catalogue.load)
    except CatalogueError as exc:
        raise RuntimeError(str(exc)) from None
    if fv.catalogue.configured:
        log.info("FunVoiceChat catalogue %s: %d products", fv.catalogue.path, count)
    await asyncio.to_thread(fv.service.build_client)
    prober = asyncio.create_task(fv.service.probe_loop(), name="funvoice-probe")
    try:
        yield
    finally:
        prober.cancel()
        tasks = [task for _, task in fv.conversations.values()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(prober, *tasks, return_exceptions=True)
        await fv.service.aclose()


def setup(app: web.Application) -> None:
    """Register /ws, /ws/tools, /ws/product_info, /connect, the product-info endpoints and /health sections."""
    settings = app[SETTINGS].funvoice
    if not settings.enabled:
        return
    channels = Channels()
    catalogue = Catalogue(settings.catalogue)
    fv = FunVoice(
        settings=settings,
        service=GeminiService(settings, app[METRICS]),
        channels=channels,
        toolbox=Toolbox(channels, catalogue, settings.pages),
        catalogue=catalogue,
    )
    app[FUNVOICE] = fv
    app[HEALTH_SECTIONS].update(health_sections(fv))
    add_routes(app)
    app.cleanup_ctx.append(_ctx)
