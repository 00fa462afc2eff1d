"""The command line: config check/show/example and doctor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEVOICE_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "edgevoice", *args], capture_output=True, text=True, timeout=120, env=full_env
    )


def test_config_check_ok_and_bad(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text("[server]\nport = 8123\n")
    r = run("config", "check", str(good))
    assert r.returncode == 0 and "8123" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[asr]\nmodel = 5\n")
    r = run("config", "check", str(bad))
    assert r.returncode == 2 and "asr.model = 5" in r.stderr and "Traceback" not in r.stderr


def test_config_show_masks_secrets() -> None:
    r = run("config", "show", env={"EDGEVOICE_SERVER__TOKEN": "hunter2", "EDGEVOICE_SERVER__PORT": "8200"})
    assert r.returncode == 0
    shown = json.loads(r.stdout)
    assert shown["server"]["port"] == 8200
    assert shown["server"]["token"] == "**********"
    assert "hunter2" not in r.stdout


def test_doctor_reports_each_check(tmp_path: Path) -> None:
    r = run("doctor", env={"EDGEVOICE_STATE__DIR": str(tmp_path / "state")})
    lines = r.stdout.splitlines()
    assert r.returncode == 0, r.stdout + r.stderr
    assert any(line.startswith("OK    asr model: tiny.en") for line in lines)
    assert any(line.startswith("OK    state directory") for line in lines)
    assert any("experience API" in line and "events wait on disk" in line for line in lines)


def test_doctor_fails_on_unknown_model_and_unwritable_state(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    r = run(
        "doctor",
        env={"EDGEVOICE_ASR__MODEL": "no-such-model", "EDGEVOICE_STATE__DIR": str(tmp_path / "file" / "state")},
    )
    assert r.returncode == 1
    assert "FAIL  asr model" in r.stdout and "unknown model 'no-such-model'" in r.stdout
    assert "FAIL  state directory" in r.stdout
