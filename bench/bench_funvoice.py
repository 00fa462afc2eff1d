"""What the FunVoiceChat bridge adds to a Gemini Live turn: first model audio byte after the user's turn, through
the daemon's /ws (raw protocol, and the Pipecat RTVI protocol) versus the SDK talking to the same fake Live
server directly (all on 127.0.0.1, TLS).

    .venv/bin/python -m bench.bench_funvoice [--turns 30]

A turn is one second of PCM16 16 kHz audio sent as fast as possible (``--paced``: in real time, as a
microphone does): in 100 ms frames on the raw protocol, in
512-byte (16 ms) protobuf ``audio`` frames on RTVI as ``@pipecat-ai/websocket-transport`` sends them. The fake
answers as soon as it has the whole second, so the figures are transport and bridge overhead, not model time.
The RTVI figures also give the final user transcript (``user-transcription`` with ``final: true``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.daemon import Daemon
from tests.support.fake_live import FakeLive
from tests.support.rtvi_client import CLIENT_READY_1X, audio_frame, protoc_classes, rtvi

FRAME = 3200
MIME = "audio/pcm;rate=16000"
TURN = b"\x10\x00" * 16000


async def send_turn(send: Callable[[bytes], Awaitable[None]], frame: int, paced: bool) -> None:
    """One turn of audio in ``frame``-byte frames: at once, or at the microphone's pace."""
    start = time.perf_counter()
    for n, i in enumerate(range(0, len(TURN), frame)):
        if paced:
            await asyncio.sleep(max(start + n * frame / 32000 - time.perf_counter(), 0))
        await send(TURN[i : i + frame])


async def through_daemon(d: Daemon, turns: int, paced: bool) -> tuple[list[float], list[float]]:
    """Per turn: first audio byte, and the user transcript (input_transcription), after the turn's last frame."""
    firsts, heards = [], []
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{d.ws_url}/ws?user_id=bench") as ws:
        while (await ws.receive_json())["type"] != "ready":
            pass
        for _ in range(turns):
            await send_turn(ws.send_bytes, FRAME, paced)
            t0 = time.perf_counter()
            first = heard = None
            while True:
                m = await ws.receive()
                if m.type == aiohttp.WSMsgType.BINARY and first is None:
                    first = time.perf_counter() - t0
                elif m.type == aiohttp.WSMsgType.TEXT:
                    kind = json.loads(m.data)["type"]
                    if kind == "input_transcription" and heard is None:
                        heard = time.perf_counter() - t0
                    elif kind == "turn_complete":
                        break
            assert first is not None and heard is not None
            firsts.append(first)
            heards.append(heard)
    return firsts, heards


async def through_rtvi(d: Daemon, turns: int, paced: bool) -> tuple[list[float], list[float]]:
    """Per turn: first bot audio frame, and the final user transcript, after the turn's last frame."""
    frame_cls = protoc_classes()["Frame"]
    firsts, finals = [], []
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(f"{d.ws_url}/ws?user_id=bench_rtvi&protocol=rtvi") as ws,
    ):

        async def next_message() -> tuple[str, Any]:
            frame = frame_cls.FromString(await ws.receive_bytes())
            kind = frame.WhichOneof("frame")
            return (kind, json.loads(frame.message.data)) if kind == "message" else (kind, None)

        await ws.send_bytes(rtvi("client-ready", CLIENT_READY_1X))
        while True:
            _, msg = await next_message()
            if msg is not None and msg["type"] == "bot-ready":
                break
        for _ in range(turns):
            await send_turn(lambda pcm: ws.send_bytes(audio_frame(pcm)), 512, paced)
            t0 = time.perf_counter()
            first = final = None
            while True:
                kind, msg = await next_message()
                if kind == "audio" and first is None:
                    first = time.perf_counter() - t0
                elif msg is not None and msg["type"] == "user-transcription" and msg["data"]["final"] and final is None:
                    final = time.perf_counter() - t0
                elif msg is not None and msg["type"] == "bot-stopped-speaking":
                    break
            assert first is not None and final is not None
            firsts.append(first)
            finals.append(final)
    return firsts, finals


async def direct(fake: FakeLive, turns: int, paced: bool) -> list[float]:
    from google import genai
    from google.genai import types

    client = genai.Client(
        api_key="test-key",
        http_options=types.HttpOptions(
            base_url=fake.base_url, api_version="v1beta", async_client_args={"ssl": fake.client_ssl_context()}
        ),
    )
    out = []
    config = types.LiveConnectConfig(response_modalities=[types.Modality.AUDIO])
    async with client.aio.live.connect(model="bench", config=config) as session:
        for _ in range(turns):
            await send_turn(
                lambda pcm: session.send_realtime_input(audio=types.Blob(data=pcm, mime_type=MIME)), FRAME, paced
            )
            t0 = time.perf_counter()
            first = None
            async for msg in session.receive():
                if first is None and msg.data:
                    first = time.perf_counter() - t0
            assert first is not None
            out.append(first)
    return out


def _ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:6.2f} ms  max {max(values) * 1000:6.2f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--paced", action="store_true", help="send each turn at the microphone's pace, not at once")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeLive(Path(tmp)) as fake:
        env = {"EDGEVOICE_FUNVOICE__API_KEY": "test-key", "EDGEVOICE_FUNVOICE__BASE_URL": fake.base_url}
        env["EDGEVOICE_FUNVOICE__CA_FILE"] = str(fake.ca_path)
        sub = Path(tmp) / "daemon"
        sub.mkdir()
        with Daemon(sub, env=env) as d:
            raw_first, raw_heard = asyncio.run(through_daemon(d, args.turns, args.paced))
            rtvi_first, rtvi_final = asyncio.run(through_rtvi(d, args.turns, args.paced))
        plain = asyncio.run(direct(fake, args.turns, args.paced))
    med = {k: statistics.median(v) * 1000 for k, v in {"plain": plain, "raw": raw_first, "rtvi": rtvi_first}.items()}
    print(f"turns: {args.turns} ({'paced at the microphone' if args.paced else 'each sent at once'})")
    print(f"first audio byte, SDK direct to fake:            {_ms(plain)}")
    print(f"first audio byte, client -> daemon /ws (raw):    {_ms(raw_first)}")
    print(f"first audio byte, client -> daemon /ws (RTVI):   {_ms(rtvi_first)}")
    print(f"user transcript, raw input_transcription:        {_ms(raw_heard)}")
    print(f"user transcript, RTVI final user-transcription:  {_ms(rtvi_final)}")
    print(f"bridge overhead (raw): median {med['raw'] - med['plain']:+.2f} ms")
    print(f"RTVI over raw, first audio byte: median {med['rtvi'] - med['raw']:+.2f} ms per turn")


if __name__ == "__main__":
    main()
