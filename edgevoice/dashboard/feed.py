"""The dashboard's live feed: stream-hub messages, delivery updates and status snapshots fanned out to open pages.

Every frame sent to a page is a JSON array of messages. The first frame is
``[{"type": "hello", "snapshot": {...}, "history": [...]}]``: the current
status and the recent messages (stream starts and stops, final text, keyword
events, deliveries, the latest partial of each open stream), so a page opened
late still shows what just happened. Then come the live messages, and a
``snapshot`` every ``dashboard.snapshot_interval_s`` while a page is open.

Publishing never waits for a page: each page has a queue bounded by count
(:data:`MAX_PENDING`) and by bytes (``dashboard.max_queue_bytes``); a page that
falls too far behind gets its queue dropped and a fresh ``hello`` instead. The
history replayed in a ``hello`` is bounded the same way (``dashboard.history``
messages, ``dashboard.history_bytes``). Sizes are those of the UTF-8 JSON text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import WSMsgType, web

from edgevoice.server.keys import HEALTH_CHECKS, HEALTH_SECTIONS

log = logging.getLogger(__name__)

MAX_PENDING = 2000
"""Messages queued for one page before it is resynchronized with a fresh hello."""
MAX_QUEUE_BYTES = 4 << 20
"""dashboard.max_queue_bytes' default."""
HISTORY_BYTES = 1 << 20
"""dashboard.history_bytes' default."""
MAX_BATCH = 200
"""Messages sent in one WebSocket frame."""


def _json_default(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if hasattr(obj, "item"):  # numpy scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return str(obj)


def dumps(msg: Any) -> str:
    """Compact JSON for the feed (dataclasses, numpy values and the rest made JSON-able)."""
    return json.dumps(msg, default=_json_default, ensure_ascii=False, separators=(",", ":"))


class _Page:
    """One open dashboard page: its WebSocket and what is waiting to be sent to it."""

    __slots__ = ("max_bytes", "pending", "pending_bytes", "resync", "wake", "ws")

    def __init__(self, ws: web.WebSocketResponse, max_bytes: int = MAX_QUEUE_BYTES) -> None:
        self.ws = ws
        self.max_bytes = max_bytes
        self.pending: deque[tuple[str, int]] = deque()
        self.pending_bytes = 0
        self.wake = asyncio.Event()
        self.resync = False

    def push(self, text: str, size: int | None = None) -> None:
        """Queue ``text`` (``size``: its UTF-8 length, if known)."""
        size = len(text.encode()) if size is None else size
        if len(self.pending) >= MAX_PENDING or self.pending_bytes + size > self.max_bytes:
            self.clear()
            self.resync = True
        else:
            self.pending.append((text, size))
            self.pending_bytes += size
        self.wake.set()

    def pop(self) -> str:
        text, size = self.pending.popleft()
        self.pending_bytes -= size
        return text

    def clear(self) -> None:
        self.pending.clear()
        self.pending_bytes = 0


class _History:
    """The recent messages replayed to a new page: at most ``count`` of them and ``max_bytes`` of text."""

    def __init__(self, count: int, max_bytes: int) -> None:
        self.count = count
        self.max_bytes = max_bytes
        self._items: deque[tuple[str, int]] = deque()
        self.bytes = 0

    def append(self, text: str, size: int) -> None:
        if not self.count or size > self.max_bytes:
            return
        self._items.append((text, size))
        self.bytes += size
        while len(self._items) > self.count or self.bytes > self.max_bytes:
            self.bytes -= self._items.popleft()[1]

    def __iter__(self) -> Iterator[str]:
        return (text for text, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)


class Feed:
    """Fan-out of live messages to every open dashboard page."""

    def __init__(
        self,
        app: web.Application,
        *,
        history: int,
        history_bytes: int = HISTORY_BYTES,
        max_queue_bytes: int = MAX_QUEUE_BYTES,
        streams: Callable[[], list[Any]] | None = None,
    ) -> None:
        self._app = app
        self._pages: set[_Page] = set()
        self._history = _History(history, history_bytes)
        self._max_queue_bytes = max_queue_bytes
        self._partials: dict[str, str] = {}
        self._streams = streams
        self._started = time.monotonic()

    @property
    def pages(self) -> int:
        """Dashboard pages connected now."""
        return len(self._pages)

    def set_streams(self, streams: Callable[[], list[Any]] | None) -> None:
        """Where snapshots read the open streams from (the stream hub's ``streams``)."""
        self._streams = streams

    def publish(self, msg: dict[str, Any]) -> None:
        """Remember ``msg`` for late pages and send it to every open page. Called on the loop; never waits."""
        text = dumps(msg)
        size = len(text.encode())
        kind = msg.get("type")
        stream_id = msg.get("stream_id")
        if kind == "transcript" and not msg.get("final"):
            if stream_id is not None:
                self._partials[stream_id] = text
        elif kind != "snapshot":
            if kind in ("transcript", "stream_stopped") and stream_id is not None:
                self._partials.pop(stream_id, None)
            self._history.append(text, size)
        for page in self._pages:
            page.push(text, size)

    def broadcast_snapshot(self) -> None:
        """Send a status snapshot to every open page (nothing is built when none is open)."""
        if self._pages:
            text = dumps(self.snapshot())
            size = len(text.encode())
            for page in self._pages:
                page.push(text, size)

    def snapshot(self) -> dict[str, Any]:
        """The daemon's status now: every /health section plus the open streams with their lag and level."""
        app = self._app
        health: dict[str, Any] = {}
        for name, section in list(app[HEALTH_SECTIONS].items()):
            try:
                health[name] = section()
            except Exception as exc:  # a broken section must not take the feed down
                health[name] = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            healthy = all(check() for check in app[HEALTH_CHECKS])
        except Exception:
            healthy = False
        streams: list[Any] = []
        if self._streams is not None:
            try:
                streams = list(self._streams())
            except Exception as exc:
                log.warning("dashboard: listing streams failed: %s", exc)
        return {
            "type": "snapshot",
            "time": time.time(),
            "uptime_s": round(time.monotonic() - self._started, 1),
            "status": "healthy" if healthy else "degraded",
            "health": health,
            "streams": streams,
        }

    def _hello(self) -> str:
        history = [*self._history, *self._partials.values()]
        return f'[{{"type":"hello","version":1,"snapshot":{dumps(self.snapshot())},"history":[{",".join(history)}]}}]'

    async def serve(self, ws: web.WebSocketResponse) -> None:
        """Feed one prepared WebSocket until it closes."""
        page = _Page(ws, self._max_queue_bytes)
        hello = self._hello()  # built and registered in one step: nothing is missed or sent twice
        self._pages.add(page)
        writer = asyncio.create_task(self._write(page, hello))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT and msg.data.strip() == '{"type":"ping"}':
                    page.push('{"type":"pong"}')
        finally:
            self._pages.discard(page)
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _write(self, page: _Page, hello: str) -> None:
        ws = page.ws
        try:
            await ws.send_str(hello)
            while not ws.closed:
                await page.wake.wait()
                page.wake.clear()
                if page.resync:
                    page.resync = False
                    text = self._hello()
                    page.clear()
                    await ws.send_str(text)
                while page.pending:
                    batch = [page.pop() for _ in range(min(len(page.pending), MAX_BATCH))]
                    await ws.send_str(f"[{','.join(batch)}]")
        except (ConnectionError, RuntimeError) as exc:  # the page went away mid-send
            log.debug("dashboard page gone: %s", exc)
            await ws.close()
