"""Pipecat RTVI clients on ``/ws``: protobuf ``pipecat.Frame`` frames and RTVI messages, bridged to a Conversation.

Thread model: everything runs on the daemon's event loop. One :class:`RtviSession` per ``/ws`` connection is
both the conversation's :class:`~edgevoice.funvoice.gemini.Sink` (Gemini's output, turned into RTVI) and the
reader of the client's frames; its :class:`AudioPacer` task sends bot audio at playback speed, and a forwarder
task hands microphone audio to the conversation (merging frames that piled up during a send).
Bounds: bot audio is sent at most ``AUDIO_LEAD_S`` ahead of playback (what an interruption cannot recall)
and at most ``MAX_QUEUED_AUDIO_S`` is held per connection (beyond: dropped, the client is told); a user
turn's transcript is kept up to ``MAX_TRANSCRIPT_CHARS``; microphone audio waiting for the conversation up to
``MAX_MIC_BACKLOG_BYTES`` (5 s; beyond: the oldest is dropped, the client is told); typed-text sends in flight
per connection up to ``MAX_PENDING_TEXTS``.

Speaks the two RTVI generations the Pipecat web SDK has shipped: ``@pipecat-ai/client-js`` 0.4 (RTVI 0.3:
``client-ready`` without a version, ``action``/``describe-actions``/``get-config``) and 1.x (RTVI 1.x/2.x:
``client-ready`` with a version, ``send-text``, ``client-message``, ``bot-output``). See docs/funvoice.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import soxr

from edgevoice import __version__
from edgevoice.funvoice.pipecat_frames import AudioIn, FrameError, decode, encode_audio, encode_message
from edgevoice.server.clientjson import BadJson, parse_client_json

if TYPE_CHECKING:
    from aiohttp import web

    from edgevoice.funvoice.gemini import Conversation

log = logging.getLogger(__name__)

LABEL = "rtvi-ai"
LEGACY_VERSION = "0.3.0"
"""RTVI version answered to clients whose ``client-ready`` carries none (client-js 0.4)."""
VERSION = "2.1.0"
"""RTVI version answered to clients that state one (client-js 1.x)."""
IN_RATE, OUT_RATE = 16000, 24000
AUDIO_LEAD_S = 0.3
AUDIO_FRAME_BYTES = OUT_RATE * 2 // 25  # 40 ms of PCM16 mono at 24 kHz
MAX_QUEUED_AUDIO_S = 120.0
MAX_TRANSCRIPT_CHARS = 20000
MAX_PENDING_TEXTS = 8
MAX_MIC_BACKLOG_BYTES = 5 * IN_RATE * 2
_MIN_SLEEP_S = 0.001  # closer than this to due counts as due
_SENTENCE_END = re.compile(r"[.!?…。！？](?=\s)")
_ACCEPTED = (
    "client-ready, send-text, append-to-context, disconnect-bot (1.x); action llm/append_to_messages, describe-actions, "
    "get-config, describe-config (0.4)"
)


_Handler = Callable[["RtviSession", "str | None", "dict[str, Any]"], Awaitable[None]]


def sniff(data: bytes) -> bool:
    """Whether a first binary frame is an RTVI client speaking pipecat.Frame (not raw PCM)."""
    try:
        frame = decode(data)
    except FrameError:
        return False
    if isinstance(frame, AudioIn):
        return False
    try:
        msg = parse_client_json(frame.data)
    except BadJson:
        return False
    return isinstance(msg, dict) and msg.get("label") == LABEL


async def refuse(ws: web.WebSocketResponse, code: str, message: str, close_code: int) -> None:
    """Tell an RTVI client why with a fatal ``error``, then close (it cannot read an HTTP error body)."""
    data = {"error": message, "message": message, "fatal": True, "code": code}
    with contextlib.suppress(Exception):
        await ws.send_bytes(encode_message({"label": LABEL, "type": "error", "id": _message_id(), "data": data}))
        await ws.close(code=close_code, message=message[:120].encode())


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _message_id() -> str:
    return uuid.uuid4().hex[:8]


class AudioPacer:
    """Bot audio to the client at playback speed plus a small lead, so an interruption can still stop it.

    Gemini sends a turn's audio faster than real time; a client plays whatever it was given. Holding it here
    and sending it ``lead_s`` ahead of the client's playback means :meth:`interrupt` silences the bot within
    ``lead_s``. ``clock`` and ``sleep`` are injectable for tests.
    """

    def __init__(
        self,
        send: Callable[[bytes], Awaitable[None]],
        started: Callable[[], Awaitable[None]],
        stopped: Callable[[], Awaitable[None]],
        *,
        lead_s: float = AUDIO_LEAD_S,
        max_queued_s: float = MAX_QUEUED_AUDIO_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._send, self._started, self._stopped = send, started, stopped
        self.lead_s = lead_s
        self.max_queued_bytes = int(max_queued_s * OUT_RATE) * 2
        self._clock, self._sleep = clock, sleep
        self._queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self._wake = asyncio.Event()
        self.speaking = False
        self._turn_open = False
        self._t0 = 0.0  # when the client started playing what we sent since (re)starting the clock
        self._sent_s = 0.0
        self.sent_bytes = 0
        self.dropped_bytes = 0

    def push(self, pcm: bytes) -> int:
        """Queue PCM16 24 kHz bot audio; return how many bytes were dropped for the queue bound."""
        room = max(self.max_queued_bytes - self.queued_bytes, 0) & ~1
        dropped = max(len(pcm) - room, 0)
        if dropped:
            pcm = pcm[:room]
            self.dropped_bytes += dropped
        for i in range(0, len(pcm), AUDIO_FRAME_BYTES):
            chunk = pcm[i : i + AUDIO_FRAME_BYTES]
            self._queue.append(chunk)
            self.queued_bytes += len(chunk)
        self._turn_open = True
        self._wake.set()
        return dropped

    def end_turn(self) -> None:
        """No more audio for this turn: once the client has played what it has, the bot stopped speaking."""
        self._turn_open = False
        self._wake.set()

    def interrupt(self) -> bool:
        """Drop everything not yet sent; return whether the bot was speaking (the caller says it stopped)."""
        was = self.speaking
        self._queue.clear()
        self.queued_bytes = 0
        self.speaking = False
        self._turn_open = False
        self._wake.set()
        return was

    async def run(self) -> None:
        """Until cancelled. Between a queue check and a send there is no await, so nothing is sent after
        :meth:`interrupt` returned."""
        while True:
            now = self._clock()
            if self._queue:
                if not self.speaking:
                    self.speaking = True
                    self._t0, self._sent_s = now, 0.0
                    await self._started()
                    continue
                if now > self._t0 + self._sent_s:  # the client ran dry: its playback restarts with the next chunk
                    self._t0, self._sent_s = now, 0.0
                ahead = self._t0 + self._sent_s - now - self.lead_s
                if ahead > _MIN_SLEEP_S:
                    await self._sleep(ahead)
                    continue
                chunk = self._queue.popleft()
                self.queued_bytes -= len(chunk)
                self._sent_s += len(chunk) / (2 * OUT_RATE)
                self.sent_bytes += len(chunk)
                await self._send(chunk)
            elif self.speaking and not self._turn_open:
                left = self._t0 + self._sent_s - now
                if left > _MIN_SLEEP_S:
                    await self._sleep(left)
                    continue
                self.speaking = False
                await self._stopped()
            else:
                self._wake.clear()
                await self._wake.wait()


class RtviSession:
    """One RTVI client's ``/ws``: its frames in, the conversation's output out as RTVI."""

    def __init__(self, ws: web.WebSocketResponse, user_id: str, model: str, *, live_open: bool = False) -> None:
        self.ws = ws
        self.user_id = user_id
        self.model = model
        self.conversation: Conversation | None = None
        self.live_open = live_open  # the Live session is open (the conversation said "ready")
        self.client_ready = False
        self.legacy = False  # a client-js 0.4 client (RTVI 0.3)
        self.bot_ready_sent = False
        self._user_text = ""
        self._user_speaking = False
        self._bot_text = ""
        self._bot_turn = False
        self._resampler: Any = None
        self._resampler_rate = IN_RATE
        self._tasks: set[asyncio.Task[None]] = set()
        self._mic = bytearray()  # microphone PCM16 16 kHz not yet handed to the conversation
        self._mic_wake = asyncio.Event()
        self.pacer = AudioPacer(self._send_audio, self._bot_started, self._bot_stopped)
        self._pacer = asyncio.create_task(self.pacer.run(), name=f"rtvi-pacer-{user_id}")
        self._forwarder = asyncio.create_task(self._forward_mic(), name=f"rtvi-mic-{user_id}")

    def attach(self, conversation: Conversation) -> None:
        """Become ``conversation``'s sink."""
        self.conversation = conversation
        conversation.sink = self

    async def close(self) -> None:
        """Stop the pacer and any typed-text sends still in flight."""
        tasks = [self._pacer, self._forwarder, *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # sending -----------------------------------------------------------------------------------------------
    async def send(self, kind: str, data: Any, msg_id: str | None = None) -> None:
        """One RTVI message to the client."""
        message = {"label": LABEL, "type": kind, "id": msg_id or _message_id(), "data": data}
        await self.ws.send_bytes(encode_message(message))

    async def error(self, message: str, *, code: str, fatal: bool = False) -> None:
        """An RTVI ``error`` (``error`` for 1.x clients, ``message`` for 0.4; ``code`` is edgevoice's)."""
        await self.send("error", {"error": message, "message": message, "fatal": fatal, "code": code})

    async def error_response(self, msg_id: str | None, message: str, *, code: str) -> None:
        """An RTVI ``error-response`` to the client's message ``msg_id`` (rejects its pending request)."""
        await self.send("error-response", {"error": message, "fatal": False, "code": code}, msg_id)

    async def refuse(self, code: str, message: str, close_code: int) -> None:
        """A fatal error, then close (for a connection replaced by a newer one)."""
        await refuse(self.ws, code, message, close_code)

    async def _send_audio(self, pcm: bytes) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):  # the client went away; the socket loop ends
            await self.ws.send_bytes(encode_audio(pcm, OUT_RATE, 1))

    async def _bot_started(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send("bot-started-speaking", {})

    async def _bot_stopped(self) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.send("bot-stopped-speaking", {})

    # the conversation's output (Sink) ------------------------------------------------------------------------
    async def audio(self, pcm24: bytes) -> None:
        await self._bot_output_begins()
        dropped = self.pacer.push(pcm24)
        if dropped:
            log.warning("user %s: %d bytes of bot audio dropped (queue bound)", self.user_id, dropped)
            await self.error(
                f"dropped {dropped / (2 * OUT_RATE):.2f} s of bot audio: more than {MAX_QUEUED_AUDIO_S:g} s "
                "were waiting to be played",
                code="audio_dropped",
            )

    async def message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "ready":
            self.live_open = True
            await self._maybe_bot_ready()
        elif kind == "input_transcription":
            await self._user_heard(str(msg.get("text", "")))
        elif kind == "output_transcription":
            await self._bot_output_begins()
            self._bot_text = (self._bot_text + str(msg.get("text", "")))[-MAX_TRANSCRIPT_CHARS:]
            await self._flush_bot_text(final=False)
        elif kind == "text":
            await self._bot_output_begins()
            await self.send("bot-llm-text", {"text": msg.get("text", "")})
        elif kind == "interrupted":
            await self._interrupted()
        elif kind == "turn_complete":
            await self._end_user_turn()
            await self._flush_bot_text(final=True)
            self._bot_turn = False
            self.pacer.end_turn()
        elif kind == "error":
            text = str(msg.get("message", ""))
            await self.error(text, code=str(msg.get("error", "error")), fatal=bool(msg.get("fatal", False)))
        elif kind == "pong":
            pass
        else:  # session_resumed, session_reset: edgevoice's own news, as RTVI server messages
            if kind == "session_reset":
                self._user_text, self._bot_text = "", ""
            await self.send("server-message", {"data": msg})

    async def _maybe_bot_ready(self) -> None:
        if self.bot_ready_sent or not (self.client_ready and self.live_open):
            return
        self.bot_ready_sent = True
        about = {
            "library": "edgevoice",
            "library_version": __version__,
            "model": self.model,
            "user_id": self.user_id,
            "input_sample_rate": IN_RATE,
            "output_sample_rate": OUT_RATE,
        }
        if self.legacy:
            await self.send("bot-ready", {"version": LEGACY_VERSION, "config": [], "user_id": self.user_id})
        else:
            await self.send("bot-ready", {"version": VERSION, "about": about, "user_id": self.user_id})
        log.info("user %s: RTVI bot-ready (RTVI %s)", self.user_id, LEGACY_VERSION if self.legacy else VERSION)

    async def _user_heard(self, text: str) -> None:
        if not self._user_speaking:
            self._user_speaking = True
            await self.send("user-started-speaking", {})
        self._user_text = (self._user_text + text)[:MAX_TRANSCRIPT_CHARS]
        await self._user_transcript(final=False)

    async def _user_transcript(self, *, final: bool) -> None:
        text = self._user_text.strip()
        if text:
            data = {"text": text, "final": final, "timestamp": _now_iso(), "user_id": self.user_id}
            await self.send("user-transcription", data)

    async def _end_user_turn(self) -> None:
        """The user's turn is over (the bot answers, or the turn completed): its transcript becomes final."""
        if not self._user_speaking:
            return
        self._user_speaking = False
        await self._user_transcript(final=True)
        self._user_text = ""
        await self.send("user-stopped-speaking", {})

    async def _bot_output_begins(self) -> None:
        if not self._bot_turn:
            self._bot_turn = True
            await self._end_user_turn()

    async def _flush_bot_text(self, *, final: bool) -> None:
        """Send the bot's transcript by sentences; the rest at the end of its turn."""
        if final:
            head, self._bot_text = self._bot_text, ""
        else:
            ends = list(_SENTENCE_END.finditer(self._bot_text))
            if not ends:
                return
            cut = ends[-1].end()
            head, self._bot_text = self._bot_text[:cut], self._bot_text[cut:]
        text = head.strip()
        if not text:
            return
        await self.send("bot-transcription", {"text": text})
        if not self.legacy:
            await self.send("bot-output", {"text": text, "spoken": True, "aggregated_by": "sentence"})

    async def _interrupted(self) -> None:
        """The user spoke over the bot: nothing more of this answer is sent, and the events say so."""
        if self.pacer.interrupt():
            await self.send("bot-stopped-speaking", {})
        await self._flush_bot_text(final=True)
        self._bot_turn = False
        if not self._user_speaking:
            self._user_speaking = True
            await self.send("user-started-speaking", {})

    # the client's frames --------------------------------------------------------------------------------------
    async def receive_text(self, data: str) -> None:
        """A text WebSocket frame: not part of this protocol."""
        await self.error(
            f"RTVI connections carry binary pipecat.Frame protobuf frames; got a text frame ({len(data)} chars)",
            code="bad_frame",
        )

    async def receive(self, data: bytes) -> None:
        """One binary frame from the client."""
        try:
            frame = decode(data)
        except FrameError as exc:
            await self.error(str(exc), code="bad_frame")
            return
        if isinstance(frame, AudioIn):
            await self._audio_in(frame)
        else:
            await self._message_in(frame.data)

    async def _audio_in(self, frame: AudioIn) -> None:
        pcm, rate = frame.pcm, frame.sample_rate
        if len(pcm) % 2:
            await self.error(f"audio frame of {len(pcm)} bytes: not whole PCM16 samples; dropped", code="bad_audio")
            return
        if frame.num_channels != 1:
            await self.error(
                f"audio frame with num_channels = {frame.num_channels}: send mono PCM16; dropped", code="bad_audio"
            )
            return
        if not 8000 <= rate <= 96000:
            await self.error(
                f"audio frame with sample_rate = {rate}: send 8000-96000 Hz (16000 preferred); dropped",
                code="bad_audio",
            )
            return
        if rate != IN_RATE:
            pcm = self._resample(pcm, rate)
        self._mic += pcm
        excess = len(self._mic) - MAX_MIC_BACKLOG_BYTES
        if excess > 0:
            del self._mic[:excess]
            await self.error(
                f"dropped the oldest {excess / (2 * IN_RATE):.2f} s of microphone audio: Gemini is not taking it "
                f"as fast as it comes (at most {MAX_MIC_BACKLOG_BYTES / (2 * IN_RATE):g} s are held)",
                code="audio_dropped",
            )
        self._mic_wake.set()

    async def _forward_mic(self) -> None:
        """Microphone audio to the conversation, in order. The SDK sends 16 ms frames; whatever piled up while
        the previous send was in flight goes as one chunk, so a backlog costs one send, not one per frame."""
        while True:
            await self._mic_wake.wait()
            self._mic_wake.clear()
            while self._mic and self.conversation is not None:
                chunk = bytes(self._mic)
                self._mic.clear()
                try:
                    await self.conversation.send_audio(chunk)
                except (ConnectionError, RuntimeError) as exc:  # the client went away while told of dropped audio
                    log.debug("user %s: microphone audio not forwarded: %s", self.user_id, exc)

    def _resample(self, pcm: bytes, rate: int) -> bytes:
        if self._resampler is None or self._resampler_rate != rate:
            self._resampler = soxr.ResampleStream(rate, IN_RATE, 1, dtype="int16")
            self._resampler_rate = rate
        out = self._resampler.resample_chunk(np.frombuffer(pcm, dtype="<i2"))
        return bytes(np.asarray(out, dtype="<i2").tobytes())

    async def _message_in(self, text: str) -> None:
        try:
            msg = parse_client_json(text)
        except BadJson as exc:
            await self.error(f"message frame data is not JSON within the limits ({exc.message})", code="bad_message")
            return
        if not isinstance(msg, dict):
            await self.error("message frame data must be a JSON object (an RTVI message)", code="bad_message")
            return
        if msg.get("label") != LABEL:
            await self.error(f'RTVI messages need "label": "{LABEL}"; got {msg.get("label")!r}', code="bad_message")
            return
        kind, data = msg.get("type"), msg.get("data")
        msg_id = msg.get("id") if isinstance(msg.get("id"), str) else None
        if not isinstance(kind, str):
            await self.error('RTVI message without a string "type"', code="bad_message")
            return
        handler = self._handlers.get(kind)
        if handler is None:
            await self.error_response(
                msg_id, f"unknown RTVI message type {kind[:60]!r}; edgevoice accepts {_ACCEPTED}", code="unknown_type"
            )
            return
        await handler(self, msg_id, data if isinstance(data, dict) else {})

    async def _client_ready(self, msg_id: str | None, data: dict[str, Any]) -> None:
        version = data.get("version")
        self.legacy = not isinstance(version, str)
        self.client_ready = True
        about = data["about"] if isinstance(data.get("about"), dict) else {}
        log.info(
            "user %s: RTVI client-ready (%s %s, RTVI %s)",
            self.user_id,
            about.get("library", "client-js"),
            about.get("library_version", "0.4" if self.legacy else "?"),
            version or "0.3",
        )
        await self._maybe_bot_ready()

    async def _disconnect_bot(self, msg_id: str | None, data: dict[str, Any]) -> None:
        await self.ws.close(code=1000, message=b"disconnect-bot")

    async def _send_text(self, msg_id: str | None, data: dict[str, Any]) -> None:
        content = data.get("content")
        if not isinstance(content, str) or not content.strip():
            await self.error_response(msg_id, 'send-text needs data {"content": "non-empty text"}', code="bad_message")
            return
        await self._text(content, msg_id, None)

    async def _action(self, msg_id: str | None, data: dict[str, Any]) -> None:
        service, action = data.get("service"), data.get("action")
        if (service, action) != ("llm", "append_to_messages"):
            await self.error_response(
                msg_id, f"action {service}/{action} is not supported; only llm/append_to_messages", code="unsupported"
            )
            return
        texts: list[str] = []
        for arg in data.get("arguments") or []:
            if isinstance(arg, dict) and arg.get("name") == "messages" and isinstance(arg.get("value"), list):
                texts += [t for m in arg["value"] if isinstance(m, dict) and m.get("role") == "user" for t in _texts(m)]
        text = "\n".join(t for t in texts if t.strip())
        if not text:
            await self.error_response(
                msg_id, "llm/append_to_messages needs user messages with text content", code="bad_message"
            )
            return
        await self._text(text, msg_id, "action-response")

    async def _text(self, text: str, msg_id: str | None, reply: str | None) -> None:
        """Typed text to the model, in the background (the session may still be opening)."""
        if len(self._tasks) >= MAX_PENDING_TEXTS:
            await self.error_response(msg_id, f"{MAX_PENDING_TEXTS} texts are already waiting", code="busy")
            return
        task = asyncio.create_task(self._deliver_text(text, msg_id, reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver_text(self, text: str, msg_id: str | None, reply: str | None) -> None:
        assert self.conversation is not None
        try:
            try:
                await self.conversation.send_text(text)
            except asyncio.TimeoutError:
                await self.error_response(msg_id, "the Gemini session is not open yet; try again", code="not_ready")
                return
            if reply is not None:
                await self.send(reply, {"result": True}, msg_id)
        except (ConnectionError, RuntimeError) as exc:  # the Live session or the client went away
            log.info("user %s: text not delivered: %s", self.user_id, exc)

    async def _describe_actions(self, msg_id: str | None, data: dict[str, Any]) -> None:
        action = {
            "service": "llm",
            "action": "append_to_messages",
            "arguments": [{"name": "messages", "type": "array"}, {"name": "run_immediately", "type": "bool"}],
            "result": "bool",
        }
        await self.send("actions-available", {"actions": [action]}, msg_id)

    async def _get_config(self, msg_id: str | None, data: dict[str, Any]) -> None:
        await self.send("config", {"config": []}, msg_id)

    async def _describe_config(self, msg_id: str | None, data: dict[str, Any]) -> None:
        await self.send("config-available", {"config": []}, msg_id)

    async def _append_to_context(self, msg_id: str | None, data: dict[str, Any]) -> None:
        text = "\n".join(_texts(data)) if data.get("role") == "user" else ""
        if not text.strip():
            await self.error_response(
                msg_id, 'append-to-context needs {"role": "user", "content": "text"}', code="bad_message"
            )
            return
        await self._text(text, msg_id, None)

    async def _unsupported(self, msg_id: str | None, data: dict[str, Any]) -> None:
        what = f"client-message {str(data.get('t'))[:60]!r}" if "t" in data else "this RTVI message"
        await self.error_response(
            msg_id, f"{what} is not supported by edgevoice; it accepts {_ACCEPTED}", code="unsupported"
        )

    _handlers: ClassVar[dict[str, _Handler]] = {
        "client-ready": _client_ready,
        "disconnect-bot": _disconnect_bot,
        "send-text": _send_text,
        "append-to-context": _append_to_context,
        "action": _action,
        "describe-actions": _describe_actions,
        "get-config": _get_config,
        "describe-config": _describe_config,
        "client-message": _unsupported,
        "update-config": _unsupported,
    }


def _texts(message: dict[str, Any]) -> list[str]:
    """The text of an LLM context message: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return []
