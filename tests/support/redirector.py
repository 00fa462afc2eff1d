"""An experience-event API on 127.0.0.1 that answers POSTs with a redirect, as a proxy in front of a deploy may.

The redirect points at ``/moved``, a page that answers 200 to anything (a login
or maintenance page): a client that followed the redirect would see a 200 and
take the event as delivered. ``/moved`` records every request it gets, so a
test can prove that none arrived. Threaded like :class:`tests.support.receiver.Receiver`::

    with Redirector() as api:
        api.redirect(302)       # every POST: 302 Location: /moved
        api.redirect(None)      # healthy: POSTs accepted (200), deduplicated by Idempotency-Key
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from tests.support.receiver import PATH, _free_port


@dataclass
class Seen:
    """What the API saw."""

    posts: list[tuple[str | None, int]] = field(default_factory=list)
    """(Idempotency-Key, status answered) per POST to the API path."""
    accepted: dict[str, bytes] = field(default_factory=dict)
    """Idempotency-Key -> body of the first accepted POST, in order."""
    moved: list[str] = field(default_factory=list)
    """Methods of the requests that reached the page redirected to (must stay empty)."""


class Redirector:
    def __init__(self) -> None:
        self.port = _free_port()
        self.status: int | None = 302
        self.seen = Seen()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="redirector", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    @property
    def moved_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/moved"

    def redirect(self, status: int | None) -> None:
        """Answer POSTs with this 3xx (None: accept them)."""
        with self._lock:
            self.status = status

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get("Idempotency-Key")
        with self._lock:
            status = self.status
            self.seen.posts.append((key, status or 200))
            if status is None and key is not None:
                self.seen.accepted.setdefault(key, body)
        if status is not None:
            return web.Response(status=status, headers={"Location": self.moved_url}, text="moved")
        return web.json_response({"status": "success"})

    async def _moved(self, request: web.Request) -> web.Response:
        await request.read()
        with self._lock:
            self.seen.moved.append(request.method)
        return web.Response(text="<html>maintenance page</html>", content_type="text/html")

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post(PATH, self._post)
        app.router.add_route("*", "/moved", self._moved)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> Redirector:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> Redirector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def redirected(self) -> int:
        with self._lock:
            return sum(1 for _, s in self.seen.posts if 300 <= s < 400)

    def accepted(self) -> list[str]:
        with self._lock:
            return list(self.seen.accepted)

    def wait(self, pred: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
        """Poll ``pred()`` until true (blocking: for sync tests); TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"redirector: not within {timeout} s: {what} ({self.seen})")
            time.sleep(0.02)

    async def until(self, pred: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
        """Async form of :meth:`wait` (never blocks the caller's loop)."""
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(f"redirector: not within {timeout} s: {what} ({self.seen})")
            await asyncio.sleep(0.02)
