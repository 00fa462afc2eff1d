"""A real experience-event API on 127.0.0.1 for tests: records, deduplicates, misbehaves on demand.

The server runs its own event loop in a thread, so sync tests, async tests and
daemon subprocesses can all talk to it. Behaviour is switchable at run time::

    with Receiver() as rx:
        rx.respond(500)                   # every request answered 500
        rx.respond(429, retry_after=1)    # 429 with Retry-After: 1
        rx.respond(400)                   # rejected: never accepted
        rx.respond("hang")                # hold the request until the mode changes
        rx.respond("accept_hang")         # accept (record) it, then hang: the client retries a delivered event
        rx.respond("down")                # listening socket closed (connection refused)
        rx.respond(200)                   # healthy again (the port is the same)
        rx.script(500, 500, 200)          # the next three requests in turn, then the default
        rx.wait_accepted(10)              # block until 10 distinct keys were accepted
        rx.events("cust-1")               # ["SAY_HELLO", "SESSION_END"] in acceptance order

A request counts as *accepted* when the receiver answered it 2xx (or, for
``accept_hang``, recorded it before hanging). Acceptance is deduplicated by the
``Idempotency-Key`` header, as a real idempotent API would: a second request
with an accepted key is answered 200 ``{"status": "duplicate"}`` and counted in
:attr:`duplicates`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

PATH = "/api/v1/experience-event"

Mode = int | Literal["hang", "accept_hang", "down"]


@dataclass(frozen=True)
class Recorded:
    """One request as the receiver saw it."""

    body: Any
    """Parsed JSON body (the raw text when it was not JSON)."""
    raw: bytes
    key: str | None
    """The ``Idempotency-Key`` header."""
    time: float
    """``time.monotonic()`` on arrival."""
    answer: int | str
    """Status answered, or "hang" / "accept_hang"."""
    content_type: str = ""


@dataclass
class _Behaviour:
    mode: Mode = 200
    retry_after: str | None = None
    script: list[tuple[Mode, str | None]] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Receiver:
    """The experience-event API at ``http://127.0.0.1:<port>/api/v1/experience-event``."""

    def __init__(self, port: int | None = None, path: str = PATH) -> None:
        self.port = port or _free_port()
        self.path = path
        self.requests: list[Recorded] = []
        """Every request received, in arrival order (duplicates and failures included)."""
        self.accepted: dict[str, Recorded] = {}
        """Idempotency-Key -> the request that was first accepted, in acceptance order."""
        self.duplicates = 0
        """Requests whose key had already been accepted."""
        self._b = _Behaviour()
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._release: asyncio.Event | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self) -> Receiver:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="receiver", daemon=True)
        self._thread.start()
        ready.wait(10)
        if self._b.mode != "down":
            self._call(self._up())
        return self

    def _run(self, ready: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        self._release = asyncio.Event()
        ready.set()
        self._loop.run_forever()

    def stop(self) -> None:
        if self._loop is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        assert self._thread is not None
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(15)

    async def _up(self) -> None:
        if self._site is not None:
            return
        if self._runner is None:
            app = web.Application()
            app.router.add_post(self.path, self._handle)
            self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.5)
            await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self._site = site

    async def _down(self) -> None:
        if self._site is not None:
            site, self._site = self._site, None
            await site.stop()  # closes the listening socket…
            assert self._runner is not None and self._runner.server is not None
            for conn in self._runner.server.connections:
                conn.force_close()  # …and the kept-alive connections: nothing gets through while down

    async def _shutdown(self) -> None:
        self._wake()
        await self._down()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- behaviour ---------------------------------------------------------

    def respond(self, mode: Mode, *, retry_after: float | str | None = None) -> None:
        """Answer every later request this way (and release any hanging ones)."""
        ra = None if retry_after is None else str(retry_after)
        with self._cond:
            self._b.mode, self._b.retry_after = mode, ra
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake)
            self._call(self._down() if mode == "down" else self._up())

    def script(self, *modes: Mode, retry_after: float | str | None = None) -> None:
        """Answer the next ``len(modes)`` requests with these modes in turn (not "down"), then the default."""
        ra = None if retry_after is None else str(retry_after)
        with self._cond:
            self._b.script.extend((m, ra) for m in modes)

    def _wake(self) -> None:
        if self._release is not None:
            self._release.set()
            self._release = asyncio.Event()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode(errors="replace")
        key = request.headers.get("Idempotency-Key")
        with self._cond:
            if self._b.script:
                mode, retry_after = self._b.script.pop(0)
            else:
                mode, retry_after = self._b.mode, self._b.retry_after
            dup = key is not None and key in self.accepted
            rec = Recorded(body, raw, key, time.monotonic(), mode, request.content_type)
            self.requests.append(rec)
            accept = (isinstance(mode, int) and 200 <= mode < 300) or mode == "accept_hang"
            if accept:
                if dup:
                    self.duplicates += 1
                elif key is not None:
                    self.accepted[key] = rec
            self._cond.notify_all()
        if mode in ("hang", "accept_hang"):
            assert self._release is not None
            await self._release.wait()
            return web.json_response({"error": "released after hanging"}, status=503)
        assert isinstance(mode, int)
        if accept:
            return web.json_response({"status": "duplicate" if dup else "success"}, status=mode)
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        return web.json_response({"error": f"HTTP {mode} from test receiver"}, status=mode, headers=headers)

    # -- inspection --------------------------------------------------------

    def events(self, customer: str | None = None) -> list[str]:
        """Accepted EVENT names (of one customer, if given) in acceptance order."""
        with self._cond:
            recs = list(self.accepted.values())
        return [r.body["EVENT"] for r in recs if customer is None or r.body.get("UUID") == customer]

    def accepted_bodies(self) -> list[Any]:
        with self._cond:
            return [r.body for r in self.accepted.values()]

    def count(self) -> int:
        with self._cond:
            return len(self.requests)

    def wait_accepted(self, n: int, timeout: float = 10) -> None:
        """Block until at least ``n`` distinct keys were accepted; TimeoutError otherwise."""
        self._wait(lambda: len(self.accepted) >= n, timeout, f"{n} accepted events")

    def wait_requests(self, n: int, timeout: float = 10) -> None:
        """Block until at least ``n`` requests arrived (any answer)."""
        self._wait(lambda: len(self.requests) >= n, timeout, f"{n} requests")

    def _wait(self, pred: Any, timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(pred, timeout):
                raise TimeoutError(
                    f"receiver: no {what} within {timeout} s (requests={len(self.requests)}, "
                    f"accepted={len(self.accepted)}, duplicates={self.duplicates})"
                )

    async def until_accepted(self, n: int, timeout: float = 10) -> None:
        """Async form of :meth:`wait_accepted` (polls; never blocks the caller's loop)."""
        await self._until(lambda: len(self.accepted) >= n, timeout, f"{n} accepted events")

    async def until_requests(self, n: int, timeout: float = 10) -> None:
        await self._until(lambda: len(self.requests) >= n, timeout, f"{n} requests")

    async def _until(self, pred: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                if pred():
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"receiver: no {what} within {timeout} s (requests={len(self.requests)}, "
                    f"accepted={len(self.accepted)}, duplicates={self.duplicates})"
                )
            await asyncio.sleep(0.01)


@contextlib.contextmanager
def running_receiver() -> Iterator[Receiver]:
    """A started receiver, stopped afterwards."""
    rx = Receiver().start()
    try:
        yield rx
    finally:
        rx.stop()
