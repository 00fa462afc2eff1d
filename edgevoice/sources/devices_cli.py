"""``edgevoice devices``: the input devices PortAudio sees, and a live per-channel level meter for installers."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import threading
import time
from typing import Any

import numpy as np

from edgevoice.config import ConfigError, MicDevice, load_settings

METER_INTERVAL_S = 0.25
FLOOR_DBFS = -90.0
BAR_WIDTH = 30
DEFAULT_MAX_CHANNELS = 16

Target = tuple[dict[str, Any], int, int, dict[int, str]]
"""A device to meter: its description, channels to open, rate, seat name per channel."""


def _dbfs(value: float) -> float:
    return max(FLOOR_DBFS, 20 * math.log10(value)) if value > 0 else FLOOR_DBFS


def _configured(args: argparse.Namespace) -> list[MicDevice]:
    try:
        return list(load_settings(getattr(args, "config", None)).mic.devices)
    except ConfigError as exc:
        print(f"edgevoice: configuration not used ({exc})", file=sys.stderr)
        return []


def _matches(devices: list[dict[str, Any]], configured: list[MicDevice]) -> dict[int, list[int]]:
    """Device index -> the mic.devices entries whose pattern matches it."""
    found: dict[int, list[int]] = {}
    for n, dev in enumerate(configured):
        pattern = re.compile(dev.match)
        for d in devices:
            if pattern.search(d["name"]):
                found.setdefault(d["index"], []).append(n)
    return found


class Meter:
    """Per-channel RMS and peak of one open input device, updated by the PortAudio callback."""

    def __init__(self, sd: Any, device: dict[str, Any], channels: int, rate: int, seats: dict[int, str]) -> None:
        from edgevoice.sources.mic import block_frames

        self.device = device
        self.rate = rate
        self.seats = seats
        self._sum = np.zeros(channels)
        self._count = 0
        self._peak = np.zeros(channels)
        self._lock = threading.Lock()
        self.stream = sd.InputStream(
            device=device["index"],
            channels=channels,
            samplerate=rate,
            dtype="float32",
            blocksize=block_frames(rate),
            callback=self._callback,
        )

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        sq = np.square(indata, dtype=np.float64).sum(axis=0)
        peak = np.abs(indata).max(axis=0)
        with self._lock:
            self._sum += sq
            self._count += frames
            np.maximum(self._peak, peak, out=self._peak)

    def take(self) -> list[tuple[float, float]]:
        """(rms dBFS, peak dBFS) per channel since the last call."""
        with self._lock:
            sums, count, peaks = self._sum.copy(), self._count, self._peak.copy()
            self._sum[:] = 0
            self._count = 0
            self._peak[:] = 0
        rms = np.sqrt(sums / count) if count else np.zeros_like(sums)
        return [(_dbfs(float(r)), _dbfs(float(p))) for r, p in zip(rms, peaks, strict=True)]


def _bar(db: float) -> str:
    filled = min(BAR_WIDTH, round((db - FLOOR_DBFS) / -FLOOR_DBFS * BAR_WIDTH))
    return "#" * filled + "." * (BAR_WIDTH - filled)


def _meter(sd: Any, targets: list[Target], seconds: float) -> int:
    if not targets:
        print("edgevoice: no input device to meter", file=sys.stderr)
        return 1
    meters = []
    try:
        for device, channels, rate, seats in targets:
            try:
                meters.append(Meter(sd, device, channels, rate, seats))
            except Exception as exc:
                print(f"cannot open {device['name']!r}: {exc}", file=sys.stderr)
                return 1
        for m in meters:
            m.stream.start()
        tty = sys.stdout.isatty()
        drawn = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(min(METER_INTERVAL_S, max(0.0, end - time.monotonic())))
            lines = []
            for m in meters:
                for ch, (rms, peak) in enumerate(m.take()):
                    seat = f"  {m.seats[ch]}" if ch in m.seats else ""
                    lines.append(f"{m.device['name']} ch{ch:<2} {_bar(rms)} {rms:6.1f} dBFS  peak {peak:6.1f}{seat}")
            if tty and drawn:
                sys.stdout.write(f"\x1b[{drawn}F")
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            drawn = len(lines)
    except KeyboardInterrupt:
        pass
    finally:
        for m in meters:
            m.stream.close()
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from edgevoice.sources.mic import DeviceError, import_sounddevice, input_devices

    try:
        sd = import_sounddevice()
    except DeviceError as exc:
        print(f"edgevoice: {exc}", file=sys.stderr)
        return 1
    devices = input_devices(sd)
    configured = _configured(args)
    matched = _matches(devices, configured)
    if args.json:
        print(json.dumps([{**d, "configured": matched.get(d["index"], [])} for d in devices], indent=2))
    else:
        if not devices:
            print("no input devices (is the user in the 'audio' group? is the array plugged in?)")
        else:
            width = max(len(d["name"]) for d in devices)
            print(f"{'#':>3}  {'NAME':<{width}}  {'HOST API':<10} {'CHANNELS':>8} {'DEFAULT RATE':>12}  CONFIGURED")
            for d in devices:
                conf = ", ".join(f"mic.devices[{n}]" for n in matched.get(d["index"], []))
                print(
                    f"{d['index']:>3}  {d['name']:<{width}}  {d['hostapi']:<10} "
                    f"{d['channels']:>8} {d['default_samplerate']:>12}  {conf}"
                )
        for n, dev in enumerate(configured):
            if not any(n in v for v in matched.values()):
                print(f"mic.devices[{n}] (match {dev.match!r}): no input device matches", file=sys.stderr)
    if args.meter is None:
        return 0
    if args.meter <= 0:
        print("edgevoice: --meter needs a positive number of seconds", file=sys.stderr)
        return 2
    return _meter(sd, _targets(sd, devices, configured, matched, args), args.meter)


def _targets(
    sd: Any,
    devices: list[dict[str, Any]],
    configured: list[MicDevice],
    matched: dict[int, list[int]],
    args: argparse.Namespace,
) -> list[Target]:
    """Devices to meter with their channel count, rate and seat names per channel."""
    by_index = {d["index"]: d for d in devices}
    if args.device is not None:
        regex = re.compile(args.device)
        chosen = [d["index"] for d in devices if regex.search(d["name"])][:1]
    elif matched:
        chosen = sorted(matched)
    else:
        default = sd.default.device[0]
        chosen = [default] if default in by_index else [d["index"] for d in devices][:1]
    targets = []
    for index in chosen:
        device = by_index[index]
        seats: dict[int, str] = {}
        rate = device["default_samplerate"]
        count = min(device["channels"], DEFAULT_MAX_CHANNELS)
        for n in matched.get(index, []):
            conf = configured[n]
            rate = conf.samplerate or rate
            count = conf.channels or max(c for seat in conf.seats for c in seat.channels) + 1
            for seat in conf.seats:
                for ch in seat.channels:
                    seats[ch] = seat.stream_id
        targets.append((device, min(args.channels or count, device["channels"]), args.rate or rate, seats))
    return targets


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("devices", help="list audio input devices; --meter shows live levels per channel")
    p.add_argument("--meter", type=float, metavar="SECONDS", help="show each channel's level for SECONDS")
    p.add_argument(
        "--device",
        metavar="PATTERN",
        help="device to meter (regular expression on the name); default: the mic.devices configured, else the default input",
    )
    p.add_argument(
        "--channels", type=int, metavar="N", help="channels to meter (default: the configured ones, else up to 16)"
    )
    p.add_argument("--rate", type=int, metavar="HZ", help="sample rate to meter at (default: configured, else native)")
    p.add_argument("--json", action="store_true", help="print the device list as JSON")
    p.set_defaults(func=cmd_devices)
