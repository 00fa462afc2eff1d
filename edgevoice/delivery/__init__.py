"""Durable delivery of experience events: disk spool and HTTP sender.

``setup(app)`` puts a :class:`~edgevoice.delivery.service.DeliveryService` at
``app[EVENT_QUEUE]`` (and ``app[DELIVERY]``); its cleanup context opens the
spool in the state directory, runs the sender while the daemon runs, and
commits and closes the spool last (after every component that may still fire
events). Nothing heavy is imported here, so ``edgevoice spool …`` starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from aiohttp import web


def setup(app: web.Application) -> None:
    """Create the event queue now; open the spool and start sending at application start-up."""
    from edgevoice.delivery.service import setup_app

    setup_app(app)
