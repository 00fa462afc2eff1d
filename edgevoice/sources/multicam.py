"""``/asr-multicam``: several audio streams per WebSocket (AUDIO_STREAM_SCHEMA.md, version 1).

Everything runs on the event loop: one reader task (the handler) and one writer
task (the outbox) per connection. Text frames carry JSON control messages,
binary frames one channel byte then PCM. Every bad input is answered with an
``error`` message and the connection and its other streams go on: text frames
are read as bytes, so invalid UTF-8 is an error, not a dropped connection;
JSON goes through :func:`~edgevoice.server.clientjson.parse_client_json`
(depth, size, number and string limits, no lone surrogates).

Bounds, per connection unless said: messages to the client go through a
bounded outbox (a client that does not read never stalls recognition or other
clients; its stale partials are dropped first, and one ``MAX_QUEUED`` messages
behind is disconnected); frames are read at most ``server.max_frames_per_s``
(a flood is slowed down, never dropped, and told ``rate_limited``); frames over
``server.max_frame_bytes`` are refused, over 4x that aiohttp closes (1009); a
client silent for ``server.idle_timeout_s`` is closed (1008); each peer address
may start ``server.max_stream_starts_per_min`` streams a minute, all its
connections together. Every close is bounded (:data:`CLOSE_TIMEOUT_S`), then the
transport is aborted. A disconnect stops (and flushes) every stream it held.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from edgevoice.config import ServerSettings
from edgevoice.errors import CodedError, describe, identifier_field
from edgevoice.events.hub import STREAM_HUB, HubStream, StreamError, StreamHub
from edgevoice.server.clientjson import BadJson, parse_client_json
from edgevoice.server.keys import SETTINGS, WEBSOCKETS
from edgevoice.sources.pcm import FORMATS, MAX_RATE, MIN_RATE, PcmDecoder

log = logging.getLogger(__name__)

PATH = "/asr-multicam"
SOURCE = "multicam"
MAX_QUEUED = 1024
"""Messages waiting for a client before it is disconnected as too slow."""
MAX_QUEUED_PARTIALS = 64
"""Above this many waiting messages, new partial transcripts are dropped."""
HEARTBEAT_S = 30.0
CLOSE_TIMEOUT_S = 5.0
"""Longest wait for a close handshake (and for the outbox to flush before it); then the transport is aborted."""
MAX_CONTROL_DEPTH = 8
"""Nesting a control message may use (none of the schema's messages nests at all)."""
MAX_CONTROL_STRING = 4096
"""Longest string in a control message (identifiers are at most 128 characters)."""
MAX_PEERS_TRACKED = 4096
"""Peer addresses whose stream-start rate is remembered; beyond it peers back at full allowance are forgotten."""

_LANGUAGE = re.compile(r"^[A-Za-z]{2,3}([-_][A-Za-z0-9]{1,8})?$")

Message = dict[str, Any]


class ProtocolError(CodedError):
    """Bad client input: answered with an ``error`` message; the connection stays open unless ``fatal``."""

    def __init__(self, code: str, message: str, stream_id: str | None = None, *, fatal: bool = False) -> None:
        super().__init__(code, message)
        self.stream_id = stream_id
        self.fatal = fatal

    def to_message(self) -> Message:
        msg: Message = {"type": "error", "code": self.code, "message": self.message}
        if self.stream_id is not None:
            msg["stream_id"] = self.stream_id
        if self.fatal:
            msg["fatal"] = True
        return msg


class TokenBucket:
    """``rate`` tokens a second, at most ``capacity`` saved up; the clock is injectable for tests."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self.tokens = capacity
        self._stamp = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def take(self) -> float:
        """Take a token, owing it if there is none: 0.0, or the seconds to wait before using it."""
        self._refill()
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def try_take(self) -> float:
        """Take a token if there is one: 0.0, else (nothing taken) the seconds until there is."""
        self._refill()
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate

    @property
    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.capacity


class PeerStartLimiter:
    """``audio_stream_start`` allowance per peer address (``server.max_stream_starts_per_min``), daemon-wide."""

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_minute = per_minute
        self.clock = clock
        self._peers: dict[str, TokenBucket] = {}

    def check(self, peer: str) -> float:
        """Count one start for ``peer``: 0.0 when allowed, else the seconds until the next one is."""
        bucket = self._peers.get(peer)
        if bucket is None:
            if len(self._peers) >= MAX_PEERS_TRACKED:
                self._peers = {p: b for p, b in self._peers.items() if not b.full}
            bucket = self._peers[peer] = TokenBucket(self.per_minute / 60.0, self.per_minute, self.clock)
        return bucket.try_take()


START_LIMITER = web.AppKey("multicam_start_limiter", PeerStartLimiter)
"""Stream starts per peer address, shared by every /asr-multicam connection."""


@dataclass(frozen=True, slots=True)
class StartRequest:
    """A validated ``audio_stream_start``."""

    session_id: str
    customer_id: str
    stream_id: str
    channel: int
    format: str
    sample_rate: int
    channels: int
    language: str | None


def _identifier(obj: Message, name: str) -> str:
    return identifier_field(obj, name, ProtocolError)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def parse_start(obj: Message) -> StartRequest:
    """Validate an ``audio_stream_start``; raises ProtocolError naming the bad field."""
    stream_id = _identifier(obj, "stream_id")
    try:
        session_id = _identifier(obj, "session_id")
        customer_id = _identifier(obj, "customer_id")
        channel = _int(obj.get("channel", 0))
        if channel is None or not 0 <= channel <= 255:
            raise ProtocolError("bad_channel", f"channel must be an integer 0–255, got {describe(obj.get('channel'))}")
        fmt = obj.get("format", "pcm_s16le")
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise ProtocolError(
                "unsupported_format", f"format must be one of {', '.join(FORMATS)}, got {describe(fmt)}"
            )
        rate = _int(obj.get("sample_rate", 16000))
        if rate is None or not MIN_RATE <= rate <= MAX_RATE:
            raise ProtocolError(
                "bad_sample_rate",
                f"sample_rate must be an integer {MIN_RATE}–{MAX_RATE}, got {describe(obj.get('sample_rate'))}",
            )
        channels = _int(obj.get("channels", 1))
        if channels not in (1, 2):
            raise ProtocolError(
                "unsupported_format", f"channels must be 1 (mono) or 2 (stereo), got {describe(obj.get('channels'))}"
            )
        language = obj.get("language")
        if language is not None and not (isinstance(language, str) and _LANGUAGE.fullmatch(language)):
            raise ProtocolError(
                "bad_language", f"language must be a code such as 'en' or 'vi', got {describe(language)}"
            )
    except ProtocolError as exc:
        exc.stream_id = stream_id
        raise
    return StartRequest(session_id, customer_id, stream_id, channel, fmt, rate, channels, language)


def parse_text(data: str | bytes) -> Message:
    """A control message (UTF-8 JSON text) as a dict with a string ``type``; raises ProtocolError."""
    try:
        obj = parse_client_json(data, max_depth=MAX_CONTROL_DEPTH, max_string_chars=MAX_CONTROL_STRING)
    except BadJson as exc:
        raise ProtocolError("bad_json", f"text frame is not a usable JSON message: {exc.message}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"a control message must be a JSON object, got {type(obj).__name__}")
    if "type" not in obj:
        raise ProtocolError("missing_field", "type is required")
    if not isinstance(obj["type"], str):
        raise ProtocolError("unknown_type", f"type must be a string, got {describe(obj['type'])}")
    return obj


class Outbox:
    """Bounded queue of messages to one client, written by its own task."""

    def __init__(self, ws: web.WebSocketResponse[bool], max_queued: int = MAX_QUEUED) -> None:
        self.ws = ws
        self.max_queued = max_queued
        self._queue: deque[Message] = deque()
        self._partials: dict[str, Message] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.closed = False
        self.dropped_partials = 0
        self.overflowed = False

    def put(self, msg: Message) -> None:
        """Queue a message (never blocks)."""
        if self.closed:
            return
        if msg.get("type") == "transcript" and not msg.get("final"):
            stale = self._partials.pop(msg["stream_id"], None)
            if stale is not None:  # superseded by the newer hypothesis
                with contextlib.suppress(ValueError):
                    self._queue.remove(stale)
                self.dropped_partials += 1
            if len(self._queue) >= MAX_QUEUED_PARTIALS:
                self.dropped_partials += 1
                return
            self._partials[msg["stream_id"]] = msg
        elif len(self._queue) >= self.max_queued:
            while self._partials and len(self._queue) >= self.max_queued:
                _, stale = self._partials.popitem()
                with contextlib.suppress(ValueError):
                    self._queue.remove(stale)
                self.dropped_partials += 1
            if len(self._queue) >= self.max_queued:
                self.overflowed = True
                self.close()
                return
        self._queue.append(msg)
        self._idle.clear()
        self._wake.set()

    def close(self) -> None:
        self.closed = True
        self._wake.set()

    async def flushed(self) -> None:
        """Return once every message queued so far is written (or the outbox stopped writing)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Write queued messages until closed; a send error ends the connection's output."""
        try:
            while True:
                while not self._queue:
                    self._idle.set()
                    if self.closed:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                if self.overflowed:
                    return
                msg = self._queue.popleft()
                if msg.get("type") == "transcript" and self._partials.get(msg["stream_id"]) is msg:
                    del self._partials[msg["stream_id"]]
                try:
                    await self._send(msg)
                except Exception as exc:  # the peer went away
                    log.debug("send failed: %s", exc)
                    self.closed = True
                    return
        finally:
            self._idle.set()

    async def _send(self, msg: Message) -> None:
        try:
            await self.ws.send_str(json.dumps(msg, ensure_ascii=False))
        except UnicodeEncodeError:  # a lone surrogate (encoding fails before anything is written): \\u escapes
            await self.ws.send_str(json.dumps(msg))


@dataclass(slots=True)
class _Stream:
    stream: HubStream
    channel: int
    decoder: PcmDecoder


class Connection:
    """One /asr-multicam client and its streams."""

    def __init__(
        self,
        ws: web.WebSocketResponse[bool],
        hub: StreamHub,
        server: ServerSettings,
        peer: str,
        *,
        starts: PeerStartLimiter | None = None,
        abort: Callable[[], None] = lambda: None,
    ) -> None:
        self.ws = ws
        self.hub = hub
        self.server = server
        self.peer = peer
        self.starts = starts or PeerStartLimiter(server.max_stream_starts_per_min)
        self.abort = abort
        self.outbox = Outbox(ws)
        self.channels: dict[int, _Stream] = {}
        self.by_id: dict[str, _Stream] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self.frames = TokenBucket(server.max_frames_per_s, server.max_frames_per_s)
        self.throttled = False
        self.close_reason: str | None = None

    def error(self, exc: ProtocolError) -> None:
        log.debug("%s: %s %s", self.peer, exc.code, exc.message)
        self.outbox.put(exc.to_message())

    async def run(self) -> None:
        writer = asyncio.create_task(self.outbox.run())
        try:
            await self._read()
        finally:
            await self.close_streams()
            self.outbox.close()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _read(self) -> None:
        """Read frames until the client leaves, breaks the protocol, goes idle or stops reading."""
        idle = self.server.idle_timeout_s
        while True:
            try:
                msg = await self.ws.receive(timeout=idle)
            except asyncio.TimeoutError:
                log.info("%s: nothing received for %.0f s (server.idle_timeout_s); closing", self.peer, idle)
                self.error(
                    ProtocolError(
                        "idle_timeout",
                        f"nothing received for {idle:g} s (server.idle_timeout_s); send a ping to stay connected",
                        fatal=True,
                    )
                )
                await self._close(WSCloseCode.POLICY_VIOLATION, "idle timeout")
                return
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if msg.type == WSMsgType.ERROR:  # a WebSocket protocol violation: aiohttp has closed the connection
                log.info("%s: connection closed (%s): %s", self.peer, self.ws.close_code, msg.data)
                return
            await self._pace()
            try:
                if msg.type == WSMsgType.TEXT:
                    self.on_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self.on_binary(msg.data)
            except Exception:  # a bug must cost one message, never the connection and its customers
                log.exception("%s: failed to handle a %s frame", self.peer, msg.type.name)
                self.error(ProtocolError("internal_error", "the daemon failed to handle that frame; see its log"))
            if self.outbox.overflowed:
                log.warning("%s: client is not reading its messages; disconnecting it", self.peer)
                await self._close(WSCloseCode.POLICY_VIOLATION, "client not reading", flush=False)
                return

    async def _pace(self) -> None:
        """Hold reading back to ``server.max_frames_per_s`` (TCP then slows the sender); tell the client once."""
        wait = self.frames.take()
        if wait <= 0:
            self.throttled = False
            return
        if not self.throttled:
            self.throttled = True
            limit = self.server.max_frames_per_s
            log.info("%s: more than %d frames a second; reading slowed down", self.peer, limit)
            self.error(
                ProtocolError(
                    "rate_limited",
                    f"more than server.max_frames_per_s ({limit}) frames a second: reading is slowed down to that rate"
                    " (nothing is dropped); send larger frames",
                )
            )
        await asyncio.sleep(wait)

    async def _close(self, code: int, reason: str, *, flush: bool = True) -> None:
        """Close with ``code``, each step bounded by :data:`CLOSE_TIMEOUT_S`; abort the transport if that fails."""
        self.close_reason = reason
        if flush:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.outbox.flushed(), CLOSE_TIMEOUT_S)
        self.outbox.close()
        try:
            await asyncio.wait_for(self.ws.close(code=code, message=reason.encode()), CLOSE_TIMEOUT_S)
        except Exception as exc:  # the peer does not read (the close frame cannot be written) or answer
            log.info("%s: close handshake did not finish (%s); aborting the connection", self.peer, type(exc).__name__)
            self.abort()

    async def close_streams(self) -> None:
        """Stop (and flush) every stream still open; wait for stops already under way."""
        for stream_id in list(self.by_id):
            self._begin_stop(stream_id)
        while self._stopping:
            await asyncio.gather(*list(self._stopping), return_exceptions=True)

    # -- input ----------------------------------------------------------------

    def on_text(self, data: str | bytes) -> None:
        if len(data) > self.server.max_frame_bytes:
            self.error(
                ProtocolError(
                    "frame_too_large", f"frame exceeds server.max_frame_bytes ({self.server.max_frame_bytes})"
                )
            )
            return
        try:
            obj = parse_text(data)
            kind = obj["type"]
            if kind == "audio_stream_start":
                self.start(parse_start(obj))
            elif kind == "audio_stream_stop":
                self.stop(_identifier(obj, "stream_id"))
            elif kind == "ping":
                self.outbox.put({"type": "pong"})
            else:
                raise ProtocolError(
                    "unknown_type",
                    f"unknown message type {describe(kind)}; expected audio_stream_start, audio_stream_stop or ping",
                )
        except ProtocolError as exc:
            self.error(exc)

    def start(self, req: StartRequest) -> None:
        if req.stream_id in self.by_id:
            raise ProtocolError("duplicate_stream", f"stream_id {req.stream_id!r} is already open", req.stream_id)
        if req.channel in self.channels:
            raise ProtocolError(
                "channel_in_use",
                f"channel {req.channel} already carries stream {self.channels[req.channel].stream.stream_id!r}",
                req.stream_id,
            )
        limit = self.server.max_streams_per_connection
        if len(self.by_id) >= limit:
            raise ProtocolError(
                "too_many_streams", f"server.max_streams_per_connection ({limit}) streams are open here", req.stream_id
            )
        wait = self.starts.check(self.peer)
        if wait > 0:
            raise ProtocolError(
                "start_rate_limited",
                f"more than server.max_stream_starts_per_min ({self.server.max_stream_starts_per_min}) stream starts"
                f" a minute from {self.peer}; try again in {wait:.0f} s",
                req.stream_id,
            )
        decoder = PcmDecoder(req.format, req.sample_rate, req.channels)
        try:
            stream = self.hub.open_stream(
                req.stream_id,
                source=SOURCE,
                language=req.language,
                session_id=req.session_id,
                customer_id=req.customer_id,
                listener=self.outbox.put,
            )
        except StreamError as exc:
            raise ProtocolError(exc.code, exc.message, req.stream_id) from None
        entry = _Stream(stream, req.channel, decoder)
        self.channels[req.channel] = entry
        self.by_id[req.stream_id] = entry
        self.outbox.put({"type": "stream_started", "stream_id": req.stream_id, "channel": req.channel})

    def stop(self, stream_id: str) -> None:
        if stream_id not in self.by_id:
            raise ProtocolError("unknown_stream", f"stream_id {stream_id!r} is not open on this connection", stream_id)
        self._begin_stop(stream_id)

    def _begin_stop(self, stream_id: str) -> None:
        entry = self.by_id.pop(stream_id)
        self.channels.pop(entry.channel, None)
        entry.stream.feed(entry.decoder.flush())
        task = asyncio.create_task(self._finish(entry))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _finish(self, entry: _Stream) -> None:
        await entry.stream.stop()  # the hub sends stream_stopped (also when it ends the stream itself, at shutdown)

    def on_binary(self, data: bytes) -> None:
        if not data:
            self.error(ProtocolError("bad_frame", "a binary frame needs a channel byte before its samples"))
            return
        entry = self.channels.get(data[0])
        if len(data) > self.server.max_frame_bytes:
            self.error(
                ProtocolError(
                    "frame_too_large",
                    f"frame of {len(data)} bytes exceeds server.max_frame_bytes ({self.server.max_frame_bytes})",
                    entry.stream.stream_id if entry else None,
                )
            )
            return
        if entry is None:
            self.error(ProtocolError("unknown_channel", f"no open stream on channel {data[0]}"))
            return
        entry.stream.feed(entry.decoder.decode(memoryview(data)[1:]))


async def asr_multicam(request: web.Request) -> web.WebSocketResponse[bool]:
    """The /asr-multicam WebSocket endpoint."""
    app = request.app
    server = app[SETTINGS].server
    # Frames up to 4x the limit are read and answered with frame_too_large; beyond that aiohttp closes (1009).
    # Text frames arrive as bytes: invalid UTF-8 is answered with bad_json instead of closing (1007).
    ws = web.WebSocketResponse(
        max_msg_size=server.max_frame_bytes * 4, heartbeat=HEARTBEAT_S, compress=False, decode_text=False
    )
    await ws.prepare(request)
    peer = request.remote or "?"
    transport = request.transport

    def abort() -> None:
        if transport is not None:
            transport.abort()

    app[WEBSOCKETS].add(ws)
    conn = Connection(ws, app[STREAM_HUB], server, peer, starts=app[START_LIMITER], abort=abort)
    log.debug("%s: /asr-multicam connected", peer)
    try:
        await conn.run()
    finally:
        app[WEBSOCKETS].discard(ws)
        log.debug("%s: /asr-multicam disconnected (%d partials dropped)", peer, conn.outbox.dropped_partials)
    return ws


def setup(app: web.Application) -> None:
    """Serve /asr-multicam (needs the stream hub)."""
    app[START_LIMITER] = PeerStartLimiter(app[SETTINGS].server.max_stream_starts_per_min)
    app.router.add_get(PATH, asr_multicam)
