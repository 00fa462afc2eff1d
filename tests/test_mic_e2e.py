"""Local mic arrays end to end: a real daemon captures FIFO-fed ALSA devices through PortAudio, recognizes every
seat with faster-whisper, and fires a bound customer's events to a real HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import soxr

from edgevoice import modelstore
from edgevoice.sources.mic import block_frames
from tests.support.daemon import Daemon
from tests.support.fakemic import FakeMic, write_asoundrc
from tests.support.receiver import Receiver
from tests.support.speech import have_espeak, silence, synth, wer

pytestmark = pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")

MODELS = Path(tempfile.gettempdir()) / "edgevoice-test-models"
SESSION = "restaurant_table_05_evening"
CUSTOMER = "customer_tran_thi_b"
SEATS = [f"mic_table_05_seat_0{n}" for n in range(1, 5)]
# espeak-ng phrases (and pitches) tiny.en transcribes well; each seat has a word no other seat says.
PHRASES = [
    "Good evening, we would like a table for four people.",
    "Hello, sorry, can I see the menu please?",
    "Hello, I am sorry, we are a little late tonight.",
    "Thank you, everything was delicious.",
]
PITCHES = [30, 45, 60, 45]
OWN_WORDS = ["people", "please", "tonight", "delicious"]
MAX_WER = 0.5  # streaming recognition of synthetic speech: a word or two may differ
TABLE_06 = "mic_table_06_seat_01"


def speech(text: str, rate: int, pitch: int, lead_s: float = 0.5) -> np.ndarray:
    audio = np.concatenate([silence(lead_s), synth(text, pitch=pitch), silence(1.5)])
    return audio if rate == 16000 else soxr.resample(audio, 16000, rate).astype(np.float32)


def channels(*tracks: np.ndarray) -> np.ndarray:
    n = max(len(t) for t in tracks)
    return np.stack([np.pad(t, (0, n - len(t))) for t in tracks], axis=1)


def config(table_05_seats: list[str]) -> str:
    seats = "".join(
        f'[[mic.devices.seats]]\nstream_id = "{s}"\nchannels = [{n}]\n' for n, s in enumerate(table_05_seats)
    )
    return f"""
[mic]
stall_s = 1.0
reopen_max_s = 2.0

[[mic.devices]]
match = "^fake_table_05$"
samplerate = 48000
channels = 4
{seats}
[[mic.devices]]
match = "^fake_table_06$"
[[mic.devices.seats]]
stream_id = "{TABLE_06}"
channels = [0]
"""


class Feed:
    """The dashboard's live feed: every final transcript, per stream."""

    def __init__(self) -> None:
        self.finals: dict[str, list[str]] = {}
        self.sources: dict[str, str] = {}

    def take(self, frame: list[dict[str, Any]]) -> None:
        for msg in frame:
            if msg.get("type") == "transcript" and msg.get("final"):
                self.finals.setdefault(msg["stream_id"], []).append(msg["text"])
                self.sources[msg["stream_id"]] = msg.get("source", "")

    def text(self, stream_id: str) -> str:
        return " ".join(self.finals.get(stream_id, []))


@contextlib.asynccontextmanager
async def feed(daemon: Daemon) -> AsyncIterator[tuple[Feed, aiohttp.ClientSession]]:
    f = Feed()
    async with aiohttp.ClientSession(daemon.url) as http, http.ws_connect("/dashboard/feed") as ws:

        async def read() -> None:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    f.take(data if isinstance(data, list) else [data])

        task = asyncio.create_task(read())
        try:
            yield f, http
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def until(predicate: Callable[[], Any], timeout: float, what: str, daemon: Daemon) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{daemon.log()[-4000:]}")
        await asyncio.sleep(0.1)


async def health_devices(http: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
    async with http.get("/health") as r:
        assert r.status == 200
        return {d["match"]: d for d in (await r.json())["devices"]}


async def devices_up(http: aiohttp.ClientSession, daemon: Daemon, *matches: str) -> dict[str, dict[str, Any]]:
    """/health's devices once every one of ``matches`` is up (each opens in its own worker thread: READY does not wait)."""
    deadline = time.monotonic() + 30
    while True:
        devices = await health_devices(http)
        if all(devices[m]["state"] == "up" for m in matches):
            return devices
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after 30 s waiting for {matches} to be up: {devices}\n{daemon.log()[-4000:]}"
            )
        await asyncio.sleep(0.1)


@pytest.fixture
def table_mics(tmp_path: Path) -> Iterator[tuple[Path, FakeMic, FakeMic]]:
    home = tmp_path / "home"
    home.mkdir()
    t05 = FakeMic(home, "fake_table_05", 4, 48000, block_frames(48000)).plug()
    t06 = FakeMic(home, "fake_table_06", 1, 44100, block_frames(44100)).plug()  # the file PCM's default rate
    write_asoundrc(home, [t05, t06])
    yield home, t05, t06
    t05.close()
    t06.close()


def start(daemon_factory: Callable[..., Daemon], home: Path, receiver: Receiver, seats: list[str]) -> Daemon:
    return daemon_factory(
        env={
            "HOME": str(home),
            "EDGEVOICE_ASR__MODEL": str(modelstore.resolve("tiny.en", MODELS)),
            "EDGEVOICE_EVENTS__URL": receiver.url,
            "EDGEVOICE_EVENTS__RETRY_BASE_S": "0.1",
        },
        config=config(seats),
    )


async def test_four_seats_four_transcripts_and_a_bound_customer_gets_events(
    daemon_factory: Callable[..., Daemon], table_mics: tuple[Path, FakeMic, FakeMic]
) -> None:
    home, t05, _ = table_mics
    with Receiver() as rx:
        daemon = start(daemon_factory, home, rx, SEATS)
        async with feed(daemon) as (f, http):
            devices = await devices_up(http, daemon, "^fake_table_05$")
            assert devices["^fake_table_05$"]["seats"] == SEATS

            # Bad requests are refused clearly and change nothing.
            async def post(path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
                data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
                async with http.post(path, data=data, headers={"Content-Type": "application/json"}) as r:
                    return r.status, await r.json()

            ids = {"session_id": SESSION, "customer_id": CUSTOMER}
            status, body = await post("/streams/mic_table_09_seat_01/start", ids)
            assert (status, body["error"]) == (404, "unknown_stream")
            status, body = await post(f"/streams/{SEATS[1]}/start", raw=b"{not json")
            assert (status, body["error"]) == (400, "bad_json")
            status, body = await post(f"/streams/{SEATS[1]}/start", {"session_id": SESSION})
            assert (status, body["error"]) == (400, "missing_field") and "customer_id" in body["message"]
            status, body = await post(f"/streams/{SEATS[1]}/start", {**ids, "customer_id": "bad id!"})
            assert (status, body["error"]) == (400, "bad_identifier") and "customer_id" in body["message"]
            status, body = await post(f"/streams/{SEATS[1]}/stop")
            assert (status, body["error"]) == (409, "not_bound")

            status, body = await post(f"/streams/{SEATS[1]}/start", ids)
            assert status == 200 and body == {"stream_id": SEATS[1], **ids, "bound": True}
            status, _ = await post(f"/streams/{SEATS[1]}/start", ids)  # same customer again: fine
            assert status == 200
            status, body = await post(f"/streams/{SEATS[1]}/start", {**ids, "customer_id": "someone_else"})
            assert (status, body["error"]) == (409, "stream_bound")

            # Four people talk at once, one per channel.
            t05.play(channels(*(speech(p, 48000, pitch) for p, pitch in zip(PHRASES, PITCHES, strict=True))))
            await until(lambda: all(f.finals.get(s) for s in SEATS), 90, "a final on every seat", daemon)
            await until(lambda: t05.queued_s == 0, 30, "the speech to be played", daemon)

            def heard() -> bool:  # every seat's last finals (how long they take depends on the machine's load)
                return all(wer(p, f.text(s)) <= MAX_WER for s, p in zip(SEATS, PHRASES, strict=True))

            await until(heard, 60, "every seat's phrase", daemon)
            for seat, phrase in zip(SEATS, PHRASES, strict=True):
                text = f.text(seat)
                assert wer(phrase, text) <= MAX_WER, (seat, phrase, text)
                assert f.sources[seat] == "mic"
            for seat, word in zip(SEATS, OWN_WORDS, strict=True):  # independent seats
                assert [s for s in SEATS if word in f.text(s).lower()] == [seat], (word, f.finals)

            # Seat 2's customer got SAY_HELLO and SAY_SORRY; seat 3 also said hello but nobody is bound there.
            await rx.until_accepted(2, 30)
            status, body = await post(f"/streams/{SEATS[1]}/stop")
            assert status == 200 and body["customer_id"] == CUSTOMER and body["bound"] is False
            assert wer(PHRASES[1], body["full_transcript"]) <= MAX_WER
            await rx.until_accepted(3, 30)
            assert rx.events(CUSTOMER) == ["SAY_HELLO", "SAY_SORRY", "SESSION_END"]
            assert {r.body["UUID"] for r in rx.requests} == {CUSTOMER}
            status, body = await post(f"/streams/{SEATS[1]}/stop")
            assert (status, body["error"]) == (409, "not_bound")
        assert daemon.stop() == 0
    log = daemon.log()
    assert f"TRANSCRIPT [-][-][{SEATS[2]}] Speaker 1: " in log  # unbound seat: recognized and logged
    assert f"KEYWORD DETECTED: SAY_HELLO - Session: {SESSION}, Customer: {CUSTOMER}" in log


async def test_a_vanished_device_comes_back_and_nothing_else_stops(
    daemon_factory: Callable[..., Daemon], table_mics: tuple[Path, FakeMic, FakeMic]
) -> None:
    """Table 05's array stalls and disappears; table 06 keeps being recognized; table 05 comes back and resumes."""
    home, t05, t06 = table_mics
    with Receiver() as rx:
        daemon = start(daemon_factory, home, rx, SEATS[:1])
        async with feed(daemon) as (f, http):
            await devices_up(http, daemon, "^fake_table_05$", "^fake_table_06$")

            t05.pause()
            await until(lambda: "no audio for 1 s; closing 'fake_table_05'" in daemon.log(), 20, "a stall", daemon)
            t05.unplug()
            await until(lambda: "cannot open 'fake_table_05'" in daemon.log(), 20, "a failed reopen attempt", daemon)
            devices = await health_devices(http)
            assert devices["^fake_table_05$"]["state"] in ("down", "opening"), devices
            assert devices["^fake_table_06$"]["state"] == "up" and devices["^fake_table_06$"]["opens"] == 1

            # Meanwhile the other table is heard.
            t06.play(speech("Could we have the bill please?", 44100, pitch=30))
            await until(lambda: f.finals.get(TABLE_06), 60, "table 06 to be recognized", daemon)
            async with http.get("/metrics") as r:
                metrics = await r.text()
            assert 'edgevoice_mic_device_up{device="^fake_table_05$"} 0.0' in metrics
            assert 'edgevoice_mic_device_up{device="^fake_table_06$"} 1.0' in metrics

            t05.plug()
            t05.play(speech("Thank you, everything was delicious.", 48000, pitch=30))
            await until(lambda: f.finals.get(SEATS[0]), 60, "table 05 to be recognized again", daemon)
            done = "Thank you, everything was delicious."
            await until(lambda: wer(done, f.text(SEATS[0])) <= MAX_WER, 60, f"all of {done!r}", daemon)
            assert wer("Thank you, everything was delicious.", f.text(SEATS[0])) <= MAX_WER, f.text(SEATS[0])
            assert wer("Could we have the bill please?", f.text(TABLE_06)) <= MAX_WER, f.text(TABLE_06)
            devices = await health_devices(http)
            assert devices["^fake_table_05$"]["state"] == "up" and devices["^fake_table_05$"]["opens"] == 2
            assert devices["^fake_table_06$"]["opens"] == 1
        assert daemon.stop() == 0
