"""``edgevoice transcribe FILE.wav``: a file through the daemon's own streaming recognizer, deterministically.

The audio is fed in 100 ms chunks to the same :class:`WhisperRecognizer` the daemon
uses (VAD, endpointing, hypotheses, commit rule, batched decode, diarization); after
each chunk the recognizer's cycles run to completion in a worker thread
(:meth:`Scheduler.drain`): every hypothesis a long utterance is committed from is
decoded, and nothing depends on the clock, so the same file gives the same text on
every run whatever the machine's load (as the daemon does on an idle box). The finals
are printed with their speaker, and the keyword events they would fire (each event at
most once, as for one customer). With speaker labels, audio is fed no faster than the
diarizer keeps up, so labels are those of real time (they may differ between runs;
the text does not).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgevoice.config import Settings, load_settings
from edgevoice.recognition.types import SAMPLE_RATE, Transcript

if TYPE_CHECKING:
    from edgevoice.recognition.recognizer import WhisperRecognizer

CHUNK_S = 0.1
DIARIZER_AHEAD_S = 0.5
"""With speaker labels: audio fed ahead of what the diarizer has processed."""


def _diarizer_lag(stream: object) -> float:
    diarizer = getattr(stream, "diarizer", None)
    return float(getattr(diarizer, "lag_s", 0.0)) if diarizer is not None else 0.0


class AudioFileError(Exception):
    """The input file cannot be read as audio."""


def read_audio(path: Path) -> np.ndarray:
    """Mono float32 at 16 kHz from an audio file libsndfile reads (WAV, FLAC, OGG; any rate and channels)."""
    import soundfile

    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:
        raise AudioFileError(f"{path}: cannot read audio ({exc})") from None
    mono = np.asarray(data.mean(axis=1), dtype=np.float32)
    if rate != SAMPLE_RATE:
        import soxr

        mono = np.asarray(soxr.resample(mono, rate, SAMPLE_RATE), dtype=np.float32)
    return mono


async def transcribe_audio(
    audio: np.ndarray, settings: Settings, *, language: str | None = None, stream_id: str = "file"
) -> tuple[list[Transcript], dict[str, Any]]:
    """Every final of ``audio`` through the streaming recognizer, and run facts."""
    from edgevoice import modelstore as models
    from edgevoice.events.keywords import KeywordMatcher
    from edgevoice.metrics import Metrics
    from edgevoice.recognition.recognizer import WhisperRecognizer

    models_dir = models.default_models_dir(settings.state.path(), settings.asr.models_dir)
    recognizer = await asyncio.to_thread(
        WhisperRecognizer.load, settings.asr, models_dir, Metrics(), settings.diarization
    )
    recognizer.check_finals(KeywordMatcher(settings.keywords))  # as the daemon's stream hub does
    try:
        return await transcribe_with(recognizer, audio, language=language, stream_id=stream_id)
    finally:
        await asyncio.to_thread(recognizer.stop)


async def transcribe_with(
    recognizer: WhisperRecognizer, audio: np.ndarray, *, language: str | None = None, stream_id: str = "file"
) -> tuple[list[Transcript], dict[str, Any]]:
    """:func:`transcribe_audio` on a loaded recognizer that is not started (its cycles run here)."""
    finals: list[Transcript] = []
    started = time.monotonic()
    drain = recognizer.scheduler.drain
    stream = recognizer.open_stream(
        stream_id, language=language, on_transcript=lambda t: finals.append(t) if t.final and t.text else None
    )
    chunk = int(CHUNK_S * SAMPLE_RATE)
    labelled = recognizer.diarizer.name != "none"
    try:
        for i in range(0, len(audio), chunk):
            stream.feed(audio[i : i + chunk])
            await asyncio.to_thread(drain)
            while labelled and _diarizer_lag(stream) > DIARIZER_AHEAD_S:  # noqa: ASYNC110 - polling another thread
                await asyncio.sleep(0.01)
        finishing = asyncio.ensure_future(stream.finish())
        await asyncio.sleep(0)  # the stream is marked finishing
        await asyncio.to_thread(drain)
        await finishing
    except BaseException:
        stream.close()
        raise
    elapsed = time.monotonic() - started
    engine = recognizer.scheduler.engines[stream.model]
    info = engine.info
    facts = {
        "model": info.model,
        "device": info.device,
        "compute_type": info.compute_type,
        "language": stream.language,
        "duration_s": round(len(audio) / SAMPLE_RATE, 3),
        "elapsed_s": round(elapsed, 3),
        "real_time_factor": round(elapsed / max(len(audio) / SAMPLE_RATE, 1e-9), 4),
    }
    return finals, facts


def keyword_events(finals: list[Transcript], settings: Settings) -> list[dict[str, Any]]:
    """The events the daemon would fire for these finals (each at most once, like one customer)."""
    from edgevoice.events.keywords import KeywordMatcher

    matcher = KeywordMatcher(settings.keywords)
    fired: list[dict[str, Any]] = []
    seen: set[str] = set()
    for t in finals:
        for event in matcher.match(t.text, t.language):
            if event not in seen:
                seen.add(event)
                fired.append({"event": event, "at": t.start, "segment": t.segment, "text": t.text})
    return fired


def _clock(seconds: float) -> str:
    m, s = divmod(seconds, 60)
    return f"{int(m):02d}:{s:05.2f}"


def cmd_transcribe(args: argparse.Namespace) -> int:
    settings = load_settings(getattr(args, "config", None))
    if args.model:
        settings = settings.model_copy(update={"asr": settings.asr.model_copy(update={"model": args.model})})
    path = Path(args.file)
    try:
        audio = read_audio(path)
    except AudioFileError as exc:
        print(f"edgevoice: {exc}", file=sys.stderr)
        return 2
    from edgevoice.modelstore import ModelError
    from edgevoice.recognition.diarization import DiarizationError
    from edgevoice.recognition.engine import EngineError

    try:
        finals, facts = asyncio.run(transcribe_audio(audio, settings, language=args.language))
    except (ValueError, ModelError, EngineError, DiarizationError) as exc:
        print(f"edgevoice: {exc}", file=sys.stderr)
        return 2
    events = keyword_events(finals, settings)
    if args.json:
        out = {
            "file": str(path),
            **facts,
            "segments": [
                {
                    "start": t.start,
                    "end": t.end,
                    "speaker": t.speaker,
                    "text": t.text,
                    "words": [{"text": w.text, "start": w.start, "end": w.end} for w in t.words],
                }
                for t in finals
            ],
            "events": events,
        }
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return 0
    by_segment: dict[int, list[str]] = {}
    for e in events:
        by_segment.setdefault(e["segment"], []).append(e["event"])
    for t in finals:
        print(f"[{_clock(t.start)} -> {_clock(t.end)}] {t.speaker}: {t.text}")
        for event in by_segment.pop(t.segment, []):
            print(f"    -> keyword event {event}")
    print(
        f"# {facts['duration_s']:.1f} s of audio in {facts['elapsed_s']:.1f} s "
        f"({facts['model']}, {facts['device']}, {facts['compute_type']}, language {facts['language'] or 'auto'})",
        file=sys.stderr,
    )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "transcribe", help="run an audio file through the streaming recognizer; print segments and keyword events"
    )
    p.add_argument("file", metavar="FILE.wav", help="audio file (WAV; any rate and channel count)")
    p.add_argument("--json", action="store_true", help="print JSON (segments with word timestamps, events)")
    p.add_argument("--language", help="language code (default: asr.language)")
    p.add_argument("--model", help="model name or directory (default: asr.model)")
    p.set_defaults(func=cmd_transcribe)
