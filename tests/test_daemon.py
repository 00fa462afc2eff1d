"""The daemon as a real subprocess: systemd notify, /health, SIGTERM, token and TLS."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from edgevoice.daemon import Signals
from tests.support.daemon import Daemon


def get(url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_ready_health_and_clean_sigterm(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    ready_at = d.messages.index("READY=1")
    assert any(m.startswith("STATUS=loading model") for m in d.messages[:ready_at]), d.messages
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in d.messages[:ready_at])
    status, body = get(d.url + "/health")
    assert status == 200 and body["status"] == "healthy"
    assert body["asr"]["model"] == "tiny.en"
    assert d.stop() == 0
    assert "STOPPING=1" in d.messages
    assert "stopped" in d.log()


def test_watchdog_pings_from_the_loop(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(env={"WATCHDOG_USEC": "400000"})
    time.sleep(1.0)
    assert d.messages.count("WATCHDOG=1") >= 3, d.messages
    assert d.stop() == 0


def test_sigint_also_stops_cleanly(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    assert d.proc is not None
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(30) == 0


async def test_signals_stop_then_force_and_reload() -> None:
    """Real signals to this process: HUP asks for a reload, the first TERM a stop, a second stop signal forces exit."""
    reloads: list[int] = []
    forced: list[int] = []
    changed = asyncio.Event()

    def record(into: list[int], value: int) -> None:
        into.append(value)
        changed.set()

    signals = Signals(on_reload=lambda: record(reloads, 1), on_force=lambda status: record(forced, status))

    async def deliver(sig: signal.Signals) -> None:
        changed.clear()
        os.kill(os.getpid(), sig)
        await asyncio.wait_for(changed.wait(), 30)

    signals.install()
    try:
        await deliver(signal.SIGHUP)
        await deliver(signal.SIGHUP)
        assert reloads == [1, 1] and not signals.stop_requested.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(signals.stop_requested.wait(), 30)
        assert signals.stopped_by == signal.SIGTERM and forced == []
        await deliver(signal.SIGINT)
        assert forced == [128 + signal.SIGINT]
    finally:
        signals.remove()
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL


def test_bearer_token_enforced(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(env={"EDGEVOICE_SERVER__TOKEN": "tok-123"})
    assert get(d.url + "/health")[0] == 401
    assert get(d.url + "/health", {"Authorization": "Bearer wrong"})[0] == 401
    assert get(d.url + "/health", {"Authorization": "Bearer tok-123"})[0] == 200
    assert get(d.url + "/health?token=tok-123")[0] == 200
    assert "tok-123" not in d.log()


def test_tls(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_pem, key_pem = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    d = daemon_factory(env={"EDGEVOICE_SERVER__TLS_CERT": str(cert_pem), "EDGEVOICE_SERVER__TLS_KEY": str(key_pem)})
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    assert get(f"https://127.0.0.1:{d.port}/health", context=ctx)[0] == 200
    with pytest.raises(urllib.error.URLError):
        get(f"https://127.0.0.1:{d.port}/health")  # untrusted certificate


def test_bad_config_fails_fast_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[server]\nport = 0\n")
    r = subprocess.run(
        [sys.executable, "-m", "edgevoice", "--config", str(cfg), "serve"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2
    assert "server.port = 0" in r.stderr and str(cfg) in r.stderr
    assert "Traceback" not in r.stderr


def test_port_in_use_is_a_clear_error(daemon_factory: Callable[..., Daemon], tmp_path: Path) -> None:
    first = daemon_factory()
    second = daemon_factory(env={"EDGEVOICE_SERVER__PORT": str(first.port)}, start=False)
    second.start(wait_ready=False)
    assert second.proc is not None and second.proc.wait(60) == 1
    assert "start-up failed" in second.log() and "Traceback" not in second.log()
