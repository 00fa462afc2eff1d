"""PCM decoding, control-message parsing and the bounded outbox, on real objects."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from edgevoice.sources.multicam import MAX_QUEUED_PARTIALS, Outbox, ProtocolError, parse_start, parse_text
from edgevoice.sources.pcm import PcmDecoder, Resampler, downmix


def _tone(rate: int, seconds: float = 1.0, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("fmt", ["pcm_s16le", "pcm_f32le"])
@pytest.mark.parametrize("channels", [1, 2])
def test_decoder_any_rate_format_and_split(rate: int, fmt: str, channels: int) -> None:
    mono = _tone(rate)
    frames = np.stack([mono] * channels, axis=1) if channels == 2 else mono
    raw = (frames * 32767).astype("<i2").tobytes() if fmt == "pcm_s16le" else frames.astype("<f4").tobytes()
    dec = PcmDecoder(fmt, rate, channels)
    out = np.concatenate([dec.decode(c) for c in _chunks(raw, 333)] + [dec.flush()])  # samples split across frames
    assert out.dtype == np.float32
    assert abs(len(out) - 16000) <= 2
    mid = out[2000:14000]
    assert np.sqrt(np.mean(mid**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.02)
    # The frequency survives resampling: 440 Hz peak in the spectrum.
    spectrum = np.abs(np.fft.rfft(mid))
    assert abs(np.argmax(spectrum) * 16000 / len(mid) - 440) < 3
    assert dec.input_seconds == pytest.approx(1.0, abs=1e-3)


def test_stereo_is_averaged() -> None:
    left = np.full(1600, 0.5, dtype=np.float32)
    right = np.full(1600, -0.1, dtype=np.float32)
    dec = PcmDecoder("pcm_f32le", 16000, 2)
    out = dec.decode(np.stack([left, right], axis=1).astype("<f4").tobytes())
    assert np.allclose(out, 0.2)
    assert np.allclose(downmix(np.stack([left, right], axis=1)), 0.2)


def test_f32_garbage_is_clipped_not_propagated() -> None:
    dec = PcmDecoder("pcm_f32le", 16000, 1)
    out = dec.decode(np.array([np.nan, np.inf, -np.inf, 7.0, -3.0, 0.25], dtype="<f4").tobytes())
    assert np.all(np.isfinite(out)) and np.all(np.abs(out) <= 1.0)
    assert out[-1] == pytest.approx(0.25)


def test_decoder_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="format"):
        PcmDecoder("mp3")
    with pytest.raises(ValueError, match="sample_rate"):
        PcmDecoder("pcm_s16le", 96000)
    with pytest.raises(ValueError, match="channels"):
        PcmDecoder("pcm_s16le", 16000, 6)


def test_resampler_streaming_matches_length() -> None:
    r = Resampler(48000)
    out = np.concatenate([r.process(c) for c in np.array_split(_tone(48000, 2.0), 37)] + [r.flush()])
    assert abs(len(out) - 32000) <= 2


GOOD = {"type": "audio_stream_start", "session_id": "table_05", "customer_id": "cust_a", "stream_id": "mic_1"}


def test_parse_start_defaults_and_fields() -> None:
    req = parse_start(dict(GOOD))
    assert (req.channel, req.format, req.sample_rate, req.channels, req.language) == (0, "pcm_s16le", 16000, 1, None)
    full = {**GOOD, "channel": 7, "format": "pcm_f32le", "sample_rate": 44100, "channels": 2, "language": "vi"}
    req = parse_start(full)
    assert (req.channel, req.format, req.sample_rate, req.channels, req.language) == (7, "pcm_f32le", 44100, 2, "vi")


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"session_id": None}, "missing_field"),
        ({"customer_id": None}, "missing_field"),
        ({"customer_id": "has space"}, "bad_identifier"),
        ({"session_id": "x" * 129}, "bad_identifier"),
        ({"session_id": ""}, "bad_identifier"),
        ({"customer_id": 5}, "bad_identifier"),
        ({"customer_id": "khách"}, "bad_identifier"),
        ({"customer_id": "guest_1\n"}, "bad_identifier"),
        ({"channel": 256}, "bad_channel"),
        ({"channel": -1}, "bad_channel"),
        ({"channel": True}, "bad_channel"),
        ({"channel": "0"}, "bad_channel"),
        ({"format": "opus"}, "unsupported_format"),
        ({"channels": 3}, "unsupported_format"),
        ({"sample_rate": 7999}, "bad_sample_rate"),
        ({"sample_rate": 48001}, "bad_sample_rate"),
        ({"sample_rate": "16000"}, "bad_sample_rate"),
        ({"language": "Vietnamese!"}, "bad_language"),
    ],
)
def test_parse_start_errors(change: dict[str, object], code: str) -> None:
    obj = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    with pytest.raises(ProtocolError) as info:
        parse_start(obj)
    assert info.value.code == code
    assert info.value.stream_id == "mic_1"
    field = next(iter(change))
    assert field in info.value.message or field.replace("_id", "") in info.value.message


def test_parse_start_without_stream_id() -> None:
    with pytest.raises(ProtocolError) as info:
        parse_start({k: v for k, v in GOOD.items() if k != "stream_id"})
    assert (info.value.code, info.value.stream_id) == ("missing_field", None)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{not json", "bad_json"),
        ("[1, 2]", "bad_json"),
        ('"ping"', "bad_json"),
        ("[" * 100000, "bad_json"),
        ('{"session_id": "x"}', "missing_field"),
        ('{"type": 3}', "unknown_type"),
    ],
)
def test_parse_text_errors(text: str, code: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_text(text)
    assert info.value.code == code


class _SlowSocket:
    """Collects sends; blocks until released (a client that does not read)."""

    def __init__(self) -> None:
        self.sent: list[dict[str, object]] = []
        self.release = asyncio.Event()

    async def send_str(self, data: str) -> None:
        await self.release.wait()
        self.sent.append(json.loads(data))


def _partial(stream: str, i: int) -> dict[str, object]:
    return {"type": "transcript", "stream_id": stream, "final": False, "text": f"p{i}"}


def _final(stream: str, i: int) -> dict[str, object]:
    return {"type": "transcript", "stream_id": stream, "final": True, "text": f"f{i}"}


async def test_outbox_drops_stale_partials_keeps_finals_in_order() -> None:
    ws = _SlowSocket()
    box = Outbox(ws)  # type: ignore[arg-type]
    writer = asyncio.create_task(box.run())
    await asyncio.sleep(0)
    for i in range(200):
        box.put(_partial("a", i))
        box.put(_partial("b", i))
        if i % 10 == 0:
            box.put(_final("a", i))
    ws.release.set()
    box.close()
    await asyncio.wait_for(writer, 5)
    finals = [m["text"] for m in ws.sent if m["final"]]
    assert finals == [f"f{i}" for i in range(0, 200, 10)]
    partials = [m for m in ws.sent if not m["final"]]
    assert len(partials) <= 1 + 2 + 2  # one in flight, then only the newest per stream
    assert {m["stream_id"]: m["text"] for m in partials[-2:]} == {"a": "p199", "b": "p199"}
    assert box.dropped_partials >= 390


async def test_outbox_partials_dropped_when_backlogged_then_overflow_closes() -> None:
    ws = _SlowSocket()
    box = Outbox(ws, max_queued=100)  # type: ignore[arg-type]
    writer = asyncio.create_task(box.run())
    await asyncio.sleep(0)
    for i in range(MAX_QUEUED_PARTIALS + 5):
        box.put(_final("a", i))
    box.put(_partial("z", 0))
    assert box.dropped_partials == 1  # backlog: partials go first
    for i in range(200):
        box.put(_final("a", 1000 + i))
    assert box.overflowed and box.closed
    await asyncio.wait_for(writer, 5)  # the writer gives up instead of waiting on the client


async def test_outbox_survives_a_message_that_cannot_be_encoded() -> None:
    """A lone surrogate (from anywhere) is sent as a JSON escape; the outbox keeps writing what follows."""
    ws = _SlowSocket()
    ws.release.set()

    async def send_str(data: str) -> None:
        data.encode("utf-8")  # what aiohttp does first: raises on a lone surrogate
        ws.sent.append(json.loads(data))

    ws.send_str = send_str  # type: ignore[method-assign]
    box = Outbox(ws)  # type: ignore[arg-type]
    writer = asyncio.create_task(box.run())
    box.put({"type": "error", "code": "bad_json", "message": "odd \ud800 value"})
    box.put({"type": "pong"})
    box.close()
    await asyncio.wait_for(writer, 5)
    assert ws.sent == [{"type": "error", "code": "bad_json", "message": "odd \ud800 value"}, {"type": "pong"}]
    assert not box.overflowed
