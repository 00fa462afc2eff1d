"""Local microphone arrays: every seat of a table captured from the box's own devices.

One PortAudio input stream per configured device, found by a name pattern. The
PortAudio callback only copies into a bounded :class:`Ring` (never waits; what
does not fit is dropped and counted). A worker thread per device drains the
ring, averages each seat's channels, resamples to 16 kHz and hands the chunks
to the event loop, which feeds each seat's stream in the stream hub
(``source="mic"``). A device that errors, stops delivering or disappears is
closed and reopened with exponential backoff while the others keep running;
when it is missing from PortAudio's device list (plugged in after start, or
back under another card number) the list is rescanned once a fresh process
sees it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from aiohttp import web

from edgevoice.config import MicDevice, MicSettings
from edgevoice.events.hub import STREAM_HUB, HubStream, StreamError
from edgevoice.metrics import METRICS, Metrics
from edgevoice.server.keys import HEALTH_SECTIONS, SETTINGS
from edgevoice.sources.pcm import Resampler, downmix

log = logging.getLogger(__name__)

BLOCK_S = 0.02
"""Audio per PortAudio callback."""
POLL_S = 0.05
"""How often a worker drains its ring buffer."""
FIRST_RETRY_S = 0.5
"""First wait before reopening a lost device (doubling up to ``mic.reopen_max_s``)."""
HEALTHY_S = 10.0
"""A device that ran this long starts its next reopen from FIRST_RETRY_S again."""
CLOSE_TIMEOUT_S = 3.0
"""A stream that does not close within this is abandoned (the driver is stuck)."""
OVERFLOW_LOG_S = 10.0
"""Overflows are logged at most this often per device."""

AudioCallback = Callable[[list[np.ndarray]], None]
"""Receives one 16 kHz chunk per seat (in seat order); called on the event loop."""


def block_frames(rate: int) -> int:
    """Frames per PortAudio callback at ``rate``."""
    return max(1, round(rate * BLOCK_S))


class DeviceError(Exception):
    """A device cannot be found or opened; the message is meant for an operator."""


class DeviceNotFound(DeviceError):
    """No device in PortAudio's list matches the pattern."""


RESCAN = "rescan"
"""Why a stream ended when PortAudio's device list is being rescanned."""
STOPPED = "stopped"
"""Why a stream ended when capture is shutting down."""


class Ring:
    """Bounded single-producer single-consumer ring of float32 frames.

    The producer (the PortAudio callback) never waits: frames that do not fit
    are dropped and counted in :attr:`dropped`. Positions are totals that only
    the owning side advances, so no lock is needed.
    """

    def __init__(self, frames: int, channels: int) -> None:
        if frames < 1:
            raise ValueError("a ring holds at least one frame")
        self.size = frames
        self._buf = np.zeros((frames, channels), dtype=np.float32)
        self.written = 0
        """Frames accepted so far (producer side)."""
        self._read = 0
        self.dropped = 0
        """Frames dropped because the ring was full."""

    def write(self, block: np.ndarray) -> int:
        """Copy ``(n, channels)`` frames in; returns how many were dropped."""
        n = len(block)
        room = self.size - (self.written - self._read)
        dropped = max(0, n - room)
        if dropped:
            self.dropped += dropped
            n = room
        if n:
            start = self.written % self.size
            first = min(n, self.size - start)
            self._buf[start : start + first] = block[:first]
            if n > first:
                self._buf[: n - first] = block[first:n]
            self.written += n
        return dropped

    def read(self) -> np.ndarray | None:
        """Every frame written since the last read (a copy), or None."""
        end = self.written
        n = end - self._read
        if n <= 0:
            return None
        start = self._read % self.size
        first = min(n, self.size - start)
        out = np.empty((n, self._buf.shape[1]), dtype=np.float32)
        out[:first] = self._buf[start : start + first]
        if n > first:
            out[first:] = self._buf[: n - first]
        self._read = end
        return out

    @property
    def pending(self) -> int:
        return self.written - self._read


_PROBE = (
    "import json, sounddevice as sd; "
    "print(json.dumps([d['name'] for d in sd.query_devices() if d['max_input_channels'] > 0]))"
)


def input_devices(sd: Any) -> list[dict[str, Any]]:
    """PortAudio's input devices: index, name, host API, channels, default rate."""
    apis = sd.query_hostapis()
    return [
        {
            "index": i,
            "name": d["name"],
            "hostapi": apis[d["hostapi"]]["name"],
            "channels": int(d["max_input_channels"]),
            "default_samplerate": int(d["default_samplerate"]),
        }
        for i, d in enumerate(sd.query_devices())
        if d["max_input_channels"] > 0
    ]


def import_sounddevice() -> Any:
    """The sounddevice module (initializes PortAudio); a clear error when it cannot load."""
    try:
        import sounddevice
    except (ImportError, OSError) as exc:
        raise DeviceError(
            f"cannot load sounddevice/PortAudio ({exc}); install libportaudio2 and edgevoice's 'mic' extra"
        ) from None
    return sounddevice


class PortAudio:
    """The process-wide PortAudio library: serialized device lookups and opens, and rescans.

    PortAudio lists devices once, at initialization. A rescan re-initializes it,
    which closes every stream, so it runs only when a fresh process sees a
    device this one does not: every open stream is closed first (their workers
    reopen them at once) and opens wait until the rescan is done.
    """

    def __init__(self, sd: Any) -> None:
        self.sd = sd
        self.generation = 0
        """Bumped by every rescan; a stream from an older generation must be reopened."""
        self.stuck = False
        """A stream could not be closed; rescans would hang and are disabled until restart."""
        self._cond = threading.Condition()
        self._rescanning = False
        self._open: set[Any] = set()
        self._claimed: dict[int, str] = {}
        self._rescanned_for: dict[str, frozenset[str]] = {}

    def _wait_rescan(self) -> None:
        while self._rescanning:
            self._cond.wait()

    def open(
        self, device: MicDevice, owner: str, channels: int, make_callback: Callable[[int], Callable[..., None]]
    ) -> tuple[Any, dict[str, Any], int]:
        """Open a started input stream on the device matching ``device.match``.

        ``make_callback(rate)`` builds the PortAudio callback once the rate is
        known. Returns the stream, the device's description (with the rate
        opened) and the PortAudio generation it belongs to.
        """
        pattern = re.compile(device.match)
        with self._cond:
            self._wait_rescan()
            candidates = [
                d
                for d in input_devices(self.sd)
                if pattern.search(d["name"]) and self._claimed.get(d["index"], owner) == owner
            ]
            if not candidates:
                raise DeviceNotFound(f"no input device matches {device.match!r}")
            fitting = [d for d in candidates if d["channels"] >= channels]
            if not fitting:
                d = candidates[0]
                raise DeviceError(f"{d['name']!r} has {d['channels']} input channels; the seats need {channels}")
            info = fitting[0]
            rate = device.samplerate or info["default_samplerate"]
            try:
                stream = self.sd.InputStream(
                    device=info["index"],
                    channels=channels,
                    samplerate=rate,
                    dtype="float32",
                    blocksize=block_frames(rate),
                    latency="high",
                    callback=make_callback(rate),
                )
                stream.start()
            except Exception as exc:
                raise DeviceError(f"cannot open {info['name']!r} ({channels} ch, {rate} Hz): {exc}") from None
            self._open.add(stream)
            self._claimed[info["index"]] = owner
            return stream, {**info, "samplerate": rate}, self.generation

    def close(self, stream: Any, index: int) -> bool:
        """Abort and close ``stream``; False when the driver did not let go within CLOSE_TIMEOUT_S."""
        done = threading.Event()

        def run() -> None:
            with contextlib.suppress(Exception):
                stream.abort()
            with contextlib.suppress(Exception):
                stream.close()
            done.set()

        threading.Thread(target=run, name="mic-close", daemon=True).start()
        closed = done.wait(CLOSE_TIMEOUT_S)
        with self._cond:
            self._open.discard(stream)
            self._claimed.pop(index, None)
            if not closed and not self.stuck:
                self.stuck = True
                # Pa_Terminate at exit would wait on the stuck stream forever: let the process exit without it.
                handler = getattr(self.sd, "_exit_handler", None)
                if handler is not None:
                    atexit.unregister(handler)
            self._cond.notify_all()
        return closed

    def rescan_for(self, pattern: str) -> bool:
        """Re-initialize PortAudio when a fresh process lists a device matching ``pattern``; True if done."""
        regex = re.compile(pattern)
        if self.stuck:
            return False
        try:
            out = subprocess.run(
                [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=30, check=True
            ).stdout
            names = json.loads(out.strip().splitlines()[-1]) if out.strip() else []
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            log.warning("cannot list audio devices in a fresh process: %s", exc)
            return False
        seen = frozenset(n for n in names if regex.search(n))
        if not seen or self._rescanned_for.get(pattern) == seen:
            return False  # absent, or a rescan for exactly these devices already happened
        self._rescanned_for[pattern] = seen
        with self._cond:
            if self._rescanning:
                self._wait_rescan()
                return True
            self._rescanning = True
            self.generation += 1
            try:
                deadline = time.monotonic() + 2 * CLOSE_TIMEOUT_S + 1
                while self._open and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
                if self._open:
                    log.warning("PortAudio rescan skipped: %d stream(s) did not close", len(self._open))
                    return False
                log.info("rescanning audio devices: a device matching %r appeared", pattern)
                self.sd._terminate()
                self.sd._initialize()
                return True
            finally:
                self._rescanning = False
                self._cond.notify_all()


class DeviceCapture:
    """One configured device: a worker thread that opens it, drains it and reopens it when lost."""

    def __init__(
        self,
        device: MicDevice,
        settings: MicSettings,
        portaudio: PortAudio,
        loop: asyncio.AbstractEventLoop,
        on_audio: AudioCallback,
        metrics: Metrics,
    ) -> None:
        self.device = device
        self.settings = settings
        self.label = device.match
        self.channels = device.channels or max(c for seat in device.seats for c in seat.channels) + 1
        self._pa = portaudio
        self._loop = loop
        self._on_audio = on_audio
        self._metrics = metrics
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"mic {self.label}", daemon=True)
        # State read by /health on the loop (plain attributes written by the worker).
        self.state = "starting"
        self.name: str | None = None
        self.samplerate: int | None = None
        self.error: str | None = None
        self.since = time.time()
        self.opens = 0
        self.failures = 0
        self.overflow_frames = 0
        self.xruns = 0
        self.audio_s = 0.0
        self.next_attempt: float | None = None
        self._up_metric = metrics.mic_device_up.labels(device=self.label)
        self._up_metric.set(0)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = CLOSE_TIMEOUT_S + 2) -> None:
        """Close the device and end the worker (blocking: call off the loop)."""
        self._stop.set()
        self._thread.join(timeout)

    def snapshot(self) -> dict[str, Any]:
        return {
            "match": self.label,
            "state": self.state,
            "name": self.name,
            "channels": self.channels,
            "samplerate": self.samplerate,
            "seats": [seat.stream_id for seat in self.device.seats],
            "since": round(self.since, 3),
            "error": self.error,
            "opens": self.opens,
            "failures": self.failures,
            "overflow_frames": self.overflow_frames,
            "xruns": self.xruns,
            "audio_s": round(self.audio_s, 2),
            "next_attempt_s": None
            if self.next_attempt is None
            else round(max(0.0, self.next_attempt - time.time()), 1),
        }

    # -- worker thread -------------------------------------------------------------

    def _set_state(self, state: str, error: str | None = None) -> None:
        if (state == "up") != (self.state == "up"):
            self.since = time.time()  # when the device last came up or went away
        self.state, self.error = state, error
        self._up_metric.set(1 if state == "up" else 0)

    def _run(self) -> None:
        delay = FIRST_RETRY_S
        reported: str | None = None
        while not self._stop.is_set():
            self.next_attempt = None
            self._set_state("opening", self.error)
            ran = 0.0
            try:
                reason, ran = self._capture_once()
            except DeviceNotFound as exc:
                reason = str(exc)
                if self._pa.rescan_for(self.device.match):
                    continue
            except DeviceError as exc:
                reason = str(exc)
            except Exception as exc:  # a bug must not end the worker
                log.exception("mic %s: capture failed", self.label)
                reason = f"{type(exc).__name__}: {exc}"
            if self._stop.is_set():
                break
            if reason == RESCAN:
                continue
            if ran >= HEALTHY_S:
                delay = FIRST_RETRY_S
            if ran:
                reported = None  # it was up in between: say it again
            self.failures += 1
            self._set_state("down", reason)
            if reason != reported:
                log.warning(
                    "mic %s: %s; reopening in %.1f s (backoff up to %g s)",
                    self.label,
                    reason,
                    delay,
                    self.settings.reopen_max_s,
                )
                reported = reason
            self.next_attempt = time.time() + delay
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.settings.reopen_max_s)
        self.next_attempt = None
        self._set_state("stopped")

    def _capture_once(self) -> tuple[str, float]:
        """Open the device and pump it until it is lost or stopped; returns why it ended and how long it ran."""
        rings: list[Ring] = []
        xruns = [0]
        closing = threading.Event()

        def make_callback(rate: int) -> Callable[..., None]:
            ring = Ring(max(4 * block_frames(rate), int(self.settings.buffer_s * rate)), self.channels)
            rings.append(ring)

            def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
                # PortAudio's thread: copy and return, nothing else.
                if status.input_overflow:
                    xruns[0] += 1
                if not closing.is_set():
                    ring.write(indata)

            return callback

        stream, info, generation = self._pa.open(self.device, self.label, self.channels, make_callback)
        rate = info["samplerate"]
        self.name, self.samplerate = info["name"], rate
        self.opens += 1
        log.info(
            "mic %s: %s %r (%d ch, %d Hz)",
            self.label,
            "reopened" if self.opens > 1 else "capturing",
            info["name"],
            self.channels,
            rate,
        )
        self._set_state("up")
        started = time.monotonic()
        reason = "capture failed"
        try:
            reason = self._pump(stream, rings[0], rate, xruns, generation)
        finally:
            closing.set()
            self._set_state("closing", None if reason in (STOPPED, RESCAN) else reason)
            if self.error:
                log.warning("mic %s: %s; closing %r", self.label, reason, info["name"])
            if not self._pa.close(stream, info["index"]):
                log.error("mic %s: the driver did not release %r; abandoning that stream", self.label, info["name"])
        return reason, time.monotonic() - started

    def _pump(self, stream: Any, ring: Ring, rate: int, xruns: list[int], generation: int) -> str:
        seats = [(seat.channels, Resampler(rate)) for seat in self.device.seats]
        last_written, last_progress = ring.written, time.monotonic()
        last_log, counted = 0.0, 0
        while not self._stop.wait(POLL_S):
            now = time.monotonic()
            frames = ring.read()
            if frames is not None:
                self.audio_s += len(frames) / rate
                chunks = [res.process(downmix(frames[:, chans])) for chans, res in seats]
                try:
                    self._loop.call_soon_threadsafe(self._on_audio, chunks)
                except RuntimeError:  # the loop is closed: the daemon is going down
                    return STOPPED
            dropped = ring.dropped - counted
            if dropped:
                counted += dropped
                self.overflow_frames += dropped
                self._metrics.mic_overflows.labels(device=self.label).inc(dropped)
                if now - last_log >= OVERFLOW_LOG_S:
                    last_log = now
                    log.warning(
                        "mic %s: ring buffer full, %d frames dropped so far (mic.buffer_s = %g)",
                        self.label,
                        self.overflow_frames,
                        self.settings.buffer_s,
                    )
            self.xruns = xruns[0]
            if ring.written != last_written:
                last_written, last_progress = ring.written, now
            if not stream.active:
                return "the stream stopped (device error or unplugged)"
            if self._pa.generation != generation:
                return RESCAN
            if now - last_progress > self.settings.stall_s:
                return f"no audio for {self.settings.stall_s:g} s"
        return STOPPED


class MicCapture:
    """Every configured device, its seats' hub streams, and their health."""

    def __init__(self, settings: MicSettings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.devices: list[DeviceCapture] = []
        self.portaudio: PortAudio | None = None

    @property
    def seat_ids(self) -> list[str]:
        return [seat.stream_id for device in self.settings.devices for seat in device.seats]

    async def start(self, on_audio: Callable[[MicDevice], AudioCallback]) -> None:
        """Load PortAudio (off the loop) and start a worker per device; ``on_audio(device)`` routes its seats."""
        if not self.settings.devices:
            return
        sd = await asyncio.to_thread(import_sounddevice)
        self.portaudio = PortAudio(sd)
        loop = asyncio.get_running_loop()
        for device in self.settings.devices:
            capture = DeviceCapture(device, self.settings, self.portaudio, loop, on_audio(device), self.metrics)
            self.devices.append(capture)
            capture.start()

    async def stop(self) -> None:
        """Close every device (off the loop)."""
        await asyncio.gather(*(asyncio.to_thread(d.stop) for d in self.devices))

    def health(self) -> list[dict[str, Any]]:
        return [d.snapshot() for d in self.devices]


MIC_CAPTURE = web.AppKey("mic_capture", MicCapture)
"""The daemon's local microphone capture."""


async def _mic_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS].mic
    capture = MicCapture(settings, app[METRICS])
    app[MIC_CAPTURE] = capture
    if not settings.devices:
        yield
        return
    hub = app[STREAM_HUB]
    streams: dict[str, HubStream] = {}
    try:
        for device in settings.devices:
            for seat in device.seats:
                streams[seat.stream_id] = hub.open_stream(seat.stream_id, source="mic", language=seat.language)
    except StreamError as exc:
        await asyncio.gather(*(s.stop() for s in streams.values()), return_exceptions=True)
        raise RuntimeError(f"mic seat cannot open its stream: {exc.message}") from None

    def route(device: MicDevice) -> AudioCallback:
        targets = [streams[seat.stream_id] for seat in device.seats]

        def feed(chunks: list[np.ndarray]) -> None:
            for stream, chunk in zip(targets, chunks, strict=True):
                stream.feed(chunk)

        return feed

    try:
        await capture.start(route)
    except DeviceError as exc:
        await asyncio.gather(*(s.stop() for s in streams.values()), return_exceptions=True)
        raise RuntimeError(f"mic.devices: {exc}") from None
    app[HEALTH_SECTIONS]["devices"] = capture.health
    log.info("capturing %d mic device(s), %d seat(s)", len(settings.devices), len(streams))
    try:
        yield
    finally:
        await capture.stop()
        await asyncio.gather(*(s.stop() for s in streams.values()), return_exceptions=True)


def setup(app: web.Application) -> None:
    """Capture the configured devices into the stream hub (one stream per seat; :mod:`.seats` binds customers)."""
    app.cleanup_ctx.append(_mic_ctx)
