"""The real Pipecat web SDK in headless Chromium against edgevoice: both generations front ends ship with
(``@pipecat-ai/client-js`` 0.4.1 + ``@pipecat-ai/websocket-transport`` 0.4.2, and 1.13.1 + 1.7.1).

The packages are the npm releases at those exact versions (``tests/support/rtvi_js/*/package-lock.json``,
installed by ``./bootstrap.sh test`` into ``.cache/rtvi-js/``) bundled here with their own esbuild; nothing
touches the network. The page is served from another origin than the daemon (so ``/connect`` goes through a
CORS preflight, with a bearer token), the microphone is Chromium's fake capture device playing an espeak-ng
WAV through the package's ``WavMediaManager``, and the daemon bridges it to the fake Gemini Live server.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import wave
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, FAKE_MEDIA_ARGS
from tests.support.daemon import Daemon, free_port
from tests.support.fake_live import FakeLive, heard
from tests.support.speech import have_espeak, silence, synth, to_s16le

ROOT = Path(__file__).resolve().parent.parent
JS = ROOT / "tests" / "support" / "rtvi_js"
CACHE = Path(os.environ.get("EDGEVOICE_RTVI_JS_CACHE", ROOT / ".cache" / "rtvi-js"))
TOKEN = "rtvi-browser-token"
PAGE = """<!doctype html><meta charset="utf-8"><title>RTVI {gen}</title><script src="bundle.js"></script>"""
GENERATIONS = {
    "v0": {"client-js": "0.4.1", "websocket-transport": "0.4.2", "rtvi": "0.3.0"},
    "v1": {"client-js": "1.13.1", "websocket-transport": "1.7.1", "rtvi": "2.1.0"},
}

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Chromium at {CHROMIUM}"),
    pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng"),
]

try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # pragma: no cover - the test extra installs it
    pytestmark.append(pytest.mark.skip(reason="needs playwright"))


def installed(gen: str) -> Path:
    """The generation's npm install; the versions are checked, not assumed."""
    modules = CACHE / gen / "node_modules"
    if not (modules / ".bin" / "esbuild").exists():
        pytest.skip(f"Pipecat web SDK {gen} not installed in {CACHE}: run ./bootstrap.sh test (or {JS}/install.sh)")
    import json

    for name, version in GENERATIONS[gen].items():
        if name != "rtvi":
            meta = json.loads((modules / "@pipecat-ai" / name / "package.json").read_text())
            assert meta["version"] == version, f"{name} {meta['version']} installed, {version} expected: rerun install"
    return modules


def bundle(gen: str, out: Path) -> Path:
    modules = installed(gen)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "bundle.js"
    subprocess.run(
        [
            str(modules / ".bin" / "esbuild"),
            str(JS / gen / "entry.js"),
            "--bundle",
            "--format=iife",
            "--target=chrome120",
            "--log-level=warning",
            f"--outfile={target}",
        ],
        check=True,
        env={**os.environ, "NODE_PATH": str(modules)},
        timeout=120,
    )
    (out / "index.html").write_text(PAGE.format(gen=gen))
    return out


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeLive]:
    with FakeLive(tmp_path) as f:
        yield f


@pytest.fixture
async def page_server(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A static server on another port: the front end's own origin."""
    root = tmp_path / "site"
    root.mkdir()
    app = web.Application()
    app.router.add_static("/", root)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", root
    finally:
        await runner.cleanup()


def speech_wav(path: Path) -> np.ndarray:
    audio = np.concatenate(
        [synth("Hello, I would like a bowl of beef noodle soup and an iced tea, please."), silence(0.4)]
    )
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(to_s16le(audio))
    return audio


def best_match(received: np.ndarray, reference: np.ndarray) -> float:
    """The highest normalized correlation of ``received`` against any offset of the (looping) reference."""
    ref = np.concatenate([reference, reference])
    n = len(received)
    spectrum = np.fft.rfft(ref, 2 * len(ref)) * np.conj(np.fft.rfft(received, 2 * len(ref)))
    corr = np.fft.irfft(spectrum)[: len(reference)]
    window = np.convolve(ref**2, np.ones(n), "valid")[: len(reference)]
    return float(np.max(corr / (np.sqrt(window * np.sum(received**2)) + 1e-9)))


def piecewise_match(received: np.ndarray, reference: np.ndarray, piece: int = 4000) -> float:
    """The median :func:`best_match` of the voiced 0.25 s pieces of ``received``: Chromium captures in real
    time, and on a starved box it drops a few samples now and then, which shifts everything after them; each
    piece is matched on its own, so a drop costs only its piece. Unrelated espeak-ng speech scores ~0.45."""
    scores = [
        best_match(received[i : i + piece], reference)
        for i in range(0, len(received) - piece + 1, piece)
        if np.sqrt(np.mean(received[i : i + piece] ** 2)) > 0.01
    ]
    assert scores, "no voiced audio reached Gemini"
    return float(np.median(scores))


async def wait_for(page: Page, condition: str, timeout_s: float = 60) -> None:
    await page.wait_for_function(condition, timeout=timeout_s * 1000, polling=100)


@pytest.mark.parametrize("gen", list(GENERATIONS))
async def test_pipecat_web_sdk_talks_to_gemini_through_the_box(
    gen: str, fake: FakeLive, daemon_factory: Any, page_server: tuple[str, Path], tmp_path: Path
) -> None:
    origin, site = page_server
    bundle(gen, site)
    wav = tmp_path / "speech.wav"
    reference = speech_wav(wav)
    d: Daemon = daemon_factory(
        env={
            "EDGEVOICE_SERVER__TOKEN": TOKEN,
            "EDGEVOICE_SERVER__CORS_ORIGINS": f'["{origin}"]',
            "EDGEVOICE_FUNVOICE__API_KEY": "test-key",
            "EDGEVOICE_FUNVOICE__BASE_URL": fake.base_url,
            "EDGEVOICE_FUNVOICE__CA_FILE": str(fake.ca_path),
            "EDGEVOICE_FUNVOICE__PAGES": '["menu", "cart"]',
        }
    )
    user_id = f"pipecat_{gen}_user"
    args = [
        *CHROMIUM_ARGS,
        *FAKE_MEDIA_ARGS,
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
    ]
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = await browser.new_page()
            page_errors: list[str] = []
            page.on("pageerror", lambda exc: page_errors.append(str(exc)))
            await page.goto(f"{origin}/index.html")
            options = {
                "baseUrl": d.url,  # 0.4: POSTs baseUrl + "/connect" with {"rtvi_client_version", ...requestData}
                "connectUrl": f"{d.url}/connect?protocol=rtvi",  # 1.x: startBotAndConnect({endpoint})
                "token": TOKEN,
                "userId": user_id,
                "toolsUrl": f"{d.ws_url}/ws/tools?user_id={user_id}&token={TOKEN}",
            }
            await page.evaluate("(o) => startRtvi(o)", options)  # resolves at bot-ready
            state = await page.evaluate("window.rtvi")
            assert state["failed"] is None and state["connected"], state
            ready = state["botReady"]
            assert ready["version"] == GENERATIONS[gen]["rtvi"] and ready["user_id"] == user_id

            # the fake answers every second of microphone audio: transcript, the audio echoed back at 24 kHz
            await wait_for(
                page, "rtvi.userFinals.length >= 1 && rtvi.botTranscripts.length >= 1 && rtvi.posted >= 4800"
            )
            deadline = time.monotonic() + 30
            while (played := await page.evaluate("playedSamples()")) < 4800:  # >= 200 ms through the player
                assert time.monotonic() < deadline, f"the player played {played} samples"
                await asyncio.sleep(0.1)

            await page.evaluate("(t) => sendText(t)", 'tool navigate_to_page {"page": "menu"}')
            await wait_for(page, "rtvi.tools.some((m) => m.type === 'tool_command')")
            await wait_for(page, "rtvi.botTranscripts.some((t) => t.includes('answered'))")
            state = await page.evaluate("window.rtvi")
        finally:
            await browser.close()

    final = state["userFinals"][0]
    m = re.fullmatch(r"heard (\d+) bytes crc [0-9a-f]{8}", final["text"])
    assert m and final["user_id"] == user_id, final
    conn = next(c for c in fake.sessions() if c.audio_bytes)
    first_turn = bytes(conn.audio[: int(m.group(1))])
    assert final["text"] == heard(first_turn)  # exactly the PCM the SDK captured reached Gemini
    received = np.frombuffer(first_turn, dtype="<i2").astype(np.float64) / 32768
    match = piecewise_match(received[4000:], reference.astype(np.float64))
    assert match > 0.6, f"the audio Gemini got matches the WAV at {match:.2f}"  # and it is the WAV's speech
    assert any(re.fullmatch(r"conversation c\d+ turn \d+: I heard 1\.\d\d seconds", t) for t in state["botTranscripts"])
    assert state["posted"] >= 4800
    assert {"user-started", "user-stopped", "bot-started"} <= set(state["speaking"])
    cmd = next(t for t in state["tools"] if t["type"] == "tool_command")
    assert cmd["command"] == "navigate_to_page" and cmd["args"] == {"page": "menu"}
    assert state["tools"][0] == {"type": "connected", "channel": "tools", "user_id": user_id}
    if gen == "v1":
        assert state["botOutputs"] and set(state["botOutputs"]) <= set(state["botTranscripts"])
    assert not state["errors"] and not page_errors, (state["errors"], page_errors)
