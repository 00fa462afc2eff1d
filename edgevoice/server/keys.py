"""Application keys shared by every component (aiohttp ``web.AppKey``; no globals)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from edgevoice.config import Settings, Surface
from edgevoice.systemd import Notifier

SETTINGS = web.AppKey("settings", Settings)
"""The validated configuration."""
NOTIFIER = web.AppKey("notifier", Notifier)
"""systemd notify channel (a no-op outside systemd)."""
HEALTH_SECTIONS = web.AppKey("health_sections", dict[str, Callable[[], Any]])
"""Extra sections of ``/health``: name -> callable returning JSON-able data."""
HEALTH_CHECKS = web.AppKey("health_checks", list[Callable[[], bool]])
"""Liveness checks; the watchdog ping is withheld while any returns False."""
HEALTH_DEGRADED = web.AppKey("health_degraded", list[Callable[[], str | None]])
"""Readiness: each returns why the daemon works only in part (or None); ``/health`` answers 503 with the reasons.
Unlike HEALTH_CHECKS it keeps the watchdog ping (a restart would not help). Optional: components ``setdefault`` it."""
WEBSOCKETS = web.AppKey("websockets", set[web.WebSocketResponse[bool]])
"""Every open WebSocket, closed on shutdown and counted against server.max_connections."""
ROUTE_SURFACES = web.AppKey("route_surfaces", dict[str, Surface])
"""Route (a resource's canonical path) -> the surface whose token guards it; filled by the composition root."""
