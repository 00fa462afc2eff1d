"""The daemon: serve the app, speak the systemd notify protocol, stop cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

from aiohttp import web

from edgevoice.config import Settings
from edgevoice.server.app import build_app
from edgevoice.server.keys import HEALTH_CHECKS
from edgevoice.server.security import ssl_context
from edgevoice.systemd import Notifier, run_watchdog, watchdog_interval

log = logging.getLogger("edgevoice")


async def serve(settings: Settings, notifier: Notifier | None = None) -> int:
    """Run until SIGTERM/SIGINT; return the process exit status."""
    notifier = notifier or Notifier()
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    app = build_app(settings, notifier)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=settings.server.shutdown_timeout_s)
    notifier.status("starting")
    try:
        await runner.setup()  # runs every cleanup_ctx: models are loaded here
        site = web.TCPSite(runner, settings.server.host, settings.server.port, ssl_context=ssl_context(settings.server))
        await site.start()
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        notifier.send(f"STATUS=start-up failed: {exc}", "ERRNO=1")
        with contextlib.suppress(Exception):
            await runner.cleanup()
        return 1

    scheme = "https" if settings.server.tls_cert else "http"
    log.info(
        "edgevoice ready on %s://%s:%d in %.2f s",
        scheme,
        settings.server.host,
        settings.server.port,
        time.monotonic() - started,
    )
    notifier.ready(f"serving on {settings.server.host}:{settings.server.port}")
    watchdog: asyncio.Task[None] | None = None
    interval = watchdog_interval()
    if interval:
        checks = app[HEALTH_CHECKS]
        watchdog = asyncio.create_task(run_watchdog(notifier, interval, lambda: all(c() for c in checks)))

    await stop.wait()
    log.info("stopping: draining streams and connections")
    notifier.stopping()
    if watchdog:
        watchdog.cancel()
    try:
        await asyncio.wait_for(runner.cleanup(), timeout=settings.server.shutdown_timeout_s + 5)
    except asyncio.TimeoutError:
        log.error("shutdown took longer than %.0f s; exiting anyway", settings.server.shutdown_timeout_s + 5)
    log.info("stopped")
    notifier.close()
    return 0
