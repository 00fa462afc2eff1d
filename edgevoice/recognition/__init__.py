"""Recognition: faster-whisper ASR (and, beside it, diarization) shared by every stream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from edgevoice import modelstore
from edgevoice.metrics import METRICS
from edgevoice.recognition.recognizer import WhisperRecognizer
from edgevoice.recognition.types import Recognizer
from edgevoice.server.keys import HEALTH_CHECKS, HEALTH_SECTIONS, NOTIFIER, SETTINGS
from edgevoice.systemd import extend_while

log = logging.getLogger(__name__)

RECOGNIZER = web.AppKey("recognizer", Recognizer)
"""The shared recognizer every audio source opens its streams on."""


async def _ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    asr = settings.asr
    models_dir = modelstore.default_models_dir(settings.state.path(), asr.models_dir)
    extender = asyncio.create_task(extend_while(app[NOTIFIER], f"loading model {asr.model}"))
    try:
        recognizer = await asyncio.to_thread(
            WhisperRecognizer.load, asr, models_dir, app[METRICS], settings.diarization
        )
    finally:
        extender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await extender
    recognizer.start()
    app[RECOGNIZER] = recognizer
    app[HEALTH_SECTIONS]["asr"] = recognizer.health
    app[HEALTH_CHECKS].append(lambda: recognizer.alive)
    try:
        yield
    finally:
        await asyncio.to_thread(recognizer.stop)


def setup(app: web.Application) -> None:
    app.cleanup_ctx.append(_ctx)
