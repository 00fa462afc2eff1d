"""Customer sessions: per (session_id, customer_id), its open streams, its transcript, the events already fired.

Pure bookkeeping, no I/O: the hub calls it on the event loop. A customer session
begins with its first stream and ends when its last stream detaches; it is then
removed, so the registry holds only customers with an open stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

CustomerKey = tuple[str, str]
"""(session_id, customer_id)."""


@dataclass(eq=False, slots=True)
class CustomerSession:
    """One customer within one visit."""

    session_id: str
    customer_id: str
    streams: set[str] = field(default_factory=set)
    parts: list[str] = field(default_factory=list)
    fired: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    ended: bool = False

    @property
    def key(self) -> CustomerKey:
        return (self.session_id, self.customer_id)

    @property
    def transcript(self) -> str:
        """Every final text of the customer's streams, in arrival order."""
        return " ".join(self.parts)

    def add_final(self, text: str) -> None:
        text = text.strip()
        if text:
            self.parts.append(text)

    def fire(self, events: Iterable[str]) -> list[str]:
        """The events not fired before in this customer session, now marked fired (at most once each)."""
        new: list[str] = []
        if self.ended:
            return new
        for event in events:
            if event not in self.fired:
                self.fired.append(event)
                new.append(event)
        return new


class SessionRegistry:
    """Every customer session with at least one open stream."""

    def __init__(self) -> None:
        self._sessions: dict[CustomerKey, CustomerSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str, customer_id: str) -> CustomerSession | None:
        return self._sessions.get((session_id, customer_id))

    def all(self) -> list[CustomerSession]:
        return list(self._sessions.values())

    def attach(self, session_id: str, customer_id: str, stream_id: str) -> CustomerSession:
        """Add a stream to the customer's session, beginning the session if it is new."""
        key = (session_id, customer_id)
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = CustomerSession(session_id, customer_id)
        session.streams.add(stream_id)
        return session

    def detach(self, session_id: str, customer_id: str, stream_id: str) -> CustomerSession | None:
        """Remove a stream; when it was the customer's last, end and drop the session and return it."""
        key = (session_id, customer_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        session.streams.discard(stream_id)
        if session.streams:
            return None
        del self._sessions[key]
        session.ended = True
        return session
