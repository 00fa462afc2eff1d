"""``GET /health``: the FunVoiceChat document's shape plus each component's section."""

from __future__ import annotations

from aiohttp import web

from edgevoice.server.keys import HEALTH_CHECKS, HEALTH_SECTIONS


async def get_health(request: web.Request) -> web.Response:
    app = request.app
    body: dict[str, object] = {"status": "healthy" if all(check() for check in app[HEALTH_CHECKS]) else "degraded"}
    for name, section in app[HEALTH_SECTIONS].items():
        body[name] = section()
    return web.json_response(body)


def setup(app: web.Application) -> None:
    app.router.add_get("/health", get_health)
