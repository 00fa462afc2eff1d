"""Capture devices without hardware, through the real ALSA/PortAudio path.

Each :class:`FakeMic` is an ALSA ``file`` PCM (slave ``null``) whose ``infile``
is a FIFO. The ALSA ``null`` slave has no clock, so a thread paces the audio:
it writes one PortAudio block at a time in real time, which PortAudio reads
back block for block (writes of exactly one block keep reads aligned). Silence
flows whenever nothing is queued, as from a real microphone.

- :meth:`pause` stops the flow (the device stalls),
- :meth:`unplug` closes and removes the FIFO (opening the device fails),
- :meth:`plug` brings it back.

:func:`write_asoundrc` writes ``$HOME/.asoundrc`` naming the devices; point
``HOME`` at that directory (in-process via ``monkeypatch`` before sounddevice
is first imported, or in a daemon's environment).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from pathlib import Path

import numpy as np

REALIGN_S = 0.2
"""A writer this far behind its clock (nobody was reading) restarts its clock instead of bursting."""


class FakeMic:
    """A FIFO-fed ALSA capture device named ``name`` with ``channels`` float32 channels at ``rate``."""

    def __init__(self, directory: Path, name: str, channels: int, rate: int, block: int) -> None:
        self.name = name
        self.channels = channels
        self.rate = rate
        self.block = block
        self.fifo = directory / f"{name}.fifo"
        self._queue: collections.deque[np.ndarray] = collections.deque()
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self._quit = threading.Event()
        self._flowing = threading.Event()
        self.frames_written = 0
        self.writer_cpu_s = 0.0
        """CPU time the current feeding thread has used (benches subtract it)."""

    def asoundrc(self) -> str:
        return (
            f'pcm.{self.name} {{ type file; slave.pcm "null"; file "/dev/null"; infile "{self.fifo}"; format "raw" }}\n'
        )

    @property
    def plugged(self) -> bool:
        return self._fd is not None

    def plug(self) -> FakeMic:
        """Create the FIFO and start the flow (silence until something is played)."""
        if self._fd is not None:
            return self
        if self.fifo.exists():
            self.fifo.unlink()
        os.mkfifo(self.fifo)
        # O_RDWR: never blocks, and the FIFO always has a writer, so a reader's open never waits.
        self._fd = os.open(self.fifo, os.O_RDWR)
        self._quit.clear()
        self._flowing.set()
        self._thread = threading.Thread(target=self._write, args=(self._fd,), name=f"fakemic {self.name}", daemon=True)
        self._thread.start()
        return self

    def play(self, audio: np.ndarray) -> None:
        """Queue ``(n, channels)`` (or mono ``(n,)``, copied to every channel) float samples."""
        audio = np.asarray(audio, dtype=np.float32)
        if audio.ndim == 1:
            audio = np.repeat(audio[:, None], self.channels, axis=1)
        if audio.shape[1] != self.channels:
            raise ValueError(f"{self.name} has {self.channels} channels, got {audio.shape[1]}")
        with self._lock:
            self._queue.append(audio)

    @property
    def queued_s(self) -> float:
        with self._lock:
            return sum(len(a) for a in self._queue) / self.rate

    def wait_played(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.queued_s > 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name}: {self.queued_s:.1f} s still queued after {timeout} s")
            time.sleep(0.05)

    def pause(self) -> None:
        """Stop delivering audio (the device stalls; the FIFO stays)."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def unplug(self) -> None:
        """Stop the flow and remove the FIFO: a reader sees end of file, a new open fails."""
        fd, self._fd = self._fd, None
        self._quit.set()
        self._flowing.set()
        if fd is not None:
            os.set_blocking(fd, False)  # drain, so that a writer blocked on a full FIFO returns
            while True:
                try:
                    if not os.read(fd, 1 << 16):
                        break
                except BlockingIOError:
                    break
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if fd is not None:
            os.close(fd)
        if self.fifo.exists():
            self.fifo.unlink()

    close = unplug

    def _next_block(self) -> np.ndarray:
        out = np.zeros((self.block, self.channels), dtype=np.float32)
        filled = 0
        with self._lock:
            while filled < self.block and self._queue:
                head = self._queue[0]
                take = min(len(head), self.block - filled)
                out[filled : filled + take] = head[:take]
                filled += take
                if take == len(head):
                    self._queue.popleft()
                else:
                    self._queue[0] = head[take:]
        return out

    def _write(self, fd: int) -> None:
        start, sent = time.monotonic(), 0
        while not self._quit.is_set():
            if not self._flowing.is_set():
                self._flowing.wait()
                start, sent = time.monotonic(), 0
                continue
            data = self._next_block().astype("<f4").tobytes()
            try:
                os.write(fd, data)  # blocks while the FIFO is full (nobody reading)
            except OSError:
                return
            sent += self.block
            self.frames_written += self.block
            self.writer_cpu_s = time.thread_time()
            now = time.monotonic()
            due = start + sent / self.rate
            if now - due > REALIGN_S:
                start, sent = now, 0
            elif due - now > 0.02:
                time.sleep(due - now - 0.02)


def write_asoundrc(home: Path, mics: list[FakeMic]) -> Path:
    """Write ``home/.asoundrc`` defining every mic (ALSA rereads it when it changes)."""
    path = home / ".asoundrc"
    path.write_text("".join(m.asoundrc() for m in mics))
    return path
