"""Faults at shutdown on the real daemon: a client that stopped reading, open customers, a phase that overruns.

Real subprocess daemons, real WebSocket clients (one a raw socket that never reads),
real speech, a real HTTP receiver, a real SQLite spool locked by another process.
Deadlines are generous; no duration is asserted tighter than the budgets.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import sqlite3
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from edgevoice import modelstore
from edgevoice.delivery import store
from edgevoice.sources.mic import block_frames
from edgevoice.sources.multicam_client import MulticamClient
from tests.support.daemon import Daemon
from tests.support.fakemic import FakeMic, write_asoundrc
from tests.support.receiver import Receiver
from tests.support.speech import have_espeak, silence, synth

REPO = Path(__file__).resolve().parent.parent
MODELS = Path(tempfile.gettempdir()) / "edgevoice-test-models"
SESSION = "restaurant_table_05_evening"
UNIT = REPO / "systemd" / "edgevoice.service"
STOP_MARGIN_S = 5.0
"""TimeoutStopSec must leave at least this much beyond the sum of the phase budgets (start-up of Python's exit)."""


def timeout_stop_sec() -> float:
    match = re.search(r"^TimeoutStopSec=(\d+)s$", UNIT.read_text(), re.MULTILINE)
    assert match, "systemd/edgevoice.service sets TimeoutStopSec=<n>s"
    return float(match.group(1))


def test_the_phase_budgets_fit_in_the_units_timeout_stop_sec() -> None:
    from edgevoice.config import ShutdownSettings

    budgets = ShutdownSettings()
    assert budgets.total_s() + STOP_MARGIN_S <= timeout_stop_sec(), (
        f"the shutdown budgets sum to {budgets.total_s()} s: raise TimeoutStopSec or lower a budget"
    )
    assert list(budgets.budgets()) == ["stop_accepting", "flush", "end_sessions", "drain", "close", "stop"]
    with pytest.raises(ValueError, match="deliver_s"):
        ShutdownSettings(drain_s=2.0, deliver_s=2.0)  # delivery's time is part of the drain


# -- a raw WebSocket client that never reads ----------------------------------------------------


def _frame(payload: bytes, opcode: int) -> bytes:
    """One masked client frame."""
    mask = os.urandom(4)
    n = len(payload)
    length = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
    head = bytes([0x80 | opcode]) + length
    body = (np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)).tobytes()
    return head + mask + body


def _text(obj: object) -> bytes:
    return _frame(json.dumps(obj).encode(), 1)


def server_send_queue(server_port: int, client_port: int) -> int:
    """Bytes the daemon wrote to this connection that the client has not taken (the kernel's tx_queue)."""
    local, remote = f"0100007F:{server_port:04X}", f"0100007F:{client_port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[0], 16)
    raise AssertionError(f"no connection 127.0.0.1:{server_port} -> :{client_port} in /proc/net/tcp")


def settled_send_queue(server_port: int, client_port: int) -> int:
    """The send queue once the daemon's writer has caught up (unchanged over a few polls)."""
    last, same = -1, 0
    while same < 3:
        time.sleep(0.1)
        now = server_send_queue(server_port, client_port)
        same = same + 1 if now == last else 0
        last = now
    return last


def stuck_client(daemon: Daemon, customer: str) -> socket.socket:
    """Open /asr-multicam, start a customer's stream, then stop reading until the daemon's writes to it block.

    The receive buffer is tiny and nothing is read (a tablet on weak Wi-Fi). Each ``audio_stream_stop``
    of an unknown stream is answered with an error: they are sent in batches until the kernel's
    buffer for the connection is full (its send queue stops growing), then enough more to fill the
    daemon's own write buffer, but far fewer than the outbox's MAX_QUEUED (which would disconnect us).
    Only reaching this state depends on polling; nothing is asserted on time.
    """
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", daemon.port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(
        f"GET /asr-multicam HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    s.sendall(_text({"type": "audio_stream_start", "session_id": SESSION, "customer_id": customer, "stream_id": "tab"}))
    client_port = s.getsockname()[1]
    error = _text({"type": "audio_stream_stop", "stream_id": "x" * 128})  # ~330 bytes of reply each
    sent, previous = 0, -1
    while True:
        assert sent < 100_000, "the daemon's send queue to a client that never reads never filled"
        s.sendall(error * 250)
        sent += 250
        wait_for_log(daemon, "unknown_stream", sent)
        queued = settled_send_queue(daemon.port, client_port)
        if queued == previous:
            break  # the kernel takes no more: what follows stays in the daemon
        previous = queued
    s.sendall(error * 400)  # fills the daemon's 64 KiB write buffer: its writer waits, ~450 replies queued
    wait_for_log(daemon, "unknown_stream", sent + 400)
    return s


SEAT = "mic_table_05_seat_01"
SEAT_CONFIG = f"""
[[mic.devices]]
match = "^fake_seat$"
[[mic.devices.seats]]
stream_id = "{SEAT}"
channels = [0]
"""


@pytest.fixture
def seat_mic(tmp_path: Path) -> Iterator[Path]:
    """A FIFO-fed ALSA capture device for one mic seat; yields the HOME holding its .asoundrc."""
    home = tmp_path / "home"
    home.mkdir()
    mic = FakeMic(home, "fake_seat", 1, 44100, block_frames(44100)).plug()
    write_asoundrc(home, [mic])
    yield home
    mic.close()


def start_daemon(
    daemon_factory: Callable[..., Daemon], receiver: Receiver, config: str | None = None, **env: str
) -> Daemon:
    return daemon_factory(
        config=config,
        env={
            "EDGEVOICE_ASR__MODEL": str(modelstore.resolve("tiny.en", MODELS)),
            "EDGEVOICE_EVENTS__URL": receiver.url,
            "EDGEVOICE_EVENTS__RETRY_BASE_S": "0.1",
            "EDGEVOICE_LOGGING__LEVEL": "DEBUG",
            **env,
        },
    )


def wait_for_log(daemon: Daemon, text: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while daemon.log().count(text) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {text!r} in the log:\n{daemon.log()[-3000:]}"
        time.sleep(0.05)


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for s in opened:
        s.close()


@pytest.mark.skipif(not have_espeak(), reason="needs espeak-ng")
async def test_sigterm_with_a_client_that_stopped_reading(
    daemon_factory: Callable[..., Daemon], receiver: Receiver, sockets: list[socket.socket], seat_mic: Path
) -> None:
    """The stuck client cannot hold the shutdown: every customer gets its keywords and SESSION_END, exit 0.

    Customers on three kinds of stream: the stuck tablet's, a polite client's (speech still being
    recognized at SIGTERM) and a mic seat's (bound over HTTP).
    """
    daemon = start_daemon(daemon_factory, receiver, SEAT_CONFIG, HOME=str(seat_mic))
    async with aiohttp.ClientSession(daemon.url) as http:
        bind = {"session_id": SESSION, "customer_id": "cust_seat"}
        async with http.post(f"/streams/{SEAT}/start", json=bind) as r:
            assert r.status == 200, await r.text()
    sockets.append(await asyncio.to_thread(stuck_client, daemon, "cust_tablet"))
    async with MulticamClient.connect(daemon.ws_url) as client:
        await client.start("seat_1", session_id=SESSION, customer_id="cust_guest")
        # The sentence is still being recognized when the daemon is told to stop.
        await client.stream(0, np.concatenate([silence(0.5), synth("Hello, can I see the menu please?")]))
        started = time.monotonic()
        status = await asyncio.to_thread(daemon.stop, timeout_stop_sec())
        took = time.monotonic() - started
        assert client.ws.close_code == 1001  # going away
    stopped = client.of("stream_stopped", "seat_1")
    assert stopped and "menu" in stopped[0]["full_transcript"].lower(), client.messages
    if len(receiver.events()) < 4:  # not all sent before the exit: they wait in the spool for the next start
        keep = ("EDGEVOICE_STATE__DIR", "EDGEVOICE_ASR__MODEL", "EDGEVOICE_EVENTS__URL")
        again = daemon_factory(env={k: daemon.env[k] for k in keep})
        await receiver.until_accepted(4, timeout=60)
        again.stop()
    assert receiver.events("cust_guest") == ["SAY_HELLO", "SESSION_END"]
    assert receiver.events("cust_tablet") == ["SESSION_END"]
    assert receiver.events("cust_seat") == ["SESSION_END"]
    assert status == 0, daemon.log()[-3000:]
    assert took < timeout_stop_sec()
    assert "did not finish the close handshake" in daemon.log()  # the tablet was cut off, not waited for


async def test_a_phase_that_overruns_its_budget_exits_non_zero(
    daemon_factory: Callable[..., Daemon], receiver: Receiver
) -> None:
    """Another process holds the spool's write lock: SESSION_END cannot be committed, the drain overruns.

    The daemon says which phase and which event, goes on, and exits 1 within the unit's TimeoutStopSec.
    """
    daemon = start_daemon(
        daemon_factory,
        receiver,
        EDGEVOICE_SHUTDOWN__DRAIN_S="2",
        EDGEVOICE_SHUTDOWN__DELIVER_S="0.5",
        EDGEVOICE_SHUTDOWN__STOP_S="3",
    )
    lock = sqlite3.connect(store.spool_path(Path(daemon.env["EDGEVOICE_STATE__DIR"])), timeout=30, isolation_level=None)
    try:
        async with MulticamClient.connect(daemon.ws_url) as client:
            await client.start("seat_1", session_id=SESSION, customer_id="cust_locked")
            lock.execute("BEGIN IMMEDIATE")  # e.g. an operator's tool holding the file for long
            started = time.monotonic()
            status = await asyncio.to_thread(daemon.stop, timeout_stop_sec())
            took = time.monotonic() - started
    finally:
        lock.close()
    log = daemon.log()
    assert status == 1, log[-3000:]
    assert took < timeout_stop_sec()
    assert "shutdown phase drain did not finish within its budget" in log
    assert "EVENT NOT COMMITTED at shutdown: SESSION_END for customer cust_locked" in log
    assert "did not finish; exit status 1" in log
    assert receiver.events() == []
