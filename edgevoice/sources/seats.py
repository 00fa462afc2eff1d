"""Who sits at a microphone seat: the POS binds a customer to a local mic stream over HTTP.

``POST /streams/{stream_id}/start`` with ``{"session_id", "customer_id"}`` attaches
the customer to the seat's already-running stream, exactly as an
``audio_stream_start`` would: keyword events fire at most once per customer
session. ``POST /streams/{stream_id}/stop`` detaches the customer as an
``audio_stream_stop`` would: ``SESSION_END`` fires when it was the customer's
last stream. A binding covers the seat's audio between the two requests (stream
samples): the stop answers once the customer's last words are recognized and
theirs (at most ``sessions.unbind_flush_s``), and the seat may be bound to the
next customer meanwhile. The seat's audio keeps being recognized (and shown)
while no customer is bound; it just fires no customer events. Handlers run on
the event loop; nothing here holds state.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from edgevoice.errors import CodedError, identifier_field
from edgevoice.events.hub import STREAM_HUB, HubStream, StreamError
from edgevoice.server.clientjson import BadJson, parse_client_json
from edgevoice.sources.mic import MIC_CAPTURE

log = logging.getLogger(__name__)

_STATUS = {
    "bad_json": 400,
    "missing_field": 400,
    "bad_identifier": 400,
    "unknown_stream": 404,
    "stream_bound": 409,
    "not_bound": 409,
    "stream_unavailable": 503,
}


class SeatError(CodedError):
    """A request the seat endpoints refuse; ``code`` names the problem."""

    def response(self, stream_id: str) -> web.Response:
        return web.json_response(
            {"error": self.code, "message": self.message, "stream_id": stream_id}, status=_STATUS[self.code]
        )


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    try:
        body = parse_client_json(raw) if raw.strip() else None
    except BadJson as exc:
        raise SeatError("bad_json", f"the body is not valid JSON: {exc.message}") from None
    if not isinstance(body, dict):
        raise SeatError("bad_json", 'the body must be a JSON object {"session_id": ..., "customer_id": ...}')
    return body


def _seat_stream(request: web.Request, stream_id: str) -> HubStream:
    """The hub stream of a configured mic seat."""
    capture = request.app.get(MIC_CAPTURE)
    if capture is None or stream_id not in capture.seat_ids:
        raise SeatError("unknown_stream", f"stream_id {stream_id!r} is not a configured mic seat (mic.devices.seats)")
    stream = request.app[STREAM_HUB].get(stream_id)
    if stream is None or stream.stopping:
        raise SeatError("stream_unavailable", f"the stream of seat {stream_id!r} is not open (shutting down?)")
    return stream


async def start_seat(request: web.Request) -> web.Response:
    """Bind a customer to a seat (idempotent for the same customer)."""
    stream_id = request.match_info["stream_id"]
    try:
        body = await _body(request)
        session_id = identifier_field(body, "session_id", SeatError)
        customer_id = identifier_field(body, "customer_id", SeatError)
        stream = _seat_stream(request, stream_id)
        if stream.customer is not None and stream.customer.key != (session_id, customer_id):
            raise SeatError(
                "stream_bound",
                f"seat {stream_id!r} is bound to customer {stream.customer_id!r} of session {stream.session_id!r};"
                " stop it first",
            )
        new = stream.customer is None
        try:
            request.app[STREAM_HUB].bind(stream_id, session_id, customer_id)
        except StreamError as exc:
            raise SeatError(exc.code if exc.code in _STATUS else "stream_unavailable", exc.message) from None
    except SeatError as exc:
        return exc.response(stream_id)
    if new:
        log.info("seat %s bound to customer %s (session %s)", stream_id, customer_id, session_id)
    return web.json_response(
        {"stream_id": stream_id, "session_id": session_id, "customer_id": customer_id, "bound": True}
    )


async def stop_seat(request: web.Request) -> web.Response:
    """Unbind the seat's customer: its customer stream ends (SESSION_END if it was the last)."""
    stream_id = request.match_info["stream_id"]
    try:
        stream = _seat_stream(request, stream_id)
        customer = stream.customer
        if customer is None:
            raise SeatError("not_bound", f"no customer is bound to seat {stream_id!r}")
    except SeatError as exc:
        return exc.response(stream_id)
    await request.app[STREAM_HUB].unbind(stream_id)
    log.info("seat %s unbound from customer %s (session %s)", stream_id, customer.customer_id, customer.session_id)
    return web.json_response(
        {
            "stream_id": stream_id,
            "session_id": customer.session_id,
            "customer_id": customer.customer_id,
            "bound": False,
            "full_transcript": customer.transcript,
        }
    )


def setup(app: web.Application) -> None:
    """Serve the seat binding endpoints (after :func:`edgevoice.sources.mic.setup`: it provides the seats)."""
    app.router.add_post("/streams/{stream_id}/start", start_seat)
    app.router.add_post("/streams/{stream_id}/stop", stop_seat)
