"""The LAN policy (docs/security.md) on the daemon's real application in process on 127.0.0.1, and the real CLI:
no LAN bind without tokens, tokens by surface, the Host check, Origin and body rules on state-changing requests,
"*" never covering WebSockets, an Authorization header that is not UTF-8."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from edgevoice import modelstore
from edgevoice.config import (
    AsrSettings,
    ConfigError,
    DashboardSettings,
    FunVoiceSettings,
    ServerSettings,
    Settings,
    StateSettings,
    load_settings,
)
from edgevoice.server.kernel import new_app
from tests.support.appthread import AppThread

MODELS = Path(tempfile.gettempdir()) / "edgevoice-test-models"
TOKENS = {"multicam": "tok-multicam", "seats": "tok-seats", "dashboard": "tok-dashboard", "metrics": "tok-metrics"}
POS = "http://pos.example"


def _settings(tmp: Path, **server: Any) -> Settings:
    return Settings(
        server=ServerSettings(**server),
        state=StateSettings(dir=tmp),
        asr=AsrSettings(model=str(modelstore.resolve("tiny.en", MODELS))),
        funvoice=FunVoiceSettings(api_key="not-used", base_url="https://127.0.0.1:9"),  # type: ignore[arg-type]
        dashboard=DashboardSettings(enabled=True, metrics=True),
    )


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    """Per-surface tokens (funvoice open), one extra host name, a POS origin and "*"."""
    settings = _settings(
        tmp_path_factory.mktemp("policy"),
        tokens=TOKENS,
        allowed_hosts=["box.example"],
        cors_origins=["*", POS],
    )
    with AppThread(settings) as a:
        yield a


@pytest.fixture(scope="module")
def legacy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppThread]:
    """Only the single server.token of earlier versions."""
    with AppThread(_settings(tmp_path_factory.mktemp("legacy"), token="tok-legacy")) as a:
        yield a


async def _status(
    a: AppThread, method: str, path: str, token: str | None = None, **kw: Any
) -> tuple[int, dict[str, Any] | str, dict[str, str]]:
    headers = dict(kw.pop("headers", {}))
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with aiohttp.ClientSession() as http, http.request(method, a.url + path, headers=headers, **kw) as r:
        try:
            body: dict[str, Any] | str = await r.json(content_type=None)
        except ValueError:
            body = await r.text()
        return r.status, body, dict(r.headers)


def status(
    a: AppThread, method: str, path: str, token: str | None = None, **kw: Any
) -> tuple[int, Any, dict[str, str]]:
    return a.call(_status(a, method, path, token, **kw))


def ws_status(a: AppThread, path: str, token: str | None = None, **headers: str) -> int:
    """101 when the upgrade is accepted, else the HTTP status it was refused with."""

    async def run() -> int:
        if token:
            headers["Authorization"] = f"Bearer {token}"
        async with aiohttp.ClientSession() as http:
            try:
                ws = await http.ws_connect(a.ws_url + path, headers=headers)
            except aiohttp.WSServerHandshakeError as exc:
                return exc.status
            await ws.close()
            return 101

    return a.call(run())


def _tracebacks(a: AppThread) -> list[str]:
    return [r.getMessage() for r in a.records.records if r.exc_info or r.name == "aiohttp.server"]


# -- the bind ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.50", "box.lan", ""])
def test_a_lan_bind_without_tokens_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="allow_insecure_lan") as err:
        ServerSettings(host=host)
    assert "multicam, seats, dashboard, metrics" in str(err.value)
    ServerSettings(host=host, token="t")  # the shared token covers every surface
    ServerSettings(host=host, tokens=TOKENS)  # funvoice may stay open: the Origin and Host checks guard it
    with pytest.raises(ValueError, match="metrics would be open"):
        ServerSettings(host=host, tokens={k: v for k, v in TOKENS.items() if k != "metrics"})
    with pytest.raises(ValueError, match="would be open"):
        ServerSettings(host=host, token="")  # an empty token is no token


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_needs_no_token(host: str) -> None:
    assert ServerSettings(host=host).host == host


def test_serve_refuses_a_lan_bind_without_tokens_and_says_how_to_fix_it(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVOICE_")}
    env.update(EDGEVOICE_SERVER__HOST="0.0.0.0", EDGEVOICE_STATE__DIR=str(tmp_path))
    r = subprocess.run(
        [sys.executable, "-m", "edgevoice", "serve"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "server.token_file" in r.stderr and "allow_insecure_lan" in r.stderr and "Traceback" not in r.stderr
    env["EDGEVOICE_SERVER__ALLOW_INSECURE_LAN"] = "true"
    r = subprocess.run(
        [sys.executable, "-m", "edgevoice", "config", "check"], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr


def test_an_insecure_lan_bind_warns_at_every_start(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    settings = Settings(
        server=ServerSettings(host="0.0.0.0", allow_insecure_lan=True, tokens={"multicam": "m"}),
        state=StateSettings(dir=tmp_path),
    )
    with caplog.at_level(logging.WARNING):
        new_app(settings)
    [warning] = [r for r in caplog.records if "INSECURE" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "seats, dashboard, metrics open to anyone on the LAN" in warning.getMessage()


def test_per_surface_token_files_are_read_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("EDGEVOICE_"):
            monkeypatch.delenv(k)
    (tmp_path / "seats.token").write_text("from-file\n")
    cfg = tmp_path / "edgevoice.toml"
    cfg.write_text(f'[server]\ntoken = "shared"\n[server.token_files]\nseats = "{tmp_path / "seats.token"}"\n')
    server = load_settings(cfg).server
    assert server.surface_token("seats") == "from-file" and server.surface_token("multicam") == "shared"
    cfg.write_text(f'[server.token_files]\nmetrics = "{tmp_path / "missing"}"\n')
    with pytest.raises(ConfigError, match=r"server\.token_files\.metrics"):
        load_settings(cfg)
    cfg.write_text('[server.tokens]\nadmin = "x"\n')
    with pytest.raises(ConfigError, match=r"server\.tokens\.admin"):
        load_settings(cfg)


# -- tokens by surface -------------------------------------------------------------------------------------------
def test_each_surface_takes_only_its_own_token(box: AppThread) -> None:
    assert ws_status(box, "/asr-multicam") == 401
    assert ws_status(box, "/asr-multicam", TOKENS["seats"]) == 401
    assert ws_status(box, "/asr-multicam", TOKENS["multicam"]) == 101
    assert status(box, "POST", "/streams/seat_1/stop", TOKENS["multicam"])[0] == 401
    code, body, _ = status(box, "POST", "/streams/seat_1/stop", TOKENS["seats"])
    assert (code, body["error"]) == (404, "unknown_stream")  # past the middleware: no such seat here
    assert ws_status(box, "/dashboard/feed", TOKENS["metrics"]) == 401
    assert ws_status(box, "/dashboard/feed", TOKENS["dashboard"]) == 101
    assert status(box, "GET", "/metrics", TOKENS["dashboard"])[0] == 401
    assert status(box, "GET", "/metrics", TOKENS["metrics"])[0] == 200
    # the FunVoiceChat front ends send no token: their surface is open here (Origin and Host still apply)
    assert status(box, "GET", "/health")[0] in (200, 503)
    assert status(box, "POST", "/connect?user_id=front_1")[0] == 200
    assert status(box, "GET", "/product-info-status")[0] == 200
    assert status(box, "GET", "/")[0] == 200  # the dashboard page itself carries no data


def test_the_single_legacy_token_still_guards_every_surface(legacy: AppThread) -> None:
    for method, path in (("POST", "/connect"), ("GET", "/metrics"), ("GET", "/product-info-status")):
        assert status(legacy, method, path)[0] == 401, path
        assert status(legacy, method, path, "tok-legacy")[0] == 200, path
    assert ws_status(legacy, "/asr-multicam") == 401
    assert ws_status(legacy, "/asr-multicam", "tok-legacy") == 101


# -- Host, Origin, bodies ----------------------------------------------------------------------------------------
def test_host_header_must_name_this_box(box: AppThread) -> None:
    for host in (f"127.0.0.1:{box.port}", f"localhost:{box.port}", "box.example", "192.168.1.50:8000", "[::1]:8000"):
        assert status(box, "GET", "/product-info-status", headers={"Host": host})[0] == 200, host
    code, body, _ = status(box, "GET", "/product-info-status", headers={"Host": "rebind.attacker.example"})
    assert (code, body["error"]) == (403, "host_not_allowed") and "server.allowed_hosts" in body["message"]
    # DNS rebinding: the attacker's page is "same origin" with its own name, which the Host check refuses
    rebound = f"rebind.attacker.example:{box.port}"
    assert ws_status(box, "/ws?user_id=u1", Host=rebound, Origin=f"http://{rebound}") == 403


def test_state_changing_requests_need_an_allowed_origin(box: AppThread) -> None:
    seats = TOKENS["seats"]
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{box.port + 1}"):
        code, body, _ = status(box, "POST", "/streams/seat_1/stop", seats, headers={"Origin": origin})
        assert (code, body["error"]) == (403, "origin_not_allowed"), origin
        code, body, _ = status(box, "POST", "/product-info-reset-all", headers={"Origin": origin})
        assert (code, body["error"]) == (403, "origin_not_allowed"), origin
    assert "reads only" in body["message"]  # "*" is configured, and it does not cover this
    for origin in (POS, f"http://127.0.0.1:{box.port}"):  # listed, or the box's own page
        assert status(box, "POST", "/streams/seat_1/stop", seats, headers={"Origin": origin})[0] == 404
        code, _, headers = status(box, "POST", "/product-info-reset-all", headers={"Origin": origin})
        assert code == 200 and headers["Access-Control-Allow-Origin"] == origin
    assert status(box, "POST", "/product-info-reset-all")[0] == 200  # no Origin: not a browser


def test_state_changing_bodies_must_be_json(box: AppThread) -> None:
    body = '{"session_id": "t", "customer_id": "c"}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        code, reply, _ = status(box, "POST", "/streams/seat_1/start", TOKENS["seats"], data=body, headers=headers)
        assert (code, reply["error"]) == (415, "unsupported_media_type"), content_type
    for content_type in ("application/json", "application/json; charset=utf-8"):
        code, reply, _ = status(
            box, "POST", "/streams/seat_1/start", TOKENS["seats"], data=body, headers={"Content-Type": content_type}
        )
        assert (code, reply["error"]) == (404, "unknown_stream"), content_type


def test_star_covers_reads_never_websockets_or_changes(box: AppThread) -> None:
    evil = "http://evil.example"
    code, _, headers = status(box, "GET", "/product-info-status", headers={"Origin": evil})
    assert code == 200 and headers["Access-Control-Allow-Origin"] == evil
    assert ws_status(box, "/ws/tools?user_id=u1", Origin=evil) == 403
    assert ws_status(box, "/asr-multicam", TOKENS["multicam"], Origin=evil) == 403
    assert ws_status(box, "/ws/tools?user_id=u1", Origin=POS) == 101
    assert (
        status(box, "GET", "/product-info-status", headers={"Origin": "null"})[2].get("Access-Control-Allow-Origin")
        is None
    )
    preflight = {"Origin": evil, "Access-Control-Request-Method": "POST"}
    assert status(box, "OPTIONS", "/product-info-reset-all", headers=preflight)[0] == 403
    preflight["Access-Control-Request-Method"] = "GET"
    assert status(box, "OPTIONS", "/product-info-status", headers=preflight)[0] == 204


def test_an_authorization_header_that_is_not_utf8_is_a_clear_400(box: AppThread) -> None:
    box.records.records.clear()
    with socket.create_connection(("127.0.0.1", box.port), timeout=20) as s:
        s.sendall(
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \xff\xfe\xfd\r\nConnection: close\r\n\r\n"
        )
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    assert b"bad_authorization" in reply and b"not UTF-8" in reply
    assert not _tracebacks(box)


def test_a_tls_key_that_does_not_fit_the_certificate_is_refused_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trustme

    for k in list(os.environ):
        if k.startswith("EDGEVOICE_"):
            monkeypatch.delenv(k)
    ca = trustme.CA()
    mine, other = ca.issue_cert("box.example"), ca.issue_cert("other.example")
    mine.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    mine.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "other.pem"))
    cfg = tmp_path / "edgevoice.toml"
    cfg.write_text(f'[server]\ntls_cert = "{tmp_path / "cert.pem"}"\ntls_key = "{tmp_path / "key.pem"}"\n')
    assert load_settings(cfg).server.tls_key == tmp_path / "key.pem"
    cfg.write_text(f'[server]\ntls_cert = "{tmp_path / "cert.pem"}"\ntls_key = "{tmp_path / "other.pem"}"\n')
    with pytest.raises(ConfigError, match="not a PEM certificate chain and its private key"):
        load_settings(cfg)
