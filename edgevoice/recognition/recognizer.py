"""The shared recognizer: the engines, one inference thread, many streams.

Models: ``asr.model`` serves every stream whose language it speaks; when it is
English-only (``tiny.en``), ``asr.multilingual_model`` (``base``) is loaded beside it
and serves the other languages, behind the same scheduler (one thread, one batch per
model per cycle). English streams are decoded exactly as they would be alone.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from edgevoice.config import AsrSettings, DiarizationSettings
from edgevoice.errors import IDENTIFIER_RULE, BadIdentifier, BadLanguage, DuplicateStream, is_identifier
from edgevoice.metrics import Metrics
from edgevoice.recognition.diarization import Diarizer, build_diarizer
from edgevoice.recognition.engine import Engine, EngineError, language_code
from edgevoice.recognition.scheduler import Scheduler
from edgevoice.recognition.stream import Stream
from edgevoice.recognition.types import FinalCheck, TranscriptCallback

log = logging.getLogger(__name__)


class WhisperRecognizer:
    """Implements :class:`~edgevoice.recognition.types.Recognizer` on faster-whisper."""

    def __init__(
        self,
        engine: Engine,
        settings: AsrSettings,
        metrics: Metrics,
        diarizer: Diarizer,
        multilingual: Engine | None = None,
    ) -> None:
        self.engine = engine
        """The main model (asr.model)."""
        self.multilingual = multilingual
        """The model for languages the main one does not speak (asr.multilingual_model), if loaded."""
        self.settings = settings
        self.metrics = metrics
        self.diarizer = diarizer
        engines = {engine.info.model: engine}
        if multilingual is not None:
            engines[multilingual.info.model] = multilingual
        self.scheduler = Scheduler(engines, settings, metrics)

    @classmethod
    def load(
        cls,
        settings: AsrSettings,
        models_dir: Path,
        metrics: Metrics,
        diarization: DiarizationSettings | None = None,
    ) -> WhisperRecognizer:
        """Load the models and the diarizer (blocking: call it off the event loop); not started yet."""
        engine = Engine.load(settings, models_dir)
        multilingual = None
        if not engine.info.multilingual and settings.multilingual_model:
            multilingual = Engine.load(settings, models_dir, settings.multilingual_model, settings.multilingual_window)
            if not multilingual.info.multilingual:
                raise EngineError(
                    f"asr.multilingual_model = {settings.multilingual_model!r} is English-only; name a multilingual model"
                )
        diarizer = build_diarizer(diarization or DiarizationSettings(), metrics, models_dir=models_dir)
        return cls(engine, settings, metrics, diarizer, multilingual)

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        """Stop the inference thread (blocking)."""
        self.scheduler.stop()

    def engine_for(self, language: str | None) -> tuple[Engine, str | None]:
        """The engine that decodes ``language`` and the code it decodes it as; BadLanguage names what is wrong."""
        requested = language or self.settings.language
        engine = self.engine
        if (
            requested is not None
            and self.multilingual is not None
            and language_code(requested) not in self.engine.languages
        ):
            engine = self.multilingual
        try:
            return engine, engine.check_language(requested)
        except ValueError as exc:
            raise BadLanguage(str(exc)) from None

    def open_stream(self, stream_id: str, *, language: str | None, on_transcript: TranscriptCallback) -> Stream:
        """Start recognizing a stream; call on the event loop. Raises BadIdentifier, BadLanguage, DuplicateStream."""
        if not is_identifier(stream_id):
            raise BadIdentifier(f"stream id {stream_id!r}: use {IDENTIFIER_RULE}")
        engine, lang = self.engine_for(language)
        stream = Stream(
            stream_id,
            lang,
            on_transcript,
            asyncio.get_running_loop(),
            self.settings,
            self.scheduler.wake,
            model=engine.info.model,
        )
        stream.diarizer_factory = lambda: self.diarizer.open_stream(stream_id)
        try:
            self.scheduler.add(stream)
        except ValueError as exc:  # the scheduler still holds a stream of this id
            raise DuplicateStream(str(exc)) from None
        return stream

    def check_finals(self, check: FinalCheck | None) -> None:
        """Finals that ``check`` doubts are decided by a vote of full-window views (see engine)."""
        for engine in self.scheduler.engines.values():
            engine.check = check

    @property
    def alive(self) -> bool:
        return self.scheduler.alive

    def health(self) -> dict[str, Any]:
        """The ``asr`` section of /health."""
        info = self.engine.info
        streams = self.scheduler.streams()
        engines = list(self.scheduler.engines.values())
        return {
            "model": info.model,
            "multilingual_model": self.multilingual.info.model if self.multilingual else None,
            "device": info.device,
            "compute_type": info.compute_type,
            "multilingual": info.multilingual,
            "window": info.window,
            "multilingual_window": self.multilingual.info.window if self.multilingual else None,
            "beam_size": self.settings.beam_size,
            "diarization": self.diarizer.name,
            "alive": self.alive,
            "streams": len(streams),
            "max_lag_s": round(max((s.lag_s for s in streams), default=0.0), 3),
            "batches": self.scheduler.batches,
            "partials_skipped": self.scheduler.partials_skipped,
            "decoded": sum(e.decoded for e in engines),
            "full_windows": sum(e.full_windows for e in engines),
            "window_retries": sum(e.window_retries for e in engines),
            "check_retries": sum(e.check_retries for e in engines),
            "continuations": sum(e.continuations for e in engines),
            "errors": self.scheduler.errors,
        }
