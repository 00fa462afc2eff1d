"""LAN hardening shared by every endpoint: Host check, Origin and body rules, bearer tokens by surface, TLS.

One middleware on the event loop, nothing blocking; the policy is computed once
per application from ``server.*`` (docs/security.md says what each rule stops):

1. **Host** (every request): the ``Host`` header must be an IP address,
   ``localhost``, this machine's hostname, ``funvoice.public_url``'s host or a
   name in ``server.allowed_hosts``; anything else (a DNS-rebinding page's own
   name) is refused with 403 ``host_not_allowed``.
2. **Origin**: a browser's WebSocket upgrade and every state-changing request
   (POST, PUT, PATCH, DELETE) must come from the same origin or one listed in
   ``server.cors_origins``; ``"*"`` there covers reads (GET, HEAD) only. Else
   403 ``origin_not_allowed``. Requests without ``Origin`` (non-browser clients)
   pass on to the token check.
3. **Body**: a state-changing request's body, if it has one, is JSON
   (``application/json``, ``*+json``); else 415 ``unsupported_media_type``
   (cross-site "simple" requests carry ``text/plain`` or form bodies).
4. **Token**: each route belongs to a surface (:data:`ROUTE_SURFACES`, filled by
   the composition root); a surface with a token needs ``Authorization: Bearer``
   or ``?token=``, else 401 ``unauthorized`` (400 ``bad_authorization`` for a
   header that is not UTF-8).
5. **Connections**: WebSocket upgrades beyond ``server.max_connections``, or
   beyond ``server.max_connections_per_peer`` from one address, get 503.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from aiohttp import web

from edgevoice.config import SURFACES, ServerSettings, Settings, Surface, is_loopback_host
from edgevoice.server.keys import ROUTE_SURFACES, WEBSOCKETS

if TYPE_CHECKING:
    from aiohttp.typedefs import Middleware

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing; every other method is state-changing."""

# Static assets of the dashboard and the example page carry no data; the pages pass their token on to the API.
_PUBLIC_PATHS: frozenset[str] = frozenset({"/favicon.ico", "/", "/examples/voice.html"})
_PUBLIC_PREFIXES: tuple[str, ...] = ("/dashboard/static/",)


def request_token(request: web.Request) -> str | None:
    """The token a client presented: ``Authorization: Bearer …`` or ``?token=…``."""
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return request.query.get("token")


def host_name(host: str) -> str:
    """The name part of a ``Host`` header, lower-cased: ``Box.LAN:8000`` -> ``box.lan``, ``[::1]:80`` -> ``::1``."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[1:end] if end > 0 else host
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _netloc(origin: str) -> str:
    """``scheme://host[:port]`` -> ``host[:port]`` lower-cased (the form a Host header has)."""
    return origin.split("://", 1)[-1].rstrip("/").lower()


@dataclass(frozen=True)
class Policy:
    """The rules of the middleware, from the settings (tokens read once)."""

    tokens: dict[Surface, str | None]
    shared_token: str | None
    origins: frozenset[str]
    any_origin_reads: bool
    hosts: frozenset[str]
    any_host: bool
    max_connections: int
    max_per_peer: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        server = settings.server
        hosts = {"localhost", host_name(server.host)}
        machine = socket.gethostname().lower()  # a system call, no DNS
        if machine:
            hosts |= {machine, f"{machine}.local", machine.split(".")[0]}
        public_url = settings.funvoice.public_url
        if public_url and urlsplit(public_url).hostname:
            hosts.add(str(urlsplit(public_url).hostname).lower())
        hosts |= {host_name(h) for h in server.allowed_hosts if h != "*"}
        return cls(
            tokens={surface: server.surface_token(surface) for surface in SURFACES},
            shared_token=server.bearer_token(),
            origins=frozenset(o.lower() for o in server.cors_origins if o != "*"),
            any_origin_reads="*" in server.cors_origins,
            hosts=frozenset(hosts),
            any_host="*" in server.allowed_hosts,
            max_connections=server.max_connections,
            max_per_peer=server.max_connections_per_peer,
        )

    def host_allowed(self, host: str | None) -> bool:
        """Whether a request with this ``Host`` header may be served (none: not a browser, allowed)."""
        if host is None or self.any_host:
            return True
        name = host_name(host)
        return name in self.hosts or _is_ip(name) or name.endswith(".localhost")

    def origin_allowed(self, request: web.Request, origin: str, method: str) -> bool:
        """Whether a browser page of ``origin`` may make this request (``method``: the one it will use)."""
        lowered = origin.lower()
        if lowered == "null":  # sandboxed frames, file: pages, some redirects: never trusted
            return False
        if lowered in self.origins:
            return True
        if _netloc(lowered) == request.headers.get("Host", "").lower():
            return True  # same origin; the Host check has vouched for the name
        is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
        return self.any_origin_reads and method in SAFE_METHODS and not is_ws

    def token_for(self, request: web.Request) -> str | None:
        """The token guarding the route this request matched (the shared one for an unrouted path)."""
        resource = request.match_info.route.resource
        surface = request.app.get(ROUTE_SURFACES, {}).get(resource.canonical) if resource is not None else None
        return self.shared_token if surface is None else self.tokens[surface]


def _refuse(status: int, error: str, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": error, "message": message}, status=status, headers=headers or None)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _is_public(path: str) -> bool:
    return path in _PUBLIC_PATHS or (path.startswith(_PUBLIC_PREFIXES) and "/.." not in path)


def _with_cors(resp: web.StreamResponse, origin: str | None) -> web.StreamResponse:
    if origin is not None and not resp.prepared:
        resp.headers["Access-Control-Allow-Origin"] = origin
        resp.headers["Vary"] = "Origin"
    return resp


def security_middleware(settings: Settings | ServerSettings) -> Middleware:
    """The Host, Origin, body, token and connection-limit rules (module docstring) in one middleware."""
    policy = Policy.from_settings(settings if isinstance(settings, Settings) else Settings(server=settings))
    per_peer: dict[str, int] = {}  # open WebSockets by peer address (this application's)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.headers.get("Host")
        if not policy.host_allowed(host):
            return _refuse(
                403,
                "host_not_allowed",
                f"Host {host!r} is not a name of this box: add it to server.allowed_hosts",
            )
        origin = request.headers.get("Origin")
        method = request.method
        preflight = method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        if preflight:
            asked = request.headers["Access-Control-Request-Method"].upper()
            if origin is None or not policy.origin_allowed(request, origin, asked):
                return _refuse(403, "origin_not_allowed", f"origin {origin} is not in server.cors_origins")
            resp: web.StreamResponse = web.Response(status=204)
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            resp.headers["Access-Control-Max-Age"] = "600"
            return _with_cors(resp, origin)
        cors = origin is not None and policy.origin_allowed(request, origin, method)
        is_ws = request.headers.get("Upgrade", "").lower() == "websocket"
        if origin is not None and not cors and (is_ws or method not in SAFE_METHODS):
            what = "open a WebSocket" if is_ws else f"send {method} requests"
            return _refuse(
                403,
                "origin_not_allowed",
                f"origin {origin} may not {what} here: list it in server.cors_origins"
                + (' ("*" covers reads only)' if policy.any_origin_reads else ""),
            )
        if method not in SAFE_METHODS:
            content_type = request.headers.get("Content-Type")
            if request.body_exists and not _is_json(content_type or ""):
                return _with_cors(
                    _refuse(
                        415,
                        "unsupported_media_type",
                        f"{method} bodies must be application/json (or empty), got {content_type or 'no Content-Type'}",
                    ),
                    origin if cors else None,
                )
        token = None if _is_public(request.path) else policy.token_for(request)
        if token is not None:
            presented = request_token(request)
            try:
                presented_bytes = None if presented is None else presented.encode("utf-8")
            except UnicodeEncodeError:  # aiohttp keeps undecodable header bytes as surrogates
                return _with_cors(
                    _refuse(400, "bad_authorization", "the bearer token is not UTF-8 text"), origin if cors else None
                )
            if presented_bytes is None or not hmac.compare_digest(presented_bytes, token.encode("utf-8")):
                return _with_cors(
                    _refuse(
                        401,
                        "unauthorized",
                        "missing or wrong bearer token (Authorization header or ?token=)",
                        **{"WWW-Authenticate": 'Bearer realm="edgevoice"'},
                    ),
                    origin if cors else None,
                )
        if not is_ws:
            return _with_cors(await handler(request), origin if cors else None)
        if len(request.app[WEBSOCKETS]) >= policy.max_connections:
            return _refuse(503, "too_many_connections", f"server.max_connections ({policy.max_connections}) reached")
        peer = request.remote or "?"
        if per_peer.get(peer, 0) >= policy.max_per_peer:
            return _refuse(
                503,
                "too_many_connections",
                f"server.max_connections_per_peer ({policy.max_per_peer}) WebSockets are open from {peer}",
            )
        per_peer[peer] = per_peer.get(peer, 0) + 1
        try:
            resp = await handler(request)  # a WebSocket handler returns when its connection ends
        finally:
            per_peer[peer] -= 1
            if not per_peer[peer]:
                del per_peer[peer]
        return _with_cors(resp, origin if cors else None)

    return middleware


def set_surface(app: web.Application, route: web.AbstractRoute, surface: Surface) -> None:
    """Put ``route`` on a token surface other than its component's (before the composition root assigns one)."""
    if ROUTE_SURFACES not in app:
        app[ROUTE_SURFACES] = {}
    assert route.resource is not None
    app[ROUTE_SURFACES][route.resource.canonical] = surface


def warn_if_exposed(settings: Settings) -> None:
    """Log, at every start, what anyone on the LAN can reach without a token (server.allow_insecure_lan)."""
    server = settings.server
    if is_loopback_host(server.host):
        return
    open_surfaces = server.open_lan_surfaces()
    if open_surfaces:
        log.warning(
            "INSECURE: server.allow_insecure_lan is on and %s listens on %s:%d with %s open to anyone on the LAN "
            "(no token): they can read transcripts, forge customer events and unbind seats; set server.token_file",
            "edgevoice",
            server.host,
            server.port,
            ", ".join(open_surfaces),
        )
    if server.tls_cert is None:
        log.info("listening beyond loopback without TLS: tokens and transcripts cross the LAN in clear text")


def ssl_context(server: ServerSettings) -> ssl.SSLContext | None:
    """A server TLS context from ``tls_cert``/``tls_key``, or None for plain HTTP."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(server.tls_cert), str(server.tls_key))
    return ctx
