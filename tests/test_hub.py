"""The stream hub in process, on the real recognizer, the real spool and sender and a real HTTP receiver.

Seat bindings attributed by audio time, events retried when the spool refuses them,
bounded text on long-lived streams, refusals once the shutdown began.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from edgevoice.config import AsrSettings, EventsSettings, SessionSettings, Settings, StateSettings
from edgevoice.delivery.service import DeliveryService
from edgevoice.events.hub import Binding, HubStream, StreamError, StreamHub
from edgevoice.events.sessions import SessionRegistry
from edgevoice.metrics import Metrics
from edgevoice.recognition.recognizer import WhisperRecognizer
from edgevoice.recognition.types import Transcript, Word
from edgevoice.server.kernel import new_app
from edgevoice.server.lifecycle import LIFECYCLE
from tests.support.receiver import Receiver
from tests.support.speech import have_espeak, silence, synth

MODELS = Path(os.environ.get("EDGEVOICE_TEST_MODELS", Path(tempfile.gettempdir()) / "edgevoice-models"))
S = "restaurant_table_05_evening"


@pytest.fixture(scope="module")
def recognizer() -> Iterator[WhisperRecognizer]:
    rec = WhisperRecognizer.load(AsrSettings(cpu_threads=2), MODELS, Metrics())
    rec.start()
    yield rec
    rec.stop()


@contextlib.asynccontextmanager
async def delivery(state: Path, url: str | None, **events: Any) -> AsyncIterator[DeliveryService]:
    """The real event queue: spool in ``state``, sender to ``url`` retrying fast."""
    service = DeliveryService(EventsSettings(url=url, retry_base_s=0.05, retry_cap_s=0.2, **events), state)
    await service.start()
    try:
        yield service
    finally:
        await service.close()


def make_hub(recognizer: WhisperRecognizer, queue: DeliveryService | None, **sessions: Any) -> StreamHub:
    hub = StreamHub(Settings(sessions=SessionSettings(**sessions)), recognizer, queue, Metrics())
    if queue is not None:
        queue.subscribe(hub.on_delivery)
    hub.events.retry_base_s, hub.events.retry_cap_s = 0.05, 0.2
    return hub


def feed(stream: HubStream, audio: np.ndarray, chunk: int = 1600) -> None:
    for i in range(0, len(audio), chunk):
        stream.feed(audio[i : i + chunk])


def final(stream_id: str, text: str, start: float = 0.0, end: float = 1.0) -> Transcript:
    return Transcript(stream_id=stream_id, text=text, final=True, start=start, end=end)


@pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
async def test_a_seat_rebound_mid_sentence_credits_the_last_words_to_the_old_customer(
    recognizer: WhisperRecognizer, receiver: Receiver, tmp_path: Path
) -> None:
    """Unbound while the sentence is still being recognized, rebound at once: the sentence is the old customer's."""
    async with delivery(tmp_path, receiver.url) as queue:
        hub = make_hub(recognizer, queue)
        seat = hub.open_stream("seat_1", source="mic")
        hub.bind("seat_1", S, "cust_a")
        # The sentence without the pause that ends it: its final cannot be out before the unbind.
        feed(seat, np.concatenate([silence(0.5), synth("Hello, can I see the menu please?")]))
        unbinding = asyncio.ensure_future(hub.unbind("seat_1"))
        await asyncio.sleep(0)
        hub.bind("seat_1", S, "cust_b")  # the next customer sits down at once
        assert seat.customer_id == "cust_b"
        feed(seat, silence(1.5))  # the pause: now the sentence is final
        ended = await asyncio.wait_for(unbinding, 60)
        assert ended is not None and ended.customer_id == "cust_a" and ended.ended
        assert "menu" in ended.transcript.lower(), ended.transcript
        b = seat.customer
        assert b is not None and b.transcript == ""
        await hub.unbind("seat_1")
        await hub.stop_all()
        await receiver.until_accepted(3, timeout=30)
    assert receiver.events("cust_a") == ["SAY_HELLO", "SESSION_END"]
    assert receiver.events("cust_b") == ["SESSION_END"]


@pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
async def test_recognized_returns_once_the_finals_before_a_sample_are_out(recognizer: WhisperRecognizer) -> None:
    """The recognition side of the handover: RecognitionStream.recognized(sample)."""
    got: list[Transcript] = []
    stream = recognizer.open_stream("rec_1", language=None, on_transcript=got.append)
    speech = np.concatenate([silence(0.5), synth("Could we have some water please?")])
    for i in range(0, len(speech), 1600):
        stream.feed(speech[i : i + 1600])
    waiting = asyncio.ensure_future(stream.recognized(len(speech)))
    await asyncio.sleep(1.0)
    assert not waiting.done()  # the sentence has not ended: its final cannot be out
    stream.feed(silence(1.5))
    await asyncio.wait_for(waiting, 60)
    finals = [t for t in got if t.final]
    assert finals and "water" in " ".join(t.text for t in finals).lower()
    await asyncio.wait_for(stream.recognized(len(speech)), 5)  # already there: at once
    later = asyncio.ensure_future(stream.recognized(10 * len(speech)))  # audio that never comes
    await asyncio.sleep(0.5)
    assert not later.done()
    stream.close()  # a closed stream releases every waiter
    await asyncio.wait_for(later, 5)


def test_a_final_across_the_unbind_point_is_split_by_word_time() -> None:
    reg = SessionRegistry()
    a, b = reg.attach(S, "cust_a", "seat#1"), reg.attach(S, "cust_b", "seat#2")
    seat = HubStream("seat", "mic", None, None, max_chars=1000, audio_seconds=Metrics().audio_seconds.labels("mic"),
                     on_stop=lambda s: asyncio.sleep(0, ""))  # fmt: skip
    seat.bindings = [Binding(a, "seat#1", 0, 32000), Binding(b, "seat#2", 32000)]  # the seat changed hands at 2 s
    words = (Word("Thank", 1.2, 1.5), Word("you.", 1.5, 1.9), Word("Hello", 2.3, 2.7), Word("there.", 2.7, 3.0))
    t = Transcript("seat", "Thank you. Hello there.", True, 1.2, 3.0, words=words)
    assert [(x.customer.customer_id if x else None, text) for x, text in seat.attribute(t)] == [
        ("cust_a", "Thank you."),
        ("cust_b", "Hello there."),
    ]
    # Without word times the final's start decides; audio while nobody was bound is nobody's.
    assert [x.customer.customer_id if x else None for x, _ in seat.attribute(final("seat", "Hi.", 0.5, 2.5))] == [
        "cust_a"
    ]
    seat.bindings = [Binding(b, "seat#2", 32000)]
    assert [x for x, _ in seat.attribute(final("seat", "Hi.", 0.5, 1.0))] == [None]


async def test_events_refused_by_a_full_spool_are_retried_in_order(
    recognizer: WhisperRecognizer, receiver: Receiver, tmp_path: Path
) -> None:
    """A keyword is fired (marked in the session) only once the queue took it; refusals are retried, in order."""
    receiver.respond("down")
    async with delivery(tmp_path, receiver.url, max_events=10) as queue:
        for i in range(10):  # the spool is full of events the API cannot take now
            await queue.submit(f"earlier_{i}", "SAY_HELLO")
        hub = make_hub(recognizer, queue)
        cam = hub.open_stream("cam_1", source="multicam", session_id=S, customer_id="cust_a")
        customer = cam.customer
        assert customer is not None
        hub._on_transcript(cam, final("cam_1", "Hello, can I see the menu please?"))
        hub._on_transcript(cam, final("cam_1", "I am so sorry about that."))
        deadline = time.monotonic() + 30
        while hub.events.failures < 2:  # both refused at least once
            assert time.monotonic() < deadline, "the spool never refused"
            await asyncio.sleep(0.02)
        assert customer.claimed == ["SAY_HELLO", "SAY_SORRY"] and customer.fired == []
        hub._on_transcript(cam, final("cam_1", "Hello again."))  # claimed already: not fired twice
        stopping = asyncio.ensure_future(cam.stop())
        await asyncio.sleep(0.2)
        assert len(hub.events) == 3  # SESSION_END waits behind the customer's keywords
        receiver.respond(200)  # the API is back: the spool empties and takes the retried events
        await asyncio.wait_for(stopping, 60)
        await asyncio.wait_for(hub.drain(), 60)
        assert customer.fired == ["SAY_HELLO", "SAY_SORRY"]
        await receiver.until_accepted(13, timeout=60)
    assert receiver.events("cust_a") == ["SAY_HELLO", "SAY_SORRY", "SESSION_END"]
    assert hub.health()["submit_failures"] >= 2


async def test_a_long_lived_seat_keeps_bounded_text(recognizer: WhisperRecognizer) -> None:
    """Finals of a seat that runs for weeks: the stream and the customer keep at most max_transcript_chars."""
    hub = make_hub(recognizer, None, max_transcript_chars=2000)
    seat = hub.open_stream("seat_1", source="mic")
    hub.bind("seat_1", S, "cust_a")
    customer = seat.customer
    assert customer is not None

    def talk(n: int, offset: int = 0) -> None:
        for i in range(offset, offset + n):
            hub._on_transcript(seat, final("seat_1", f"Could we have some more water for table {i}, thanks?"))

    talk(2000)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    talk(5000, 2000)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(seat.transcript) <= 2000 + 2 and len(customer.transcript) <= 2000 + 2
    assert seat.transcript.startswith("… ") and seat.transcript.endswith("table 6999, thanks?")
    assert grown < 256 * 1024, f"the hub grew by {grown} bytes over 5000 finals"
    await hub.stop_all()


async def test_once_stopping_new_streams_bindings_and_upgrades_are_refused(
    recognizer: WhisperRecognizer, aiohttp_client: Any, tmp_path: Path
) -> None:
    hub = make_hub(recognizer, None)
    seat = hub.open_stream("seat_1", source="mic")
    await hub.stop_accepting()
    with pytest.raises(StreamError) as exc:
        hub.open_stream("cam_2", source="multicam", session_id=S, customer_id="cust_a")
    assert exc.value.code == "shutting_down"
    with pytest.raises(StreamError) as exc:
        hub.bind("seat_1", S, "cust_a")
    assert exc.value.code == "shutting_down"
    await seat.stop()

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        return ws

    app = new_app(Settings(state=StateSettings(dir=tmp_path)))
    app.router.add_get("/ws", echo)
    client = await aiohttp_client(app)
    ws = await client.ws_connect("/ws")  # open before the shutdown: stays open
    app[LIFECYCLE].stopping = True
    r = await client.get("/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
    assert r.status == 503 and (await r.json())["error"] == "shutting_down"
    await ws.close()


def test_the_hub_gives_its_keyword_rules_to_the_recognizer(recognizer: WhisperRecognizer) -> None:
    """Finals near a keyword get the full window: the hub installs the rules' check in every engine,
    and SIGHUP's reload swaps it for the new rules' check."""
    from edgevoice.config import KeywordRule, KeywordSettings

    hub = make_hub(recognizer, None)
    check = recognizer.engine.check
    assert check is hub.matcher and check.doubt("Well, the lone air.", [], "en") == "near 'hello'"
    hub.reload_keywords(KeywordSettings(rules=[KeywordRule(event="ASK_BILL", phrases=["the bill"])]))
    check = recognizer.engine.check
    assert check is hub.matcher and check.doubt("Well, the lone air.", [], "en") == ""
    assert check.doubt("Can we have them bells?", [], "en") == "near 'the bill'"  # 2 edits: a match tolerates 1
    assert check.doubt("Can we have it?", ["Can we have the bill?"], "en") == "ASK_BILL in the beam"
