"""What the FunVoiceChat bridge adds to a Gemini Live turn: first model audio byte after the user's turn, through
the daemon's /ws versus the SDK talking to the same fake Live server directly (both on 127.0.0.1, TLS).

    .venv/bin/python -m bench.bench_funvoice [--turns 30]

A turn is one second of PCM16 16 kHz audio sent in 100 ms frames as fast as possible; the fake answers as soon
as it has the whole second, so the figure is transport and bridge overhead, not model time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from tests.support.daemon import Daemon
from tests.support.fake_live import FakeLive

FRAME = 3200
TURN = b"\x10\x00" * 16000


async def through_daemon(d: Daemon, turns: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{d.ws_url}/ws?user_id=bench") as ws:
        while (await ws.receive_json())["type"] != "ready":
            pass
        for _ in range(turns):
            for i in range(0, len(TURN), FRAME):
                await ws.send_bytes(TURN[i : i + FRAME])
            t0 = time.perf_counter()
            first = None
            while True:
                m = await ws.receive()
                if m.type == aiohttp.WSMsgType.BINARY and first is None:
                    first = time.perf_counter() - t0
                elif m.type == aiohttp.WSMsgType.TEXT and '"turn_complete"' in m.data:
                    break
            assert first is not None
            out.append(first)
    return out


async def direct(fake: FakeLive, turns: int) -> list[float]:
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
            for i in range(0, len(TURN), FRAME):
                await session.send_realtime_input(
                    audio=types.Blob(data=TURN[i : i + FRAME], mime_type="audio/pcm;rate=16000")
                )
            t0 = time.perf_counter()
            first = None
            async for msg in session.receive():
                if first is None and msg.data:
                    first = time.perf_counter() - t0
            assert first is not None
            out.append(first)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--turns", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, FakeLive(Path(tmp)) as fake:
        env = {"EDGEVOICE_FUNVOICE__API_KEY": "test-key", "EDGEVOICE_FUNVOICE__BASE_URL": fake.base_url}
        env["EDGEVOICE_FUNVOICE__CA_FILE"] = str(fake.ca_path)
        sub = Path(tmp) / "daemon"
        sub.mkdir()
        with Daemon(sub, env=env) as d:
            bridged = asyncio.run(through_daemon(d, args.turns))
        plain = asyncio.run(direct(fake, args.turns))
    med_b, med_p = statistics.median(bridged) * 1000, statistics.median(plain) * 1000
    print(f"turns: {args.turns}")
    print(f"first audio byte, SDK direct to fake:   median {med_p:6.2f} ms  max {max(plain) * 1000:6.2f} ms")
    print(f"first audio byte, browser -> daemon /ws: median {med_b:6.2f} ms  max {max(bridged) * 1000:6.2f} ms")
    print(f"bridge overhead: median {med_b - med_p:+.2f} ms")


if __name__ == "__main__":
    main()
