"""A Pipecat RTVI client in Python for protocol tests and the bench: pipecat.Frame protobuf over aiohttp.

Its message classes come from protoc's own compilation of ``edgevoice/funvoice/frames.proto`` (grpcio-tools,
``--descriptor_set_out``), not from the daemon's descriptor, so the two are checked against each other.
Frames are shaped as ``@pipecat-ai/websocket-transport`` sends them: ``audio`` with PCM16 mono and its rate,
``message`` with the RTVI JSON.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PROTO = Path(__file__).resolve().parents[2] / "edgevoice" / "funvoice" / "frames.proto"
CLIENT_READY_1X = {"version": "2.1.0", "about": {"library": "@pipecat-ai/client-js", "library_version": "1.13.1"}}


def protoc_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """frames.proto compiled by protoc (grpcio-tools)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "frames.pb"
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", f"--descriptor_set_out={out}", PROTO.name],
            check=True,
            capture_output=True,
        )
        fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    assert len(fds.file) == 1
    return fds.file[0]


@cache
def protoc_classes() -> dict[str, Any]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(protoc_descriptor())
    names = ("Frame", "AudioRawFrame", "MessageFrame", "TextFrame", "TranscriptionFrame")
    return {n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"pipecat.{n}")) for n in names}


def audio_frame(pcm: bytes, sample_rate: int = 16000, num_channels: int = 1) -> bytes:
    c = protoc_classes()
    audio = c["AudioRawFrame"](id=0, name="audio", audio=pcm, sample_rate=sample_rate, num_channels=num_channels)
    return bytes(c["Frame"](audio=audio).SerializeToString())


def message_frame(data: str) -> bytes:
    c = protoc_classes()
    return bytes(c["Frame"](message=c["MessageFrame"](data=data)).SerializeToString())


def rtvi(kind: str, data: Any = None, msg_id: str | None = None) -> bytes:
    body = {"id": msg_id or uuid.uuid4().hex[:8], "label": "rtvi-ai", "type": kind, "data": data or {}}
    return message_frame(json.dumps(body))


class RtviTalk:
    """One RTVI /ws client: every RTVI message and audio frame it receives, in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.events: list[tuple[str, Any]] = []  # ("message", dict) | ("audio", AudioRawFrame) | ("text", str)
        self.audio = bytearray()

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [e for k, e in self.events if k == "message"]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    async def send(self, kind: str, data: Any = None, msg_id: str | None = None) -> None:
        await self.ws.send_bytes(rtvi(kind, data, msg_id))

    async def send_audio(self, pcm: bytes, sample_rate: int = 16000, chunk: int = 512) -> None:
        for i in range(0, len(pcm), chunk):
            await self.ws.send_bytes(audio_frame(pcm[i : i + chunk], sample_rate))

    async def until(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 20) -> dict[str, Any]:
        async def read() -> dict[str, Any]:
            frame_cls = protoc_classes()["Frame"]
            while True:
                m = await self.ws.receive()
                if m.type == aiohttp.WSMsgType.BINARY:
                    frame = frame_cls.FromString(m.data)
                    kind = frame.WhichOneof("frame")
                    if kind == "audio":
                        self.events.append(("audio", frame.audio))
                        self.audio += frame.audio.audio
                    elif kind == "message":
                        msg = json.loads(frame.message.data)
                        self.events.append(("message", msg))
                        if pred(msg):
                            return msg
                    else:
                        raise AssertionError(f"server sent a {kind} frame")
                elif m.type == aiohttp.WSMsgType.TEXT:
                    self.events.append(("text", m.data))
                else:
                    raise AssertionError(f"/ws closed ({m.type.name} {self.ws.close_code}) after {self.messages}")

        try:
            return await asyncio.wait_for(read(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"nothing matched within {timeout} s; received {self.messages}") from None

    async def type_(self, kind: str, timeout: float = 20) -> dict[str, Any]:
        return await self.until(lambda m: m["type"] == kind, timeout)

    async def closed(self, timeout: float = 10) -> int | None:
        """Read to the close; return the code the server's close frame carried."""

        async def read() -> int | None:
            while True:
                m = await self.ws.receive()
                if m.type == aiohttp.WSMsgType.CLOSE:
                    return int(m.data)
                if m.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                    return self.ws.close_code
                if m.type == aiohttp.WSMsgType.BINARY:
                    frame = protoc_classes()["Frame"].FromString(m.data)
                    if frame.WhichOneof("frame") == "message":
                        self.events.append(("message", json.loads(frame.message.data)))

        return await asyncio.wait_for(read(), timeout)
