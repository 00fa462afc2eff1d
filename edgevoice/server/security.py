"""LAN hardening shared by every endpoint: bearer token, CORS allowlist, TLS, connection limits."""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from edgevoice.config import ServerSettings
from edgevoice.server.keys import WEBSOCKETS

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_token(request: web.Request) -> str | None:
    """The token a client presented: ``Authorization: Bearer …`` or ``?token=…``."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.query.get("token")


def _origin_allowed(request: web.Request, allowed: list[str]) -> bool:
    origin = request.headers.get("Origin")
    if origin is None or "*" in allowed or origin in allowed:
        return True
    return origin.split("://", 1)[-1] == request.host  # same origin


def security_middleware(server: ServerSettings) -> Middleware:
    """Token check, CORS and WebSocket origin check in one middleware."""
    token = server.bearer_token()
    allowed = list(server.cors_origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        cors = origin is not None and _origin_allowed(request, allowed)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            if not cors:
                return web.json_response(
                    {"error": "origin_not_allowed", "message": f"origin {origin} is not in server.cors_origins"},
                    status=403,
                )
            resp: web.StreamResponse = web.Response(status=204)
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            resp.headers["Access-Control-Max-Age"] = "600"
        else:
            is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
            if is_ws and not cors and origin is not None:
                return web.json_response(
                    {"error": "origin_not_allowed", "message": f"origin {origin} is not in server.cors_origins"},
                    status=403,
                )
            if token is not None and not _is_public(request.path):
                presented = request_token(request)
                if presented is None or not hmac.compare_digest(presented.encode(), token.encode()):
                    resp = web.json_response(
                        {
                            "error": "unauthorized",
                            "message": "missing or wrong bearer token (Authorization header or ?token=)",
                        },
                        status=401,
                        headers={"WWW-Authenticate": 'Bearer realm="edgevoice"'},
                    )
                    return _with_cors(resp, origin if cors else None)
            if is_ws and len(request.app[WEBSOCKETS]) >= server.max_connections:
                return web.json_response(
                    {
                        "error": "too_many_connections",
                        "message": f"server.max_connections ({server.max_connections}) reached",
                    },
                    status=503,
                )
            resp = await handler(request)
        return _with_cors(resp, origin if cors else None)

    return middleware


# Static assets of the dashboard carry no data; the page passes its token on to the API.
_PUBLIC_PATHS: frozenset[str] = frozenset({"/favicon.ico", "/", "/examples/voice.html"})
_PUBLIC_PREFIXES: tuple[str, ...] = ("/dashboard/static/",)


def _is_public(path: str) -> bool:
    return path in _PUBLIC_PATHS or (path.startswith(_PUBLIC_PREFIXES) and "/.." not in path)


def _with_cors(resp: web.StreamResponse, origin: str | None) -> web.StreamResponse:
    if origin is not None and not resp.prepared:
        resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers["Vary"] = "Origin"
    return resp


def ssl_context(server: ServerSettings) -> ssl.SSLContext | None:
    """A server TLS context from ``tls_cert``/``tls_key``, or None for plain HTTP."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(server.tls_cert), str(server.tls_key))
    return ctx
