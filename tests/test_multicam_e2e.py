"""The seed's restaurant scenario end to end: real daemon, real WebSocket client, real speech, real HTTP receiver."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgevoice import modelstore
from edgevoice.sources.multicam_client import MulticamClient
from tests.support.daemon import Daemon
from tests.support.receiver import Receiver
from tests.support.speech import have_espeak, silence, synth

pytestmark = pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")

MODELS = Path(tempfile.gettempdir()) / "edgevoice-test-models"
SESSION = "restaurant_table_05_evening"
CUSTOMER_A = "customer_nguyen_van_a"
CUSTOMER_B = "customer_tran_thi_b"
CUSTOMER_C = "customer_le_van_c"

SCENARIO_EN = [
    "Hello there, good evening.",
    "I would like to order a coffee please.",
    "Sorry, I want to change my order.",
    "Hello again.",
]
SCENARIO_VI = [
    "xin chào các bạn",
    "tôi muốn gọi món",
    "cho tôi một ly cà phê",
    "xin lỗi tôi muốn đổi món",
    "xin chào lần nữa",
]


def conversation(phrases: list[str], voice: str = "en-us", gap_s: float = 1.2, speed: int = 150) -> np.ndarray:
    """The phrases spoken one after another, each followed by a pause that ends the utterance."""
    parts = [silence(0.5)]
    for p in phrases:
        parts += [synth(p, voice=voice, speed=speed), silence(gap_s)]
    return np.concatenate(parts)


def model_path(name: str) -> Path:
    return modelstore.resolve(name, MODELS)


def start_daemon(
    daemon_factory: Callable[..., Daemon], receiver: Receiver, model: str = "tiny.en", **env: str
) -> Daemon:
    return daemon_factory(
        env={
            "EDGEVOICE_ASR__MODEL": str(model_path(model)),
            "EDGEVOICE_EVENTS__URL": receiver.url,
            "EDGEVOICE_EVENTS__RETRY_BASE_S": "0.1",
            **env,
        }
    )


async def run_scenario(
    daemon: Daemon, phrases: list[str], voice: str, language: str | None, speed: int = 150
) -> MulticamClient:
    async with MulticamClient.connect(daemon.ws_url) as client:
        await client.start("mic_table_05_seat_01", session_id=SESSION, customer_id=CUSTOMER_A, language=language)
        await client.stream(0, conversation(phrases, voice=voice, speed=speed))
        full = await client.stop("mic_table_05_seat_01")
        assert full, "stream_stopped carried no transcript"
    return client


def assert_seed_logs(log: str) -> None:
    for line in (
        f"Audio stream started - Session: {SESSION}, Customer: {CUSTOMER_A}",
        f"TRANSCRIPT [{SESSION}][{CUSTOMER_A}][mic_table_05_seat_01] Speaker 1: ",
        f"KEYWORD DETECTED: SAY_HELLO - Session: {SESSION}, Customer: {CUSTOMER_A}",
        f"KEYWORD DETECTED: SAY_SORRY - Session: {SESSION}, Customer: {CUSTOMER_A}",
        f"Audio stream stop - Session: {SESSION}, Customer: {CUSTOMER_A}",
        f"SESSION END: Calling API for customer {CUSTOMER_A}",
        f"FULL TRANSCRIPT [{CUSTOMER_A}]: ",
        f"Cleaned up customer data for {CUSTOMER_A}",
    ):
        assert line in log, f"missing log line {line!r}"
    assert log.count("KEYWORD DETECTED: SAY_HELLO") == 1  # "hello again" is a duplicate


async def check_restaurant_scenario(
    daemon: Daemon, receiver: Receiver, phrases: list[str], voice: str, language: str | None, speed: int = 150
) -> None:
    client = await run_scenario(daemon, phrases, voice, language, speed)
    heard = [m["text"] for m in client.of("transcript") if m["final"]]
    with contextlib.suppress(TimeoutError):
        await receiver.until_accepted(3, timeout=30)
    await asyncio.sleep(1.0)  # anything extra would arrive now
    assert receiver.events() == ["SAY_HELLO", "SAY_SORRY", "SESSION_END"], f"heard {heard}"
    assert [b["UUID"] for b in receiver.accepted_bodies()] == [CUSTOMER_A] * 3
    assert all(r.content_type == "application/json" and r.key for r in receiver.requests)
    assert all(set(b) == {"UUID", "EVENT"} for b in receiver.accepted_bodies())
    # What the client saw: finals, both keywords once each, then stream_stopped last for the stream.
    finals = [m for m in client.of("transcript") if m["final"]]
    assert finals and all(m["customer_id"] == CUSTOMER_A and m["speaker"] == "Speaker 1" for m in finals)
    assert [m["event"] for m in client.of("keyword")] == ["SAY_HELLO", "SAY_SORRY"]
    assert client.messages[-1]["type"] == "stream_stopped"
    assert client.messages[-1]["full_transcript"] == " ".join(m["text"] for m in finals)
    assert_seed_logs(daemon.log())


async def test_restaurant_scenario_english(daemon_factory: Callable[..., Daemon], receiver: Receiver) -> None:
    daemon = start_daemon(daemon_factory, receiver)
    await check_restaurant_scenario(daemon, receiver, SCENARIO_EN, "en-us", None)


@pytest.mark.slow
async def test_restaurant_scenario_vietnamese(daemon_factory: Callable[..., Daemon], receiver: Receiver) -> None:
    daemon = start_daemon(daemon_factory, receiver, model="base", EDGEVOICE_ASR__LANGUAGE="vi")
    await check_restaurant_scenario(daemon, receiver, SCENARIO_VI, "vi", "vi", speed=130)  # espeak-ng vi, slower


async def test_three_customers_on_one_connection(daemon_factory: Callable[..., Daemon], receiver: Receiver) -> None:
    """The seed's multi-customer example: 3, 2 and 1 calls; C's session ends by disconnect."""
    daemon = start_daemon(daemon_factory, receiver)
    talk = {
        CUSTOMER_A: ["Hello there, good evening.", "I am so sorry about that."],
        CUSTOMER_B: ["Could we have some water please?", "Hello there, good evening."],
        CUSTOMER_C: ["I would like to order a coffee please."],
    }
    # Customers take turns at the start (as at a table), then overlap.
    audio = {c: np.concatenate([silence(1.0 * i), conversation(p)]) for i, (c, p) in enumerate(talk.items())}
    n = max(len(a) for a in audio.values())
    async with MulticamClient.connect(daemon.ws_url) as client:
        for ch, customer in enumerate(talk):
            await client.start(f"seat_{ch}", session_id=SESSION, customer_id=customer, channel=ch)

        async def speak(ch: int, customer: str) -> None:
            await client.stream(ch, np.concatenate([audio[customer], silence((n - len(audio[customer])) / 16000)]))

        await asyncio.gather(*(speak(ch, c) for ch, c in enumerate(talk)))
        await asyncio.gather(client.stop("seat_0"), client.stop("seat_1"))
        heard = [(m["customer_id"][-1], m["text"]) for m in client.of("transcript") if m["final"]]
        with contextlib.suppress(TimeoutError):
            await receiver.until_accepted(5, timeout=30)
        assert len(receiver.events()) == 5, f"events {receiver.accepted_bodies()}, heard {heard}"
        assert CUSTOMER_C not in {b["UUID"] for b in receiver.accepted_bodies()}
        # C's stream is still open: closing the connection ends it.
    await receiver.until_accepted(6, timeout=30)
    await asyncio.sleep(1.0)
    assert receiver.events(CUSTOMER_A) == ["SAY_HELLO", "SAY_SORRY", "SESSION_END"]
    assert receiver.events(CUSTOMER_B) == ["SAY_HELLO", "SESSION_END"]
    assert receiver.events(CUSTOMER_C) == ["SESSION_END"]
    assert len(receiver.events()) == 6
    log = daemon.log()
    assert f"Cleaned up customer data for {CUSTOMER_C}" in log
    assert "coffee" in log.split(f"FULL TRANSCRIPT [{CUSTOMER_C}]: ")[1].splitlines()[0]


async def test_same_customer_on_two_streams_ends_with_the_last(
    daemon_factory: Callable[..., Daemon], receiver: Receiver
) -> None:
    """A customer heard by a seat mic and a camera: SESSION_END only when both stopped; keywords once."""
    daemon = start_daemon(daemon_factory, receiver)
    hello = conversation(["Hello there, good evening."])
    async with MulticamClient.connect(daemon.ws_url) as client:
        await client.start("seat_mic", session_id=SESSION, customer_id=CUSTOMER_A, channel=0)
        await client.start("table_cam", session_id=SESSION, customer_id=CUSTOMER_A, channel=1, sample_rate=48000)
        import soxr

        hello48 = soxr.resample(hello, 16000, 48000).astype(np.float32)
        await asyncio.gather(client.stream(0, hello), client.stream(1, hello48))
        await client.stop("seat_mic")
        await receiver.until_accepted(1, timeout=30)
        await asyncio.sleep(1.0)
        assert receiver.events() == ["SAY_HELLO"]  # both heard hello: fired once; no SESSION_END yet
        assert len(client.of("keyword")) == 1
        await client.stop("table_cam")
        await receiver.until_accepted(2, timeout=30)
        assert receiver.events() == ["SAY_HELLO", "SESSION_END"]
        hello_cam = [m["text"] for m in client.of("transcript", "table_cam") if m["final"]]
        assert any("hello" in t.lower() for t in hello_cam), hello_cam
        # A new start for the same ids begins a new customer session: hello fires again.
        await client.start("seat_mic", session_id=SESSION, customer_id=CUSTOMER_A)
        await client.stream(0, hello)
        await client.stop("seat_mic")
    await receiver.until_accepted(4, timeout=30)
    assert receiver.events() == ["SAY_HELLO", "SESSION_END", "SAY_HELLO", "SESSION_END"]


async def test_sighup_reloads_keyword_rules_without_dropping_streams(
    daemon_factory: Callable[..., Daemon], receiver: Receiver
) -> None:
    import signal

    rules = '[keywords]\nrules = [{{event = "{event}", phrases = ["{phrase}"]}}]\n'
    daemon = daemon_factory(
        config=rules.format(event="SAY_HELLO", phrase="hello"),
        env={"EDGEVOICE_ASR__MODEL": str(model_path("tiny.en")), "EDGEVOICE_EVENTS__URL": receiver.url},
    )
    config = daemon.tmp / "edgevoice.toml"
    water = conversation(["Could we have some water please?"])

    async def reload(text: str, expect: str) -> None:
        before = daemon.log().count(expect)
        config.write_text(text)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            if daemon.log().count(expect) > before:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {expect!r} in the log after SIGHUP")

    async with MulticamClient.connect(daemon.ws_url) as client:
        await client.start("seat_1", session_id=SESSION, customer_id=CUSTOMER_A)
        await client.stream(0, water)
        await client.wait_for(lambda m: m["type"] == "transcript" and m["final"] and "water" in m["text"].lower())
        assert client.of("keyword") == []
        await reload(rules.format(event="WATER_PLEASE", phrase="some water"), "keyword rules reloaded: WATER_PLEASE")
        await reload("[keywords\nbroken", "configuration not reloaded")  # a bad file keeps the rules
        await client.stream(0, water)  # the same stream, still open
        full = await client.stop("seat_1")
    assert full.lower().count("water") == 2
    assert [m["event"] for m in client.of("keyword")] == ["WATER_PLEASE"]
    await receiver.until_accepted(2, timeout=30)
    assert receiver.events() == ["WATER_PLEASE", "SESSION_END"]


async def test_sigterm_flushes_open_streams_and_ends_sessions(
    daemon_factory: Callable[..., Daemon], receiver: Receiver
) -> None:
    """Speech still in flight when the daemon is stopped is recognized, and the customer gets SESSION_END."""
    daemon = start_daemon(daemon_factory, receiver)
    async with MulticamClient.connect(daemon.ws_url) as client:
        await client.start("seat_1", session_id=SESSION, customer_id=CUSTOMER_B)
        await client.stream(0, np.concatenate([silence(0.5), synth("Hi, hello."), silence(0.2)]))
        assert await asyncio.to_thread(daemon.stop) == 0
        assert client.ws.close_code == 1001  # going away
    assert receiver.events() == ["SAY_HELLO", "SESSION_END"]
    assert f"Cleaned up customer data for {CUSTOMER_B}" in daemon.log()
