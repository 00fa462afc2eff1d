"""The process: serve the app, speak the systemd notify protocol, handle every signal, shut down in order.

Everything here runs on the event loop. The signal handlers are installed for the
whole run, start-up included (:class:`Signals`):

- ``SIGTERM`` / ``SIGINT``: the first asks for a clean stop (:func:`shutdown`); a
  second one exits at once with status 128 + the signal's number, without waiting
  for the shutdown to finish (what is committed to the spool stays committed).
- ``SIGHUP``: re-read the configuration file the daemon was started with (passed
  in explicitly, never through the environment) and apply what may change at run
  time (:func:`edgevoice.app.reload`: the keyword rules). A bad file is logged and
  the current rules are kept; a SIGHUP during start-up is applied once serving.

The shutdown sequence (:func:`shutdown`), in data-flow order, is bounded by
``server.shutdown_timeout_s`` + 5 s: STOPPING=1 and the watchdog stopped; then the
application's cleanup: close the WebSockets (the kernel's ``on_shutdown``), then
every component's cleanup context in reverse start-up order (sources stop, the
hub flushes every stream and fires SESSION_END, recognition stops, the spool
commits and closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from edgevoice import app as composition
from edgevoice.config import Settings, load_settings
from edgevoice.server.keys import HEALTH_CHECKS
from edgevoice.server.security import ssl_context
from edgevoice.systemd import Notifier, run_watchdog, watchdog_interval

log = logging.getLogger("edgevoice")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP
SHUTDOWN_GRACE_S = 5.0
"""Added to ``server.shutdown_timeout_s`` (aiohttp's own bound on closing connections) for the whole sequence."""


def force_exit(status: int) -> None:
    """Leave the process now: flush the log handlers, skip every cleanup (the default for a second signal)."""
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):  # exiting anyway: nothing left to report to
            handler.flush()
    os._exit(status)


class Signals:
    """The daemon's signal handlers on the running loop: stop, forced exit, reload.

    ``on_reload`` is called on the loop for every SIGHUP; ``on_force(status)`` for a
    second stop signal (the default, :func:`force_exit`, does not return).
    """

    def __init__(self, on_reload: Callable[[], None], on_force: Callable[[int], None] = force_exit) -> None:
        self.stop_requested = asyncio.Event()
        self.stopped_by: signal.Signals | None = None
        """The first stop signal received."""
        self._on_reload = on_reload
        self._on_force = on_force
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        """Handle the signals on the running loop (until :meth:`remove`)."""
        self._loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            self._loop.add_signal_handler(sig, self._stop, sig)
        self._loop.add_signal_handler(RELOAD_SIGNAL, self._on_reload)

    def remove(self) -> None:
        """Give the signals back their default actions."""
        if self._loop is not None:
            for sig in (*STOP_SIGNALS, RELOAD_SIGNAL):
                self._loop.remove_signal_handler(sig)
            self._loop = None

    def _stop(self, sig: signal.Signals) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
            self.stop_requested.set()
            return
        log.error("second %s while stopping (after %s): exiting now", sig.name, self.stopped_by.name)
        self._on_force(128 + sig)


class Reloader:
    """Applies SIGHUP reloads to a running application, one after another, off the loop for the file read."""

    def __init__(self, config_path: Path | None) -> None:
        self.config_path = config_path
        self._app: web.Application | None = None
        self._serving = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()

    def serving(self, app: web.Application) -> None:
        """The application runs: apply reloads to it from now on (those asked for before start now)."""
        self._app = app
        self._serving.set()

    def request(self) -> None:
        """Re-read the configuration and apply it (a task: returns at once)."""
        task = asyncio.ensure_future(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        await self._serving.wait()
        async with self._lock:
            try:
                settings = await asyncio.to_thread(load_settings, self.config_path)
            except Exception as exc:
                log.error("SIGHUP: configuration not reloaded, keeping the current keyword rules: %s", exc)
                return
            if self._app is not None:
                composition.reload(self._app, settings)

    async def close(self) -> None:
        """Cancel reloads not yet done (at shutdown)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def serve(settings: Settings, notifier: Notifier | None = None, *, config_path: Path | None = None) -> int:
    """Run until SIGTERM/SIGINT; return the process exit status.

    ``config_path`` is the file ``settings`` came from (SIGHUP re-reads it); None looks it up again as
    :func:`~edgevoice.config.load_settings` does.
    """
    notifier = notifier or Notifier()
    started = time.monotonic()
    reloader = Reloader(config_path)
    signals = Signals(on_reload=reloader.request)
    signals.install()
    try:
        app = composition.build_app(settings, notifier)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=settings.server.shutdown_timeout_s)
        if not await start(runner, settings, notifier):
            return 1
        log.info(
            "edgevoice ready on %s://%s:%d in %.2f s",
            "https" if settings.server.tls_cert else "http",
            settings.server.host,
            settings.server.port,
            time.monotonic() - started,
        )
        notifier.ready(f"serving on {settings.server.host}:{settings.server.port}")
        reloader.serving(app)
        watchdog: asyncio.Task[None] | None = None
        interval = watchdog_interval()
        if interval:
            checks = app[HEALTH_CHECKS]
            watchdog = asyncio.create_task(run_watchdog(notifier, interval, lambda: all(c() for c in checks)))
        await signals.stop_requested.wait()
        await reloader.close()
        return await shutdown(runner, settings, notifier, watchdog)
    finally:
        signals.remove()


async def start(runner: web.AppRunner, settings: Settings, notifier: Notifier) -> bool:
    """Start every component (cleanup contexts: models load here) and listen; False (logged) on failure."""
    notifier.status("starting")
    try:
        await runner.setup()
        site = web.TCPSite(runner, settings.server.host, settings.server.port, ssl_context=ssl_context(settings.server))
        await site.start()
    except Exception as exc:
        log.error("start-up failed: %s", exc)
        notifier.send(f"STATUS=start-up failed: {exc}", "ERRNO=1")
        try:
            await runner.cleanup()
        except Exception:
            log.debug("cleanup after a failed start-up failed", exc_info=True)
        return False
    return True


async def shutdown(
    runner: web.AppRunner, settings: Settings, notifier: Notifier, watchdog: asyncio.Task[None] | None
) -> int:
    """The shutdown sequence (see the module docstring); returns the exit status."""
    log.info("stopping: draining streams and connections")
    notifier.stopping()
    if watchdog is not None:
        watchdog.cancel()
    budget = settings.server.shutdown_timeout_s + SHUTDOWN_GRACE_S
    try:
        await asyncio.wait_for(runner.cleanup(), timeout=budget)
    except asyncio.TimeoutError:
        log.error("shutdown took longer than %.0f s; exiting anyway", budget)
    log.info("stopped")
    notifier.close()
    return 0
