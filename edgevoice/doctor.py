"""``edgevoice doctor``: check a box and print one verdict per line."""

from __future__ import annotations

import argparse
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from edgevoice import modelstore
from edgevoice.config import Settings, load_settings


@dataclass(frozen=True)
class Check:
    """The outcome of one check."""

    name: str
    verdict: str  # OK, WARN, FAIL, SKIP
    detail: str
    required: bool = True


def check_state_dir(s: Settings) -> list[Check]:
    path = s.state.path()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".doctor-probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return [Check("state directory", "FAIL", f"{path}: not writable ({exc.strerror})")]
    free_mb = shutil.disk_usage(path).free / 2**20
    out = [Check("state directory", "OK", f"{path} writable")]
    verdict = "OK" if free_mb >= s.state.min_free_mb else "FAIL"
    out.append(Check("free disk", verdict, f"{free_mb:,.0f} MiB free in {path} (floor {s.state.min_free_mb} MiB)"))
    return out


def check_model(s: Settings) -> list[Check]:
    """Load the model exactly as the daemon does (same device and compute-type choice, warm-up decode)."""
    from edgevoice.recognition.engine import Engine, EngineError

    models_dir = modelstore.default_models_dir(s.state.path(), s.asr.models_dir)
    try:
        info = Engine.load(s.asr, models_dir).info
    except (modelstore.ModelError, EngineError, OSError) as exc:
        return [Check("asr model", "FAIL", str(exc))]
    detail = f"{s.asr.model}: {info.path} loads in {info.load_s:.2f} s ({info.device}, {info.compute_type})"
    return [Check("asr model", "OK", detail)]


def check_cuda(s: Settings) -> list[Check]:
    try:
        import ctranslate2

        count = ctranslate2.get_cuda_device_count()
    except Exception as exc:
        return [
            Check(
                "cuda",
                "FAIL" if s.asr.device == "cuda" else "WARN",
                f"CTranslate2 cannot query CUDA: {exc}",
                s.asr.device == "cuda",
            )
        ]
    if count:
        return [Check("cuda", "OK", f"{count} CUDA device(s) visible to CTranslate2")]
    required = s.asr.device == "cuda"
    return [
        Check(
            "cuda",
            "FAIL" if required else "WARN",
            "no CUDA device visible to CTranslate2" + ("; asr.device is cuda" if required else "; running on CPU"),
            required,
        )
    ]


def check_audio(s: Settings) -> list[Check]:
    required = bool(s.mic.devices)
    try:
        import sounddevice as sd

        inputs = [d for d in sd.query_devices() if d["max_input_channels"] > 0]
    except Exception as exc:
        return [Check("audio inputs", "FAIL" if required else "SKIP", f"sounddevice unavailable: {exc}", required)]
    if not inputs:
        return [Check("audio inputs", "FAIL" if required else "WARN", "no audio input device", required)]
    return [
        Check(
            "audio inputs",
            "OK",
            f"{len(inputs)} input device(s): " + ", ".join(d["name"] for d in inputs[:6]),
            required,
        )
    ]


def check_events_api(s: Settings) -> list[Check]:
    if not s.events.url:
        return [Check("experience API", "WARN", "events.url not set: events wait on disk", False)]
    parts = urlsplit(s.events.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=min(s.events.timeout_s, 5)):
            pass
    except OSError as exc:
        return [
            Check(
                "experience API",
                "WARN",
                f"{parts.hostname}:{port} unreachable ({exc}); events will wait on disk",
                False,
            )
        ]
    return [Check("experience API", "OK", f"{parts.hostname}:{port} accepts connections", False)]


CHECKS: tuple[Callable[[Settings], list[Check]], ...] = (
    check_state_dir,
    check_model,
    check_cuda,
    check_audio,
    check_events_api,
)


def run_checks(settings: Settings) -> list[Check]:
    """Run every check in order."""
    return [result for check in CHECKS for result in check(settings)]


def cmd_doctor(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    results = run_checks(settings)
    for r in results:
        print(f"{r.verdict:<5} {r.name}: {r.detail}")
    failed = [r for r in results if r.verdict == "FAIL" and r.required]
    print(f"{len(failed)} required check(s) failed" if failed else "all required checks passed")
    return 1 if failed else 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("doctor", help="check this box: models, CUDA, audio, state dir, disk, experience API")
    p.set_defaults(func=cmd_doctor)
