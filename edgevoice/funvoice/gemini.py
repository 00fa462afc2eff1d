"""Gemini Live through the official google-genai SDK: one client per daemon, one session per conversation.

A :class:`Conversation` keeps one long-lived receive loop per Live connection (``session.receive()``
ends at every ``turnComplete``, so it is re-entered), remembers the newest resumption handle, and
reconnects with it when the server sends ``goAway`` or the connection drops, so a conversation
outlives the Live API's ~10-minute connection limit. Context-window compression is always on.
:class:`LiveStatus` is what ``/health`` reports as ``llm_service.available``: every connection attempt
updates it, and :meth:`GeminiService.probe_loop` opens a short probe session only when nothing else
has checked within ``funvoice.health_interval_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from edgevoice.config import FunVoiceSettings
from edgevoice.errors import CodedError
from edgevoice.funvoice import tools as tool_decls
from edgevoice.funvoice.tools import Toolbox
from edgevoice.metrics import Metrics

if TYPE_CHECKING:
    from google.genai import Client
    from google.genai.live import AsyncSession

log = logging.getLogger(__name__)

DEFAULT_API_VERSION = "v1beta"
DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
IN_MIME = "audio/pcm;rate=16000"
PENDING_AUDIO_BYTES = 5 * 16000 * 2  # audio kept while a connection is being (re)opened: 5 s
_CLOSE_TIMEOUT_S = 3.0


class LiveError(CodedError):
    """A Live session could not be opened; ``code`` is what the client is told, ``fatal`` stops retries."""

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(code, message)
        self.fatal = fatal


class Sink(Protocol):
    """Where a conversation's output goes (the /ws socket)."""

    async def audio(self, pcm24: bytes) -> None: ...

    async def message(self, msg: dict[str, Any]) -> None: ...


class LiveStatus:
    """Whether Gemini Live was reachable with our key at the last check."""

    def __init__(self) -> None:
        self.available = False
        self.error: str | None = "not checked yet"
        self.checked_at: float | None = None  # time.monotonic()
        self.checked_at_wall: float | None = None

    def record(self, error: LiveError | None) -> None:
        self.available = error is None
        self.error = None if error is None else f"{error.code}: {error.message}"
        self.checked_at, self.checked_at_wall = time.monotonic(), time.time()


def classify(exc: BaseException, endpoint: str, timeout_s: float) -> LiveError:
    """Turn whatever the SDK raised while connecting into a clear, client-facing :class:`LiveError`."""
    from google.genai import errors
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

    if isinstance(exc, LiveError):
        return exc
    if isinstance(exc, errors.APIError):
        reason = exc.message or (exc.details if isinstance(exc.details, str) else str(exc))
        if "api key" in str(reason).lower() or exc.code in (401, 403):
            return LiveError("llm_auth", f"Gemini refused the API key: {reason}", fatal=True)
        return LiveError("llm_rejected", f"Gemini refused the session ({exc.code}): {reason}")
    if isinstance(exc, InvalidStatus):
        status = exc.response.status_code
        if status in (401, 403):
            return LiveError("llm_auth", f"Gemini refused the API key (HTTP {status})", fatal=True)
        return LiveError(
            "llm_unreachable", f"{endpoint} answered HTTP {status}: check funvoice.base_url and api_version"
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return LiveError(
            "llm_unreachable",
            f"cannot reach Gemini Live at {endpoint}: TLS certificate not trusted ({exc.verify_message}); "
            "see funvoice.ca_file",
        )
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return LiveError("llm_unreachable", f"cannot reach Gemini Live at {endpoint}: no answer within {timeout_s:g} s")
    if isinstance(exc, OSError | InvalidHandshake | InvalidURI | ConnectionClosed):
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return LiveError("llm_unreachable", f"cannot reach Gemini Live at {endpoint}: {detail}")
    return LiveError("llm_error", f"Gemini Live failed: {type(exc).__name__}: {exc}")


class GeminiService:
    """The daemon's google-genai client, Live configuration and availability status."""

    def __init__(self, settings: FunVoiceSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.status = LiveStatus()
        self.client: Client | None = None
        self.api_version = settings.api_version or os.environ.get("GOOGLE_GENAI_API_VERSION") or DEFAULT_API_VERSION
        base = settings.base_url or os.environ.get("GOOGLE_GEMINI_BASE_URL") or DEFAULT_BASE_URL
        parts = urlsplit(base)
        self.endpoint = f"wss://{parts.netloc or base}"
        self.native_audio = "native-audio" in settings.model.lower()
        self.open_sessions = 0
        self.resumptions = 0

    # set-up ----------------------------------------------------------------------------------------------
    def build_client(self) -> None:
        """Import the SDK and build the client (file reads: run it off the loop)."""
        try:
            genai = importlib.import_module("google.genai")
            types = importlib.import_module("google.genai.types")
        except ImportError:
            self.status.error = "llm_not_configured: google-genai is not installed (pip install 'edgevoice[funvoice]')"
            log.error("FunVoiceChat: %s", self.status.error)
            return
        key = self.settings.gemini_api_key()
        if not key:
            self.status.error = (
                "llm_not_configured: no Gemini API key (funvoice.api_key, funvoice.api_key_file or GEMINI_API_KEY)"
            )
            log.warning("FunVoiceChat: %s", self.status.error)
            return
        options: dict[str, Any] = {"api_version": self.api_version}
        if self.settings.base_url:
            options["base_url"] = self.settings.base_url
        if self.settings.ca_file is not None:
            try:
                ctx = ssl.create_default_context(cafile=str(self.settings.ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise RuntimeError(
                    f"funvoice.ca_file = {str(self.settings.ca_file)!r}: cannot load it ({exc})"
                ) from None
            options["async_client_args"] = {"ssl": ctx}
        self.client = genai.Client(api_key=key, http_options=types.HttpOptions(**options))
        log.info("FunVoiceChat: Gemini Live %s via %s (API %s)", self.settings.model, self.endpoint, self.api_version)

    async def aclose(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aio.aclose()

    def live_config(self, handle: str | None, *, probe: bool = False) -> Any:
        """The ``LiveConnectConfig`` of every conversation (a probe gets the bare minimum)."""
        from google.genai import types

        s = self.settings
        if probe:
            return types.LiveConnectConfig(response_modalities=[types.Modality.AUDIO])
        speech: dict[str, Any] = {}
        if s.voice:
            speech["voice_config"] = {"prebuilt_voice_config": {"voice_name": s.voice}}
        if s.language:
            speech["language_code"] = s.language
        return types.LiveConnectConfig(
            response_modalities=[types.Modality.AUDIO],
            speech_config=types.SpeechConfig(**speech) if speech else None,
            system_instruction=s.system_prompt or None,
            tools=[types.Tool(function_declarations=tool_decls.declarations(s.pages))],
            input_audio_transcription=types.AudioTranscriptionConfig(),
            output_audio_transcription=types.AudioTranscriptionConfig(),
            session_resumption=types.SessionResumptionConfig(handle=handle),
            context_window_compression=types.ContextWindowCompressionConfig(sliding_window=types.SlidingWindow()),
        )

    # sessions --------------------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def session(self, handle: str | None = None, *, probe: bool = False) -> AsyncIterator[AsyncSession]:
        """Open one Live connection (raising :class:`LiveError`), closed when the block ends."""
        if self.client is None:
            reason = (self.status.error or "").removeprefix("llm_not_configured: ")
            raise LiveError("llm_not_configured", reason or "Gemini is not configured", fatal=True)
        timeout = self.settings.connect_timeout_s
        stack = contextlib.AsyncExitStack()
        connect = self.client.aio.live.connect(model=self.settings.model, config=self.live_config(handle, probe=probe))
        try:
            session = await asyncio.wait_for(stack.enter_async_context(connect), timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = classify(exc, self.endpoint, timeout)
            if not (handle and error.code == "llm_rejected"):  # a stale handle says nothing about Gemini
                self.status.record(error)
            raise error from exc
        self.status.record(None)
        self.open_sessions += 1
        self.metrics.gemini_sessions.inc()
        try:
            yield session
        finally:
            self.open_sessions -= 1
            self.metrics.gemini_sessions.dec()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(stack.aclose(), _CLOSE_TIMEOUT_S)

    async def probe(self) -> None:
        """Open and close a bare session to learn whether Gemini is reachable and takes our key."""
        try:
            async with self.session(probe=True):
                pass
        except LiveError as exc:
            log.warning("Gemini Live probe failed: %s", exc.message)

    async def probe_loop(self) -> None:
        """Keep ``status`` fresh: probe only when no connection attempt checked it within the interval."""
        if self.client is None:
            return
        while True:
            checked = self.status.checked_at
            due = 0.0 if checked is None else checked + self._probe_interval() - time.monotonic()
            if due <= 0:
                await self.probe()
                due = self._probe_interval()
            await asyncio.sleep(due)

    def _probe_interval(self) -> float:
        """While Gemini is unavailable, look again sooner (once a minute at most) to notice its return."""
        interval = self.settings.health_interval_s
        return interval if self.status.available else min(interval, 60.0)


class Conversation:
    """One user's voice conversation: browser audio in, model audio and messages out, tools in between."""

    def __init__(self, service: GeminiService, toolbox: Toolbox, user_id: str, sink: Sink) -> None:
        self.service = service
        self.toolbox = toolbox
        self.user_id = user_id
        self.sink = sink
        self.handle: str | None = None
        self.connections = 0
        self.resumptions = 0
        self._session: AsyncSession | None = None
        self._ready = asyncio.Event()
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self.dropped_audio_bytes = 0
        self._tool_tasks: dict[str, asyncio.Task[None]] = {}
        self._progress = False
        self._flusher: asyncio.Task[None] | None = None
        self.error: LiveError | None = None

    # input from the browser ------------------------------------------------------------------------------
    async def send_audio(self, pcm16: bytes) -> None:
        """Forward PCM16 16 kHz audio; kept (up to 5 s) while the connection is being (re)opened."""
        session = self._session
        if session is not None and self._ready.is_set():
            from google.genai import types

            try:
                await session.send_realtime_input(audio=types.Blob(data=pcm16, mime_type=IN_MIME))
                return
            except Exception as exc:  # the connection just went away: keep the audio for the next one
                log.debug("user %s: audio send failed (%s); buffering", self.user_id, exc)
        self._pending.append(pcm16)
        self._pending_bytes += len(pcm16)
        dropped = 0
        while self._pending_bytes > PENDING_AUDIO_BYTES:
            old = self._pending.popleft()
            self._pending_bytes -= len(old)
            dropped += len(old)
        if dropped:
            self.dropped_audio_bytes += dropped
            await self.sink.message(
                {
                    "type": "error",
                    "error": "audio_dropped",
                    "message": f"the Gemini session is not open yet; dropped the oldest {dropped / 32000:.2f} s of "
                    f"audio (at most {PENDING_AUDIO_BYTES / 32000:g} s are kept while connecting)",
                }
            )

    async def send_text(self, text: str) -> None:
        """A typed message, as realtime text input."""
        session = await self._ready_session()
        await session.send_realtime_input(text=text)

    async def end_audio(self) -> None:
        """The microphone stopped: let the model's voice detection close the turn."""
        session = await self._ready_session()
        await session.send_realtime_input(audio_stream_end=True)

    async def _ready_session(self) -> AsyncSession:
        """The open session, waiting for a (re)connection to finish; TimeoutError when none opens in time."""
        await asyncio.wait_for(self._ready.wait(), self.service.settings.connect_timeout_s * 2)
        if self._session is None:
            raise ConnectionError("the Live session closed")
        return self._session

    # the connection loop ---------------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, bridge, and reconnect with the resumption handle until the task is cancelled or fails."""
        failures = 0
        attempts = self.service.settings.reconnect_attempts
        while True:
            self._progress = False
            handle = self.handle
            try:
                async with self.service.session(handle) as session:
                    await self._opened(session, resumed=handle is not None)
                    outcome = await self._pump(session)
            except LiveError as err:
                if err.fatal or self.connections == 0:
                    await self._fail(err)
                    return
                if self.handle and err.code == "llm_rejected":
                    log.warning("user %s: resumption refused (%s); starting a new conversation", self.user_id, err)
                    self.handle = None
                    await self._reset_notice()
                    continue
                failures += 1
                if failures > attempts:
                    await self._fail(LiveError(err.code, f"{err.message} (gave up after {attempts} reconnections)"))
                    return
                await self._backoff(failures, attempts, err.message)
                continue
            finally:
                self._session = None
                self._ready.clear()
                if self._flusher is not None:
                    self._flusher.cancel()
                    self._flusher = None
            if self._progress or outcome == "goAway":
                failures = 0
            else:  # accepted, then closed before saying anything: do not spin
                failures += 1
                if failures > attempts:
                    await self._fail(LiveError("llm_error", f"Gemini Live keeps closing the connection ({outcome})"))
                    return
                await self._backoff(failures, attempts, outcome)
            if self.handle is None:
                await self._reset_notice()
            log.info("user %s: Live connection ended (%s); resuming", self.user_id, outcome)

    async def _backoff(self, failures: int, attempts: int, why: str) -> None:
        delay = min(0.5 * 2 ** (failures - 1), 10.0)
        log.warning("user %s: reconnect %d/%d in %.1f s: %s", self.user_id, failures, attempts, delay, why)
        await asyncio.sleep(delay)

    async def _reset_notice(self) -> None:
        await self.sink.message(
            {"type": "session_reset", "message": "the conversation could not be resumed; a new one started"}
        )

    async def _opened(self, session: AsyncSession, *, resumed: bool) -> None:
        self.connections += 1
        if resumed:
            self.resumptions += 1
            self.service.resumptions += 1
        self._session = session
        msg: dict[str, Any] = {"type": "session_resumed" if resumed else "ready", "user_id": self.user_id}
        if not resumed:
            msg.update(model=self.service.settings.model, input_rate=16000, output_rate=24000)
        await self.sink.message(msg)
        # Audio that arrived while connecting goes first, sent while the pump already reads: a server
        # that answers as it reads must never wait on us.
        self._flusher = asyncio.create_task(self._flush(session))

    async def _flush(self, session: AsyncSession) -> None:
        from google.genai import types

        while self._pending:
            chunk = self._pending[0]
            try:
                await session.send_realtime_input(audio=types.Blob(data=chunk, mime_type=IN_MIME))
            except Exception:
                return  # the connection went away; the chunk stays for the next one
            self._pending.popleft()
            self._pending_bytes -= len(chunk)
        self._ready.set()

    async def _pump(self, session: AsyncSession) -> str:
        """Relay server messages until ``goAway`` or the connection ends; return why."""
        while True:
            stream = session.receive().__aiter__()  # ends at every turnComplete: start it again
            while True:
                try:
                    msg = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as exc:  # closed or dropped (APIError with the close code, ConnectionClosed)
                    return f"closed: {exc}"
                if await self._dispatch(msg):
                    return "goAway"

    async def _dispatch(self, msg: Any) -> bool:
        """Handle one server message; True when the server asked us to go away."""
        update = msg.session_resumption_update
        if update is not None and update.resumable and update.new_handle:
            self.handle = update.new_handle
        content = msg.server_content
        if content is not None:
            self._progress = True
            await self._content(content)
        if msg.tool_call is not None:
            self._progress = True
            for call in msg.tool_call.function_calls or []:
                if call.id:
                    task = asyncio.create_task(self._run_tool(call.id, call.name or "", call.args))
                    self._tool_tasks[call.id] = task
                    task.add_done_callback(functools.partial(self._tool_done, call.id))
        if msg.tool_call_cancellation is not None:
            ids = list(msg.tool_call_cancellation.ids or [])
            for call_id in ids:
                cancelled = self._tool_tasks.pop(call_id, None)
                if cancelled is not None:
                    cancelled.cancel()
            if ids:
                await self.toolbox.cancelled(self.user_id, ids)
        if msg.go_away is not None:
            log.info(
                "user %s: goAway (time left %s); reconnecting with the resumption handle",
                self.user_id,
                msg.go_away.time_left,
            )
            return True
        return False

    async def _content(self, content: Any) -> None:
        if content.model_turn is not None:
            for part in content.model_turn.parts or []:
                blob = part.inline_data
                if blob is not None and blob.data and (blob.mime_type or "").startswith("audio/pcm"):
                    await self.sink.audio(blob.data)
                elif part.text and not part.thought:
                    await self.sink.message({"type": "text", "text": part.text})
        if content.input_transcription is not None and content.input_transcription.text:
            await self.sink.message({"type": "input_transcription", "text": content.input_transcription.text})
        if content.output_transcription is not None and content.output_transcription.text:
            await self.sink.message({"type": "output_transcription", "text": content.output_transcription.text})
        if content.interrupted:
            await self.sink.message({"type": "interrupted"})
        if content.turn_complete:
            await self.sink.message({"type": "turn_complete"})

    def _tool_done(self, call_id: str, _task: asyncio.Task[None]) -> None:
        self._tool_tasks.pop(call_id, None)

    async def _run_tool(self, call_id: str, name: str, args: dict[str, Any] | None) -> None:
        from google.genai import types

        response = await self.toolbox.call(self.user_id, call_id, name, args)
        try:
            session = await self._ready_session()
            await session.send_tool_response(
                function_responses=[types.FunctionResponse(id=call_id, name=name, response=response)]
            )
        except Exception as exc:
            log.warning("user %s: tool response for %s (%s) not delivered: %s", self.user_id, name, call_id, exc)

    async def _fail(self, err: LiveError) -> None:
        self.error = err
        log.warning("user %s: %s", self.user_id, err.message)
        await self.sink.message({"type": "error", "error": err.code, "message": err.message, "fatal": True})

    async def close(self) -> None:
        """Cancel pending tool calls (the Live connection closes with :meth:`run`'s task)."""
        for task in list(self._tool_tasks.values()):
            task.cancel()
        self._tool_tasks.clear()
