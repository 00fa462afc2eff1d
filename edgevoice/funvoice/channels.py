"""Who is connected, per user: the conversation (/ws), tool sockets (/ws/tools), product-info sockets."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from datetime import datetime, timezone
from typing import Any, Literal

from aiohttp import WSCloseCode, web

log = logging.getLogger(__name__)

Kind = Literal["tools", "product_info"]


def utc_now_iso() -> str:
    """The time as the document writes it: ``2024-01-15T10:30:00Z``."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Channels:
    """Per-user sockets; a message pushed for one user reaches that user's sockets only."""

    def __init__(self) -> None:
        self.conversations: dict[str, web.WebSocketResponse] = {}
        self._sockets: dict[Kind, dict[str, set[web.WebSocketResponse]]] = {
            "tools": defaultdict(set),
            "product_info": defaultdict(set),
        }
        self.last_product_update: str | None = None

    def add(self, kind: Kind, user_id: str, ws: web.WebSocketResponse) -> None:
        self._sockets[kind][user_id].add(ws)

    def remove(self, kind: Kind, user_id: str, ws: web.WebSocketResponse) -> None:
        sockets = self._sockets[kind].get(user_id)
        if sockets is not None:
            sockets.discard(ws)
            if not sockets:
                del self._sockets[kind][user_id]

    def users(self, kind: Kind) -> list[str]:
        return sorted(self._sockets[kind])

    async def push(self, kind: Kind, user_id: str, message: dict[str, Any]) -> int:
        """Send ``message`` to every ``kind`` socket of ``user_id``; return how many received it."""
        sockets = [ws for ws in self._sockets[kind].get(user_id, ()) if not ws.closed]
        results = await asyncio.gather(*(ws.send_json(message) for ws in sockets), return_exceptions=True)
        delivered = sum(1 for r in results if not isinstance(r, BaseException))
        if kind == "product_info" and delivered:
            self.last_product_update = utc_now_iso()
        return delivered

    async def reset(self, kind: Kind, user_id: str | None = None) -> int:
        """Close one user's (or everyone's) ``kind`` sockets; return how many were closed."""
        if user_id is None:
            sockets = [ws for group in self._sockets[kind].values() for ws in group]
        else:
            sockets = list(self._sockets[kind].get(user_id, ()))
        await asyncio.gather(
            *(ws.close(code=WSCloseCode.OK, message=b"reset by the server") for ws in sockets),
            return_exceptions=True,
        )
        for ws in sockets:
            for uid, group in list(self._sockets[kind].items()):
                if ws in group:
                    self.remove(kind, uid, ws)
        return len(sockets)

    def counts(self) -> dict[str, int]:
        """The ``sessions`` section of /health."""
        tools, product = self._sockets["tools"], self._sockets["product_info"]
        return {
            "active_sessions": len(self.conversations),
            "total_users": len(set(self.conversations) | set(tools) | set(product)),
            "users_with_tool_websockets": len(tools),
            "users_with_product_info": len(product),
        }
