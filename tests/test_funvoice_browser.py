"""The example page /examples/voice.html in headless Chromium: a fake microphone talks to /ws through a real
daemon, which bridges it to the fake Gemini Live server; the page shows the model's reply and tool commands.

Chromium is Debian's ``/usr/bin/chromium`` driven by Playwright (never ``playwright install``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.browser import CHROMIUM, FAKE_MEDIA_ARGS
from tests.support.browser import CHROMIUM_ARGS as _BASE_ARGS
from tests.support.daemon import Daemon
from tests.support.fake_live import FakeLive

CHROMIUM_ARGS = [*_BASE_ARGS, *FAKE_MEDIA_ARGS]
TOKEN = "voice-page-token"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"needs Chromium at {CHROMIUM}"),
]

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # pragma: no cover - the test extra installs it
    pytestmark.append(pytest.mark.skip(reason="needs playwright"))


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeLive]:
    with FakeLive(tmp_path) as f:
        yield f


async def test_example_page_talks_to_gemini_from_the_microphone(
    fake: FakeLive, daemon_factory: type[Daemon], tmp_path: Path
) -> None:
    d = daemon_factory(
        env={
            "EDGEVOICE_SERVER__TOKEN": TOKEN,
            "EDGEVOICE_FUNVOICE__API_KEY": "test-key",
            "EDGEVOICE_FUNVOICE__BASE_URL": fake.base_url,
            "EDGEVOICE_FUNVOICE__CA_FILE": str(fake.ca_path),
        }
    )
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{d.url}/examples/voice.html?user_id=browser_user&token={TOKEN}")
            await page.click("#connect")
            await expect(page.locator("#status")).to_have_text("connected as browser_user", timeout=15000)
            await expect(page.locator("#llm")).to_have_text("Gemini: available")
            # the fake microphone streams; after 1 s of it the fake model answers with audio and a transcript
            await expect(page.locator("#log")).to_contain_text("I heard 1.00 seconds", timeout=20000)
            await expect(page.locator("#log")).to_contain_text("you: heard 32000 bytes crc")
            assert int(await page.locator("#audio-bytes").inner_text()) >= 48000  # 1 s of 24 kHz PCM16 played
            assert int(await page.locator("#audio-sent").inner_text()) >= 32000

            await page.fill("#text", 'tool navigate_to_page {"page": "menu"}')
            await page.click("#send")
            await expect(page.locator("#page")).to_have_text("menu", timeout=10000)
            await page.fill("#text", "hello from the browser")
            await page.click("#send")
            await expect(page.locator("#log")).to_contain_text("you said hello from the browser", timeout=10000)
            assert not errors, errors
        finally:
            await browser.close()
    conn = fake.sessions()[0]
    assert conn.key == "test-key" and conn.audio_bytes >= 32000
