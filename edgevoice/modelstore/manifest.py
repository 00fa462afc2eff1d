"""The model manifest: what each model is, which files it has and their pinned sha256.

The shipped manifest (``models/manifest.toml``, packaged into the wheel) is merged
with the operator's *site manifest* (``/etc/edgevoice/models.toml`` or
``$EDGEVOICE_MODELS_SITE_MANIFEST``), which pins the production models converted
on site. Pure file reads; blocking (call off the event loop).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SITE_MANIFEST = Path("/etc/edgevoice/models.toml")
_REPO_MANIFEST = Path(__file__).resolve().parents[2] / "models" / "manifest.toml"
_PACKAGED_MANIFEST = Path(__file__).resolve().parent / "_data" / "manifest.toml"
CHUNK = 1 << 20
"""Bytes read at a time while hashing and copying model files."""
_DEFAULT: Any = object()
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")  # no separators, no dot-files, no ".."


class ModelError(Exception):
    """A model is unknown, missing, unpinned or does not match its checksums."""


@dataclass(frozen=True)
class ModelFile:
    """One file of a model."""

    name: str
    """File name inside the model directory."""
    sha256: str
    """Expected sha256 of the whole file; empty until the operator pins it."""
    parts: tuple[str, ...]
    """Paths relative to site-packages (or inside a wheel) whose concatenation is the file."""


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
    url: str = ""
    """Mirror location: ``.../`` fetches each file by name, anything else is an archive; ``{mirror}`` is substituted."""
    upstream: str = ""
    """Where the weights come from (documentation)."""
    convert: str = ""
    """The command that produced the files (documentation)."""

    @property
    def pinned(self) -> bool:
        """Whether every file has a sha256."""
        return bool(self.files) and all(f.sha256 for f in self.files)

    @property
    def source(self) -> str:
        """pypi, mirror or local (only ``--from``)."""
        return "pypi" if self.packages else "mirror" if self.url else "local"


def manifest_path() -> Path:
    """The manifest shipped in the wheel, else the repository's models/manifest.toml."""
    override = os.environ.get("EDGEVOICE_MODELS_MANIFEST")
    if override:
        return Path(override)
    return _PACKAGED_MANIFEST if _PACKAGED_MANIFEST.is_file() else _REPO_MANIFEST


def site_manifest_path() -> Path | None:
    """The operator's pins: ``$EDGEVOICE_MODELS_SITE_MANIFEST`` (empty: none), else /etc/edgevoice/models.toml."""
    override = os.environ.get("EDGEVOICE_MODELS_SITE_MANIFEST")
    if override is not None:
        return Path(override) if override else None
    return SITE_MANIFEST if SITE_MANIFEST.is_file() else None


def requirements_path() -> Path:
    """The pip pins (with wheel hashes) of the PyPI-shipped models, next to the manifest."""
    return manifest_path().with_name("requirements.txt")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the model manifest ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"{path}: the model manifest is not valid TOML: {exc}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _file_entry(value: Any) -> dict[str, Any]:
    # The site manifest may pin a file as `"model.bin" = "<sha256>"`.
    return {"sha256": value} if isinstance(value, str) else dict(value)


def load_manifest(path: Path | None = None, site: Path | None = _DEFAULT) -> dict[str, ModelSpec]:
    """Every model the manifest knows, by name, with the site manifest's pins merged in."""
    path = path or manifest_path()
    raw = _read_toml(path).get("models", {})
    site = site_manifest_path() if site is _DEFAULT else site
    if site is not None:
        if not site.is_file():
            raise ModelError(f"{site}: site model manifest not found")
        over = _read_toml(site).get("models", {})
        for m in over.values():
            if isinstance(m, dict) and isinstance(m.get("files"), dict):
                m["files"] = {k: _file_entry(v) for k, v in m["files"].items()}
        raw = _merge(raw, over)
    specs: dict[str, ModelSpec] = {}
    for name, m in raw.items():
        try:
            files = tuple(
                ModelFile(fname, str(_file_entry(f).get("sha256", "")).lower(), tuple(_file_entry(f).get("from", ())))
                for fname, f in m.get("files", {}).items()
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
                url=m.get("url", ""),
                upstream=m.get("upstream", ""),
                convert=m.get("convert", ""),
            )
        except (AttributeError, TypeError, ValueError) as exc:
            raise ModelError(f"model {name!r} in the manifest is malformed: {exc}") from None
        for bad in [name, *(mf.name for mf in files)]:
            if not _SAFE_NAME.fullmatch(bad):
                raise ModelError(f"model {name!r}: {bad!r} is not a plain file or directory name")
        for mf in files:
            if mf.sha256 and not re.fullmatch(r"[0-9a-f]{64}", mf.sha256):
                raise ModelError(f"model {name!r}: {mf.name} has an invalid sha256 {mf.sha256!r} (64 hex digits)")
    return specs


def get_spec(name: str) -> ModelSpec:
    """The manifest entry ``name`` or a :class:`ModelError` listing the known ones."""
    specs = load_manifest()
    if name not in specs:
        raise ModelError(f"unknown model {name!r} (known: {', '.join(sorted(specs))})")
    return specs[name]


def sha256_file(path: Path, chunk: int = CHUNK) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_dir(spec: ModelSpec, directory: Path) -> list[str]:
    """Problems found checking every file of ``directory`` against ``spec`` (empty when it matches)."""
    problems = []
    for mf in spec.files:
        path = directory / mf.name
        if not mf.sha256:
            problems.append(f"{path}: no sha256 pinned in the manifest")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        else:
            actual = sha256_file(path)
            if actual != mf.sha256:
                problems.append(f"{path}: sha256 {actual} does not match the manifest's {mf.sha256}")
    return problems
