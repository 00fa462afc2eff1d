"""``GET /health``: the FunVoiceChat document's shape plus each component's section."""

from __future__ import annotations

from aiohttp import web

from edgevoice.server.keys import HEALTH_CHECKS, HEALTH_DEGRADED, HEALTH_SECTIONS


async def get_health(request: web.Request) -> web.Response:
    """200 ``healthy``, or 503 ``degraded`` (with ``reasons`` when a component gives them)."""
    app = request.app
    reasons = [r for check in app.get(HEALTH_DEGRADED, []) if (r := check())]
    healthy = all(check() for check in app[HEALTH_CHECKS]) and not reasons
    body: dict[str, object] = {"status": "healthy" if healthy else "degraded"}
    if reasons:
        body["reasons"] = reasons
    for name, section in app[HEALTH_SECTIONS].items():
        body[name] = section()
    return web.json_response(body, status=200 if healthy else 503)


def setup(app: web.Application) -> None:
    app.router.add_get("/health", get_health)
