"""Durable delivery of experience events: disk spool and HTTP sender."""

from __future__ import annotations

from aiohttp import web


def setup(app: web.Application) -> None:
    """Placeholder until the spool lands."""
