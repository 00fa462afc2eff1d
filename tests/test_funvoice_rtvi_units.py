"""The RTVI bridge's parts: the pipecat.Frame schema against protoc, the codec against protoc's classes, first-frame
recognition, the audio pacer on a virtual clock, and Gemini's output turned into RTVI over a real WebSocket."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edgevoice.funvoice import pipecat_frames
from edgevoice.funvoice.rtvi import AUDIO_FRAME_BYTES, AudioPacer, RtviSession, sniff
from tests.support.rtvi_client import CLIENT_READY_1X, RtviTalk, audio_frame, protoc_classes, protoc_descriptor, rtvi

SECOND = 48000  # bytes of PCM16 mono at 24 kHz


# schema and codec --------------------------------------------------------------------------------------------
def test_schema_is_what_protoc_makes_of_frames_proto() -> None:
    assert pipecat_frames.file_descriptor() == protoc_descriptor()


def test_codec_agrees_with_protocs_classes() -> None:
    c = protoc_classes()
    ours = c["Frame"].FromString(pipecat_frames.encode_audio(b"\x01\x02" * 960, 24000))
    assert ours.WhichOneof("frame") == "audio" and ours.audio.audio == b"\x01\x02" * 960
    assert (ours.audio.sample_rate, ours.audio.num_channels) == (24000, 1)
    msg = {"label": "rtvi-ai", "type": "bot-transcription", "id": "1", "data": {"text": "Phở bò, 65 000 ₫"}}
    decoded = c["Frame"].FromString(pipecat_frames.encode_message(msg))
    assert json.loads(decoded.message.data) == msg

    theirs = c["Frame"](audio=c["AudioRawFrame"](id=7, name="in", audio=b"\0\1" * 256, sample_rate=16000, pts=99))
    theirs.audio.num_channels = 1
    assert pipecat_frames.decode(theirs.SerializeToString()) == pipecat_frames.AudioIn(b"\0\1" * 256, 16000, 1)
    assert pipecat_frames.decode(rtvi("client-ready", {"x": 1}, "i1")) == pipecat_frames.MessageIn(
        '{"id": "i1", "label": "rtvi-ai", "type": "client-ready", "data": {"x": 1}}'
    )


@pytest.mark.parametrize(
    ("frame", "needle"),
    [
        (b"\x12\xff", "not a pipecat.Frame"),  # audio field, length runs past the end
        (b"\x22\x02\x0a\xff", "not a pipecat.Frame"),  # truncated message frame
        (b"\x22\x03\x0a\x01\xff", "not a pipecat.Frame"),  # message data that is not UTF-8
        (b"", "sets none"),
        (b"\x28\x05", "sets none"),  # only an unknown field (5, varint)
        (b"\x0a\x00", "'text' is not accepted"),
        (b"\x1a\x00", "'transcription' is not accepted"),
    ],
)
def test_decode_names_what_is_wrong(frame: bytes, needle: str) -> None:
    with pytest.raises(pipecat_frames.FrameError, match=needle):
        pipecat_frames.decode(frame)


def test_first_frame_recognition() -> None:
    assert sniff(rtvi("client-ready", CLIENT_READY_1X))
    assert not sniff(audio_frame(b"\0\0" * 256))  # an audio frame first is not how RTVI clients start
    assert not sniff(bytes(range(256)) * 4)  # raw PCM
    assert not sniff(b"\x22\x05\x0a\x03{x}")  # a message frame, not JSON
    assert not sniff(pipecat_frames.encode_message({"label": "other", "type": "client-ready"}))


# the pacer --------------------------------------------------------------------------------------------------
class VirtualClock:
    """Time that moves only when the pacer sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        await asyncio.sleep(0)


class Recorder:
    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.events: list[tuple[float, str, int]] = []

    async def audio(self, pcm: bytes) -> None:
        self.events.append((self.clock.now, "audio", len(pcm)))

    async def started(self) -> None:
        self.events.append((self.clock.now, "started", 0))

    async def stopped(self) -> None:
        self.events.append((self.clock.now, "stopped", 0))

    def sent(self) -> int:
        return sum(n for _, kind, n in self.events if kind == "audio")


async def until(cond: Callable[[], bool], steps: int = 100000) -> None:
    for _ in range(steps):
        if cond():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never met")


def pacer_on(clock: VirtualClock, rec: Recorder, **kw: Any) -> tuple[AudioPacer, asyncio.Task[None]]:
    pacer = AudioPacer(rec.audio, rec.started, rec.stopped, clock=clock.time, sleep=clock.sleep, **kw)
    return pacer, asyncio.create_task(pacer.run())


async def test_pacer_sends_at_playback_speed_with_its_lead() -> None:
    clock = VirtualClock()
    rec = Recorder(clock)
    pacer, task = pacer_on(clock, rec, lead_s=0.3)
    pacer.push(b"\x01\x00" * (5 * SECOND // 2))
    pacer.end_turn()
    await until(lambda: any(kind == "stopped" for _, kind, _ in rec.events))
    task.cancel()
    assert rec.sent() == 5 * SECOND and rec.events[0] == (0.0, "started", 0)
    sent = 0
    for at, kind, n in rec.events:
        if kind == "audio":
            assert sent / SECOND - at <= 0.3 + 1e-9  # never more than the lead ahead of playback
            assert n <= AUDIO_FRAME_BYTES
            sent += n
    assert rec.events[-1] == (pytest.approx(5.0), "stopped", 0)  # when the client has played it all


async def test_pacer_interrupt_drops_what_was_not_sent() -> None:
    clock = VirtualClock()
    rec = Recorder(clock)
    pacer, task = pacer_on(clock, rec, lead_s=0.3)
    pacer.push(b"\x01\x00" * (5 * SECOND // 2))
    await until(lambda: clock.now >= 1.0)
    assert pacer.interrupt() is True
    at_interrupt = rec.sent()
    assert at_interrupt <= (1.0 + 0.3) * SECOND + AUDIO_FRAME_BYTES
    for _ in range(1000):
        await asyncio.sleep(0)
    assert rec.sent() == at_interrupt and pacer.queued_bytes == 0
    assert [k for _, k, _ in rec.events].count("stopped") == 0  # the session says it, at once
    assert pacer.interrupt() is False  # not speaking any more

    pacer.push(b"\x02\x00" * 2400)  # the next answer speaks again
    pacer.end_turn()
    await until(lambda: [k for _, k, _ in rec.events].count("stopped") == 1)
    task.cancel()
    assert rec.sent() == at_interrupt + 4800 and [k for _, k, _ in rec.events].count("started") == 2


async def test_pacer_bounds_its_queue_and_restarts_after_running_dry() -> None:
    clock = VirtualClock()
    rec = Recorder(clock)
    pacer, task = pacer_on(clock, rec, lead_s=0.1, max_queued_s=1.0)
    assert pacer.push(b"\0\0" * SECOND) == SECOND  # 2 s offered, 1 s kept
    await until(lambda: rec.sent() == SECOND)
    clock.now += 10  # Gemini pauses mid-turn; the client ran dry
    pacer.push(b"\0\0" * 2400)
    await until(lambda: rec.sent() == SECOND + 4800)
    assert not any(k == "stopped" for _, k, _ in rec.events)  # the turn is still open
    pacer.end_turn()
    await until(lambda: any(k == "stopped" for _, k, _ in rec.events))
    task.cancel()
    last_audio = max(at for at, k, _ in rec.events if k == "audio")
    assert rec.events[-1][0] == pytest.approx(last_audio + 0.1)  # the 0.1 s went out at once (lead), then played


# Gemini's output as RTVI, over a real WebSocket -------------------------------------------------------------
SESSION = web.AppKey("session", RtviSession)


async def session_pair(aiohttp_client: Any) -> tuple[RtviSession, RtviTalk, Callable[[], Awaitable[None]]]:
    opened: asyncio.Future[RtviSession] = asyncio.get_running_loop().create_future()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        session = RtviSession(ws, "unit_user", "test-model", live_open=True)
        opened.set_result(session)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                await session.receive(msg.data)
        await session.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    client = await aiohttp_client(app)
    talk = RtviTalk(await client.ws_connect("/ws"))
    session = await opened

    async def close() -> None:
        await talk.ws.close()

    return session, talk, close


async def test_gemini_output_becomes_rtvi_turns(aiohttp_client: Any) -> None:
    session, talk, close = await session_pair(aiohttp_client)
    await talk.send("client-ready", CLIENT_READY_1X)
    await talk.type_("bot-ready")
    for piece in ["I would", " like a coffee."]:
        await session.message({"type": "input_transcription", "text": piece})
    for piece in [" Sure.", " One coffee", " coming up! Anything", " else"]:
        await session.message({"type": "output_transcription", "text": piece})
    await session.message({"type": "turn_complete"})
    await talk.until(lambda m: m["type"] == "bot-transcription" and m["data"]["text"] == "Anything else")
    seen = [(m["type"], m["data"].get("text"), m["data"].get("final")) for m in talk.messages[1:]]
    assert seen == [
        ("user-started-speaking", None, None),
        ("user-transcription", "I would", False),
        ("user-transcription", "I would like a coffee.", False),
        ("user-transcription", "I would like a coffee.", True),
        ("user-stopped-speaking", None, None),
        ("bot-transcription", "Sure.", None),
        ("bot-output", "Sure.", None),
        ("bot-transcription", "One coffee coming up!", None),
        ("bot-output", "One coffee coming up!", None),
        ("bot-transcription", "Anything else", None),
    ]
    assert all(m["data"]["user_id"] == "unit_user" for m in talk.of("user-transcription"))
    await session.message({"type": "session_resumed", "user_id": "unit_user"})
    resumed = await talk.type_("server-message")
    assert resumed["data"] == {"data": {"type": "session_resumed", "user_id": "unit_user"}}
    await session.message({"type": "error", "error": "llm_unreachable", "message": "gone", "fatal": True})
    assert (await talk.type_("error"))["data"] == {
        "error": "gone",
        "message": "gone",
        "fatal": True,
        "code": "llm_unreachable",
    }
    await close()


async def test_interruption_while_speaking(aiohttp_client: Any) -> None:
    session, talk, close = await session_pair(aiohttp_client)
    await talk.send("client-ready", CLIENT_READY_1X)
    await talk.type_("bot-ready")
    await session.message({"type": "input_transcription", "text": "tell me a long story"})
    await session.audio(b"\x01\x00" * (10 * SECOND // 2))  # 10 s of answer
    await talk.type_("bot-started-speaking")
    await session.message({"type": "interrupted"})
    await talk.type_("user-started-speaking")
    at_stop = len(talk.audio)
    await session.message({"type": "turn_complete"})
    await session.message({"type": "input_transcription", "text": "stop"})
    await talk.until(lambda m: m["type"] == "user-transcription" and m["data"]["text"] == "stop")
    order = [k if k == "audio" else e["type"] for k, e in talk.events]
    stop = order.index("bot-stopped-speaking")
    assert "audio" not in order[stop:] and len(talk.audio) == at_stop
    assert order[stop + 1] == "user-started-speaking" and order.count("bot-stopped-speaking") == 1
    assert at_stop < 10 * SECOND // 2  # most of the 10 s was never sent
    await close()


async def test_bot_ready_waits_for_the_live_session(aiohttp_client: Any) -> None:
    session, talk, close = await session_pair(aiohttp_client)
    session.live_open = False
    await talk.send("client-ready", {})  # 0.4: no version
    await talk.send("get-config", msg_id="c1")
    assert (await talk.type_("config"))["id"] == "c1" and not talk.of("bot-ready")
    await session.message({"type": "ready", "user_id": "unit_user"})
    assert (await talk.type_("bot-ready"))["data"]["version"] == "0.3.0"
    await session.message({"type": "output_transcription", "text": "Hello."})
    await session.message({"type": "turn_complete"})
    await talk.type_("bot-transcription")
    assert not talk.of("bot-output")
    await close()
