"""The process: serve the app, speak the systemd notify protocol, handle every signal, shut down in phases.

Everything here runs on the event loop. The signal handlers are installed for the
whole run, start-up included (:class:`Signals`):

- ``SIGTERM`` / ``SIGINT``: the first asks for a clean stop (:func:`shutdown`); a
  second one exits at once with status 128 + the signal's number, without waiting
  for the shutdown to finish (what is committed to the spool stays committed).
- ``SIGHUP``: re-read the configuration file the daemon was started with (passed
  in explicitly, never through the environment) and apply what may change at run
  time (:func:`edgevoice.app.reload`: the keyword rules). A bad file is logged and
  the current rules are kept; a SIGHUP during start-up is applied once serving.

The shutdown (:func:`shutdown`) runs the phases of :mod:`edgevoice.server.lifecycle`
in data-flow order, each within its own budget from ``[shutdown]``: STOPPING=1 and
the watchdog stopped; ``stop_accepting`` (the listening sockets close here) →
``flush`` → ``end_sessions`` → ``drain`` → ``close`` → ``stop`` (aiohttp's cleanup:
every component's cleanup context in reverse start-up order). Each phase logs what it
did. A phase that overruns its budget is abandoned (logged with what it was doing) and
the next one runs; the process then exits with status 1 at once, without waiting
for what is stuck, so the whole stop stays within ``shutdown.total_s()`` and the
unit's ``TimeoutStopSec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from edgevoice import app as composition
from edgevoice.config import Settings, load_settings
from edgevoice.server.keys import HEALTH_CHECKS
from edgevoice.server.lifecycle import LIFECYCLE, Hook, Phase, Registered
from edgevoice.server.security import ssl_context
from edgevoice.systemd import Notifier, run_watchdog, watchdog_interval

log = logging.getLogger("edgevoice")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELOAD_SIGNAL = signal.SIGHUP
OVERRUN_STATUS = 1
"""Exit status when a shutdown phase did not finish within its budget."""
REQUEST_GRACE_S = 1.0
"""In ``stop``: how long in-flight HTTP requests may still run (at most half of shutdown.stop_s)."""


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


async def serve(
    settings: Settings,
    notifier: Notifier | None = None,
    *,
    config_path: Path | None = None,
    exit_now: Callable[[int], None] | None = force_exit,
) -> int:
    """Run until SIGTERM/SIGINT; return the process exit status.

    ``config_path`` is the file ``settings`` came from (SIGHUP re-reads it); None looks it up again as
    :func:`~edgevoice.config.load_settings` does. ``exit_now`` is called with the status when a shutdown
    phase overran (the default leaves the process at once); None returns the status instead.
    """
    notifier = notifier or Notifier()
    started = time.monotonic()
    reloader = Reloader(config_path)
    signals = Signals(on_reload=reloader.request)
    signals.install()
    try:
        if settings.server.shutdown_timeout_s is not None:
            log.warning("server.shutdown_timeout_s is no longer used: the [shutdown] section budgets each phase")
        app = composition.build_app(settings, notifier)
        grace = min(REQUEST_GRACE_S, settings.shutdown.stop_s / 2)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=grace)
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
        status = await shutdown(runner, settings, notifier, watchdog)
        if status and exit_now is not None:
            exit_now(status)
        return status
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
    """The shutdown phases (see the module docstring); returns the exit status (1 if a phase overran)."""
    budgets = settings.shutdown.budgets()
    log.info(
        "stopping: %s (%.0f s at most)",
        ", ".join(f"{name} {budget:g} s" for name, budget in budgets.items()),
        settings.shutdown.total_s(),
    )
    notifier.stopping()
    if watchdog is not None:
        watchdog.cancel()
    lifecycle = runner.app[LIFECYCLE]

    async def stop_listening() -> str:
        lifecycle.stopping = True
        sites = list(runner.sites)
        for site in sites:
            await site.stop()
        return f"{len(sites)} listening socket(s) closed, new WebSocket upgrades refused"

    async def cleanup() -> None:
        await runner.cleanup()

    overran: list[str] = []
    for phase in Phase:
        hooks = lifecycle.hooks(phase)
        if phase is Phase.STOP_ACCEPTING:
            hooks.insert(0, Registered("server", stop_listening))
        if not await run_phase(phase.value, budgets[phase.value], hooks, notifier):
            overran.append(phase.value)
    if not await run_phase("stop", budgets["stop"], [Registered("components", _no_account(cleanup))], notifier):
        overran.append("stop")
    if overran:
        log.error("stopped: shutdown phase(s) %s did not finish; exit status %d", ", ".join(overran), OVERRUN_STATUS)
    else:
        log.info("stopped")
    notifier.close()
    return OVERRUN_STATUS if overran else 0


def _no_account(fn: Callable[[], Awaitable[None]]) -> Hook:
    async def hook() -> str | None:
        await fn()
        return None

    return hook


async def run_phase(name: str, budget: float, hooks: list[Registered], notifier: Notifier | None = None) -> bool:
    """Run ``hooks`` one after another within ``budget`` seconds; False (logged) if they did not all finish.

    An overrun abandons the phase at once: its task is cancelled but not waited for (whatever it
    was stuck on may not end), and the caller goes on with the next phase.
    """
    if notifier is not None:
        notifier.status(f"stopping: {name}")
    started = time.monotonic()
    current = ["-"]
    failed: list[str] = []

    async def run_all() -> None:
        for registered in hooks:
            current[0] = registered.name
            try:
                account = await registered.hook()
            except Exception:
                log.exception("shutdown phase %s: %s failed", name, registered.name)
                failed.append(registered.name)
                continue
            if account:
                log.info("shutdown phase %s: %s: %s", name, registered.name, account)

    task = asyncio.ensure_future(run_all())
    done, _ = await asyncio.wait({task}, timeout=budget)
    if not done:
        task.cancel()
        log.error(
            "shutdown phase %s did not finish within its budget of %.1f s (still in %s); going on",
            name,
            budget,
            current[0],
        )
        return False
    log.info("shutdown phase %s done in %.2f s", name, time.monotonic() - started)
    return not failed
