"""Customer sessions: per (session_id, customer_id), its bindings to streams, its transcript, its events.

Pure bookkeeping, no I/O: the hub calls it on the event loop. A customer session
begins with its first binding (a stream opened with the customer's ids, or a mic seat
bound to it) and ends when its last binding detaches; it is then removed, so the
registry holds only customers with an open binding. Bounds: the transcript keeps at
most ``sessions.max_transcript_chars`` characters (:class:`BoundedText`); the events
list holds each configured event at most once.

An event's life in a session: :meth:`CustomerSession.fire` claims it (it never fires
twice in the session), :meth:`SessionRegistry.accepted` marks it *fired* once the event
queue has it on disk. A :class:`SessionJournal` sees every begin, fired event and end:
the hook through which open sessions and fired keywords can be persisted, so that a
restart after a crash can end or resume them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

CustomerKey = tuple[str, str]
"""(session_id, customer_id)."""

DEFAULT_MAX_CHARS = 20_000
"""sessions.max_transcript_chars' default."""
ELLIPSIS = "…"


class BoundedText:
    """Final texts joined by spaces, at most ``limit`` characters: the oldest parts are dropped first.

    When anything was dropped the text starts with "…" (counted in :attr:`dropped_chars`).
    """

    __slots__ = ("_chars", "_parts", "dropped_chars", "limit")

    def __init__(self, limit: int = DEFAULT_MAX_CHARS) -> None:
        self.limit = limit
        self._parts: deque[str] = deque()
        self._chars = 0
        self.dropped_chars = 0

    def add(self, text: str) -> None:
        text = text.strip()
        if not text:
            return
        if len(text) > self.limit:
            self.dropped_chars += len(text) - self.limit
            text = text[-self.limit :]
        self._parts.append(text)
        self._chars += len(text) + 1
        while self._chars - 1 > self.limit:
            gone = self._parts.popleft()
            self._chars -= len(gone) + 1
            self.dropped_chars += len(gone)

    def __str__(self) -> str:
        joined = " ".join(self._parts)
        return f"{ELLIPSIS} {joined}" if self.dropped_chars else joined

    def __len__(self) -> int:
        """Characters kept (without the "…" marker)."""
        return max(0, self._chars - 1)


@dataclass(eq=False, slots=True)
class CustomerSession:
    """One customer within one visit."""

    session_id: str
    customer_id: str
    max_chars: int = DEFAULT_MAX_CHARS
    bindings: set[str] = field(default_factory=set)
    """Tokens of the customer's open bindings (one per stream binding)."""
    text: BoundedText = field(init=False)
    claimed: list[str] = field(default_factory=list)
    """Events fired in this session, in order: each at most once (handed to the event queue, or waiting for it)."""
    fired: list[str] = field(default_factory=list)
    """The claimed events the event queue has accepted (on disk), in acceptance order."""
    started: float = field(default_factory=time.time)
    ended: bool = False
    resumed: bool = False
    """Continued from the last run (open at a crash): its earlier keywords are in ``fired``."""

    def __post_init__(self) -> None:
        self.text = BoundedText(self.max_chars)

    @property
    def key(self) -> CustomerKey:
        return (self.session_id, self.customer_id)

    @property
    def transcript(self) -> str:
        """The customer's final text, in arrival order (the oldest dropped beyond ``max_chars``)."""
        return str(self.text)

    def add_final(self, text: str) -> None:
        self.text.add(text)

    def fire(self, events: Iterable[str]) -> list[str]:
        """The events not fired before in this customer session, now claimed (at most once each)."""
        new: list[str] = []
        if self.ended:
            return new
        for event in events:
            if event not in self.claimed:
                self.claimed.append(event)
                new.append(event)
        return new

    @property
    def unaccepted(self) -> list[str]:
        """Claimed events the queue has not accepted yet."""
        return [e for e in self.claimed if e not in self.fired]


class SessionJournal(Protocol):
    """Sees every change worth persisting (called on the loop, in order; must not block)."""

    def began(self, session: CustomerSession) -> None:
        """A customer session began."""

    def fired(self, session: CustomerSession, event: str, event_id: str) -> None:
        """The queue accepted ``event`` (as ``event_id``) for the session."""

    def ended(self, session: CustomerSession) -> None:
        """The session ended (its SESSION_END is being submitted)."""


class SessionRegistry:
    """Every customer session with at least one open binding."""

    def __init__(
        self,
        max_chars: int = DEFAULT_MAX_CHARS,
        journal: SessionJournal | None = None,
        resume: dict[CustomerKey, frozenset[str]] | None = None,
    ) -> None:
        self.max_chars = max_chars
        self.journal = journal
        self.resumable: dict[CustomerKey, frozenset[str]] = dict(resume or {})
        """Sessions open when the daemon last stopped (a crash) -> the keywords they had fired: a binding with
        their ids resumes them (those keywords do not fire again)."""
        self._sessions: dict[CustomerKey, CustomerSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str, customer_id: str) -> CustomerSession | None:
        return self._sessions.get((session_id, customer_id))

    def all(self) -> list[CustomerSession]:
        return list(self._sessions.values())

    def attach(self, session_id: str, customer_id: str, token: str) -> CustomerSession:
        """Add a binding (``token``, unique per binding) to the customer's session, beginning it if new."""
        key = (session_id, customer_id)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = CustomerSession(session_id, customer_id, self.max_chars)
            fired = self.resumable.pop(key, None)
            if fired is not None:
                session.claimed = sorted(fired)
                session.fired = sorted(fired)
                session.resumed = True
            if self.journal is not None:
                self.journal.began(session)
        session.bindings.add(token)
        return session

    def detach(self, session_id: str, customer_id: str, token: str) -> CustomerSession | None:
        """Remove a binding; when it was the customer's last, end and drop the session and return it."""
        key = (session_id, customer_id)
        session = self._sessions.get(key)
        if session is None or token not in session.bindings:
            return None
        session.bindings.discard(token)
        if session.bindings:
            return None
        del self._sessions[key]
        session.ended = True
        if self.journal is not None:
            self.journal.ended(session)
        return session

    def accepted(self, session: CustomerSession, event: str, event_id: str) -> None:
        """The queue accepted a claimed event: it is fired now."""
        if event in session.claimed and event not in session.fired:
            session.fired.append(event)
            if self.journal is not None:
                self.journal.fired(session, event, event_id)
