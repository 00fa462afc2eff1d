"""Configuration: file, environment, validation messages, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edgevoice.config import ConfigError, load_settings, masked_dump
from edgevoice.config_example import render_example

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("EDGEVOICE_") or k in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "STATE_DIRECTORY"):
            monkeypatch.delenv(k)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "edgevoice.toml"
    p.write_text(text, encoding="utf-8")
    return p


def test_embedded_defaults() -> None:
    s = load_settings()
    assert (s.server.host, s.server.port) == ("127.0.0.1", 8000)
    assert s.server.bearer_token() is None
    assert s.asr.model == "tiny.en" and s.asr.device == "auto" and s.asr.compute_type == "auto"
    assert s.events.url is None and s.events.timeout_s == 10
    assert s.diarization.backend == "none"
    assert [r.event for r in s.keywords.rules] == ["SAY_HELLO", "SAY_SORRY"]


def test_file_then_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write(
        tmp_path, '[server]\nport = 9001\nhost = "0.0.0.0"\ntoken = "t0k"\n[events]\nurl = "http://127.0.0.1:1/x"\n'
    )
    monkeypatch.setenv("EDGEVOICE_SERVER__PORT", "9002")
    monkeypatch.setenv("EDGEVOICE_EVENTS__URL", "http://127.0.0.1:4000/api/v1/experience-event")
    s = load_settings(cfg)
    assert s.server.port == 9002 and s.server.host == "0.0.0.0"
    assert s.events.url == "http://127.0.0.1:4000/api/v1/experience-event"


def test_config_env_variable_names_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEVOICE_CONFIG", str(write(tmp_path, "[asr]\nbeam_size = 3\n")))
    assert load_settings().asr.beam_size == 3


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.server.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("toml", "key", "value", "allowed"),
    [
        ("[server]\nport = 70000\n", "server.port", "70000", "less than or equal to 65535"),
        ('[server]\nport = "eighty"\n', "server.port", "'eighty'", "valid integer"),
        ('[asr]\ndevice = "gpu"\n', "asr.device", "'gpu'", "'auto', 'cpu' or 'cuda'"),
        ('[asr]\ncompute_type = "int4"\n', "asr.compute_type", "'int4'", "'int8'"),
        ("[asr]\nbeam_size = 0\n", "asr.beam_size", "0", "greater than or equal to 1"),
        ('[asr]\nlanguage = "vietnamese!"\n', "asr.language", "'vietnamese!'", "language code"),
        ('[events]\nfull_policy = "panic"\n', "events.full_policy", "'panic'", "'refuse_new' or 'drop_oldest'"),
        ("[events]\ntimeout_s = -1\n", "events.timeout_s", "-1", "greater than 0"),
        ('[diarization]\nbackend = "magic"\n', "diarization.backend", "'magic'", "'sortformer'"),
        (
            '[[keywords.rules]]\nevent = "say hello"\nphrases = ["hi"]\n',
            "keywords.rules.0.event",
            "'say hello'",
            "pattern",
        ),
        (
            "[server]\nprot = 1\n",
            "server.prot",
            "1",
            "allowed here: allow_insecure_lan, allowed_hosts, cors_origins, host",
        ),
        ("[nonsense]\nx = 1\n", "nonsense", "", "unknown key"),
    ],
)
def test_each_bad_value_names_file_key_value_and_allowed(
    tmp_path: Path, toml: str, key: str, value: str, allowed: str
) -> None:
    cfg = write(tmp_path, toml)
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    msg = str(err.value)
    assert str(cfg) in msg
    assert f"  {key}" in msg
    assert value in msg
    assert allowed in msg


def test_bad_env_value_names_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEVOICE_EVENTS__TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match=r"events\.timeout_s = 'soon' \(from \$EDGEVOICE_EVENTS__TIMEOUT_S\)"):
        load_settings()


def test_broken_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[server\nport=1"))
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path / "absent.toml")


def test_secrets_from_file_and_never_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    s = load_settings(write(tmp_path, f'[server]\ntoken_file = "{token}"\n'))
    assert s.server.bearer_token() == "s3cret-token"
    monkeypatch.setenv("EDGEVOICE_SERVER__TOKEN", "env-token")
    s = load_settings()
    assert s.server.bearer_token() == "env-token"
    assert "env-token" not in repr(s) and "env-token" not in str(masked_dump(s))
    monkeypatch.delenv("EDGEVOICE_SERVER__TOKEN")
    with pytest.raises(ConfigError, match="token_file"):
        load_settings(write(tmp_path, f'[server]\ntoken_file = "{tmp_path / "nope"}"\n'))


def test_tls_needs_both_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key must be set together"):
        load_settings(write(tmp_path, f'[server]\ntls_key = "{tmp_path}/k.pem"\n'))


def test_example_file_is_current_and_valid(tmp_path: Path) -> None:
    example = (REPO / "edgevoice.example.toml").read_text(encoding="utf-8")
    assert example == render_example(), "regenerate with: edgevoice config example > edgevoice.example.toml"
    s = load_settings(REPO / "edgevoice.example.toml")
    assert s == load_settings()
