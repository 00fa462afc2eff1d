"""The mic ring buffer, the mic configuration checks, and ``edgevoice devices`` on FIFO-fed ALSA devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgevoice.config import ConfigError, load_settings
from edgevoice.sources.mic import Ring, block_frames
from tests.support.fakemic import FakeMic, write_asoundrc


@settings(max_examples=200, deadline=None)
@given(
    size=st.integers(1, 64),
    ops=st.lists(st.one_of(st.integers(0, 80), st.just(-1)), max_size=60),
)
def test_ring_keeps_order_drops_only_what_does_not_fit(size: int, ops: list[int]) -> None:
    """Writes of n frames (or a read, -1): what comes out is what went in, in order, minus the counted drops."""
    ring = Ring(size, 2)
    counter = 0
    expected: list[int] = []
    got: list[int] = []
    dropped = 0
    for op in ops:
        if op < 0:
            out = ring.read()
            if out is not None:
                assert (out[:, 0] == -out[:, 1]).all()
                got.extend(int(v) for v in out[:, 0])
            continue
        block = np.arange(counter, counter + op, dtype=np.float32)
        counter += op
        room = size - ring.pending
        expected.extend(int(v) for v in block[:room])
        dropped += max(0, op - room)
        assert ring.write(np.stack([block, -block], axis=1)) == max(0, op - room)
        assert ring.pending <= size
    out = ring.read()
    if out is not None:
        got.extend(int(v) for v in out[:, 0])
    assert got == expected
    assert ring.dropped == dropped
    assert ring.read() is None


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgevoice.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[[mic.devices]]\nmatch = "(usb"\n[[mic.devices.seats]]\nstream_id = "s1"\nchannels = [0]\n',
            "mic.devices.0.match = '(usb'",
        ),
        (
            '[[mic.devices]]\nmatch = "usb"\nchannels = 2\n[[mic.devices.seats]]\nstream_id = "s1"\nchannels = [2]\n',
            "a seat uses channel 2 but only 2 channels are opened",
        ),
        (
            '[[mic.devices]]\nmatch = "a"\n[[mic.devices.seats]]\nstream_id = "s1"\nchannels = [0]\n'
            '[[mic.devices]]\nmatch = "b"\n[[mic.devices.seats]]\nstream_id = "s1"\nchannels = [0]\n',
            "stream_id 's1' is used by more than one seat",
        ),
        (
            '[[mic.devices]]\nmatch = "a"\n[[mic.devices.seats]]\nstream_id = "seat one"\nchannels = [0]\n',
            "mic.devices.0.seats.0.stream_id = 'seat one'",
        ),
        (
            '[[mic.devices]]\nmatch = "a"\n[[mic.devices.seats]]\nstream_id = "s1"\nchannels = [1, 1]\n',
            "must be distinct channel numbers from 0",
        ),
    ],
)
def test_bad_mic_configuration_is_named(tmp_path: Path, toml: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(_config(tmp_path, toml))
    assert expected in str(err.value)


def test_a_good_mic_configuration_loads(tmp_path: Path) -> None:
    s = load_settings(
        _config(
            tmp_path,
            '[mic]\nstall_s = 1.5\n[[mic.devices]]\nmatch = "ReSpeaker"\n'
            '[[mic.devices.seats]]\nstream_id = "mic_table_05_seat_01"\nchannels = [0, 1]\nlanguage = "vi"\n',
        )
    )
    (device,) = s.mic.devices
    assert device.seats[0].channels == [0, 1] and device.seats[0].language == "vi" and s.mic.stall_s == 1.5


@pytest.fixture
def meter_mic(tmp_path: Path) -> Iterator[FakeMic]:
    m = FakeMic(tmp_path, "fake_installer_array", 2, 16000, block_frames(16000)).plug()
    write_asoundrc(tmp_path, [m])
    t = np.arange(16000 * 30) / 16000
    m.play(np.stack([np.zeros_like(t), 0.3 * np.sin(2 * np.pi * 440 * t)], axis=1))
    yield m
    m.close()


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("EDGEVOICE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "edgevoice", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_devices_lists_inputs_and_which_configuration_matches(tmp_path: Path, meter_mic: FakeMic) -> None:
    conf = _config(
        tmp_path,
        '[[mic.devices]]\nmatch = "installer_array"\n[[mic.devices.seats]]\nstream_id = "s1"\nchannels = [1]\n'
        '[[mic.devices]]\nmatch = "^missing$"\n[[mic.devices.seats]]\nstream_id = "s2"\nchannels = [0]\n',
    )
    out = _cli(tmp_path, "--config", str(conf), "devices")
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if "fake_installer_array" in ln)
    assert "ALSA" in line and "mic.devices[0]" in line and "44100" in line
    assert "mic.devices[1] (match '^missing$'): no input device matches" in out.stderr

    listed = json.loads(_cli(tmp_path, "--config", str(conf), "devices", "--json").stdout)
    (entry,) = [d for d in listed if d["name"] == "fake_installer_array"]
    assert entry["configured"] == [0] and entry["channels"] > 0


def test_devices_meter_shows_each_channel_level(tmp_path: Path, meter_mic: FakeMic) -> None:
    """Channel 1 carries a 0.3-amplitude sine (RMS -13.5 dBFS, peak -10.5), channel 0 silence."""
    conf = _config(
        tmp_path,
        '[[mic.devices]]\nmatch = "installer_array"\nsamplerate = 16000\nchannels = 2\n'
        '[[mic.devices.seats]]\nstream_id = "mic_table_01_seat_02"\nchannels = [1]\n',
    )
    out = _cli(tmp_path, "--config", str(conf), "devices", "--meter", "1")
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("fake_installer_array ch")]
    ch0 = [ln for ln in lines if " ch0 " in ln]
    ch1 = [ln for ln in lines if " ch1 " in ln]
    assert ch0 and ch1 and len(lines) == len(ch0) + len(ch1)  # just the two configured channels
    last0, last1 = ch0[-1].split(), ch1[-1].split()
    assert float(last0[3]) == -90.0
    assert float(last1[3]) == pytest.approx(-13.5, abs=0.5) and float(last1[6]) == pytest.approx(-10.5, abs=0.5)
    assert ch1[-1].endswith("mic_table_01_seat_02")
