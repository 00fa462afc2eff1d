"""The daemon's real application (``edgevoice.app.build_app``) served on 127.0.0.1 by its own loop in a thread.

In process, so a test sees every log record (a traceback anywhere is a failure), and usable from
sync tests (hypothesis) and async ones alike: clients connect to ``url`` / ``ws_url`` over TCP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from aiohttp import web

from edgevoice.app import build_app
from edgevoice.config import Settings

T = TypeVar("T")


class Records(logging.Handler):
    """Every log record at WARNING or above, and every one carrying a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.exc_info:
            self.records.append(record)

    def failures(self) -> list[str]:
        """Errors and tracebacks (warnings are expected: a client that does not read, an insecure bind)."""
        return [
            self.format(r) + (f"\n{logging.Formatter().formatException(r.exc_info)}" if r.exc_info else "")
            for r in self.records
            if r.levelno >= logging.ERROR or r.exc_info
        ]


class AppThread:
    """``build_app(settings)`` listening on 127.0.0.1:<free port>; ``records`` holds what it logged."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.app: web.Application | None = None
        self.records = Records()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="edgevoice-app", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run ``coro`` on the application's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self) -> AppThread:
        logging.getLogger().addHandler(self.records)
        self._thread.start()
        self.call(self._start())
        return self

    async def _start(self) -> None:
        self.app = build_app(self.settings)
        self._runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = int(server.sockets[0].getsockname()[1])

    def stop(self) -> None:
        try:
            if self._runner is not None:
                self.call(self._runner.cleanup(), timeout=60)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            logging.getLogger().removeHandler(self.records)

    def __enter__(self) -> AppThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
