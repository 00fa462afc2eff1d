"""Local mic capture through the real PortAudio/ALSA path, on FIFO-fed ALSA ``file`` devices (no hardware)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr

from edgevoice.config import MicSettings
from edgevoice.metrics import Metrics
from edgevoice.sources.mic import DeviceCapture, MicCapture, block_frames, import_sounddevice
from tests.support.fakemic import FakeMic, write_asoundrc

RATE = 16000
FILE_PLUGIN_DEFAULT_RATE = 44100  # what PortAudio reports for an ALSA file PCM


def tone(hz: float, seconds: float, rate: int, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def spectrum(x: np.ndarray, rate: int = RATE) -> tuple[np.ndarray, np.ndarray]:
    x = x[-rate:]  # the last second
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x)))) / (len(x) / 4)
    return np.fft.rfftfreq(len(x), 1 / rate), mag


def amplitude_at(x: np.ndarray, hz: float) -> float:
    freqs, mag = spectrum(x)
    band = (freqs > hz - 15) & (freqs < hz + 15)
    return float(mag[band].max())


def peak_hz(x: np.ndarray) -> float:
    freqs, mag = spectrum(x)
    return float(freqs[int(np.argmax(mag))])


class Rig:
    """FakeMics in a temporary $HOME, PortAudio re-initialized to see them, and a capture collecting each seat."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.sd = import_sounddevice()
        self.mics: list[FakeMic] = []
        self.got: dict[str, list[np.ndarray]] = {}
        self.capture: MicCapture | None = None
        self.metrics = Metrics()

    def mic(self, name: str, channels: int, rate: int) -> FakeMic:
        m = FakeMic(self.home, name, channels, rate, block_frames(rate)).plug()
        self.mics.append(m)
        return m

    def publish(self, *mics: FakeMic) -> None:
        """Write .asoundrc with these mics (default: all) and let PortAudio list them."""
        write_asoundrc(self.home, list(mics) or self.mics)
        self.sd._terminate()
        self.sd._initialize()

    async def start(self, config: dict[str, Any]) -> MicCapture:
        settings = MicSettings.model_validate(config)
        self.capture = MicCapture(settings, self.metrics)
        for seat_id in self.capture.seat_ids:
            self.got[seat_id] = []

        def route(device: Any) -> Callable[[list[np.ndarray]], None]:
            ids = [s.stream_id for s in device.seats]

            def feed(chunks: list[np.ndarray]) -> None:
                for seat_id, chunk in zip(ids, chunks, strict=True):
                    self.got[seat_id].append(chunk)

            return feed

        await self.capture.start(route)
        return self.capture

    def audio(self, seat_id: str) -> np.ndarray:
        chunks = self.got[seat_id]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def seconds(self, seat_id: str) -> float:
        return sum(len(c) for c in self.got[seat_id]) / RATE

    def device(self, match: str) -> DeviceCapture:
        assert self.capture is not None
        return next(d for d in self.capture.devices if d.label == match)

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    monkeypatch.setenv("HOME", str(tmp_path))
    r = Rig(tmp_path)
    yield r
    for m in r.mics:
        m.close()


async def test_seats_are_mapped_averaged_and_resampled(rig: Rig) -> None:
    """A 4-channel 48 kHz array and a 2-channel array at its default rate: every seat hears only its channels."""
    a = rig.mic("fake_array_a", 4, 48000)
    b = rig.mic("fake_array_b", 2, FILE_PLUGIN_DEFAULT_RATE)
    rig.publish()
    assert rig.sd.query_devices("fake_array_b")["default_samplerate"] == FILE_PLUGIN_DEFAULT_RATE
    a.play(np.stack([tone(f, 3, 48000) for f in (300, 500, 700, 900)], axis=1))
    b.play(np.stack([tone(f, 3, FILE_PLUGIN_DEFAULT_RATE) for f in (1100, 1300)], axis=1))
    capture = await rig.start(
        {
            "devices": [
                {
                    "match": "^fake_array_a$",
                    "samplerate": 48000,
                    "seats": [
                        {"stream_id": "a_seat_1", "channels": [0]},
                        {"stream_id": "a_seat_2", "channels": [1]},
                        {"stream_id": "a_seats_3_4", "channels": [2, 3]},
                    ],
                },
                {"match": "array_b", "seats": [{"stream_id": "b_seat_2", "channels": [1]}]},
            ]
        }
    )
    try:
        await until(lambda: all(rig.seconds(s) >= 2.0 for s in rig.got), 15, "2 s of audio on every seat")
        assert peak_hz(rig.audio("a_seat_1")) == pytest.approx(300, abs=2)
        assert peak_hz(rig.audio("a_seat_2")) == pytest.approx(500, abs=2)
        assert peak_hz(rig.audio("b_seat_2")) == pytest.approx(1300, abs=2)
        group = rig.audio("a_seats_3_4")
        # Averaged: both tones at half their amplitude, nothing of the other channels.
        assert amplitude_at(group, 700) == pytest.approx(0.15, rel=0.15)
        assert amplitude_at(group, 900) == pytest.approx(0.15, rel=0.15)
        assert amplitude_at(group, 300) < 0.01
        assert amplitude_at(rig.audio("a_seat_1"), 300) == pytest.approx(0.3, rel=0.15)

        health = {d["match"]: d for d in capture.health()}
        da, db = health["^fake_array_a$"], health["array_b"]
        assert (da["state"], da["name"], da["samplerate"], da["channels"]) == ("up", "fake_array_a", 48000, 4)
        assert (db["state"], db["name"], db["samplerate"], db["channels"]) == (
            "up",
            "fake_array_b",
            FILE_PLUGIN_DEFAULT_RATE,
            2,  # highest seat channel + 1
        )
        assert da["overflow_frames"] == 0 and da["seats"] == ["a_seat_1", "a_seat_2", "a_seats_3_4"]
        assert rig.metric("edgevoice_mic_device_up", device="^fake_array_a$") == 1
        # The resampler keeps the ratio: 16 kHz out per second captured (less its filter delay).
        dev_a = rig.device("^fake_array_a$")
        await capture.stop()
        assert rig.seconds("a_seat_1") == pytest.approx(dev_a.audio_s, abs=0.05)
        assert rig.metric("edgevoice_mic_device_up", device="^fake_array_a$") == 0
        assert capture.health()[0]["state"] == "stopped"
    finally:
        await capture.stop()


async def test_capture_loses_and_repeats_nothing(rig: Rig) -> None:
    """Noise captured at 48 kHz comes out as exactly the 16 kHz resampling of what was played: no block lost,
    repeated or reordered (one alignment offset fits the whole stretch)."""
    mic = rig.mic("fake_exact", 1, 48000)
    rig.publish()
    played = (np.random.default_rng(7).standard_normal(48000 * 3) * 0.1).astype(np.float32)
    mic.play(played)
    capture = await rig.start(
        {"devices": [{"match": "fake_exact", "samplerate": 48000, "seats": [{"stream_id": "x", "channels": [0]}]}]}
    )
    try:
        await until(lambda: mic.queued_s == 0, 15, "the noise to be played")
        await asyncio.sleep(0.5)
    finally:
        await capture.stop()
    got = rig.audio("x")
    reference = soxr.resample(played, 48000, 16000).astype(np.float32)
    start = int(np.argmax(np.abs(got) > 0.02))  # the noise starts after the device's leading silence
    probe = reference[: RATE // 10]
    window = got[max(0, start - 200) : start + 200 + len(probe)]
    corr = np.correlate(window, probe, mode="valid")
    offset = max(0, start - 200) + int(np.argmax(corr))
    aligned = got[offset : offset + len(reference)]
    assert len(aligned) >= len(reference) - 200, "audio is missing"
    n = min(len(aligned), len(reference)) - 100
    error = aligned[:n] - reference[:n]
    assert float(np.sqrt(np.mean(error**2))) < 0.01 * float(np.sqrt(np.mean(reference**2)))
    # Block by block (20 ms): every one matches, so none was dropped or repeated.
    blocks = n // 320
    worst = max(float(np.abs(error[i * 320 : (i + 1) * 320]).max()) for i in range(blocks))
    assert worst < 0.02


async def test_overflow_is_dropped_and_counted_never_blocking(
    rig: Rig, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A device delivering far faster than real time (a plain file has no clock) overflows a tiny ring:
    the excess is dropped and counted, and capture carries on."""
    raw = tmp_path / "flood.raw"
    raw.write_bytes(np.tile(tone(440, 1, 16000)[:, None], (1, 2)).astype("<f4").tobytes())
    (tmp_path / ".asoundrc").write_text(
        f'pcm.fake_flood {{ type file; slave.pcm "null"; file "/dev/null"; infile "{raw}"; format "raw" }}\n'
    )
    rig.sd._terminate()
    rig.sd._initialize()
    caplog.set_level(logging.WARNING, "edgevoice.sources.mic")
    capture = await rig.start(
        {
            "buffer_s": 0.1,
            "devices": [
                {"match": "fake_flood", "samplerate": 16000, "seats": [{"stream_id": "flood", "channels": [1]}]}
            ],
        }
    )
    try:
        dev = rig.device("fake_flood")
        await until(lambda: dev.overflow_frames > 0, 10, "an overflow")
        heard = rig.seconds("flood")
        await asyncio.sleep(0.3)
        assert rig.seconds("flood") > heard, "capture stopped after the overflow"
        assert dev.state == "up"
        assert rig.metric("edgevoice_mic_overflows_total", device="fake_flood") == pytest.approx(
            dev.overflow_frames, rel=0.5
        )
        assert any("ring buffer full" in r.getMessage() for r in caplog.records)
    finally:
        await capture.stop()
    assert capture.health()[0]["overflow_frames"] > 0


async def test_lost_device_is_reopened_while_the_other_keeps_running(rig: Rig) -> None:
    """Array A stalls and is unplugged (its FIFO removed): A goes down and retries with backoff while B keeps
    delivering; A is plugged back in and capture resumes on its seat."""
    a = rig.mic("fake_a", 2, 16000)
    b = rig.mic("fake_b", 1, 16000)
    rig.publish()
    b.play(tone(600, 30, 16000))
    capture = await rig.start(
        {
            "stall_s": 0.5,
            "reopen_max_s": 1.0,
            "devices": [
                {"match": "fake_a", "samplerate": 16000, "seats": [{"stream_id": "a1", "channels": [1]}]},
                {"match": "fake_b", "samplerate": 16000, "seats": [{"stream_id": "b0", "channels": [0]}]},
            ],
        }
    )
    dev_a, dev_b = rig.device("fake_a"), rig.device("fake_b")
    try:
        await until(lambda: dev_a.state == dev_b.state == "up" and rig.seconds("a1") > 0.5, 10, "both devices up")
        a.pause()  # the device stops delivering ...
        await until(lambda: dev_a.state in ("closing", "down"), 5, "the stall to be noticed")
        a.unplug()  # ... and is gone
        await until(lambda: dev_a.state == "down" and dev_a.failures >= 3, 10, "failed reopen attempts")
        assert "no audio for 0.5 s" not in (dev_a.error or "")  # now failing to open
        assert "fake_a" in (dev_a.error or "")
        assert rig.metric("edgevoice_mic_device_up", device="fake_a") == 0
        snap = next(d for d in capture.health() if d["match"] == "fake_a")
        assert snap["state"] == "down" and snap["next_attempt_s"] is not None and snap["next_attempt_s"] <= 1.0
        # B never stopped: it goes on delivering while A is down, never closed and reopened.
        b_before = rig.seconds("b0")
        await until(lambda: rig.seconds("b0") - b_before >= 0.5, 10, "more audio from B while A is down")
        assert dev_a.state != "up" and dev_b.state == "up" and dev_b.opens == 1

        a_before = len(rig.got["a1"])
        a.plug()
        a.play(np.stack([np.zeros(16000 * 3, np.float32), tone(800, 3, 16000)], axis=1))
        await until(lambda: dev_a.state == "up" and dev_a.opens == 2, 10, "A reopened")
        await until(lambda: sum(len(c) for c in rig.got["a1"][a_before:]) >= 1.5 * RATE, 10, "audio from A again")
        assert peak_hz(np.concatenate(rig.got["a1"][a_before:])) == pytest.approx(800, abs=2)
        assert rig.metric("edgevoice_mic_device_up", device="fake_a") == 1
        assert dev_b.opens == 1 and peak_hz(rig.audio("b0")) == pytest.approx(600, abs=2)
    finally:
        await capture.stop()


async def test_device_plugged_in_after_start_is_found_by_a_rescan(rig: Rig) -> None:
    """A device absent at start (not in PortAudio's list) is found once a fresh process sees it."""
    a = rig.mic("fake_present", 1, 16000)
    late = FakeMic(rig.home, "fake_late", 1, 16000, block_frames(16000))
    rig.mics.append(late)
    rig.publish(a)
    a.play(tone(400, 30, 16000))
    capture = await rig.start(
        {
            "reopen_max_s": 1.0,
            "devices": [
                {"match": "fake_present", "samplerate": 16000, "seats": [{"stream_id": "p", "channels": [0]}]},
                {"match": "fake_late", "samplerate": 16000, "seats": [{"stream_id": "l", "channels": [0]}]},
            ],
        }
    )
    dev_p, dev_l = rig.device("fake_present"), rig.device("fake_late")
    try:
        await until(lambda: dev_l.failures >= 2 and dev_p.state == "up", 20, "the late device to be missed")
        assert dev_l.state == "down" and dev_l.error == "no input device matches 'fake_late'"
        assert dev_p.opens == 1  # no rescan while the late device is absent
        late.plug()
        late.play(tone(1000, 30, 16000))
        write_asoundrc(rig.home, [a, late])  # "plugged in"
        await until(lambda: dev_l.state == "up", 30, "the late device to be found")
        await until(lambda: rig.seconds("l") >= 1.0, 10, "audio from the late device")
        assert peak_hz(rig.audio("l")) == pytest.approx(1000, abs=2)
        # The rescan briefly reopened the running device; it runs on.
        await until(lambda: dev_p.state == "up", 10, "the present device back up")
        assert dev_p.opens == 2
        before = rig.seconds("p")
        await asyncio.sleep(0.5)
        assert rig.seconds("p") > before
    finally:
        await capture.stop()
