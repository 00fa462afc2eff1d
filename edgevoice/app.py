"""The composition root: the one module that knows every component and wires them into the web kernel.

:data:`COMPONENTS` is the start-up order, **providers before consumers**: a
component's ``setup(app)`` may use what a component before it put in the
application (an app key, a health section, a subscription), never what one after
it provides. aiohttp enters the cleanup contexts in this order and leaves them in
reverse, so a provider outlives its consumers: the hub stops (flushing every
stream, firing SESSION_END) before the spool closes. The shutdown phases
(:mod:`edgevoice.server.lifecycle`) follow the same rule: a phase's hooks run
consumers first, so in ``drain`` the hub commits its events before delivery stops.
Nothing imports this module but the process (:mod:`edgevoice.daemon`) and tests.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from edgevoice import dashboard, delivery, funvoice, recognition
from edgevoice.config import Settings, Surface
from edgevoice.events import hub
from edgevoice.server import health
from edgevoice.server.kernel import new_app
from edgevoice.server.keys import ROUTE_SURFACES
from edgevoice.server.lifecycle import LIFECYCLE, Phase
from edgevoice.sources import mic, multicam, seats
from edgevoice.systemd import Notifier

Setup = Callable[[web.Application], None]


def _delivery(app: web.Application) -> None:
    """The event queue; in the shutdown's ``drain`` (after the hub committed its events) the sender stops."""
    delivery.setup(app)
    from edgevoice.delivery.service import DELIVERY

    service = app[DELIVERY]

    async def stop_sending() -> str:
        await service.close()
        return "sender stopped, spool committed and closed"

    app[LIFECYCLE].on(Phase.DRAIN, "delivery", stop_sending)


COMPONENTS: tuple[tuple[str, Setup], ...] = (
    # Beside the data flow; first so that /health leads with the FunVoiceChat document's sections, in its order.
    ("funvoice", funvoice.setup),
    # Provides app[EVENT_QUEUE]: up before anything can fire an event, closed after the last one.
    ("delivery", _delivery),
    # Provides app[RECOGNIZER].
    ("recognition", recognition.setup),
    # Consumes the recognizer and the event queue; provides app[STREAM_HUB], where every source opens its streams.
    ("events", hub.setup),
    # The audio sources: LAN clients over /asr-multicam, then the local microphone arrays (one stream per seat).
    ("multicam", multicam.setup),
    ("mic", mic.setup),
    # Consumes app[MIC_CAPTURE] and the hub: the POS binds customers to mic seats.
    ("seats", seats.setup),
    # /health: every section the components above registered.
    ("health", health.setup),
    # Last: its feed subscribes to the hub and the event queue.
    ("dashboard", dashboard.setup),
)


SURFACES: dict[str, Surface] = {
    "funvoice": "funvoice",
    "multicam": "multicam",
    "seats": "seats",
    "health": "funvoice",  # the FunVoiceChat front ends read /health
    "dashboard": "dashboard",  # /metrics is put on the metrics surface by the dashboard itself
}
"""The token surface (docs/security.md) of the routes each component adds, unless the component names its own."""


def build_app(settings: Settings, notifier: Notifier | None = None) -> web.Application:
    """The daemon's application: the web kernel with every component of :data:`COMPONENTS`, in order.

    Every route lands on a token surface (:data:`SURFACES`, or the component's own choice in
    ``app[ROUTE_SURFACES]``); a component that adds a route without one is a programming error.
    """
    app = new_app(settings, notifier)
    surfaces = app[ROUTE_SURFACES]
    for name, setup in COMPONENTS:
        known = len(app.router.resources())
        setup(app)
        for resource in list(app.router.resources())[known:]:
            if resource.canonical not in surfaces:
                if name not in SURFACES:
                    raise RuntimeError(f"component {name} added {resource.canonical} but has no token surface")
                surfaces[resource.canonical] = SURFACES[name]
    return app


def reload(app: web.Application, settings: Settings) -> None:
    """Apply what may change while the daemon runs (the keyword rules); everything else needs a restart."""
    app[hub.STREAM_HUB].reload_keywords(settings.keywords)
