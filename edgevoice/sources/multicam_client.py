"""A small asyncio client for ``/asr-multicam`` (tests, benches and scripts).

async with MulticamClient.connect("ws://127.0.0.1:8000") as client:
    await client.start("mic_1", session_id="table_05", customer_id="cust_a", channel=0)
    await client.stream(0, audio)            # float32 16 kHz mono, at real-time pace
    text = await client.stop("mic_1")         # waits for stream_stopped
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np

Message = dict[str, Any]


def to_s16le(audio: np.ndarray) -> bytes:
    """float32 samples to little-endian 16-bit PCM."""
    pcm: np.ndarray = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    return pcm.tobytes()


class MulticamClient:
    """One connection; every received message is kept in :attr:`messages` (with its arrival time)."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._session = session
        self.ws = ws
        self.messages: list[Message] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())
        self.on_message: Callable[[Message], None] | None = None

    @classmethod
    def connect(cls, base_url: str, token: str | None = None, path: str = "/asr-multicam") -> _Connect:
        return _Connect(cls, base_url.rstrip("/") + path, token)

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                data["_t"] = time.monotonic()
                if self.on_message is not None:
                    self.on_message(data)
                async with self._changed:
                    self.messages.append(data)
                    self._changed.notify_all()
        finally:
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(self, predicate: Callable[[Message], bool], timeout: float = 30, since: int = 0) -> Message:
        """The first message from index ``since`` on (already received or coming) that matches."""

        async def find() -> Message:
            async with self._changed:
                seen = since
                while True:
                    for m in self.messages[seen:]:
                        if predicate(m):
                            return m
                    seen = len(self.messages)
                    if self._reader.done():
                        raise ConnectionError(f"connection closed ({self.ws.close_code}) before the message arrived")
                    await self._changed.wait()

        return await asyncio.wait_for(find(), timeout)

    async def send_json(self, obj: Message) -> None:
        await self.ws.send_str(json.dumps(obj))

    async def start(
        self,
        stream_id: str,
        *,
        session_id: str,
        customer_id: str,
        channel: int = 0,
        language: str | None = None,
        fmt: str = "pcm_s16le",
        sample_rate: int = 16000,
        channels: int = 1,
        timeout: float = 10,
    ) -> Message:
        """Start a stream; return ``stream_started`` (or raise with the ``error`` message)."""
        msg: Message = {
            "type": "audio_stream_start",
            "session_id": session_id,
            "customer_id": customer_id,
            "stream_id": stream_id,
            "channel": channel,
            "format": fmt,
            "sample_rate": sample_rate,
            "channels": channels,
        }
        if language:
            msg["language"] = language
        since = len(self.messages)
        await self.send_json(msg)
        reply = await self.wait_for(
            lambda m: m.get("stream_id") == stream_id and m["type"] in ("stream_started", "error"), timeout, since
        )
        if reply["type"] == "error":
            raise RuntimeError(f"{reply['code']}: {reply['message']}")
        return reply

    async def send_audio(self, channel: int, audio: np.ndarray) -> None:
        await self.ws.send_bytes(bytes([channel]) + to_s16le(audio))

    async def stream(self, channel: int, audio: np.ndarray, *, frame_ms: int = 40, realtime: bool = True) -> float:
        """Send 16 kHz float32 audio in frames, paced at real time; return the monotonic time of the last frame."""
        step = 16 * frame_ms
        t0 = time.monotonic()
        for i in range(0, len(audio), step):
            await self.send_audio(channel, audio[i : i + step])
            if realtime:
                delay = t0 + (i + step) / 16000 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
        return time.monotonic()

    async def stop(self, stream_id: str, timeout: float = 60) -> str:
        """Stop a stream; return its ``full_transcript`` once the daemon has flushed it."""
        since = len(self.messages)
        await self.send_json({"type": "audio_stream_stop", "stream_id": stream_id})
        reply = await self.wait_for(
            lambda m: m.get("stream_id") == stream_id and m["type"] in ("stream_stopped", "error"), timeout, since
        )
        if reply["type"] == "error":
            raise RuntimeError(f"{reply['code']}: {reply['message']}")
        return str(reply["full_transcript"])

    def of(self, kind: str, stream_id: str | None = None) -> list[Message]:
        """Received messages of one type (and stream)."""
        return [
            m for m in self.messages if m["type"] == kind and (stream_id is None or m.get("stream_id") == stream_id)
        ]

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._session.close()


class _Connect:
    def __init__(self, cls: type[MulticamClient], url: str, token: str | None) -> None:
        self.cls, self.url, self.token = cls, url, token
        self.client: MulticamClient | None = None

    async def __aenter__(self) -> MulticamClient:
        session = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            ws = await session.ws_connect(self.url, headers=headers, heartbeat=None, max_msg_size=0)
        except BaseException:
            await session.close()
            raise
        self.client = self.cls(session, ws)
        return self.client

    async def __aexit__(self, *exc: object) -> None:
        assert self.client is not None
        await self.client.close()
