"""The shared recognizer: one engine, one inference thread, many streams."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from edgevoice.config import AsrSettings, DiarizationSettings
from edgevoice.errors import IDENTIFIER_RULE, BadIdentifier, BadLanguage, DuplicateStream, is_identifier
from edgevoice.metrics import Metrics
from edgevoice.recognition.diarization import Diarizer, build_diarizer
from edgevoice.recognition.engine import Engine
from edgevoice.recognition.scheduler import Scheduler
from edgevoice.recognition.stream import Stream
from edgevoice.recognition.types import TranscriptCallback

log = logging.getLogger(__name__)


class WhisperRecognizer:
    """Implements :class:`~edgevoice.recognition.types.Recognizer` on faster-whisper."""

    def __init__(self, engine: Engine, settings: AsrSettings, metrics: Metrics, diarizer: Diarizer) -> None:
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        self.diarizer = diarizer
        self.scheduler = Scheduler(engine, settings, metrics)

    @classmethod
    def load(
        cls,
        settings: AsrSettings,
        models_dir: Path,
        metrics: Metrics,
        diarization: DiarizationSettings | None = None,
    ) -> WhisperRecognizer:
        """Load the model and the diarizer (blocking: call it off the event loop); not started yet."""
        engine = Engine.load(settings, models_dir)
        diarizer = build_diarizer(diarization or DiarizationSettings(), metrics, models_dir=models_dir)
        return cls(engine, settings, metrics, diarizer)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the inference thread (blocking)."""
        self.scheduler.stop()

    def open_stream(self, stream_id: str, *, language: str | None, on_transcript: TranscriptCallback) -> Stream:
        """Start recognizing a stream; call on the event loop. Raises BadIdentifier, BadLanguage, DuplicateStream."""
        if not is_identifier(stream_id):
            raise BadIdentifier(f"stream id {stream_id!r}: use {IDENTIFIER_RULE}")
        try:
            lang = self.engine.check_language(language or self.settings.language)
        except ValueError as exc:
            raise BadLanguage(str(exc)) from None
        stream = Stream(
            stream_id,
            lang,
            on_transcript,
            asyncio.get_running_loop(),
            self.settings,
            self.scheduler.wake,
        )
        stream.diarizer_factory = lambda: self.diarizer.open_stream(stream_id)
        try:
            self.scheduler.add(stream)
        except ValueError as exc:  # the scheduler still holds a stream of this id
            raise DuplicateStream(str(exc)) from None
        return stream

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    def health(self) -> dict[str, Any]:
        """The ``asr`` section of /health."""
        info = self.engine.info
        streams = self.scheduler.streams()
        return {
            "model": info.model,
            "device": info.device,
            "compute_type": info.compute_type,
            "multilingual": info.multilingual,
            "window": self.settings.window,
            "diarization": self.diarizer.name,
            "alive": self.alive,
            "streams": len(streams),
            "max_lag_s": round(max((s.lag_s for s in streams), default=0.0), 3),
            "batches": self.scheduler.batches,
            "partials_skipped": self.scheduler.partials_skipped,
            "full_windows": self.engine.full_windows,
            "full_window_s": round(self.engine.full_window_s, 3),
            "window_retries": self.engine.window_retries,
            "errors": self.scheduler.errors,
        }
