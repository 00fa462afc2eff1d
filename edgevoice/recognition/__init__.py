"""Recognition: faster-whisper ASR (and, beside it, diarization) shared by every stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from edgevoice import models
from edgevoice.server.keys import HEALTH_SECTIONS, NOTIFIER, SETTINGS
from edgevoice.systemd import extend_while

log = logging.getLogger(__name__)

WHISPER = web.AppKey("whisper", Any)
"""The loaded faster-whisper model (placeholder until the engine lands)."""


async def _ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    asr = settings.asr
    models_dir = models.default_models_dir(settings.state.path(), asr.models_dir)
    extender = asyncio.create_task(extend_while(app[NOTIFIER], f"loading model {asr.model}"))
    try:
        path = await asyncio.to_thread(models.resolve, asr.model, models_dir)
        from faster_whisper import WhisperModel

        device = "cpu" if asr.device == "auto" else asr.device
        compute = "int8" if asr.compute_type == "auto" else asr.compute_type
        app[WHISPER] = await asyncio.to_thread(
            WhisperModel, str(path), device=device, compute_type=compute, cpu_threads=asr.cpu_threads
        )
        log.info("model %s loaded from %s (%s, %s)", asr.model, path, device, compute)
    finally:
        extender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await extender
    app[HEALTH_SECTIONS]["asr"] = lambda: {"model": asr.model, "device": device, "compute_type": compute}
    yield


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_ctx)
