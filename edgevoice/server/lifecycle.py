"""Shutdown phases: components say what they do in each; the daemon runs the phases in order, each within its budget.

Runs on the event loop, at shutdown only. The phases, in data-flow order (their
budgets are ``[shutdown]`` in the configuration; :mod:`edgevoice.daemon` runs them):

1. ``stop_accepting``: the listening sockets close; new WebSocket upgrades on kept-alive
   connections are refused (503 ``shutting_down``), and so are new streams and bindings;
2. ``flush``: every recognition stream recognizes what it received (last finals, keywords);
3. ``end_sessions``: every stream ends, ``SESSION_END`` fires for every open customer;
4. ``drain``: every fired event is committed to the spool, then the sender stops;
5. ``close``: every WebSocket gets a close frame; one that does not finish its close
   handshake in time (a client that stopped reading) has its connection aborted;
6. ``stop``: not a hook phase; aiohttp's cleanup (every component's cleanup context).

A hook is an async callable returning a short account of what it did (logged) or None.
The hooks of one phase run one after another in **reverse registration order**, like
cleanup contexts: a consumer (registered later) before its provider, so the hub commits
its events before delivery closes the spool. Bounds: one :class:`Lifecycle` per
application, a handful of hooks; the set of open upgrade connections is bounded by
``server.max_connections``.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web


class Phase(enum.Enum):
    """The shutdown phases with hooks, in the order they run."""

    STOP_ACCEPTING = "stop_accepting"
    FLUSH = "flush"
    END_SESSIONS = "end_sessions"
    DRAIN = "drain"
    CLOSE = "close"


Hook = Callable[[], Awaitable[str | None]]
"""What a component does in a phase; returns an account for the log (or None)."""


@dataclass(frozen=True, slots=True)
class Registered:
    """A hook with the name it is logged under."""

    name: str
    hook: Hook


class Lifecycle:
    """The application's shutdown state and phase hooks."""

    def __init__(self) -> None:
        self.stopping = False
        """Set when the shutdown begins (stop_accepting): refuse whatever would open something new."""
        self.upgrades: set[asyncio.Transport] = set()
        """Connections of WebSocket upgrade requests whose handler still runs (aborted in ``close`` if need be)."""
        self._hooks: dict[Phase, list[Registered]] = {phase: [] for phase in Phase}

    def on(self, phase: Phase, name: str, hook: Hook) -> None:
        """Run ``hook`` in ``phase`` (before the hooks registered earlier)."""
        self._hooks[phase].append(Registered(name, hook))

    def hooks(self, phase: Phase) -> list[Registered]:
        """The hooks of ``phase`` in the order they run."""
        return list(reversed(self._hooks[phase]))


LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
"""The application's shutdown phases."""
