"""Logs reach journald with structured fields when $JOURNAL_STREAM is set."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon

JOURNAL = Path("/run/systemd/journal/socket")


@pytest.fixture
def fake_journald() -> Iterator[list[bytes]]:
    """Bind journald's socket path (only where no journald runs and we may write /run)."""
    pytest.importorskip("systemd.journal")
    if JOURNAL.exists():
        pytest.skip("a real journald owns /run/systemd/journal/socket")
    try:
        JOURNAL.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(JOURNAL))
    except OSError as exc:
        pytest.skip(f"cannot bind a fake journald socket: {exc}")
    sock.settimeout(0.2)
    received: list[bytes] = []
    import threading

    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                received.append(sock.recv(1 << 20))
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    yield received
    stop.set()
    t.join()
    sock.close()
    os.unlink(JOURNAL)


def test_daemon_logs_to_journald(daemon_factory: Callable[..., Daemon], fake_journald: list[bytes]) -> None:
    d = daemon_factory(env={"JOURNAL_STREAM": "8:12345"})
    assert d.stop() == 0
    entries = [e.decode(errors="replace") for e in fake_journald]
    ready = [e for e in entries if "MESSAGE=edgevoice ready on http://127.0.0.1" in e]
    assert ready, entries[:5]
    assert "SYSLOG_IDENTIFIER=edgevoice" in ready[0]
    assert "PRIORITY=6" in ready[0]
    assert "edgevoice ready" not in d.log()  # not duplicated on stderr


def test_structured_fields() -> None:
    from edgevoice.logs import fields

    assert fields(session_id="s1", customer_id="c1", stream_id=None) == {
        "extra": {"SESSION_ID": "s1", "CUSTOMER_ID": "c1"}
    }
