"""/asr-multicam against a real daemon: every error code, auth, formats, a slow client, and a fuzz test."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soxr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgevoice import modelstore
from edgevoice.sources.multicam_client import MulticamClient
from tests.support.daemon import Daemon
from tests.support.speech import have_espeak, silence, synth

pytestmark = pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")

TOKEN = "multicam-test-token"
MODELS = Path(tempfile.gettempdir()) / "edgevoice-test-models"
MAX_FRAME = 2048
SERVER_TYPES = {"stream_started", "transcript", "keyword", "stream_stopped", "error", "pong"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("multicam")
    d = Daemon(
        tmp,
        env={
            "EDGEVOICE_ASR__MODEL": str(modelstore.resolve("tiny.en", MODELS)),
            "EDGEVOICE_ASR__MULTILINGUAL_MODEL": "none",  # tiny.en alone: a Vietnamese stream is refused
            "EDGEVOICE_SERVER__TOKEN": TOKEN,
            "EDGEVOICE_SERVER__MAX_STREAMS_PER_CONNECTION": "2",
            "EDGEVOICE_SERVER__MAX_STREAMS": "3",
            "EDGEVOICE_SERVER__MAX_FRAME_BYTES": str(MAX_FRAME),
        },
    )
    d.start()
    yield d
    d.stop()


def connect(daemon: Daemon) -> Any:
    return MulticamClient.connect(daemon.ws_url, token=TOKEN)


def start_msg(stream_id: str, **kw: Any) -> dict[str, Any]:
    return {"type": "audio_stream_start", "session_id": "t5", "customer_id": "cust", "stream_id": stream_id, **kw}


async def expect_error(client: MulticamClient, code: str, stream_id: str | None = None) -> dict[str, Any]:
    """The next error after everything sent so far (a ping fences the reply)."""
    before = len(client.messages)
    await client.send_json({"type": "ping"})
    await client.wait_for(lambda m: m["type"] == "pong", 10, since=before)
    errors = [m for m in client.messages[before:] if m["type"] == "error"]
    assert errors, f"no error, expected {code}"
    err = errors[-1]
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and err["message"]
    assert err.get("stream_id") == stream_id
    assert not err.get("fatal")
    return err


async def test_every_error_code_keeps_the_connection(daemon: Daemon) -> None:
    hello = np.concatenate([silence(0.3), synth("Hello everyone, good evening."), silence(1.2)])
    async with connect(daemon) as c:
        ws = c.ws
        await ws.send_str("{not json")
        await expect_error(c, "bad_json")
        await ws.send_str("[1, 2, 3]")
        await expect_error(c, "bad_json")
        await c.send_json({"type": "dance"})
        await expect_error(c, "unknown_type")
        await c.send_json({"stream_id": "x"})
        await expect_error(c, "missing_field")
        await c.send_json({"type": "audio_stream_start", "stream_id": "s1", "session_id": "t5"})
        err = await expect_error(c, "missing_field", "s1")
        assert "customer_id" in err["message"]
        await c.send_json(start_msg("bad id!"))
        await expect_error(c, "bad_identifier")
        await c.send_json(start_msg("s1", customer_id="x" * 129))
        await expect_error(c, "bad_identifier", "s1")
        await c.send_json(start_msg("s1", format="opus"))
        await expect_error(c, "unsupported_format", "s1")
        await c.send_json(start_msg("s1", channels=4))
        await expect_error(c, "unsupported_format", "s1")
        await c.send_json(start_msg("s1", sample_rate=96000))
        await expect_error(c, "bad_sample_rate", "s1")
        await c.send_json(start_msg("s1", channel=300))
        await expect_error(c, "bad_channel", "s1")
        await c.send_json(start_msg("s1", language="Klingon language"))
        await expect_error(c, "bad_language", "s1")
        await c.send_json(start_msg("s1", language="vi"))  # tiny.en is English-only
        err = await expect_error(c, "bad_language", "s1")
        assert "English-only" in err["message"]
        await ws.send_bytes(b"\x05" + b"\x00" * 320)
        await expect_error(c, "unknown_channel")
        await ws.send_bytes(b"")
        await expect_error(c, "bad_frame")
        await c.send_json({"type": "audio_stream_stop", "stream_id": "never_started"})
        await expect_error(c, "unknown_stream", "never_started")
        await c.send_json({"type": "audio_stream_stop"})
        await expect_error(c, "missing_field")

        # Two good streams, then the per-connection limit, duplicates and channel reuse.
        await c.start("good", session_id="t5", customer_id="cust_good", channel=3)
        await c.start("other", session_id="t5", customer_id="cust_other", channel=4)
        await c.send_json(start_msg("third", channel=5))
        await expect_error(c, "too_many_streams", "third")
        await c.stop("other")
        await c.send_json(start_msg("good", channel=6))
        await expect_error(c, "duplicate_stream", "good")
        await c.send_json(start_msg("again", channel=3))
        await expect_error(c, "channel_in_use", "again")
        await ws.send_bytes(b"\x03" + b"\x00" * (MAX_FRAME + 10))
        await expect_error(c, "frame_too_large", "good")
        await ws.send_str(json.dumps({"type": "ping", "pad": "x" * (MAX_FRAME + 10)}))
        await expect_error(c, "frame_too_large")

        # After all that, the good stream recognizes speech sent in odd-sized frames.
        raw = (hello * 32767).astype("<i2").tobytes()
        t0 = time.monotonic()
        for i in range(0, len(raw), 1001):  # samples split across frames
            await ws.send_bytes(b"\x03" + raw[i : i + 1001])
            await asyncio.sleep(max(0.0, t0 + (i + 1001) / 32000 - time.monotonic()))
        full = await c.stop("good")
        assert "hello" in full.lower(), full
        assert [m["event"] for m in c.of("keyword", "good")] == ["SAY_HELLO"]
        assert c.of("stream_started", "good") == [c.of("stream_started", "good")[0]]
        assert c.of("stream_started", "good")[0]["channel"] == 3


async def test_daemon_wide_stream_limit_and_duplicates_across_connections(daemon: Daemon) -> None:
    async with connect(daemon) as a, connect(daemon) as b:
        await a.start("wide_1", session_id="t5", customer_id="c1", channel=0)
        await a.start("wide_2", session_id="t5", customer_id="c2", channel=1)
        await b.send_json(start_msg("wide_1"))
        await expect_error(b, "duplicate_stream", "wide_1")
        await b.start("wide_3", session_id="t5", customer_id="c3", channel=0)
        await b.send_json(start_msg("wide_4", channel=1))
        err = await expect_error(b, "too_many_streams", "wide_4")
        assert "max_streams" in err["message"]
        await a.stop("wide_1")
        await b.start("wide_4", session_id="t5", customer_id="c4", channel=1)
        await asyncio.gather(a.stop("wide_2"), b.stop("wide_3"), b.stop("wide_4"))  # free the daemon's slots


async def test_auth_is_required(daemon: Daemon) -> None:
    async with aiohttp.ClientSession() as s:
        for url in (f"{daemon.ws_url}/asr-multicam", f"{daemon.ws_url}/asr-multicam?token=wrong"):
            with pytest.raises(aiohttp.WSServerHandshakeError) as info:
                await s.ws_connect(url)
            assert info.value.status == 401
        async with s.ws_connect(f"{daemon.ws_url}/asr-multicam?token={TOKEN}") as ws:
            await ws.send_json({"type": "ping"})
            assert (await ws.receive_json(timeout=5)) == {"type": "pong"}


async def test_stereo_float_44k(daemon: Daemon) -> None:
    """pcm_f32le stereo at 44.1 kHz, one channel silent: downmixed, resampled, recognized."""
    speech = np.concatenate([silence(0.3), synth("I am so sorry."), silence(1.2)])
    s44 = soxr.resample(speech, 16000, 44100).astype(np.float32)
    stereo = np.stack([s44, np.zeros_like(s44)], axis=1).astype("<f4").tobytes()
    async with connect(daemon) as c:
        await c.start(
            "stereo", session_id="t5", customer_id="cust_st", channel=9, fmt="pcm_f32le", sample_rate=44100, channels=2
        )
        step, t0 = 2002, time.monotonic()  # under max_frame_bytes; splits stereo frames across messages
        for i in range(0, len(stereo), step):
            await c.ws.send_bytes(b"\x09" + stereo[i : i + step])
            await asyncio.sleep(max(0.0, t0 + (i + step) / (44100 * 8) - time.monotonic()))
        full = await c.stop("stereo")
    assert "sorry" in full.lower(), full
    assert [m["event"] for m in c.of("keyword")] == ["SAY_SORRY"]


def _raw_ws(port: int) -> socket.socket:
    """A WebSocket opened by hand on a socket with a tiny receive buffer, so the client can refuse to read."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        (
            f"GET /asr-multicam?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
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
    head = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n))
    body = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
    return head + mask + body


def _spam_until_disconnected(port: int, seconds: float) -> int:
    """Send bad audio frames (each answered with an error) without ever reading; frames sent until cut off."""
    s = _raw_ws(port)
    s.settimeout(5)
    frame = _frame(b"\x07" + b"\x00" * 64)
    sent, deadline = 0, time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            s.sendall(frame * 200)
            sent += 200
    except OSError:
        return sent
    finally:
        s.close()
    return -sent


async def test_a_client_that_never_reads_stalls_nobody(daemon: Daemon) -> None:
    speech = np.concatenate([silence(0.3), synth("Could we have some water please?"), silence(1.2)])
    spam = asyncio.create_task(asyncio.to_thread(_spam_until_disconnected, daemon.port, 60.0))
    async with connect(daemon) as c:
        await c.start("polite", session_id="t5", customer_id="cust_polite")
        t0 = time.monotonic()
        await c.stream(0, speech)
        full = await c.stop("polite")
        took = time.monotonic() - t0
    assert "water" in full.lower(), full
    assert took < len(speech) / 16000 + 10, f"the polite stream took {took:.1f} s"
    sent = await spam
    assert sent > 0, f"the non-reading client was never disconnected ({-sent} frames sent)"
    assert "client is not reading" in daemon.log()


# -- fuzz ---------------------------------------------------------------------------------------

_ident = st.one_of(st.sampled_from(["t5", "cust", "fz_a", "fz_b", "m.1"]), st.text(max_size=12))
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=16),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_control = st.fixed_dictionaries(
    {"type": st.sampled_from(["audio_stream_start", "audio_stream_stop", "ping", "nope"]) | st.text(max_size=6)},
    optional={
        "session_id": _ident,
        "customer_id": _ident,
        "stream_id": _ident,
        "channel": st.integers(-2, 260) | _json,
        "format": st.sampled_from(["pcm_s16le", "pcm_f32le", "mp3"]) | _json,
        "sample_rate": st.sampled_from([8000, 16000, 22050, 48000, 7999]) | _json,
        "channels": st.integers(0, 3) | _json,
        "language": st.sampled_from(["en", "vi", "en-US", "??"]) | _json,
    },
)
_frames = st.lists(
    st.one_of(
        _control.map(lambda d: ("text", json.dumps(d))),
        _json.map(lambda v: ("text", json.dumps(v))),
        st.text(max_size=40).map(lambda t: ("text", t)),
        st.binary(max_size=MAX_FRAME + 200).map(lambda b: ("binary", b)),
        st.tuples(st.integers(0, 3), st.binary(max_size=1600)).map(lambda t: ("binary", bytes([t[0]]) + t[1])),
    ),
    min_size=1,
    max_size=25,
)


async def _throw(daemon: Daemon, frames: list[tuple[str, Any]]) -> list[dict[str, Any]]:
    async with connect(daemon) as c:
        for kind, data in frames:
            await (c.ws.send_str(data) if kind == "text" else c.ws.send_bytes(data))
        await c.send_json({"type": "ping", "fence": True})
        await c.wait_for(lambda m: m["type"] == "pong", 15)
        return list(c.messages)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=_frames)
def test_fuzz_frames_never_hurt_the_daemon(daemon: Daemon, frames: list[tuple[str, Any]]) -> None:
    for msg in asyncio.run(_throw(daemon, frames)):
        assert msg["type"] in SERVER_TYPES, msg
        if msg["type"] == "error":
            assert isinstance(msg["code"], str) and isinstance(msg["message"], str), msg
            assert not msg.get("fatal"), msg
    assert daemon.proc is not None and daemon.proc.poll() is None


async def test_after_fuzz_a_well_behaved_stream_is_served(daemon: Daemon) -> None:
    """Runs after the fuzz test (file order): the daemon is alive, healthy and still recognizes speech."""
    assert daemon.proc is not None and daemon.proc.poll() is None
    req = urllib.request.Request(f"{daemon.url}/health", headers={"Authorization": f"Bearer {TOKEN}"})

    async def health() -> dict[str, Any]:
        try:
            return json.loads(await asyncio.to_thread(lambda: urllib.request.urlopen(req, timeout=10).read()))
        except urllib.error.HTTPError as exc:  # degraded is still an answer
            return json.loads(exc.read())

    for _ in range(100):  # the fuzz connections' streams finish flushing
        if (await health())["events"]["streams"] == 0:
            break
        await asyncio.sleep(0.2)
    events = (await health())["events"]
    assert events["streams"] == 0 and events["customers"] == 0, events  # no customer state left behind
    speech = np.concatenate([silence(0.3), synth("Hello again."), silence(1.2)])
    async with connect(daemon) as c:
        await c.start("after_fuzz", session_id="t5", customer_id="cust_after")
        await c.stream(0, speech)
        full = await c.stop("after_fuzz")
    assert "hello" in full.lower(), full
    log = daemon.log()
    assert "Error handling request" not in log
    assert "Traceback" not in log, log[log.index("Traceback") - 200 :][:3000]
