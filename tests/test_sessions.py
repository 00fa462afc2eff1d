"""Customer session bookkeeping: bindings, bounded transcript, at-most-once events, end and cleanup."""

from __future__ import annotations

import gc
import tracemalloc

from edgevoice.events.sessions import BoundedText, CustomerSession, SessionRegistry

S = "restaurant_table_05_evening"


def test_events_fire_at_most_once_per_customer_session() -> None:
    reg = SessionRegistry()
    a = reg.attach(S, "customer_a", "mic1")
    assert a.fire(["SAY_HELLO"]) == ["SAY_HELLO"]
    assert a.fire(["SAY_SORRY", "SAY_HELLO"]) == ["SAY_SORRY"]
    assert a.fire(["SAY_HELLO", "SAY_SORRY"]) == []
    assert a.claimed == ["SAY_HELLO", "SAY_SORRY"]
    assert a.fired == [] and a.unaccepted == ["SAY_HELLO", "SAY_SORRY"]  # fired = accepted by the event queue
    reg.accepted(a, "SAY_SORRY", "ev-2")
    assert a.fired == ["SAY_SORRY"] and a.unaccepted == ["SAY_HELLO"]
    assert a.fire(["SAY_HELLO"]) == []  # still waiting for the queue: never claimed twice


def test_session_ends_with_the_last_stream_and_is_dropped() -> None:
    reg = SessionRegistry()
    a = reg.attach(S, "customer_a", "mic1")
    assert reg.attach(S, "customer_a", "mic2") is a
    a.add_final("xin chào các bạn")
    a.add_final("  ")
    a.add_final("xin lỗi")
    assert reg.detach(S, "customer_a", "mic1") is None
    assert reg.get(S, "customer_a") is a
    ended = reg.detach(S, "customer_a", "mic2")
    assert ended is a and ended.ended
    assert ended.transcript == "xin chào các bạn xin lỗi"
    assert reg.get(S, "customer_a") is None and len(reg) == 0
    assert ended.fire(["SAY_HELLO"]) == []  # nothing fires after the end
    assert reg.detach(S, "customer_a", "mic2") is None  # a second stop ends nothing


def test_a_new_start_after_the_end_is_a_new_customer_session() -> None:
    reg = SessionRegistry()
    first = reg.attach(S, "customer_a", "mic1")
    first.fire(["SAY_HELLO"])
    reg.detach(S, "customer_a", "mic1")
    second = reg.attach(S, "customer_a", "mic1")
    assert second is not first
    assert second.fire(["SAY_HELLO"]) == ["SAY_HELLO"]


def test_customers_are_independent() -> None:
    reg = SessionRegistry()
    a = reg.attach(S, "customer_nguyen_van_a", "seat1")
    b = reg.attach(S, "customer_tran_thi_b", "seat2")
    c = reg.attach(S, "customer_le_van_c", "seat3")
    other_visit = reg.attach("table_06", "customer_nguyen_van_a", "seat9")
    assert len({id(x) for x in (a, b, c, other_visit)}) == 4
    assert a.fire(["SAY_HELLO", "SAY_SORRY"]) == ["SAY_HELLO", "SAY_SORRY"]
    assert b.fire(["SAY_HELLO"]) == ["SAY_HELLO"]
    assert other_visit.fire(["SAY_HELLO"]) == ["SAY_HELLO"]
    ended = [reg.detach(S, cid, sid) for cid, sid in (("customer_le_van_c", "seat3"), ("customer_tran_thi_b", "seat2"))]
    assert [e.customer_id for e in ended if e] == ["customer_le_van_c", "customer_tran_thi_b"]
    assert c.fired == []
    assert len(reg) == 2


def test_no_leak_after_thousands_of_sessions() -> None:
    reg = SessionRegistry()

    def cycle(n: int) -> None:
        for i in range(n):
            s = reg.attach(f"visit_{i}", f"customer_{i}", f"mic_{i % 7}")
            reg.attach(f"visit_{i}", f"customer_{i}", f"cam_{i % 7}")
            s.add_final("xin chào " * 20)
            s.fire(["SAY_HELLO", "SAY_SORRY"])
            reg.detach(f"visit_{i}", f"customer_{i}", f"mic_{i % 7}")
            assert reg.detach(f"visit_{i}", f"customer_{i}", f"cam_{i % 7}") is s

    cycle(500)  # warm up interned strings and allocator pools
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cycle(5000)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(reg) == 0
    assert grown < 64 * 1024, f"registry grew by {grown} bytes over 5000 sessions"


def test_a_journal_sees_begin_fired_and_end() -> None:
    """The hook for persisting sessions: begin, each event once the queue accepted it, end."""
    seen: list[tuple[str, ...]] = []

    class Journal:
        def began(self, session: CustomerSession) -> None:
            seen.append(("began", session.customer_id))

        def fired(self, session: CustomerSession, event: str, event_id: str) -> None:
            seen.append(("fired", session.customer_id, event, event_id))

        def ended(self, session: CustomerSession) -> None:
            seen.append(("ended", session.customer_id))

    reg = SessionRegistry(journal=Journal())
    a = reg.attach(S, "customer_a", "seat1#1")
    reg.attach(S, "customer_a", "seat1#2")  # rebound to the same seat while the first binding ends
    a.fire(["SAY_HELLO"])
    assert seen == [("began", "customer_a")]
    reg.accepted(a, "SAY_HELLO", "ev-1")
    reg.accepted(a, "SAY_HELLO", "ev-1")  # reported once
    assert reg.detach(S, "customer_a", "seat1#1") is None
    assert reg.detach(S, "customer_a", "seat1#1") is None  # the same binding twice ends nothing
    assert reg.detach(S, "customer_a", "seat1#2") is a
    assert seen == [("began", "customer_a"), ("fired", "customer_a", "SAY_HELLO", "ev-1"), ("ended", "customer_a")]


def test_bounded_text_keeps_the_newest_within_the_limit() -> None:
    t = BoundedText(limit=25)
    t.add("hello there")
    t.add("  ")
    t.add("good evening")
    assert str(t) == "hello there good evening" and t.dropped_chars == 0
    t.add("menu please")
    assert str(t) == "… good evening menu please" and len(t) <= 25
    assert t.dropped_chars == len("hello there")
    t.add("x" * 40)  # longer than the limit alone: its end is kept
    assert str(t) == "… " + "x" * 25 and len(t) == 25


def test_a_session_transcript_is_capped() -> None:
    reg = SessionRegistry(max_chars=1000)
    a = reg.attach(S, "customer_a", "seat1#1")
    for i in range(10_000):
        a.add_final(f"sentence number {i} of a very long dinner")
    assert len(a.text) <= 1000 and a.transcript.startswith("… ")
    assert a.transcript.endswith("sentence number 9999 of a very long dinner")
