"""Hostile or broken input against the daemon's real application (in process, on 127.0.0.1).

/asr-multicam: wrong types, lone surrogates, invalid UTF-8, protocol violations, floods, idle and
non-reading clients, start/stop churn; FunVoiceChat (/ws, /ws/tools, /connect) with the real google-genai
client against the fake Live server: deep and huge JSON, ids with a trailing newline; a property-based fuzz of
both protocols' control messages. Every test also checks that nothing was logged as an error or traceback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevoice import modelstore
from edgevoice.config import (
    AsrSettings,
    DashboardSettings,
    FunVoiceSettings,
    ServerSettings,
    Settings,
    StateSettings,
)
from edgevoice.sources.multicam_client import MulticamClient
from tests.support.appthread import AppThread
from tests.support.fake_live import FakeLive

MODELS = Path(tempfile.gettempdir()) / "edgevoice-test-models"
MAX_FRAME = 16384
SERVER_TYPES = {"stream_started", "transcript", "keyword", "stream_stopped", "error", "pong"}
WS_TYPES = {
    "ready",
    "session_resumed",
    "session_reset",
    "text",
    "input_transcription",
    "output_transcription",
    "interrupted",
    "turn_complete",
    "error",
    "pong",
}


def _settings(tmp: Path, fake: FakeLive | None = None, **server: Any) -> Settings:
    funvoice = (
        FunVoiceSettings(
            api_key="test-key",  # type: ignore[arg-type]
            base_url=fake.base_url,
            api_version="v1alpha",
            ca_file=fake.ca_path,
        )
        if fake is not None
        else FunVoiceSettings(enabled=False)
    )
    return Settings(
        server=ServerSettings(max_frame_bytes=MAX_FRAME, **server),
        state=StateSettings(dir=tmp),
        asr=AsrSettings(model=str(modelstore.resolve("tiny.en", MODELS))),
        funvoice=funvoice,
        dashboard=DashboardSettings(enabled=False, metrics=False),
    )


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeLive]:
    with FakeLive(tmp_path_factory.mktemp("fake-live")) as f:
        yield f


@pytest.fixture(scope="module")
def app(fake: FakeLive, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    """Generous limits: the hostile-input tests and the fuzz."""
    settings = _settings(
        tmp_path_factory.mktemp("hostile"), fake, max_streams_per_connection=4, max_stream_starts_per_min=100_000
    )
    with AppThread(settings) as a:
        yield a


@pytest.fixture(autouse=True)
def _fresh_records(app: AppThread) -> None:
    """Each test answers for its own log records."""
    app.records.records.clear()


def connect(a: AppThread, token: str | None = None) -> Any:
    return MulticamClient.connect(a.ws_url, token=token)


def start_msg(stream_id: str, **kw: Any) -> dict[str, Any]:
    return {
        "type": "audio_stream_start",
        "session_id": "t5",
        "customer_id": f"c_{stream_id}",
        "stream_id": stream_id,
        **kw,
    }


async def fence(client: MulticamClient, timeout: float = 15) -> list[dict[str, Any]]:
    """Every message answering what was sent so far (a ping fences them); the connection must still answer."""
    before = len(client.messages)
    await client.send_json({"type": "ping"})
    await client.wait_for(lambda m: m["type"] == "pong", timeout, since=before)
    return client.messages[before:]


async def errors_for(client: MulticamClient, since: int) -> list[dict[str, Any]]:
    await fence(client)
    return [m for m in client.messages[since:] if m["type"] == "error"]


def assert_clean(a: AppThread) -> None:
    """Nothing was logged as an error or with a traceback (since the last check)."""
    failures = a.records.failures()
    a.records.records.clear()
    assert not failures, "\n".join(failures)


# -- /asr-multicam: wrong types, surrogates, UTF-8 ------------------------------------------------------------
WRONG_TYPES: list[tuple[str, Any, str]] = [
    ("format", ["pcm_s16le"], "unsupported_format"),
    ("format", {"pcm": "s16le"}, "unsupported_format"),
    ("format", 16, "unsupported_format"),
    ("channel", "3", "bad_channel"),
    ("channel", [3], "bad_channel"),
    ("sample_rate", {"hz": 16000}, "bad_sample_rate"),
    ("sample_rate", 1e308, "bad_sample_rate"),
    ("channels", [1], "unsupported_format"),
    ("language", ["vi"], "bad_language"),
    ("session_id", ["t5"], "bad_identifier"),
    ("customer_id", {"id": 1}, "bad_identifier"),
    ("session_id", "t5\n", "bad_identifier"),
]


def test_wrong_types_get_an_error_naming_the_field_and_spare_the_other_streams(app: AppThread) -> None:
    async def run() -> None:
        async with connect(app) as c:
            await c.start("keep_me", session_id="t5", customer_id="c_keep", channel=1)
            for field, value, code in WRONG_TYPES:
                since = len(c.messages)
                await c.send_json(start_msg("wrong", **{"channel": 2, field: value}))
                errors = await errors_for(c, since)
                assert [e["code"] for e in errors] == [code], (field, value, errors)
                assert field in errors[0]["message"] and errors[0]["stream_id"] == "wrong"
            for bad in (
                {"type": ["audio_stream_start"]},
                {"type": None},
                {"type": "audio_stream_stop", "stream_id": 5},
            ):
                since = len(c.messages)
                await c.send_json(bad)
                assert len(await errors_for(c, since)) == 1
            # the first stream never noticed: its audio is taken, and it stops with its own stream_stopped
            since = len(c.messages)
            await c.ws.send_bytes(b"\x01" + b"\x00\x00" * 800)
            assert await errors_for(c, since) == []
            assert not c.of("stream_stopped")
            await c.stop("keep_me")

    app.call(run())
    assert_clean(app)


def test_a_lone_surrogate_gets_an_error_and_the_outbox_keeps_writing(app: AppThread) -> None:
    async def run() -> None:
        async with connect(app) as c:
            for text in (
                '{"type": "audio_stream_start", "stream_id": "s", "session_id": "t", "customer_id": "c",'
                ' "format": ["\\ud800"]}',
                '{"type": "\\udfff"}',
                '{"type": "ping", "note": "a\\ud83d"}',
            ):
                since = len(c.messages)
                await c.ws.send_str(text)
                errors = await errors_for(c, since)  # a pong still comes back: the outbox was not poisoned
                assert [e["code"] for e in errors] == ["bad_json"] and "surrogate" in errors[0]["message"], errors

    app.call(run())
    assert_clean(app)


def test_invalid_utf8_text_frame_is_an_error_not_a_disconnect(app: AppThread) -> None:
    async def run() -> None:
        async with connect(app) as c:
            await c.start("utf8_keep", session_id="t5", customer_id="c_utf8", channel=0)
            since = len(c.messages)
            await c.ws.send_frame(b'{"type": "ping", "x": "\xff\xfe"}', aiohttp.WSMsgType.TEXT)
            errors = await errors_for(c, since)
            assert [e["code"] for e in errors] == ["bad_json"] and "UTF-8" in errors[0]["message"], errors
            assert (await c.stop("utf8_keep")) == ""

    app.call(run())
    assert_clean(app)


def test_deep_or_huge_json_gets_bad_json(app: AppThread) -> None:
    texts = [
        '{"type": "ping", "x": ' + "[" * 900 + "]" * 900 + "}",
        '{"type": "ping", "x": ' + "[" * 20 + "]" * 20 + "}",
        '{"type": "audio_stream_start", "sample_rate": 1' + "0" * 1500 + "}",
        '{"type": "audio_stream_start", "sample_rate": 1e999}',
        '{"type": "ping", "x": NaN}',
    ]

    async def run() -> None:
        async with connect(app) as c:
            for text in texts:
                since = len(c.messages)
                await c.ws.send_str(text)
                errors = await errors_for(c, since)
                assert [e["code"] for e in errors] == ["bad_json"], (text[:60], errors)

    app.call(run())
    assert_clean(app)


def _raw_ws(port: int, path: str = "/asr-multicam", rcvbuf: int | None = None, headers: str = "") -> socket.socket:
    """A WebSocket opened by hand, for frames no client library sends."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(20)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def _frame(payload: bytes, opcode: int = 2) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        length = bytes([0x80 | n])
    elif n < 1 << 16:
        length = bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        length = bytes([0x80 | 127]) + struct.pack(">Q", n)
    head = bytes([0x80 | opcode]) + length
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _read_until_closed(s: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def test_protocol_violations_are_fatal_only_to_their_own_connection(app: AppThread) -> None:
    """A bad opcode or a frame over 4x server.max_frame_bytes cannot be skipped: that connection closes (1002,
    1009) and its streams stop as on any disconnect; every other connection goes on (docs/asr-multicam.md)."""

    async def run() -> None:
        async with connect(app) as other:
            await other.start("bystander", session_id="t5", customer_id="c_by", channel=0)
            for frame, code in ((_frame(b"hi", opcode=0x3), 1002), (_frame(b"\x00" * (MAX_FRAME * 4 + 10)), 1009)):
                s = await asyncio.to_thread(_raw_ws, app.port)
                await asyncio.to_thread(s.sendall, frame)
                data = await asyncio.to_thread(_read_until_closed, s)
                s.close()
                assert struct.pack(">H", code) in data, data[:40]
            await fence(other)
            assert (await other.stop("bystander")) == ""

    app.call(run())
    assert_clean(app)


# -- FunVoiceChat ------------------------------------------------------------------------------------------
def test_funvoice_ids_with_a_trailing_newline_are_refused(app: AppThread) -> None:
    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            for path in ("/connect?user_id=user_1%0A", "/product-info-reset/user_1%0A"):
                async with http.post(app.url + path) as r:
                    assert r.status == 400 and (await r.json())["error"] == "bad_user_id", path
            async with http.post(app.url + "/connect", json={"user_id": "user_1\n"}) as r:
                assert r.status == 400
            async with http.ws_connect(app.ws_url + "/ws/tools?user_id=user_1%0A") as ws:
                assert (await ws.receive_json(timeout=10))["error"] == "bad_user_id"

    app.call(run())
    assert_clean(app)


def test_funvoice_deep_or_huge_json_is_a_clear_error(app: AppThread) -> None:
    deep = "[" * 5000 + "]" * 5000
    huge = '{"user_id": 1' + "0" * 5000 + "}"

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            for body in (deep, huge, '{"user_id": "a\\ud800"}'):
                async with http.post(
                    app.url + "/connect", data=body, headers={"Content-Type": "application/json"}
                ) as r:
                    assert r.status == 400 and (await r.json())["error"] == "bad_json", body[:40]
            async with http.ws_connect(app.ws_url + "/ws/tools?user_id=deep_user") as ws:
                assert (await ws.receive_json(timeout=10))["type"] == "connected"
                await ws.send_str(deep)
                await ws.send_str(huge)
                await ws.send_json({"type": "ping"})
                assert await ws.receive_json(timeout=10) == {"type": "pong"}
            async with http.ws_connect(app.ws_url + "/ws?user_id=deep_talker") as ws:
                for text in (deep, huge):
                    await ws.send_str(text)
                await ws.send_json({"type": "ping"})
                seen: list[dict[str, Any]] = []
                while not seen or seen[-1]["type"] != "pong":
                    msg = await ws.receive(timeout=20)
                    assert msg.type == aiohttp.WSMsgType.TEXT, (msg, seen)
                    seen.append(json.loads(msg.data))
                assert [m["error"] for m in seen if m["type"] == "error"] == ["bad_message", "bad_message"], seen

    app.call(run())
    assert_clean(app)


# -- the fuzz ----------------------------------------------------------------------------------------------
_surrogate = st.integers(0xD800, 0xDFFF).map(chr)
_text = st.text(alphabet=st.characters() | _surrogate, max_size=12)
_scalar = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | _text
    | st.sampled_from(["x" * 1500, "pcm_s16le", "t5", "cust"])
)
_json = st.recursive(
    _scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3), max_leaves=8
)
_deep = st.integers(1, 900).map(lambda n: "[" * n + "]" * n)
_huge_number = st.integers(20, 1500).map(lambda n: "1" + "0" * n) | st.sampled_from(["1e999", "-1e400", "NaN"])
_start_fields = st.fixed_dictionaries(
    {},
    optional={
        "session_id": st.sampled_from(["t5", "fz"]) | _json,
        "customer_id": st.sampled_from(["fz_a", "fz_b"]) | _json,
        "stream_id": st.sampled_from(["fz_1", "fz_2"]) | _json,
        "channel": st.integers(-2, 260) | _json,
        "format": st.sampled_from(["pcm_s16le", "pcm_f32le", "mp3"]) | _json,
        "sample_rate": st.sampled_from([8000, 16000, 48000, 7999]) | _json,
        "channels": st.integers(0, 3) | _json,
        "language": st.sampled_from(["en", "vi", "??"]) | _json,
    },
)
_control = st.builds(
    lambda kind, fields: json.dumps({"type": kind, **fields}),
    st.sampled_from(["audio_stream_start", "audio_stream_stop", "ping"]) | _json,
    _start_fields,
)
_spliced = st.builds(
    lambda key, raw: '{"type": "audio_stream_start", "stream_id": "fz_x", "' + key + '": ' + raw + "}",
    st.sampled_from(["format", "sample_rate", "channel", "session_id"]),
    _deep | _huge_number,
)
_multicam_frames = st.lists(
    st.one_of(
        _control.map(lambda t: ("text", t)),
        _spliced.map(lambda t: ("text", t)),
        _json.map(lambda v: ("text", json.dumps(v))),
        st.binary(max_size=64).map(lambda b: ("utf8?", b)),
        st.binary(max_size=MAX_FRAME + 100).map(lambda b: ("binary", b)),
        st.tuples(st.integers(0, 2), st.binary(max_size=640)).map(lambda t: ("binary", bytes([t[0]]) + t[1])),
    ),
    min_size=1,
    max_size=12,
)


def _well_formed_multicam(msg: dict[str, Any]) -> None:
    assert msg["type"] in SERVER_TYPES, msg
    if msg["type"] == "error":
        assert isinstance(msg["code"], str) and msg["code"] and isinstance(msg["message"], str), msg
        assert not msg.get("fatal"), msg


@settings(max_examples=30, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=_multicam_frames)
def test_fuzz_multicam_control_messages(app: AppThread, frames: list[tuple[str, Any]]) -> None:
    async def run() -> list[dict[str, Any]]:
        async with connect(app) as c:
            for kind, data in frames:
                if kind == "text":
                    await c.ws.send_str(data)
                elif kind == "utf8?":
                    await c.ws.send_frame(data, aiohttp.WSMsgType.TEXT)
                else:
                    await c.ws.send_bytes(data)
            await fence(c)
            return list(c.messages)

    for msg in app.call(run()):
        _well_formed_multicam(msg)
    assert_clean(app)


_ws_control = st.one_of(
    st.builds(
        lambda kind, text: json.dumps({"type": kind, "text": text}),
        st.sampled_from(["text", "audio_end", "ping", "dance"]) | _json,
        _json,
    ),
    st.builds(
        lambda raw: '{"type": "text", "text": ' + raw + "}",
        st.integers(1, 3000).map(lambda n: "[" * n + "]" * n) | _huge_number,
    ),
    _json.map(json.dumps),
    st.text(max_size=40),  # a text frame must be UTF-8 here: /ws closes on invalid UTF-8 (RFC 6455, 1007)
)


class _Talker:
    """One /ws conversation kept open across fuzz examples (each example checks it still answers a ping)."""

    def __init__(self, a: AppThread) -> None:
        self.app = a
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None

    async def open(self) -> None:
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(self.app.ws_url + "/ws?user_id=fuzz_talker")
        assert (await self.until_type("ready"))[-1]["type"] == "ready"

    async def until_type(self, kind: str, timeout: float = 30) -> list[dict[str, Any]]:
        assert self.ws is not None
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while not seen or seen[-1]["type"] != kind:
            msg = await self.ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.type == aiohttp.WSMsgType.BINARY:
                continue  # the model's speech
            assert msg.type == aiohttp.WSMsgType.TEXT, (msg, seen)
            seen.append(json.loads(msg.data))
        return seen

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()


@pytest.fixture(scope="module")
def talker(app: AppThread) -> Iterator[_Talker]:
    t = _Talker(app)
    app.call(t.open())
    yield t
    app.call(t.close())


_FAKE_COMMANDS = ("tool", "cancel", "goaway", "drop", "interrupt")  # the fake Live server's test hooks


@settings(max_examples=30, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(messages=st.lists(_ws_control, min_size=1, max_size=6))
def test_fuzz_funvoice_ws_control_messages(app: AppThread, talker: _Talker, messages: list[str]) -> None:
    async def run() -> list[dict[str, Any]]:
        assert talker.ws is not None
        for text in messages:
            await talker.ws.send_str(text)
        await talker.ws.send_json({"type": "ping"})
        return await talker.until_type("pong")

    for text in messages:  # the fake's command words would steer the fake, not test the bridge
        try:
            words = str(json.loads(text).get("text", "")).split()
        except (ValueError, AttributeError, RecursionError):
            words = []
        if words and words[0] in _FAKE_COMMANDS:
            return
    for msg in app.call(run()):
        assert msg["type"] in WS_TYPES, msg
        if msg["type"] == "error":
            assert isinstance(msg["error"], str) and isinstance(msg["message"], str), msg
    assert_clean(app)
