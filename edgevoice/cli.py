"""The ``edgevoice`` command line."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Callable, Sequence

from edgevoice import __version__
from edgevoice.config import ConfigError, Settings, load_settings, masked_dump, resolve_config_path

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]
"""A command module's ``register(subparsers)``: adds its sub-commands."""

# Commands contributed by components, imported by name so that each command loads only what it needs.
_COMMAND_MODULES = (
    "edgevoice.doctor",
    "edgevoice.delivery.cli",
    "edgevoice.modelstore.cli",
    "edgevoice.transcribe",
    "edgevoice.sources.devices_cli",
)


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(getattr(args, "config", None))


def cmd_serve(args: argparse.Namespace) -> int:
    from edgevoice.daemon import serve
    from edgevoice.logs import setup_logging

    settings = _settings(args)
    found = resolve_config_path(getattr(args, "config", None))
    config_path = found.absolute() if found is not None else None  # SIGHUP re-reads this file
    setup_logging(settings.logging.level)
    return asyncio.run(serve(settings, config_path=config_path))


def cmd_config_check(args: argparse.Namespace) -> int:
    settings = load_settings(args.file or args.config)
    origin = resolve_config_path(args.file or args.config) or "embedded defaults"
    print(
        f"configuration OK ({origin}): listening on {settings.server.host}:{settings.server.port}, model {settings.asr.model}"
    )
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    print(json.dumps(masked_dump(_settings(args)), indent=2, ensure_ascii=False))
    return 0


def cmd_config_example(args: argparse.Namespace) -> int:
    from edgevoice.config_example import render_example

    sys.stdout.write(render_example())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgevoice", description="The edgevoice voice-appliance daemon.")
    parser.add_argument("--version", action="version", version=f"edgevoice {__version__}")
    parser.add_argument(
        "--config",
        "-c",
        metavar="FILE",
        help="TOML configuration (default: $EDGEVOICE_CONFIG, /etc/edgevoice/edgevoice.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon")
    p.set_defaults(func=cmd_serve)

    cfg = sub.add_parser("config", help="check or show the configuration")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    p = cfg_sub.add_parser("check", help="validate a configuration file")
    p.add_argument("file", nargs="?", help="file to check (default: the one serve would use)")
    p.set_defaults(func=cmd_config_check)
    p = cfg_sub.add_parser("show", help="print the effective configuration, secrets masked")
    p.set_defaults(func=cmd_config_show)
    p = cfg_sub.add_parser("example", help="print a documented example configuration")
    p.set_defaults(func=cmd_config_example)

    for name in _COMMAND_MODULES:
        register: Register = importlib.import_module(name).register
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"edgevoice: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
