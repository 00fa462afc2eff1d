"""FunVoiceChat end to end: a real daemon (subprocess) running the real google-genai client against a fake
Gemini Live server on 127.0.0.1 (TLS with a trustme certificate), driven by real WebSocket/HTTP clients.

The module's daemon finds the fake only through the SDK's own environment variables
(``GEMINI_API_KEY``, ``GOOGLE_GEMINI_BASE_URL``, ``GOOGLE_GENAI_API_VERSION``, ``SSL_CERT_FILE``); the
refused-key daemon through ``[funvoice]`` configuration (``base_url``, ``api_version``, ``ca_file``).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.daemon import Daemon
from tests.support.fake_live import FakeLive, echo_24k, heard
from tests.support.speech import have_espeak, synth, to_s16le

CATALOGUE = [
    {"id": "pho-bo", "name": "Phở bò", "price": 65000, "category": "noodles", "description": "Beef noodle soup"},
    {"id": "bun-cha", "name": "Bún chả", "price": 60000, "category": "noodles", "tags": ["pork", "grilled"]},
    {"id": "tra-da", "name": "Trà đá", "price": 5000, "category": "drinks"},
]
FRAME = 3200  # 100 ms of PCM16 at 16 kHz
TURN = 32000  # the fake answers every second of audio


# fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLive]:
    with FakeLive(tmp_path_factory.mktemp("fake-live"), go_away_s=3.0) as f:
        yield f


@pytest.fixture(scope="module")
def daemon(fake: FakeLive, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("funvoice-daemon")
    catalogue = tmp / "catalogue.json"
    catalogue.write_text(json.dumps({"products": CATALOGUE}, ensure_ascii=False), encoding="utf-8")
    config = f"""
[funvoice]
catalogue = "{catalogue}"
pages = ["menu", "cart", "checkout"]
voice = "Puck"
language = "vi-VN"
system_prompt = "You are the test waiter."
"""
    env = {
        "GEMINI_API_KEY": "test-key",
        "GOOGLE_GEMINI_BASE_URL": fake.base_url,
        "GOOGLE_GENAI_API_VERSION": "v1alpha",
        "SSL_CERT_FILE": str(fake.ca_path),
    }
    with Daemon(tmp, env=env, config=config) as d:
        yield d


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        yield s


class Talk:
    """One /ws client: everything it receives, JSON messages and audio."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self.audio = bytearray()

    async def until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            while True:
                m = await self.ws.receive()
                if m.type == aiohttp.WSMsgType.BINARY:
                    self.audio += m.data
                elif m.type == aiohttp.WSMsgType.TEXT:
                    msg = json.loads(m.data)
                    self.messages.append(msg)
                    if pred(msg):
                        return msg
                else:
                    raise AssertionError(f"/ws closed ({m.type.name} {self.ws.close_code}) after {self.messages}")

        try:
            return await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"nothing matched within {timeout} s; received {self.messages}") from None

    async def type_(self, kind: str) -> dict[str, Any]:
        return await self.until(lambda m: m["type"] == kind)

    async def say(self, text: str) -> str:
        """Send a text turn; return the model's output transcription once the turn is complete."""
        start = len(self.messages)
        await self.ws.send_json({"type": "text", "text": text})
        await self.type_("turn_complete")
        return " ".join(m["text"] for m in self.messages[start:] if m["type"] == "output_transcription")


def conversation_of(text: str) -> str:
    m = re.search(r"conversation (c\d+) turn (\d+)", text)
    assert m, text
    return m.group(1)


def turn_of(text: str) -> int:
    m = re.search(r"conversation c\d+ turn (\d+)", text)
    assert m, text
    return int(m.group(1))


async def talk(http: aiohttp.ClientSession, d: Daemon, user_id: str | None) -> Talk:
    query = f"?user_id={user_id}" if user_id else ""
    return Talk(await http.ws_connect(f"{d.ws_url}/ws{query}"))


async def side(http: aiohttp.ClientSession, d: Daemon, path: str, user_id: str) -> aiohttp.ClientWebSocketResponse:
    ws = await http.ws_connect(f"{d.ws_url}{path}?user_id={user_id}")
    hello = await ws.receive_json(timeout=5)
    assert hello == {"type": "connected", "channel": path.rsplit("/", 1)[-1], "user_id": user_id}
    return ws


async def no_message(ws: aiohttp.ClientWebSocketResponse, wait: float = 0.5) -> None:
    with pytest.raises(asyncio.TimeoutError):
        msg = await ws.receive(timeout=wait)
        pytest.fail(f"unexpected message {msg}")


async def health(http: aiohttp.ClientSession, d: Daemon) -> dict[str, Any]:
    async with http.get(f"{d.url}/health") as r:
        assert r.status == 200
        return await r.json()


async def wait_idle(http: aiohttp.ClientSession, d: Daemon) -> None:
    """Earlier tests' sockets are closed asynchronously on the server: wait for zero counts."""
    for _ in range(100):
        if not any((await health(http, d))["sessions"].values()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError((await health(http, d))["sessions"])


def speech_pcm(text: str) -> bytes:
    return to_s16le(synth(text))


# conversation ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
async def test_user_streams_audio_and_hears_it_back(
    daemon: Daemon, fake: FakeLive, http: aiohttp.ClientSession
) -> None:
    pcm = speech_pcm("Hello, I would like a bowl of beef noodle soup, please.")
    assert 2 * TURN < len(pcm) < 5 * TURN  # more than two turns, less than the 5 s kept while connecting
    t = await talk(http, daemon, "audio_user")
    for i in range(0, len(pcm), FRAME):  # sent at once: audio before the Live session is ready is kept
        await t.ws.send_bytes(pcm[i : i + FRAME])
    await t.ws.send_json({"type": "audio_end"})
    chunks = [pcm[i : i + TURN] for i in range(0, len(pcm), TURN)]
    for _ in chunks:
        await t.type_("turn_complete")

    ready = next(m for m in t.messages if m["type"] == "ready")
    assert ready["user_id"] == "audio_user" and ready["input_rate"] == 16000 and ready["output_rate"] == 24000
    heard_texts = [m["text"] for m in t.messages if m["type"] == "input_transcription"]
    assert heard_texts == [heard(c) for c in chunks]  # every byte reached Gemini, in order
    assert bytes(t.audio) == b"".join(echo_24k(c) for c in chunks)  # every byte of the answer came back
    said = [m["text"] for m in t.messages if m["type"] == "output_transcription"]
    assert len({conversation_of(s) for s in said}) == 1 and [turn_of(s) for s in said] == list(
        range(1, len(chunks) + 1)
    )

    conn = next(c for c in fake.sessions() if c.conversation and c.conversation.id == conversation_of(said[0]))
    setup = conn.setup
    assert conn.version == "v1alpha" and conn.key == "test-key" and conn.audio_bytes == len(pcm)
    assert setup["model"] == "models/gemini-2.5-flash-native-audio-preview-09-2025"
    assert setup["generationConfig"]["responseModalities"] == ["AUDIO"]
    assert json.dumps(setup["generationConfig"]["speechConfig"]).count("Puck") == 1
    assert "vi-VN" in json.dumps(setup["generationConfig"]["speechConfig"])
    assert setup["systemInstruction"]["parts"][0]["text"] == "You are the test waiter."
    assert "contextWindowCompression" in setup and "sessionResumption" in setup
    assert "inputAudioTranscription" in setup and "outputAudioTranscription" in setup
    decls = {d["name"]: d for d in setup["tools"][0]["functionDeclarations"]}
    assert set(decls) == {"navigate_to_page", "show_product", "get_product_info"}
    assert decls["navigate_to_page"]["parameters"]["properties"]["page"]["enum"] == ["menu", "cart", "checkout"]

    await t.ws.close()
    for _ in range(100):  # torn down on disconnect: the Live connection closes too
        if not conn.open:
            break
        await asyncio.sleep(0.05)
    assert conn.closed_by == "client"


async def test_tool_calls_reach_only_that_users_sockets(
    daemon: Daemon, fake: FakeLive, http: aiohttp.ClientSession
) -> None:
    alice, bob = await talk(http, daemon, "alice"), await talk(http, daemon, "bob")
    a_tools, b_tools = await side(http, daemon, "/ws/tools", "alice"), await side(http, daemon, "/ws/tools", "bob")
    a_info, b_info = (
        await side(http, daemon, "/ws/product_info", "alice"),
        await side(http, daemon, "/ws/product_info", "bob"),
    )
    await alice.type_("ready")
    await bob.type_("ready")

    said = await alice.say('tool navigate_to_page {"page": "menu"}')
    cmd = await a_tools.receive_json(timeout=5)
    assert cmd["type"] == "tool_command" and cmd["command"] == "navigate_to_page" and cmd["args"] == {"page": "menu"}
    assert 'answered {"page": "menu", "status": "ok"}' in said
    conn = next(c for c in fake.sessions() if c.conversation and c.conversation.id == conversation_of(said))
    assert conn.tool_responses[-1]["id"] == cmd["call_id"]  # answered by call id
    assert conn.tool_responses[-1]["name"] == "navigate_to_page"

    said = await alice.say('tool get_product_info {"query": "pho"}')  # accents ignored: "Phở bò"
    info = await a_info.receive_json(timeout=5)
    assert info["type"] == "product_info" and [p["id"] for p in info["products"]] == ["pho-bo"]
    assert info["products"][0] == CATALOGUE[0] and '"id": "pho-bo"' in said

    said = await alice.say('tool show_product {"product_id": "bun-cha"}')
    cmd = await a_tools.receive_json(timeout=5)
    assert cmd["command"] == "show_product" and cmd["product"] == CATALOGUE[1]
    assert (await a_info.receive_json(timeout=5))["products"] == [CATALOGUE[1]]
    assert '"status": "ok"' in said

    said = await alice.say('tool show_product {"product_id": "no-such-dish"}')
    assert "no product 'no-such-dish' in the catalogue" in said and '"status": "error"' in said

    said = await alice.say('tool navigate_to_page {"page": "kitchen"}')
    assert "unknown page 'kitchen'" in said

    said = await alice.say('cancel navigate_to_page {"page": "cart"}')
    call_id = said.rsplit(" ", 1)[-1]
    while (msg := await a_tools.receive_json(timeout=5))["type"] != "tool_cancelled":
        assert msg["type"] == "tool_command"  # the call may have run before its cancellation arrived
    assert msg["call_ids"] == [call_id]

    await no_message(b_tools)  # bob saw none of it
    await no_message(b_info, 0.1)
    said = await bob.say('tool navigate_to_page {"page": "cart"}')
    assert (await b_tools.receive_json(timeout=5))["args"] == {"page": "cart"}
    await no_message(a_tools, 0.2)
    for ws in (alice.ws, bob.ws, a_tools, b_tools, a_info, b_info):
        await ws.close()


@pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
async def test_two_users_at_once_stay_isolated(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    voices = {"user_a": speech_pcm("One table for two, please."), "user_b": speech_pcm("Can I see the wine list?")}
    talks = {u: await talk(http, daemon, u) for u in voices}

    async def converse(user: str) -> tuple[str, str]:
        t, pcm = talks[user], voices[user][:TURN]
        for i in range(0, len(pcm), FRAME):
            await t.ws.send_bytes(pcm[i : i + FRAME])
        await t.type_("turn_complete")
        said = await t.say(f"my name is {user}")
        return said, next(m["text"] for m in t.messages if m["type"] == "input_transcription")

    (said_a, heard_a), (said_b, heard_b) = await asyncio.gather(converse("user_a"), converse("user_b"))
    assert heard_a == heard(voices["user_a"][:TURN]) and heard_b == heard(voices["user_b"][:TURN])
    assert talks["user_a"].audio.startswith(echo_24k(voices["user_a"][:TURN]))
    assert talks["user_b"].audio.startswith(echo_24k(voices["user_b"][:TURN]))
    assert "you said my name is user_a" in said_a and "you said my name is user_b" in said_b
    assert conversation_of(said_a) != conversation_of(said_b)
    assert turn_of(said_a) == turn_of(said_b) == 2
    assert not any("user_b" in m.get("text", "") for m in talks["user_a"].messages)
    assert not any("user_a" in m.get("text", "") for m in talks["user_b"].messages)
    h = await health(http, daemon)
    assert h["sessions"]["active_sessions"] >= 2 and h["funvoice"]["live_connections"] >= 2
    for t in talks.values():
        await t.ws.close()


async def test_go_away_resumes_the_same_conversation(
    daemon: Daemon, fake: FakeLive, http: aiohttp.ClientSession
) -> None:
    t = await talk(http, daemon, "long_talker")
    first = await t.say("hello")
    conv = conversation_of(first)
    before = [c for c in fake.sessions() if c.conversation and c.conversation.id == conv]
    assert len(before) == 1
    handle = fake.conversations[conv].handles[-1]
    await t.ws.send_json({"type": "text", "text": "goaway"})
    await t.type_("session_resumed")
    after = [c for c in fake.sessions() if c.conversation and c.conversation.id == conv]
    assert len(after) == 2 and after[1].resumed_with == handle
    assert after[0].closed_by == "client"  # moved on at goAway, before the server's own close (3 s later)
    again = await t.say("are you still there")
    assert conversation_of(again) == conv and turn_of(again) == 3
    await t.ws.close()


async def test_dropped_connection_resumes_with_its_handle(
    daemon: Daemon, fake: FakeLive, http: aiohttp.ClientSession
) -> None:
    t = await talk(http, daemon, "dropped_user")
    conv = conversation_of(await t.say("first"))
    handle = fake.conversations[conv].handles[-1]
    await t.ws.send_json({"type": "text", "text": "drop"})
    await t.type_("session_resumed")
    conns = [c for c in fake.sessions() if c.conversation and c.conversation.id == conv]
    assert [c.closed_by for c in conns[:1]] == ["drop"] and conns[1].resumed_with == handle
    again = await t.say("second")
    assert conversation_of(again) == conv and turn_of(again) == 3
    h = await health(http, daemon)
    assert h["funvoice"]["resumptions"] >= 1 and h["llm_service"]["available"] is True
    await t.ws.close()


async def test_interrupted_and_bad_input_keep_the_conversation(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    t = await talk(http, daemon, None)  # user_id generated
    ready = await t.type_("ready")
    assert re.fullmatch(r"user_[0-9a-f]{12}", ready["user_id"])
    await t.say("interrupt")
    assert [m["type"] for m in t.messages].count("interrupted") == 1
    await t.ws.send_bytes(b"\x01\x02\x03")
    assert (await t.type_("error"))["error"] == "bad_audio"
    await t.ws.send_str("not json")
    assert (await t.type_("error"))["error"] == "bad_message"
    await t.ws.send_json({"type": "dance"})
    assert (await t.type_("error"))["error"] == "bad_message"
    await t.ws.send_json({"type": "ping"})
    await t.type_("pong")
    assert "you said still fine" in await t.say("still fine")
    await t.ws.close()


async def test_same_user_reconnecting_takes_over(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    old = await talk(http, daemon, "reloader")
    await old.type_("ready")
    new = await talk(http, daemon, "reloader")
    err = await old.until(lambda m: m["type"] == "error")
    assert err["error"] == "replaced"
    assert "you said hi" in await new.say("hi")
    h = await health(http, daemon)
    assert h["sessions"]["active_sessions"] == 1
    await new.ws.close()


# the document's HTTP examples, field for field ---------------------------------------------------------------
DOC_HEALTH = {
    "status": "healthy",
    "llm_service": {
        "provider": "Gemini Live Multimodal",
        "available": True,
        "function_calling": True,
        "native_audio": True,
    },
    "websockets": {
        "conversation": "/ws?user_id=your_user_id",
        "tools": "/ws/tools?user_id=your_user_id",
        "product_info": "/ws/product_info?user_id=your_user_id",
    },
    "sessions": {"active_sessions": 2, "total_users": 3, "users_with_tool_websockets": 2, "users_with_product_info": 1},
    "expected_latency": "sub-500ms with native audio streaming",
}
DOC_CONNECT = {
    "ws_url": "wss://funvoice.example:1294/ws?user_id=user_12345",
    "user_id": "user_12345",
    "note": "WebSocket connection will use the provided user_id",
}
DOC_STATUS = {
    "status": "success",
    "data": {
        "streaming_active": True,
        "connected_users": ["user_12345", "user_67890"],
        "last_update": "2024-01-15T10:30:00Z",
    },
}
DOC_RESET = {"status": "success", "message": "ProductInfo WebSocket connection reset successfully for user user_12345"}
DOC_RESET_ALL = {"status": "success", "message": "Reset 3 ProductInfo WebSocket connections"}


def same_shape(got: Any, doc: Any, where: str = "") -> None:
    """Same keys (recursively) and the same JSON types as the document's example."""
    if isinstance(doc, dict):
        assert isinstance(got, dict), where
        assert list(got) == list(doc), f"{where}: keys {list(got)} != {list(doc)}"
        for k in doc:
            same_shape(got[k], doc[k], f"{where}.{k}")
    elif isinstance(doc, list):
        assert isinstance(got, list), where
        for item in got:
            same_shape(item, doc[0], f"{where}[]")
    else:
        assert type(got) is type(doc), f"{where}: {got!r} is not a {type(doc).__name__}"


async def test_health_matches_the_document_with_real_counts(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    await wait_idle(http, daemon)
    # the document's situation: 2 conversations, 3 users, 2 of them with tool sockets, 1 with product info
    user1, user2 = await talk(http, daemon, "user_12345"), await talk(http, daemon, "user_67890")
    sockets = [
        await side(http, daemon, "/ws/tools", "user_12345"),
        await side(http, daemon, "/ws/tools", "user_12345"),  # a second tab: still one user
        await side(http, daemon, "/ws/tools", "user_third"),
        await side(http, daemon, "/ws/product_info", "user_67890"),
    ]
    await user1.type_("ready")
    await user2.type_("ready")
    body = await health(http, daemon)
    doc_part = {k: body[k] for k in DOC_HEALTH}
    assert list(body)[: len(DOC_HEALTH)] == list(DOC_HEALTH)  # the document's fields lead, in its order
    assert doc_part == DOC_HEALTH  # field for field, and the counts are real
    for ws in [user1.ws, user2.ws, *sockets]:
        await ws.close()
    await wait_idle(http, daemon)


async def test_connect_matches_the_document(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{daemon.url}/connect?user_id=user_12345") as r:
        assert r.status == 200
        by_query = await r.json()
    async with http.post(f"{daemon.url}/connect", json={"user_id": "user_12345"}) as r:
        assert r.status == 200
        by_body = await r.json()
    expected = {**DOC_CONNECT, "ws_url": f"ws://127.0.0.1:{daemon.port}/ws?user_id=user_12345"}
    assert by_query == by_body == expected
    same_shape(by_query, DOC_CONNECT)
    async with http.post(f"{daemon.url}/connect") as r:
        generated = await r.json()
    same_shape(generated, DOC_CONNECT)
    assert generated["ws_url"].endswith(f"/ws?user_id={generated['user_id']}")
    async with http.post(f"{daemon.url}/connect", data=b"{not json", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and (await r.json())["error"] == "bad_json"
    async with http.post(f"{daemon.url}/connect", json={"user_id": "bad id/../x"}) as r:
        assert r.status == 400 and "user_id" in (await r.json())["message"]


async def test_product_info_endpoints_match_the_document(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    await wait_idle(http, daemon)
    async with http.get(f"{daemon.url}/product-info-status") as r:
        idle = await r.json()
    assert idle["data"]["streaming_active"] is False and idle["data"]["connected_users"] == []

    t = await talk(http, daemon, "user_12345")
    infos = [
        await side(http, daemon, "/ws/product_info", "user_12345"),
        await side(http, daemon, "/ws/product_info", "user_67890"),
        await side(http, daemon, "/ws/product_info", "user_67890"),
    ]
    await t.say('tool get_product_info {"query": "tra da"}')
    assert (await infos[0].receive_json(timeout=5))["products"][0]["id"] == "tra-da"
    async with http.get(f"{daemon.url}/product-info-status") as r:
        status = await r.json()
    same_shape(status, DOC_STATUS)
    assert status["data"]["streaming_active"] is True
    assert status["data"]["connected_users"] == ["user_12345", "user_67890"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", status["data"]["last_update"])

    async with http.post(f"{daemon.url}/product-info-reset/user_12345") as r:
        assert r.status == 200 and await r.json() == DOC_RESET
    assert (await infos[0].receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
    async with http.post(f"{daemon.url}/product-info-reset/user_12345") as r:
        assert r.status == 404 and "user_12345" in (await r.json())["message"]
    extra = await side(http, daemon, "/ws/product_info", "user_third")
    async with http.post(f"{daemon.url}/product-info-reset-all") as r:
        assert r.status == 200 and await r.json() == DOC_RESET_ALL  # 2 for user_67890 + 1 for user_third
    for ws in (infos[1], infos[2], extra):
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE
    async with http.get(f"{daemon.url}/product-info-status") as r:
        assert (await r.json())["data"]["connected_users"] == []
    await t.ws.close()


async def test_side_sockets_need_a_user_id(daemon: Daemon, http: aiohttp.ClientSession) -> None:
    for path in ("/ws/tools", "/ws/product_info"):
        ws = await http.ws_connect(f"{daemon.ws_url}{path}")
        msg = await ws.receive_json(timeout=5)
        assert msg["error"] == "missing_user_id"
        assert (await ws.receive(timeout=5)).type == aiohttp.WSMsgType.CLOSE and ws.close_code == 1008


# Gemini refusing or missing ----------------------------------------------------------------------------------
async def _wait_checked(http: aiohttp.ClientSession, d: Daemon) -> dict[str, Any]:
    for _ in range(200):
        body = await health(http, d)
        if body["funvoice"]["checked_at"] is not None:
            return body
        await asyncio.sleep(0.05)
    raise AssertionError("the start-up probe never finished")


async def test_refused_key_gives_a_clear_error_and_health_says_unavailable(
    fake: FakeLive, daemon_factory: Callable[..., Daemon], http: aiohttp.ClientSession
) -> None:
    config = f"""
[funvoice]
api_key = "wrong-key"
base_url = "{fake.base_url}"
api_version = "v1beta"
ca_file = "{fake.ca_path}"
"""
    d = daemon_factory(config=config)
    body = await _wait_checked(http, d)
    assert body["llm_service"]["available"] is False
    assert "API key not valid" in body["funvoice"]["error"]
    probe = fake.connections[-1]
    assert probe.key == "wrong-key" and probe.version == "v1beta" and probe.closed_by == "server"

    t = await talk(http, d, "refused_user")
    err = await t.type_("error")
    assert err["error"] == "llm_auth"
    assert err["message"] == "Gemini refused the API key: API key not valid. Please pass a valid API key."
    closed = await t.ws.receive(timeout=5)
    assert (closed.type, closed.data, closed.extra) == (aiohttp.WSMsgType.CLOSE, 1011, "llm_auth")
    assert (await health(http, d))["sessions"]["active_sessions"] == 0


async def test_unreachable_gemini_gives_a_clear_error(
    tmp_path: Path, daemon_factory: Callable[..., Daemon], http: aiohttp.ClientSession
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = daemon_factory(env={"GEMINI_API_KEY": "some-key", "GOOGLE_GEMINI_BASE_URL": f"https://127.0.0.1:{port}"})
    body = await _wait_checked(http, d)
    assert body["llm_service"]["available"] is False
    assert body["funvoice"]["error"].startswith(f"llm_unreachable: cannot reach Gemini Live at wss://127.0.0.1:{port}")
    t = await talk(http, d, "lonely_user")
    err = await t.type_("error")
    assert err["error"] == "llm_unreachable" and f"127.0.0.1:{port}" in err["message"]
    closed = await t.ws.receive(timeout=5)
    assert (closed.type, closed.data, closed.extra) == (aiohttp.WSMsgType.CLOSE, 1011, "llm_unreachable")


async def test_sigterm_closes_conversations_and_their_live_sessions(
    fake: FakeLive, daemon_factory: Callable[..., Daemon], http: aiohttp.ClientSession
) -> None:
    d = daemon_factory(
        env={
            "EDGEVOICE_FUNVOICE__API_KEY": "test-key",
            "EDGEVOICE_FUNVOICE__BASE_URL": fake.base_url,
            "EDGEVOICE_FUNVOICE__CA_FILE": str(fake.ca_path),
        }
    )
    t = await talk(http, d, "late_diner")
    conv = conversation_of(await t.say("one more dessert"))
    conn = next(c for c in fake.sessions() if c.conversation and c.conversation.id == conv)
    async with http.get(f"{d.url}/metrics") as r:
        assert "edgevoice_gemini_sessions 1.0" in await r.text()
    assert await asyncio.to_thread(d.stop) == 0
    closed = await t.ws.receive(timeout=5)
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1001  # going away
    assert not conn.open and conn.closed_by == "client"
