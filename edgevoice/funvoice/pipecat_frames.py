"""The Pipecat WebSocket wire format: one protobuf ``pipecat.Frame`` per binary frame (schema: frames.proto).

Thread model: pure functions over bytes, safe on the event loop (the ``protobuf`` runtime's upb backend
parses a 16 ms audio frame in microseconds). Bounds: one frame at a time; its size is bounded by the
WebSocket's ``server.max_frame_bytes``.

The message classes come from the ``protobuf`` runtime, built from a descriptor written out here rather
than from protoc-generated code: generated ``_pb2`` modules are tied to the protobuf release of the protoc
that made them, this works with any protobuf >= 4.25. ``tests/test_funvoice_rtvi_units.py`` compiles
``frames.proto`` with protoc (grpcio-tools) and checks it is the same schema.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

PROTO_PATH = Path(__file__).with_name("frames.proto")
PACKAGE = "pipecat"


class FrameError(ValueError):
    """A binary frame that is not a usable ``pipecat.Frame``; the text says what is wrong."""


@dataclass(frozen=True)
class AudioIn:
    """Microphone audio from the client."""

    pcm: bytes
    sample_rate: int
    num_channels: int


@dataclass(frozen=True)
class MessageIn:
    """An RTVI message (JSON text) from the client."""

    data: str


# (name, number, type, message type) per field; every field is a proto3 singular field.
_U64, _U32, _STR, _BYTES, _MSG = "TYPE_UINT64", "TYPE_UINT32", "TYPE_STRING", "TYPE_BYTES", "TYPE_MESSAGE"
_MESSAGES: dict[str, list[tuple[str, int, str, str | None]]] = {
    "TextFrame": [("id", 1, _U64, None), ("name", 2, _STR, None), ("text", 3, _STR, None)],
    "AudioRawFrame": [
        ("id", 1, _U64, None),
        ("name", 2, _STR, None),
        ("audio", 3, _BYTES, None),
        ("sample_rate", 4, _U32, None),
        ("num_channels", 5, _U32, None),
        ("pts", 6, _U64, None),  # proto3 `optional`
    ],
    "TranscriptionFrame": [
        ("id", 1, _U64, None),
        ("name", 2, _STR, None),
        ("text", 3, _STR, None),
        ("user_id", 4, _STR, None),
        ("timestamp", 5, _STR, None),
    ],
    "MessageFrame": [("data", 1, _STR, None)],
    "Frame": [  # all in `oneof frame`
        ("text", 1, _MSG, "TextFrame"),
        ("audio", 2, _MSG, "AudioRawFrame"),
        ("transcription", 3, _MSG, "TranscriptionFrame"),
        ("message", 4, _MSG, "MessageFrame"),
    ],
}
_OPTIONAL = {("AudioRawFrame", "pts")}


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def file_descriptor() -> Any:
    """frames.proto as a ``FileDescriptorProto`` (what ``protoc --descriptor_set_out`` writes for it)."""
    pb = importlib.import_module("google.protobuf.descriptor_pb2")
    fdp = pb.FileDescriptorProto(name=PROTO_PATH.name, package=PACKAGE, syntax="proto3")
    for msg_name, fields in _MESSAGES.items():
        msg = fdp.message_type.add(name=msg_name)
        if msg_name == "Frame":
            msg.oneof_decl.add(name="frame")
        for name, number, kind, type_name in fields:
            field = msg.field.add(
                name=name,
                number=number,
                label=pb.FieldDescriptorProto.LABEL_OPTIONAL,
                type=getattr(pb.FieldDescriptorProto, kind),
                json_name=_json_name(name),
            )
            if type_name is not None:
                field.type_name = f".{PACKAGE}.{type_name}"
            if msg_name == "Frame":
                field.oneof_index = 0
            elif (msg_name, name) in _OPTIONAL:  # a synthetic oneof `_pts`, as protoc declares it
                field.proto3_optional = True
                field.oneof_index = len(msg.oneof_decl)
                msg.oneof_decl.add(name=f"_{name}")
    return fdp


@cache
def _classes() -> dict[str, Any]:
    """The message classes, in a private descriptor pool (another pipecat.Frame elsewhere cannot clash)."""
    pool_mod = importlib.import_module("google.protobuf.descriptor_pool")
    factory = importlib.import_module("google.protobuf.message_factory")
    pool = pool_mod.DescriptorPool()
    pool.AddSerializedFile(file_descriptor().SerializeToString())
    return {name: factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}")) for name in _MESSAGES}


def decode(data: bytes) -> AudioIn | MessageIn:
    """Parse one client frame; :class:`FrameError` names what is wrong with anything else."""
    frame_cls = _classes()["Frame"]
    decode_error = importlib.import_module("google.protobuf.message").DecodeError
    try:
        frame = frame_cls.FromString(data)
    except decode_error as exc:
        raise FrameError(f"not a pipecat.Frame protobuf ({len(data)} bytes): {exc}") from None
    kind = frame.WhichOneof("frame")
    if kind == "audio":
        audio = frame.audio
        return AudioIn(bytes(audio.audio), int(audio.sample_rate), int(audio.num_channels))
    if kind == "message":
        return MessageIn(str(frame.message.data))
    if kind is None:
        raise FrameError(
            f"pipecat.Frame ({len(data)} bytes) sets none of its frame kinds (text = 1, audio = 2, "
            "transcription = 3, message = 4)"
        )
    raise FrameError(f"pipecat.Frame kind {kind!r} is not accepted from clients; send audio or message frames")


def encode_audio(pcm: bytes, sample_rate: int, num_channels: int = 1) -> bytes:
    """An ``audio`` frame (PCM16 little-endian)."""
    cls = _classes()
    frame = cls["Frame"](audio=cls["AudioRawFrame"](audio=pcm, sample_rate=sample_rate, num_channels=num_channels))
    return bytes(frame.SerializeToString())


def encode_message(message: dict[str, Any]) -> bytes:
    """A ``message`` frame carrying ``message`` as JSON."""
    cls = _classes()
    data = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    return bytes(cls["Frame"](message=cls["MessageFrame"](data=data)).SerializeToString())
