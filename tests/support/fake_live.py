"""A fake Gemini Live server on 127.0.0.1: TLS, the BidiGenerateContent protocol as google-genai speaks it.

The SDK always connects to ``wss://{base}/ws/google.ai.generativelanguage.{version}.GenerativeService.
BidiGenerateContent`` with the key in ``x-goog-api-key``; the first client message is ``{"setup": ...}``,
then ``realtime_input`` / ``tool_response`` / ``client_content``. Replies use camelCase top-level keys
(``setupComplete``, ``serverContent``, ``toolCall``, ``toolCallCancellation``, ``goAway``,
``sessionResumptionUpdate``) and URL-safe base64 audio.

The fake's model is deterministic so tests can check every byte:

- audio in: after ``turn_audio_s`` of PCM16 16 kHz (or ``audioStreamEnd``) the turn is answered with an
  input transcription ``heard N bytes crc XXXXXXXX``, the same audio resampled to 24 kHz
  (:func:`echo_24k`) in 100 ms chunks, an output transcription ``conversation C turn K: ...`` and
  ``turnComplete``;
- text in (``realtimeInput.text``) is a command: ``tool NAME {json}`` (a function call, answered once the
  tool response with its id arrives), ``cancel NAME {json}`` (a call then its cancellation),
  ``goaway`` (``goAway`` then a server close after ``go_away_s``), ``drop`` (the TCP connection is cut
  without a close frame), ``interrupt [SECONDS]`` (SECONDS of audio, default 0.3, then ``interrupted``);
  anything else is echoed back.

Conversations survive reconnects: every ``sessionResumptionUpdate`` hands out a new handle for the
conversation, and a ``setup`` carrying a known handle continues it (same id, turn count going on).
A wrong key is refused as Gemini does: the setup is read, then the socket closes with 1007.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import re
import secrets
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trustme
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

PATH_RE = re.compile(r"^/+ws/google\.ai\.generativelanguage\.(\w+)\.GenerativeService\.BidiGenerateContent$")
IN_RATE, OUT_RATE = 16000, 24000
BAD_KEY_REASON = "API key not valid. Please pass a valid API key."


def echo_24k(pcm16_16k: bytes) -> bytes:
    """The fake model's spoken answer to a turn of audio: the same samples at 24 kHz (linear interpolation)."""
    x = np.frombuffer(pcm16_16k, dtype="<i2").astype(np.float64)
    if x.size == 0:
        return b""
    n_out = x.size * OUT_RATE // IN_RATE
    t = np.arange(n_out) * (IN_RATE / OUT_RATE)
    y = np.interp(t, np.arange(x.size), x)
    return np.round(y).astype("<i2").tobytes()


def tone_24k(seconds: float, freq: float = 440.0) -> bytes:
    """A plain tone standing in for speech in answers to text."""
    t = np.arange(int(seconds * OUT_RATE)) / OUT_RATE
    return (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2").tobytes()


def heard(pcm: bytes) -> str:
    """The input transcription the fake gives for a turn of audio."""
    return f"heard {len(pcm)} bytes crc {binascii.crc32(pcm):08x}"


@dataclass
class Conversation:
    """One conversation, possibly spread over several connections."""

    id: str
    turns: int = 0
    handles: list[str] = field(default_factory=list)
    user_texts: list[str] = field(default_factory=list)


@dataclass
class Connection:
    """What the fake saw on one WebSocket connection."""

    version: str
    key: str | None
    setup: dict[str, Any] = field(default_factory=dict)
    conversation: Conversation | None = None
    resumed_with: str | None = None
    audio_bytes: int = 0
    audio: bytearray = field(default_factory=bytearray)  # every byte of audio received, in order
    tool_responses: list[dict[str, Any]] = field(default_factory=list)
    closed_by: str | None = None  # "client" | "server" | "drop"
    open: bool = True


class FakeLive:
    """The server, on its own event loop in a thread (usable from sync and async tests)."""

    def __init__(
        self,
        tmp: Path,
        keys: frozenset[str] = frozenset({"test-key"}),
        turn_audio_s: float = 1.0,
        go_away_s: float = 3.0,
    ) -> None:
        self.keys = keys
        self.turn_bytes = int(turn_audio_s * IN_RATE) * 2
        self.go_away_s = go_away_s
        self.ca = trustme.CA()
        self.ca_path = tmp / "fake-live-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_path))
        self.connections: list[Connection] = []
        self.conversations: dict[str, Conversation] = {}
        self._by_handle: dict[str, Conversation] = {}
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-live", daemon=True)
        self._server: Any = None
        self.port = 0

    # lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> FakeLive:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
        self._server = await serve(
            self._handle, "127.0.0.1", 0, ssl=ctx, process_request=self._check_path, max_size=None
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        async def _stop() -> None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(_stop(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> FakeLive:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx

    def sessions(self) -> list[Connection]:
        """Connections that carried tools, i.e. real conversations rather than health probes."""
        return [c for c in list(self.connections) if c.setup.get("tools")]

    # protocol --------------------------------------------------------------------------------------------
    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if PATH_RE.match(request.path.split("?", 1)[0]):
            return None
        body = json.dumps({"error": {"code": 404, "message": f"no such path {request.path}", "status": "NOT_FOUND"}})
        return Response(404, "Not Found", Headers({"Content-Type": "application/json"}), body.encode())

    async def _handle(self, ws: ServerConnection) -> None:
        m = PATH_RE.match(ws.request.path.split("?", 1)[0])  # type: ignore[union-attr]
        assert m is not None
        conn = Connection(version=m.group(1), key=ws.request.headers.get("x-goog-api-key"))  # type: ignore[union-attr]
        self.connections.append(conn)
        try:
            await self._serve(ws, conn)
        except ConnectionClosed:
            if conn.closed_by is None:
                conn.closed_by = "client"
        finally:
            conn.open = False

    async def _serve(self, ws: ServerConnection, conn: Connection) -> None:
        first = json.loads(await ws.recv())
        if "setup" not in first:
            conn.closed_by = "server"
            await ws.close(1007, "Invalid JSON payload: the first message must be setup")
            return
        conn.setup = first["setup"]
        if conn.key not in self.keys:
            conn.closed_by = "server"
            await ws.close(1007, BAD_KEY_REASON)
            return
        if not str(conn.setup.get("model", "")).startswith("models/"):
            conn.closed_by = "server"
            await ws.close(1008, f"models/{conn.setup.get('model')} is not found")
            return
        resumption = conn.setup.get("sessionResumption")
        handle = (resumption or {}).get("handle")
        if handle:
            conv = self._by_handle.get(handle)
            if conv is None:
                conn.closed_by = "server"
                await ws.close(1008, "Session resumption handle is invalid or expired.")
                return
            conn.resumed_with = handle
        else:
            conv = Conversation(id=f"c{next(self._ids)}")
            self.conversations[conv.id] = conv
        conn.conversation = conv
        await self._send(ws, {"setupComplete": {}})
        if resumption is not None:
            await self._new_handle(ws, conv)
        audio = bytearray()
        pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        tasks: set[asyncio.Task[None]] = set()
        async for raw in ws:
            msg = json.loads(raw)
            realtime = msg.get("realtimeInput") or msg.get("realtime_input")
            tool_response = msg.get("toolResponse") or msg.get("tool_response")
            if realtime:
                if "audio" in realtime:
                    blob = realtime["audio"]
                    chunk = base64.urlsafe_b64decode(blob["data"])
                    mime = blob.get("mimeType") or blob.get("mime_type")  # proto JSON accepts both spellings
                    if mime != "audio/pcm;rate=16000":
                        conn.closed_by = "server"
                        await ws.close(1007, f"unsupported audio mime type {mime!r}")
                        return
                    conn.audio_bytes += len(chunk)
                    conn.audio += chunk
                    audio += chunk
                    if len(audio) >= self.turn_bytes:
                        await self._answer_audio(ws, conv, bytes(audio))
                        audio.clear()
                elif (realtime.get("audioStreamEnd") or realtime.get("audio_stream_end")) and audio:
                    await self._answer_audio(ws, conv, bytes(audio))
                    audio.clear()
                elif "text" in realtime:
                    task = asyncio.create_task(self._command(ws, conn, conv, realtime["text"], pending))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            elif tool_response:
                for resp in tool_response.get("functionResponses", []):
                    conn.tool_responses.append(resp)
                    fut = pending.pop(resp.get("id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(resp)
        conn.closed_by = conn.closed_by or "client"
        for task in tasks:
            task.cancel()

    async def _send(self, ws: ServerConnection, msg: dict[str, Any]) -> None:
        await ws.send(json.dumps(msg))

    async def _new_handle(self, ws: ServerConnection, conv: Conversation) -> None:
        handle = f"{conv.id}-h{len(conv.handles) + 1}-{secrets.token_hex(4)}"
        conv.handles.append(handle)
        self._by_handle[handle] = conv
        await self._send(ws, {"sessionResumptionUpdate": {"newHandle": handle, "resumable": True}})

    async def _speak(self, ws: ServerConnection, pcm24: bytes) -> None:
        step = OUT_RATE // 10 * 2
        for i in range(0, len(pcm24), step):
            data = base64.urlsafe_b64encode(pcm24[i : i + step]).decode("ascii")
            part = {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": data}}
            await self._send(ws, {"serverContent": {"modelTurn": {"parts": [part]}}})

    async def _finish_turn(self, ws: ServerConnection, conv: Conversation, text: str) -> None:
        await self._send(ws, {"serverContent": {"outputTranscription": {"text": f"conversation {conv.id} {text}"}}})
        await self._send(ws, {"serverContent": {"generationComplete": True}})
        await self._send(ws, {"serverContent": {"turnComplete": True}})
        await self._new_handle(ws, conv)

    async def _answer_audio(self, ws: ServerConnection, conv: Conversation, pcm: bytes) -> None:
        conv.turns += 1
        await self._send(ws, {"serverContent": {"inputTranscription": {"text": heard(pcm)}}})
        await self._speak(ws, echo_24k(pcm))
        await self._finish_turn(ws, conv, f"turn {conv.turns}: I heard {len(pcm) / 2 / IN_RATE:.2f} seconds")

    async def _command(
        self,
        ws: ServerConnection,
        conn: Connection,
        conv: Conversation,
        text: str,
        pending: dict[str, asyncio.Future[dict[str, Any]]],
    ) -> None:
        conv.turns += 1
        conv.user_texts.append(text)
        await self._send(ws, {"serverContent": {"inputTranscription": {"text": text}}})
        word, _, rest = text.strip().partition(" ")
        if word in ("tool", "cancel"):
            name, _, args = rest.partition(" ")
            call_id = f"call-{secrets.token_hex(4)}"
            call = {"id": call_id, "name": name, "args": json.loads(args or "{}")}
            fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            pending[call_id] = fut
            await self._send(ws, {"toolCall": {"functionCalls": [call]}})
            if word == "cancel":
                await self._send(ws, {"toolCallCancellation": {"ids": [call_id]}})
                pending.pop(call_id, None)
                await self._finish_turn(ws, conv, f"turn {conv.turns}: cancelled {call_id}")
                return
            try:
                resp = await asyncio.wait_for(fut, 10)
            except asyncio.TimeoutError:
                await self._finish_turn(ws, conv, f"turn {conv.turns}: no tool response for {call_id}")
                return
            await self._speak(ws, tone_24k(0.2))
            answer = json.dumps(resp.get("response"), sort_keys=True, ensure_ascii=False)
            await self._finish_turn(ws, conv, f"turn {conv.turns}: tool {name} answered {answer}")
        elif word == "goaway":
            await self._send(ws, {"goAway": {"timeLeft": f"{self.go_away_s:g}s"}})
            await asyncio.sleep(self.go_away_s)
            if conn.open and conn.closed_by is None:
                conn.closed_by = "server"
                await ws.close(1000, "session time limit reached")
        elif word == "drop":
            conn.closed_by = "drop"
            ws.transport.abort()
        elif word == "interrupt":
            await self._speak(ws, tone_24k(float(rest or 0.3)))
            await self._send(ws, {"serverContent": {"interrupted": True}})
            await self._finish_turn(ws, conv, f"turn {conv.turns}: interrupted")
        else:
            await self._speak(ws, tone_24k(0.2))
            await self._finish_turn(ws, conv, f"turn {conv.turns}: you said {text}")
