"""Pipecat RTVI clients on /ws, end to end: a real daemon (subprocess) with the real google-genai client against
the fake Gemini Live server, driven by a Python RTVI client speaking protobuf pipecat.Frame (classes from
protoc's compilation of frames.proto, see tests/support/rtvi_client.py).

The daemon has a bearer token and a CORS allowlist, as a box serving a front end from another origin would.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import numpy as np
import pytest

from tests.support.daemon import Daemon
from tests.support.fake_live import FakeLive, echo_24k, heard
from tests.support.rtvi_client import CLIENT_READY_1X, RtviTalk, audio_frame, message_frame
from tests.support.speech import have_espeak, synth, to_s16le

TOKEN = "rtvi-test-token"
ORIGIN = "http://127.0.0.1:3999"  # a front end on another origin
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TURN = 32000  # the fake answers every second of 16 kHz audio


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLive]:
    with FakeLive(tmp_path_factory.mktemp("fake-live-rtvi")) as f:
        yield f


@pytest.fixture(scope="module")
def daemon(fake: FakeLive, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("rtvi-daemon")
    catalogue = tmp / "catalogue.json"
    catalogue.write_text(json.dumps([{"id": "pho-bo", "name": "Phở bò", "price": 65000}]), encoding="utf-8")
    env = {
        "EDGEVOICE_SERVER__TOKEN": TOKEN,
        "EDGEVOICE_SERVER__CORS_ORIGINS": f'["{ORIGIN}"]',
        "EDGEVOICE_FUNVOICE__API_KEY": "test-key",
        "EDGEVOICE_FUNVOICE__BASE_URL": fake.base_url,
        "EDGEVOICE_FUNVOICE__CA_FILE": str(fake.ca_path),
        "EDGEVOICE_FUNVOICE__PAGES": '["menu", "cart"]',
        "EDGEVOICE_FUNVOICE__CATALOGUE": str(catalogue),
    }
    with Daemon(tmp, env=env) as d:
        yield d


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        yield s


async def connect(http: aiohttp.ClientSession, d: Daemon, **kw: Any) -> dict[str, Any]:
    async with http.post(f"{d.url}/connect", headers={**AUTH, **kw.pop("headers", {})}, **kw) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def rtvi_talk(http: aiohttp.ClientSession, d: Daemon, user_id: str, legacy: bool = False) -> RtviTalk:
    """/connect as the SDK does, open the ws_url it answered verbatim, client-ready, wait for bot-ready."""
    if legacy:
        answer = await connect(http, d, json={"user_id": user_id, "rtvi_client_version": "0.4.1"})
    else:
        answer = await connect(http, d, params={"protocol": "rtvi"}, json={"user_id": user_id})
    assert set(answer) == {"ws_url"}
    t = RtviTalk(await http.ws_connect(answer["ws_url"]))
    await t.send("client-ready", {} if legacy else CLIENT_READY_1X)
    ready = await t.type_("bot-ready")
    assert ready["data"]["user_id"] == user_id
    return t


async def side(http: aiohttp.ClientSession, d: Daemon, path: str, user_id: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{d.ws_url}{path}?user_id={user_id}&token={TOKEN}")
    assert (await ws.receive_json(timeout=5))["type"] == "connected"
    return ws


def speech(text: str) -> bytes:
    return to_s16le(synth(text))


def session_of(fake: FakeLive, audio_prefix: bytes) -> Any:
    return next(c for c in fake.sessions() if bytes(c.audio[: len(audio_prefix)]) == audio_prefix)


# /connect ----------------------------------------------------------------------------------------------------
async def test_connect_answers_rtvi_clients_with_ws_url_alone(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    base = f"ws://127.0.0.1:{daemon.port}/ws"
    legacy = await connect(http, daemon, json={"rtvi_client_version": "0.4.1", "user_id": "ann"})
    assert legacy == {"ws_url": f"{base}?user_id=ann&protocol=rtvi&token={TOKEN}"}
    # 1.x: startBotAndConnect() posts requestData (or nothing) with Content-Type: application/json
    by_query = await connect(http, daemon, params={"protocol": "rtvi", "user_id": "bea"})
    by_body = await connect(http, daemon, json={"protocol": "rtvi", "user_id": "bea"})
    by_data = await connect(http, daemon, params={"protocol": "rtvi"}, json={"user_id": "bea"})
    assert by_query == by_body == by_data == {"ws_url": f"{base}?user_id=bea&protocol=rtvi&token={TOKEN}"}
    bare = await connect(http, daemon, params={"protocol": "rtvi"}, headers={"Content-Type": "application/json"})
    assert set(bare) == {"ws_url"}
    query = parse_qs(urlsplit(bare["ws_url"]).query)
    assert re.fullmatch(r"user_[0-9a-f]{12}", query["user_id"][0]) and query["protocol"] == ["rtvi"]
    # the document's clients still get the document's answer
    plain = await connect(http, daemon, json={"user_id": "cat"})
    assert plain == {
        "ws_url": f"{base}?user_id=cat",
        "user_id": "cat",
        "note": "WebSocket connection will use the provided user_id",
    }
    async with http.post(f"{daemon.url}/connect?protocol=grpc", headers=AUTH) as r:
        assert r.status == 400 and (await r.json())["error"] == "bad_protocol"
    async with http.post(f"{daemon.url}/connect?protocol=rtvi") as r:  # no token: refused as everywhere
        assert r.status == 401


async def test_connect_preflight_from_the_front_ends_origin(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with http.options(f"{daemon.url}/connect", headers=preflight) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == ORIGIN
        allowed = r.headers["Access-Control-Allow-Headers"].lower()
        assert (
            "authorization" in allowed
            and "content-type" in allowed
            and "POST" in r.headers["Access-Control-Allow-Methods"]
        )
    async with http.post(f"{daemon.url}/connect?protocol=rtvi", headers={**AUTH, "Origin": ORIGIN}) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    async with http.options(f"{daemon.url}/connect", headers={**preflight, "Origin": "http://evil.example"}) as r:
        assert r.status == 403


# conversation ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
async def test_audio_turn_gives_final_transcript_bot_audio_and_speaking_events(
    daemon: Daemon, fake: FakeLive, http: aiohttp.ClientSession
) -> None:
    pcm = speech("Hello, a bowl of beef noodle soup, please.")[:TURN]
    t = await rtvi_talk(http, daemon, "rtvi_audio")
    ready = t.of("bot-ready")[0]["data"]
    assert ready["version"] == "2.1.0" and ready["about"]["library"] == "edgevoice"
    assert ready["about"]["input_sample_rate"] == 16000 and ready["about"]["output_sample_rate"] == 24000
    await t.send_audio(pcm)  # 512-byte frames, as the SDK sends them
    await t.type_("bot-stopped-speaking")

    kinds = [m["type"] for m in t.messages]
    finals = [m["data"] for m in t.of("user-transcription") if m["data"]["final"]]
    assert [f["text"] for f in finals] == [heard(pcm)]  # every byte reached Gemini as PCM, in order
    assert finals[0]["user_id"] == "rtvi_audio" and finals[0]["timestamp"].endswith("Z")
    assert bytes(t.audio) == echo_24k(pcm)  # every byte of the answer came back
    frames = [e for k, e in t.events if k == "audio"]
    assert {(f.sample_rate, f.num_channels) for f in frames} == {(24000, 1)}
    assert max(len(f.audio) for f in frames) == 1920 and all(len(f.audio) % 2 == 0 for f in frames)
    order = [k if k == "audio" else e["type"] for k, e in t.events if k == "audio" or e["type"] != "bot-ready"]
    first_audio, last_audio = order.index("audio"), len(order) - 1 - order[::-1].index("audio")
    assert order.index("user-started-speaking") < order.index("user-stopped-speaking") < first_audio
    assert order.index("bot-started-speaking") < first_audio and order.index("bot-stopped-speaking") > last_audio
    said = t.of("bot-transcription")
    assert len(said) == 1 and re.fullmatch(r"conversation c\d+ turn 1: I heard 1\.00 seconds", said[0]["data"]["text"])
    assert t.of("bot-output")[0]["data"]["text"] == said[0]["data"]["text"]
    assert kinds.count("bot-started-speaking") == kinds.count("bot-stopped-speaking") == 1
    assert session_of(fake, pcm).audio_bytes == len(pcm)
    await t.ws.close()


async def test_send_text_reaches_that_users_tools_only(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    mine, theirs = await side(http, daemon, "/ws/tools", "rtvi_tools"), await side(http, daemon, "/ws/tools", "other")
    info = await side(http, daemon, "/ws/product_info", "rtvi_tools")
    t = await rtvi_talk(http, daemon, "rtvi_tools")
    await t.send("send-text", {"content": 'tool navigate_to_page {"page": "menu"}', "options": {}})
    cmd = await mine.receive_json(timeout=10)
    assert cmd["type"] == "tool_command" and cmd["args"] == {"page": "menu"}
    said = await t.until(lambda m: m["type"] == "bot-transcription" and "answered" in m["data"]["text"])
    assert '"status": "ok"' in said["data"]["text"]
    await t.send("send-text", {"content": 'tool get_product_info {"query": "pho"}'})
    product = await info.receive_json(timeout=10)
    assert product["type"] == "product_info" and [p["id"] for p in product["products"]] == ["pho-bo"]
    with pytest.raises(asyncio.TimeoutError):
        await theirs.receive(timeout=0.5)
    for ws in (t.ws, mine, theirs, info):
        await ws.close()


async def test_legacy_client_handshake_actions_and_tools(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    tools = await side(http, daemon, "/ws/tools", "rtvi_legacy")
    t = await rtvi_talk(http, daemon, "rtvi_legacy", legacy=True)
    assert t.of("bot-ready")[0]["data"] == {"version": "0.3.0", "config": [], "user_id": "rtvi_legacy"}
    await t.send("describe-actions", msg_id="d1")
    actions = await t.type_("actions-available")
    assert actions["id"] == "d1" and actions["data"]["actions"][0]["action"] == "append_to_messages"
    await t.send("get-config", msg_id="g1")
    assert (await t.type_("config")) == {"label": "rtvi-ai", "type": "config", "id": "g1", "data": {"config": []}}
    messages = [{"role": "user", "content": 'tool navigate_to_page {"page": "cart"}'}]
    action = {
        "service": "llm",
        "action": "append_to_messages",
        "arguments": [{"name": "messages", "value": messages}, {"name": "run_immediately", "value": True}],
    }
    await t.send("action", action, msg_id="a1")
    response = await t.type_("action-response")
    assert response["id"] == "a1" and response["data"] == {"result": True}
    assert (await tools.receive_json(timeout=10))["args"] == {"page": "cart"}
    await t.until(lambda m: m["type"] == "bot-transcription" and "answered" in m["data"]["text"])
    assert not t.of("bot-output")  # 1.x only
    await t.send("action", {"service": "llm", "action": "get_context"}, msg_id="a2")
    refused = await t.type_("error-response")
    assert refused["id"] == "a2" and "get_context" in refused["data"]["error"]
    await t.ws.close()
    await tools.close()


async def test_interruption_stops_bot_audio_and_says_so(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    t = await rtvi_talk(http, daemon, "rtvi_interrupt")
    await t.send("send-text", {"content": "interrupt 6"})  # 6 s of answer, then Gemini's `interrupted`
    await t.type_("bot-stopped-speaking")
    await t.type_("user-started-speaking")
    at_stop = len(t.audio)
    await t.until(lambda m: m["type"] == "bot-transcription" and "interrupted" in m["data"]["text"])
    await t.send("send-text", {"content": "still there"})
    await t.until(lambda m: m["type"] == "bot-transcription" and "you said still there" in m["data"]["text"])
    await t.type_("bot-stopped-speaking")
    # nothing of the interrupted answer came after bot-stopped-speaking; what came is what was sent ahead of
    # playback (0.3 s lead), far below the 6 s Gemini produced
    assert 0 < at_stop < 3 * 48000
    assert len(t.audio) == at_stop + 0.2 * 48000  # the next answer (a 0.2 s tone) came whole
    kinds = [m["type"] for m in t.messages]
    assert kinds.count("bot-started-speaking") == kinds.count("bot-stopped-speaking") == 2
    await t.ws.close()


async def test_bad_frames_get_rtvi_errors_and_nothing_reaches_gemini(
    daemon: Daemon, fake: FakeLive, http: aiohttp.ClientSession
) -> None:
    t = await rtvi_talk(http, daemon, "rtvi_bad")

    async def error_for(frame: bytes | str, code: str) -> str:
        start = len(t.messages)
        if isinstance(frame, str):
            await t.ws.send_str(frame)
        else:
            await t.ws.send_bytes(frame)
        err = await t.type_("error")
        assert len(t.messages) == start + 1, t.messages[start:]
        assert err["data"]["code"] == code and err["data"]["fatal"] is False, err
        assert err["data"]["error"] == err["data"]["message"]
        return str(err["data"]["error"])

    assert "not a pipecat.Frame" in await error_for(b"\xff\xfe\xfd", "bad_frame")
    assert "sets none of its frame kinds" in await error_for(b"", "bad_frame")
    assert "sets none of its frame kinds" in await error_for(b"\x58\x01", "bad_frame")  # unknown field 11
    assert "'text'" in await error_for(b"\x0a\x05\x1a\x03abc", "bad_frame")  # Frame.text = TextFrame(text="abc")
    assert "'transcription'" in await error_for(b"\x1a\x05\x1a\x03abc", "bad_frame")
    assert "not JSON" in await error_for(message_frame("{not json"), "bad_message")
    assert "JSON object" in await error_for(message_frame("[1, 2]"), "bad_message")
    assert "label" in await error_for(message_frame('{"type": "send-text", "data": {}}'), "bad_message")
    assert "type" in await error_for(message_frame('{"label": "rtvi-ai", "data": {}}'), "bad_message")
    assert "3 bytes: not whole PCM16 samples" in await error_for(audio_frame(b"\x01\x02\x03"), "bad_audio")
    assert "num_channels = 2" in await error_for(audio_frame(b"\0\0" * 256, 16000, 2), "bad_audio")
    assert "sample_rate = 0" in await error_for(audio_frame(b"\0\0" * 256, 0), "bad_audio")
    assert "binary pipecat.Frame" in await error_for('{"type": "text", "text": "raw protocol"}', "bad_frame")

    await t.send("dance", {"style": "tango"}, msg_id="x1")
    unknown = await t.type_("error-response")
    assert unknown["id"] == "x1" and unknown["data"]["code"] == "unknown_type" and "'dance'" in unknown["data"]["error"]
    await t.send("client-message", {"t": "get-menu", "d": {}}, msg_id="x2")
    unsupported = await t.type_("error-response")
    assert unsupported["id"] == "x2" and "'get-menu'" in unsupported["data"]["error"]
    await t.send("send-text", {"content": ""}, msg_id="x3")
    assert (await t.type_("error-response"))["id"] == "x3"

    await t.send("send-text", {"content": "still fine"})
    said = await t.until(lambda m: m["type"] == "bot-transcription")
    assert "you said still fine" in said["data"]["text"]
    conn = next(c for c in fake.sessions() if c.conversation and "still fine" in c.conversation.user_texts)
    assert conn.audio_bytes == 0 and conn.conversation.user_texts == ["still fine"]  # no noise forwarded
    await t.ws.close()


async def test_audio_at_another_rate_is_resampled(daemon: Daemon, fake: FakeLive, http: aiohttp.ClientSession) -> None:
    seconds = 1.5
    tone = (np.sin(2 * np.pi * 300 * np.arange(int(48000 * seconds)) / 48000) * 8000).astype("<i2").tobytes()
    t = await rtvi_talk(http, daemon, "rtvi_48k")
    await t.send_audio(tone, sample_rate=48000, chunk=1536)  # 16 ms frames at 48 kHz
    final = await t.until(lambda m: m["type"] == "user-transcription" and m["data"]["final"])
    m = re.match(r"heard (\d+) bytes", final["data"]["text"])
    assert m and int(m.group(1)) >= 32000  # the fake answers at a second of 16 kHz audio
    conn = fake.sessions()[-1]  # this test's conversation (the tests run one at a time)
    await t.send("send-text", {"content": "flush"})
    await t.until(lambda m: m["type"] == "bot-transcription" and "you said flush" in m["data"]["text"])
    received = np.frombuffer(bytes(conn.audio), dtype="<i2").astype(np.float64)
    assert 46000 <= len(conn.audio) <= 48000  # 1.5 s at 16 kHz, less the resampler's delay
    spectrum = np.abs(np.fft.rfft(received))
    assert abs(np.argmax(spectrum) * 16000 / len(received) - 300) < 5  # still a 300 Hz tone
    await t.ws.close()


async def test_first_frame_tells_an_rtvi_client_without_protocol_param(
    daemon: Daemon, fake: FakeLive, http: aiohttp.ClientSession
) -> None:
    t = RtviTalk(await http.ws_connect(f"{daemon.ws_url}/ws?user_id=rtvi_sniffed&token={TOKEN}"))
    await t.send("client-ready", CLIENT_READY_1X)
    assert (await t.type_("bot-ready"))["data"]["version"] == "2.1.0"
    pcm = (np.arange(TURN // 2) % 200 * 50).astype("<i2").tobytes()
    await t.send_audio(pcm)
    final = await t.until(lambda m: m["type"] == "user-transcription" and m["data"]["final"])
    assert final["data"]["text"] == heard(pcm)  # the protobuf frames' PCM, not the frames, reached Gemini
    await t.ws.close()


async def test_refusals_and_takeover_speak_rtvi(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    bad = RtviTalk(await http.ws_connect(f"{daemon.ws_url}/ws?protocol=rtvi&user_id=no%20spaces&token={TOKEN}"))
    assert await bad.closed() == 1008
    assert bad.of("error")[0]["data"]["code"] == "bad_user_id" and bad.of("error")[0]["data"]["fatal"] is True
    async with http.ws_connect(f"{daemon.ws_url}/ws?protocol=carrier-pigeon&token={TOKEN}") as ws:
        assert (await ws.receive_json(timeout=5))["error"] == "bad_protocol"

    old = await rtvi_talk(http, daemon, "rtvi_twice")
    new = await rtvi_talk(http, daemon, "rtvi_twice")
    assert await old.closed() == 1000
    replaced = old.of("error")[-1]["data"]
    assert replaced["code"] == "replaced" and replaced["fatal"] is True
    await new.send("send-text", {"content": "hi"})
    assert "you said hi" in (await new.type_("bot-transcription"))["data"]["text"]
    await new.send("disconnect-bot")
    assert await new.closed() == 1000


async def test_gemini_refusing_the_key_is_a_fatal_rtvi_error(
    fake: FakeLive, daemon_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    d = daemon_factory(
        env={
            "EDGEVOICE_FUNVOICE__API_KEY": "wrong-key",
            "EDGEVOICE_FUNVOICE__BASE_URL": fake.base_url,
            "EDGEVOICE_FUNVOICE__CA_FILE": str(fake.ca_path),
        }
    )
    t = RtviTalk(await http.ws_connect(f"{d.ws_url}/ws?protocol=rtvi&user_id=rtvi_nokey"))
    await t.send("client-ready", CLIENT_READY_1X)
    err = await t.type_("error")
    assert err["data"]["code"] == "llm_auth" and err["data"]["fatal"] is True
    assert "API key not valid" in err["data"]["error"]
    assert await t.closed() == 1011 and not t.of("bot-ready")


async def test_raw_frames_without_protocol_param_stay_raw(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    async with http.ws_connect(f"{daemon.ws_url}/ws?user_id=raw_still&token={TOKEN}") as ws:
        pcm = (np.arange(TURN // 2) % 100 * 30).astype("<i2").tobytes()
        for i in range(0, len(pcm), 3200):
            await ws.send_bytes(pcm[i : i + 3200])
        seen: list[dict[str, Any]] = []
        while not any(m["type"] == "turn_complete" for m in seen):
            m = await ws.receive(timeout=15)
            if m.type == aiohttp.WSMsgType.TEXT:
                seen.append(m.json())
        assert heard(pcm) in [m.get("text") for m in seen]
