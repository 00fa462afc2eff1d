"""The dashboard in headless Chromium against a real daemon while real speech flows through /asr-multicam.

Screenshots land in ``test-artifacts/`` (gitignored). Chromium is Debian's
``/usr/bin/chromium`` driven by Playwright (never ``playwright install``).
"""

from __future__ import annotations

import asyncio
import contextlib
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np
import pytest

from edgevoice.sources.multicam_client import MulticamClient
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS
from tests.support.daemon import Daemon
from tests.support.receiver import Receiver
from tests.support.speech import have_espeak, silence, synth
from tests.test_metrics import daemon_env

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TOKEN = "dashboard-e2e-token"
SESSION = "restaurant_table_05_evening"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Chromium at {CHROMIUM}"),
    pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng"),
]

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover - the test extra installs it
    pytestmark.append(pytest.mark.skip(reason="needs playwright"))


@contextlib.asynccontextmanager
async def launch(*extra_args: str) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args])
        try:
            yield browser
        finally:
            await browser.close()


async def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=True)
    return path


def speech(*phrases: str) -> np.ndarray:
    parts = [silence(0.5)]
    for p in phrases:
        parts += [synth(p), silence(1.2)]
    return np.concatenate(parts)


async def while_speaking(page: Page) -> None:
    """While audio flows: a level meter above -60 dBFS, then a partial (italic) hypothesis; screenshot it."""
    await page.wait_for_function(
        "() => [...document.querySelectorAll('.stream .meter > div')].some(e => parseFloat(e.style.width) > 0)",
        timeout=10_000,
    )
    await expect(page.locator(".stream li.partial").first).to_be_visible(timeout=20_000)
    await screenshot(page, "dashboard-speaking.png")


async def test_page_shows_live_transcripts_keyword_events_and_deliveries(
    daemon_factory: Callable[..., Daemon], receiver: Receiver
) -> None:
    daemon = daemon_factory(env=daemon_env(receiver, TOKEN, EDGEVOICE_DASHBOARD__SNAPSHOT_INTERVAL_S="0.25"))
    seats = {
        # stream id: (channel, customer, speech)
        "mic_table_05_seat_01": (0, "customer_nguyen_van_a", speech("Hello, I would like a table for two.")),
        "mic_table_05_seat_02": (1, "customer_tran_thi_b", speech("Sorry, we are a little late tonight.")),
    }
    async with launch() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        await page.goto(f"{daemon.url}/?token={TOKEN}")
        await expect(page.locator("#conn")).to_have_text("live", timeout=15_000)
        await expect(page.locator("#status")).to_have_text("healthy")
        await expect(page.locator("#card-model")).to_contain_text("tiny.en")
        await expect(page.locator("#card-model")).to_contain_text("running")
        await expect(page.locator("#card-gemini")).to_contain_text("unavailable")  # no key: never leaves the box
        await expect(page.locator("#card-devices")).to_contain_text("no capture device")
        await expect(page.locator("#card-spool")).to_contain_text("waiting")

        async with MulticamClient.connect(daemon.ws_url, token=TOKEN) as client:
            for stream_id, (channel, customer, _) in seats.items():
                await client.start(stream_id, session_id=SESSION, customer_id=customer, channel=channel)
            session = page.locator(f'.session[data-session="{SESSION}"]')
            for stream_id, (_, customer, _) in seats.items():
                # Grouped by session, then customer, while the streams are open.
                await expect(
                    session.locator(f'.customer[data-customer="{customer}"] .stream[data-stream="{stream_id}"]')
                ).to_be_visible(timeout=10_000)
            speaking = asyncio.ensure_future(while_speaking(page))
            await asyncio.gather(*(client.stream(ch, audio) for ch, _, audio in seats.values()))
            await speaking  # a partial hypothesis and a moving level meter were on the page mid-speech

            seat1 = page.locator('.stream[data-stream="mic_table_05_seat_01"]')
            seat2 = page.locator('.stream[data-stream="mic_table_05_seat_02"]')
            await expect(seat1.locator("li.final").first).to_contain_text("hello", ignore_case=True, timeout=30_000)
            await expect(seat2.locator("li.final").first).to_contain_text("late", ignore_case=True, timeout=30_000)
            await expect(seat1.locator(".speaker").first).to_have_text("Speaker 1")
            await expect(seat1).not_to_contain_text("stopped")
            hello = page.locator('#events li.event[data-event="SAY_HELLO"]')
            sorry = page.locator('#events li.event[data-event="SAY_SORRY"]')
            await expect(hello).to_have_count(1, timeout=30_000)
            await expect(hello).to_contain_text("customer_nguyen_van_a")
            await expect(hello.locator(".event-text")).to_contain_text("hello", ignore_case=True)
            await expect(sorry).to_contain_text("customer_tran_thi_b", timeout=30_000)
            await expect(hello.locator(".state")).to_have_text("delivered", timeout=30_000)
            await expect(sorry.locator(".state")).to_have_text("delivered", timeout=30_000)
            await expect(page.locator("#stream-count")).to_have_text("2 active")
            shot = await screenshot(page, "dashboard-live.png")

            for stream_id in seats:
                await client.stop(stream_id)

        ends = page.locator('#events li.event[data-event="SESSION_END"]')
        await expect(ends).to_have_count(2, timeout=30_000)
        for i in range(2):
            await expect(ends.nth(i).locator(".state")).to_have_text("delivered", timeout=30_000)
        await expect(seat1).to_contain_text("stopped")
        await expect(page.locator("#stream-count")).to_have_text("0 active")
        await screenshot(page, "dashboard-after.png")

        # A page opened late replays what just happened from the feed's history.
        late = await browser.new_page(viewport={"width": 1280, "height": 900})
        await late.goto(f"{daemon.url}/?token={TOKEN}")
        await expect(late.locator('#events li.event[data-event="SAY_HELLO"] .state')).to_have_text("delivered")
        await expect(late.locator('.stream[data-stream="mic_table_05_seat_01"]')).to_contain_text(
            "hello", ignore_case=True
        )
        assert errors == []
    assert shot.stat().st_size > 10_000
    assert sorted(receiver.events("customer_nguyen_van_a")) == ["SAY_HELLO", "SESSION_END"]


async def test_page_without_the_token_asks_for_it(daemon_factory: Callable[..., Daemon], receiver: Receiver) -> None:
    daemon = daemon_factory(env=daemon_env(receiver, TOKEN))
    async with launch() as browser:
        page = await browser.new_page()
        await page.goto(daemon.url)
        await expect(page.locator("#auth")).to_be_visible(timeout=15_000)
        await expect(page.locator("#auth-msg")).to_contain_text("needs an access token")
        await page.fill("#auth-token", TOKEN)
        await page.click("#auth-form button")
        await expect(page.locator("#conn")).to_have_text("live", timeout=15_000)
        assert f"token={TOKEN}" in page.url


def write_wav(path: Path, audio: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


TAP_SENT_AUDIO = """
window.__sent = [];
const send = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  if (data instanceof ArrayBuffer) window.__sent.push(...new Float32Array(data.slice(1)));
  return send.call(this, data);
};
"""
"""Keeps a copy of the samples the page sends (after the channel byte), to say what the daemon was given."""


def what_was_sent(sent: np.ndarray, rate: int, speech: np.ndarray) -> str:
    """Where the speech lies in the audio the page sent, and how faithfully (Chromium captures in real time)."""
    from scipy.signal import correlate, resample_poly

    ref = resample_poly(speech, rate, 16000).astype(np.float32)
    if len(sent) < len(ref):
        return f"the page sent {len(sent) / rate:.2f} s, shorter than the speech"
    at = int(np.argmax(np.abs(correlate(sent, ref, mode="valid", method="fft"))))
    got = sent[at : at + len(ref)]
    error = float(np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2)))
    return f"the page sent {len(sent) / rate:.2f} s; the speech found at {at / rate:.2f} s, relative error {error:.2f}"


async def test_try_it_panel_streams_the_microphone(
    daemon_factory: Callable[..., Daemon], receiver: Receiver, tmp_path: Path
) -> None:
    """Chromium's fake microphone plays espeak-ng speech; the panel sends it to /asr-multicam as pcm_f32le,
    with what it heard while the stream was being opened."""
    daemon = daemon_factory(env=daemon_env(receiver, TOKEN))
    speech = synth("Hello, can I see the menu please?")
    wav = write_wav(tmp_path / "mic.wav", np.concatenate([silence(1.5), speech, silence(2.5)]))
    fake_mic = [
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        "--autoplay-policy=no-user-gesture-required",
    ]
    async with launch(*fake_mic) as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.add_init_script(TAP_SENT_AUDIO)
        await page.goto(f"{daemon.url}/?token={TOKEN}")
        await expect(page.locator("#conn")).to_have_text("live", timeout=15_000)
        await page.fill("#try-session", "dashboard_try_it")
        await page.fill("#try-customer", "browser_guest")
        await page.click("#try-start")
        await expect(page.locator("#try-status")).to_contain_text("Listening", timeout=15_000)
        await expect(page.locator("#try-status")).to_contain_text("pcm_f32le")
        try:
            await expect(page.locator("#try-transcript")).to_contain_text("hello", ignore_case=True, timeout=40_000)
            await expect(page.locator("#try-transcript .kw")).to_contain_text("SAY_HELLO", timeout=30_000)
        except AssertionError as e:
            rate = int(await page.evaluate("tryIt.ctx.sampleRate"))
            sent = np.asarray(await page.evaluate("window.__sent"), dtype=np.float32)
            ARTIFACTS.mkdir(exist_ok=True)
            write_wav(ARTIFACTS / "try-it-sent.wav", sent, rate)
            raise AssertionError(f"{what_was_sent(sent, rate, speech)} (saved as try-it-sent.wav)") from e
        # The same stream on the dashboard, like any table.
        stream = page.locator('.session[data-session="dashboard_try_it"] .customer[data-customer="browser_guest"]')
        await expect(stream.locator(".stream li.final").first).to_contain_text("hello", ignore_case=True)
        await screenshot(page, "dashboard-try-it.png")
        await page.click("#try-stop")
        await expect(page.locator("#try-status")).to_contain_text("Full transcript", timeout=30_000)
    await receiver.until_accepted(2, timeout=30)
    assert receiver.events("browser_guest") == ["SAY_HELLO", "SESSION_END"]
