"""The FunVoiceChat HTTP and WebSocket endpoints (paths, parameters and JSON as in the backend document)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from aiohttp import WSCloseCode, WSMsgType, web

from edgevoice.config import FunVoiceSettings
from edgevoice.errors import is_identifier
from edgevoice.funvoice.catalogue import Catalogue
from edgevoice.funvoice.channels import Channels, Kind
from edgevoice.funvoice.gemini import Conversation, GeminiService
from edgevoice.funvoice.rtvi import RtviSession
from edgevoice.funvoice.rtvi import refuse as rtvi_refuse
from edgevoice.funvoice.rtvi import sniff as rtvi_sniff
from edgevoice.funvoice.tools import Toolbox
from edgevoice.server.clientjson import BadJson, parse_client_json
from edgevoice.server.keys import SETTINGS, WEBSOCKETS
from edgevoice.server.security import request_token

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
EXAMPLE_PAGE = "/examples/voice.html"
_HEARTBEAT_S = 30.0


@dataclass
class FunVoice:
    """Everything the endpoints share, per daemon."""

    settings: FunVoiceSettings
    service: GeminiService
    channels: Channels
    toolbox: Toolbox
    catalogue: Catalogue
    conversations: dict[str, tuple[Conversation, asyncio.Task[None]]] = field(default_factory=dict)


FUNVOICE = web.AppKey("funvoice", FunVoice)
"""The FunVoiceChat bridge (present only when funvoice.enabled)."""


# health ------------------------------------------------------------------------------------------------
def health_sections(fv: FunVoice) -> dict[str, Any]:
    """The document's /health sections, in its order, plus a ``funvoice`` detail section."""
    service = fv.service

    def llm_service() -> dict[str, Any]:
        return {
            "provider": "Gemini Live Multimodal",
            "available": service.status.available,
            "function_calling": True,
            "native_audio": service.native_audio,
        }

    def websockets() -> dict[str, str]:
        return {
            "conversation": "/ws?user_id=your_user_id",
            "tools": "/ws/tools?user_id=your_user_id",
            "product_info": "/ws/product_info?user_id=your_user_id",
        }

    def expected_latency() -> str:
        return (
            "sub-500ms with native audio streaming"
            if service.native_audio
            else "about 1 s with half-cascade audio (speech recognition, text model, speech synthesis)"
        )

    def details() -> dict[str, Any]:
        status = service.status
        return {
            "model": fv.settings.model,
            "endpoint": service.endpoint,
            "api_version": service.api_version,
            "error": status.error,
            "checked_at": status.checked_at_wall,
            "live_connections": service.open_sessions,
            "resumptions": service.resumptions,
            "catalogue": str(fv.catalogue.path) if fv.catalogue.path else None,
        }

    return {
        "llm_service": llm_service,
        "websockets": websockets,
        "sessions": fv.channels.counts,
        "expected_latency": expected_latency,
        "funvoice": details,
    }


# helpers -----------------------------------------------------------------------------------------------
def _error(status: int, error: str, message: str) -> web.Response:
    return web.json_response({"status": "error", "error": error, "message": message}, status=status)


def _check_user_id(user_id: str) -> str | None:
    """None when valid, else the reason."""
    if not is_identifier(user_id):
        return f"user_id {user_id[:40]!r} is invalid: 1-128 characters of letters, digits and _ . : @ -"
    return None


def new_user_id() -> str:
    return f"user_{uuid.uuid4().hex[:12]}"


async def _open_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(heartbeat=_HEARTBEAT_S, max_msg_size=request.app[SETTINGS].server.max_frame_bytes)
    await ws.prepare(request)
    request.app[WEBSOCKETS].add(ws)
    return ws


async def _refuse(ws: web.WebSocketResponse, error: str, message: str, code: int) -> web.WebSocketResponse:
    """Tell a browser client why (it cannot read an HTTP error body), then close."""
    with contextlib.suppress(Exception):
        await ws.send_json({"type": "error", "error": error, "message": message})
        await ws.close(code=code, message=message[:120].encode())
    return ws


class _WsSink:
    """A conversation's output to its /ws socket, in the raw protocol."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.live_open = False

    async def audio(self, pcm24: bytes) -> None:
        await self.ws.send_bytes(pcm24)

    async def message(self, msg: dict[str, Any]) -> None:
        if msg.get("type") == "ready":
            self.live_open = True
        await self.ws.send_json(msg)

    async def refuse(self, error: str, message: str, code: int) -> None:
        await _refuse(self.ws, error, message, code)


Protocol = Literal["raw", "rtvi", "auto"]
_PROTOCOLS: dict[str | None, Protocol] = {None: "auto", "": "auto", "raw": "raw", "rtvi": "rtvi"}


# /ws ---------------------------------------------------------------------------------------------------
async def conversation_ws(request: web.Request) -> web.WebSocketResponse:
    """The conversation: ``protocol=rtvi`` for Pipecat RTVI clients, ``raw`` (or none) for edgevoice's own."""
    fv = request.app[FUNVOICE]
    user_id = request.query.get("user_id") or new_user_id()
    protocol = _PROTOCOLS.get(request.query.get("protocol"))
    ws = await _open_ws(request)
    try:
        if protocol is None:
            given = request.query.get("protocol", "")[:40]
            return await _refuse(
                ws,
                "bad_protocol",
                f"protocol {given!r} is unknown: use rtvi, raw or leave it out",
                WSCloseCode.POLICY_VIOLATION,
            )

        async def refuse(error: str, message: str, code: int) -> web.WebSocketResponse:
            if protocol == "rtvi":
                await rtvi_refuse(ws, error, message, code)
                return ws
            return await _refuse(ws, error, message, code)

        if (reason := _check_user_id(user_id)) is not None:
            return await refuse("bad_user_id", reason, WSCloseCode.POLICY_VIOLATION)
        previous = fv.channels.conversations.get(user_id)
        if previous is None and len(fv.conversations) >= fv.settings.max_sessions:
            return await refuse(
                "too_many_sessions",
                f"funvoice.max_sessions ({fv.settings.max_sessions}) conversations are open; try again later",
                WSCloseCode.TRY_AGAIN_LATER,
            )
        if previous is not None:  # a reload or a second tab: the newest connection takes the conversation over
            entry = fv.conversations.get(user_id)
            sink = entry[0].sink if entry is not None else None
            message = "a newer connection for this user_id took over"
            if isinstance(sink, _WsSink | RtviSession):
                await sink.refuse("replaced", message, WSCloseCode.OK)
            else:
                await _refuse(previous, "replaced", message, WSCloseCode.OK)
            await _end_conversation(fv, user_id)
        await _converse(fv, user_id, ws, protocol)
    finally:
        request.app[WEBSOCKETS].discard(ws)
    return ws


async def _run(conversation: Conversation, ws: web.WebSocketResponse) -> None:
    """The conversation's lifetime; when it ends on its own (a fatal error was sent), the client's socket closes."""
    try:
        await conversation.run()
    except (ConnectionError, RuntimeError) as exc:  # the client went away mid-send
        log.info("user %s: conversation ended: %s", conversation.user_id, exc)
    except Exception:
        log.exception("user %s: conversation failed", conversation.user_id)
        with contextlib.suppress(Exception):
            await conversation.sink.message(
                {"type": "error", "error": "internal_error", "message": "the bridge failed; see the log", "fatal": True}
            )
    if not ws.closed:
        reason = conversation.error.code if conversation.error else "conversation ended"
        await ws.close(code=WSCloseCode.INTERNAL_ERROR, message=reason.encode())


async def _converse(fv: FunVoice, user_id: str, ws: web.WebSocketResponse, protocol: Protocol) -> None:
    raw = _WsSink(ws)
    conversation = Conversation(fv.service, fv.toolbox, user_id, raw)
    rtvi: RtviSession | None = None
    if protocol == "rtvi":
        rtvi = RtviSession(ws, user_id, fv.settings.model)
        rtvi.attach(conversation)
    task = asyncio.create_task(_run(conversation, ws), name=f"funvoice-{user_id}")
    fv.channels.conversations[user_id] = ws
    fv.conversations[user_id] = (conversation, task)
    side_tasks: set[asyncio.Task[None]] = set()
    log.info("user %s: conversation opened (%s protocol)", user_id, protocol)
    first = protocol == "auto"
    try:
        async for msg in ws:
            if first:  # an RTVI client that was not told protocol=rtvi: its first frame says so
                first = False
                if msg.type == WSMsgType.BINARY and rtvi_sniff(msg.data):
                    rtvi = RtviSession(ws, user_id, fv.settings.model, live_open=raw.live_open)
                    rtvi.attach(conversation)
                    log.info("user %s: RTVI client recognised by its first frame", user_id)
            if rtvi is not None:
                if msg.type == WSMsgType.BINARY:
                    await rtvi.receive(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    await rtvi.receive_text(msg.data)
            elif msg.type == WSMsgType.BINARY:
                if len(msg.data) % 2:
                    await ws.send_json(
                        {"type": "error", "error": "bad_audio", "message": "audio frames must be whole PCM16 samples"}
                    )
                    continue
                await conversation.send_audio(msg.data)
            elif msg.type == WSMsgType.TEXT:
                side = await _client_message(conversation, ws, msg.data)
                if side is not None:
                    side_tasks.add(side)
                    side.add_done_callback(side_tasks.discard)
            if msg.type == WSMsgType.ERROR:
                log.info("user %s: /ws error: %s", user_id, ws.exception())
    finally:
        for side in list(side_tasks):
            side.cancel()
        if rtvi is not None:
            await rtvi.close()
        if fv.channels.conversations.get(user_id) is ws:
            await _end_conversation(fv, user_id)
        log.info("user %s: conversation closed", user_id)


async def _client_message(
    conversation: Conversation, ws: web.WebSocketResponse, data: str
) -> asyncio.Task[None] | None:
    """A JSON message from the client: text, audio_end or ping."""
    try:
        msg = parse_client_json(data)
        kind = msg.get("type")
    except (BadJson, AttributeError) as exc:
        reason = f": {exc.message}" if isinstance(exc, BadJson) else ""
        await ws.send_json(
            {"type": "error", "error": "bad_message", "message": f"text frames must be JSON objects{reason}"}
        )
        return None
    if kind == "ping":
        await ws.send_json({"type": "pong"})
        return None
    if kind == "text" and isinstance(msg.get("text"), str) and msg["text"].strip():
        return asyncio.create_task(_guarded(conversation.send_text(msg["text"]), ws))
    if kind == "audio_end":
        return asyncio.create_task(_guarded(conversation.end_audio(), ws))
    await ws.send_json(
        {
            "type": "error",
            "error": "bad_message",
            "message": 'unknown message; send {"type": "text", "text": ...}, {"type": "audio_end"} or {"type": "ping"}',
        }
    )
    return None


async def _guarded(coro: Any, ws: web.WebSocketResponse) -> None:
    try:
        await coro
    except asyncio.TimeoutError:
        with contextlib.suppress(Exception):
            await ws.send_json(
                {"type": "error", "error": "not_ready", "message": "the Gemini session is not open yet; try again"}
            )
    except Exception as exc:
        log.info("client message not delivered to Gemini: %s", exc)


async def _end_conversation(fv: FunVoice, user_id: str) -> None:
    fv.channels.conversations.pop(user_id, None)
    entry = fv.conversations.pop(user_id, None)
    if entry is None:
        return
    conversation, task = entry
    await conversation.close()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


# /ws/tools and /ws/product_info --------------------------------------------------------------------------
async def _side_ws(request: web.Request, kind: Kind) -> web.WebSocketResponse:
    fv = request.app[FUNVOICE]
    user_id = request.query.get("user_id", "")
    ws = await _open_ws(request)
    try:
        if not user_id:
            return await _refuse(ws, "missing_user_id", "user_id is required", WSCloseCode.POLICY_VIOLATION)
        if (reason := _check_user_id(user_id)) is not None:
            return await _refuse(ws, "bad_user_id", reason, WSCloseCode.POLICY_VIOLATION)
        fv.channels.add(kind, user_id, ws)
        try:
            await ws.send_json({"type": "connected", "channel": kind, "user_id": user_id})
            async for msg in ws:  # the front end only listens; a ping is answered
                if msg.type == WSMsgType.TEXT and _is_ping(msg.data):
                    await ws.send_json({"type": "pong"})
        finally:
            fv.channels.remove(kind, user_id, ws)
    finally:
        request.app[WEBSOCKETS].discard(ws)
    return ws


def _is_ping(data: str) -> bool:
    try:
        msg = parse_client_json(data)
    except BadJson:
        return False
    return isinstance(msg, dict) and msg.get("type") == "ping"


async def tools_ws(request: web.Request) -> web.WebSocketResponse:
    return await _side_ws(request, "tools")


async def product_info_ws(request: web.Request) -> web.WebSocketResponse:
    return await _side_ws(request, "product_info")


# HTTP --------------------------------------------------------------------------------------------------
def _ws_base(request: web.Request, public_url: str | None) -> str:
    if public_url:
        parts = urlsplit(public_url)
        scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
        return f"{scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return f"{'wss' if request.secure else 'ws'}://{request.host}"


async def connect(request: web.Request) -> web.Response:
    """``{"ws_url", "user_id", "note"}`` as the document says; ``{"ws_url"}`` alone for RTVI clients.

    An RTVI client is one that says so (``protocol=rtvi`` in the query or body: client-js 1.x, whose
    ``startBotAndConnect()`` refuses any other key) or whose body carries ``rtvi_client_version``
    (client-js 0.4 adds it to every request). Its ``ws_url`` selects ``protocol=rtvi`` and carries the
    token the request presented (browsers cannot set headers on a WebSocket).
    """
    fv = request.app[FUNVOICE]
    body: dict[str, Any] = {}
    if request.can_read_body:
        try:
            parsed = parse_client_json(await request.read())
        except BadJson as exc:
            return _error(400, "bad_json", f'the body must be JSON such as {{"user_id": "user_12345"}} ({exc.message})')
        if parsed is not None and not isinstance(parsed, dict):
            return _error(400, "bad_json", 'the body must be a JSON object such as {"user_id": "user_12345"}')
        body = parsed or {}
    user_id = request.query.get("user_id") or body.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        return _error(400, "bad_user_id", "user_id must be a string")
    protocol = request.query.get("protocol") or body.get("protocol")
    if protocol not in (None, "", "raw", "rtvi"):
        return _error(400, "bad_protocol", f"protocol {str(protocol)[:40]!r} is unknown: use rtvi, raw or leave it out")
    rtvi = protocol == "rtvi" or (protocol is None and "rtvi_client_version" in body)
    if user_id:
        if (reason := _check_user_id(user_id)) is not None:
            return _error(400, "bad_user_id", reason)
        note = "WebSocket connection will use the provided user_id"
    else:
        user_id = new_user_id()
        note = "No user_id was provided; WebSocket connection will use this generated user_id"
    ws_url = f"{_ws_base(request, fv.settings.public_url)}/ws?user_id={quote(user_id, safe='')}"
    if not rtvi:
        return web.json_response({"ws_url": ws_url, "user_id": user_id, "note": note})
    ws_url += "&protocol=rtvi"
    if request.app[SETTINGS].server.bearer_token() is not None and (token := request_token(request)):
        ws_url += f"&token={quote(token, safe='')}"
    return web.json_response({"ws_url": ws_url})


async def product_info_status(request: web.Request) -> web.Response:
    channels = request.app[FUNVOICE].channels
    users = channels.users("product_info")
    return web.json_response(
        {
            "status": "success",
            "data": {
                "streaming_active": bool(users),
                "connected_users": users,
                "last_update": channels.last_product_update,
            },
        }
    )


async def product_info_reset(request: web.Request) -> web.Response:
    user_id = request.match_info["user_id"]
    if (reason := _check_user_id(user_id)) is not None:
        return _error(400, "bad_user_id", reason)
    closed = await request.app[FUNVOICE].channels.reset("product_info", user_id)
    if not closed:
        return web.json_response(
            {"status": "error", "message": f"No ProductInfo WebSocket connection for user {user_id}"}, status=404
        )
    return web.json_response(
        {"status": "success", "message": f"ProductInfo WebSocket connection reset successfully for user {user_id}"}
    )


async def product_info_reset_all(request: web.Request) -> web.Response:
    closed = await request.app[FUNVOICE].channels.reset("product_info")
    noun = "connection" if closed == 1 else "connections"
    return web.json_response({"status": "success", "message": f"Reset {closed} ProductInfo WebSocket {noun}"})


async def example_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "voice.html", headers={"Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/ws", conversation_ws)
    app.router.add_get("/ws/tools", tools_ws)
    app.router.add_get("/ws/product_info", product_info_ws)
    app.router.add_post("/connect", connect)
    app.router.add_get("/product-info-status", product_info_status)
    app.router.add_post("/product-info-reset/{user_id}", product_info_reset)
    app.router.add_post("/product-info-reset-all", product_info_reset_all)
    app.router.add_get(EXAMPLE_PAGE, example_page)
