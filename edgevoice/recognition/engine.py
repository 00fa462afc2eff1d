"""The shared Whisper model and its batched decode (CTranslate2 through faster-whisper).

One :class:`Engine` per daemon. :meth:`Engine.decode` takes the audio windows of
many streams at once and runs ONE encoder call, ONE ``generate`` call and ONE
alignment call per language for all of them: the encoder dominates the cost, and
batching is what shares it. It is blocking and not thread-safe: only the
recognizer's inference thread calls it.

Window: Whisper was trained on 30 s windows, and faster-whisper always encodes one
(about 0.2 s for tiny.en, 0.4 s for base on this CPU, whatever the audio length).
CTranslate2 also accepts a shorter mel input: a request with ``full=False`` is
encoded in a window fitted to it (rounded up to 4, 8 or 16 s, +1 s), 5-25x cheaper
but slightly less accurate on short phrases; the scheduler decides which requests
get the full window (``asr.window``). A fitted window occasionally makes the decoder
loop; such a final is decoded again in the full window (``window_retries``), and a
repetition that survives is cut to its first copy. Decoding is greedy unless
``beam_size`` > 1, at temperature 0 with no fallback (the fallback multiplies the
cost on noise and is what invents text).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgevoice import modelstore as models
from edgevoice.config import AsrSettings
from edgevoice.recognition.types import SAMPLE_RATE

log = logging.getLogger(__name__)

HOP = 160
"""Audio samples per mel frame."""
FULL_FRAMES = 3000
"""Mel frames of Whisper's native 30 s window."""
FIT_BUCKETS_S = (4, 8, 16)
"""Window lengths that share an encoder call in the fit window (longer ones go together up to 30 s)."""
ATTENTION_BUDGET_WINDOWS = 4
"""Most full 30 s windows per encoder call (about 55 MB of attention each for tiny, 75 MB for base); shorter
windows get proportionally more. Bounds the memory of a call whatever the batch."""
MAX_TOKENS_PER_S = 12
"""Generated tokens allowed per second of audio (speech rarely exceeds ~8); more means a loop."""
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
"""Whisper's own rule: no_speech_prob above AND mean log-probability below -> nothing was said."""
SURE_NO_SPEECH = 0.85
"""no_speech_prob above which the text is dropped whatever its probability (tiny.en says "you" on silence at 0.99)."""
_PREPEND = "\"'“¿([{-"
_APPEND = "\"'.。,，!！?？:：”)]}、"


class EngineError(Exception):
    """The model cannot be loaded or a request is invalid."""


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    """One window of one stream."""

    audio: np.ndarray
    """16 kHz mono float32, at most 30 s."""
    language: str | None
    """Language code; None detects it (multilingual models only)."""
    beam_size: int = 1
    retry: bool = True
    """Decode again in the full window when the short one loops (finals); partials just cut the loop."""
    words: bool = True
    """Compute word timestamps (an alignment pass, about a quarter of the cost of a short window)."""
    full: bool = False
    """Encode Whisper's full 30 s window instead of one fitted to the audio."""


@dataclass(frozen=True, slots=True)
class DecodedWord:
    text: str
    """The word as Whisper spells it, leading space included."""
    start: float
    """Seconds from the start of the request's audio."""
    end: float
    probability: float


@dataclass(slots=True)
class Decoded:
    """What one request produced; empty ``text`` means nothing was said."""

    text: str
    words: list[DecodedWord] = field(default_factory=list)
    language: str | None = None
    no_speech_prob: float = 0.0
    avg_logprob: float = 0.0
    retried: bool = False
    tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    model: str
    path: str
    device: str
    compute_type: str
    multilingual: bool
    load_s: float


def pick_device(configured: str) -> str:
    """``cuda`` when configured, or when ``auto`` and CTranslate2 sees a GPU; else ``cpu``."""
    if configured != "auto":
        return configured
    import ctranslate2

    try:
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    except Exception:  # pragma: no cover - broken CUDA runtime
        return "cpu"


def pick_compute_type(configured: str, device: str) -> str:
    """The quantization: ``int8`` on CPU and ``int8_float16`` on CUDA unless configured."""
    if configured != "auto":
        return configured
    return "int8_float16" if device == "cuda" else "int8"


def _per_call(window_s: float) -> int:
    """Windows per encoder call: self-attention memory grows with the square of the window length."""
    return max(1, int(ATTENTION_BUDGET_WINDOWS * (30 / window_s) ** 2))


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _tandem(tokens: list[int], accept: Callable[[int, int], bool], max_period: int = 40) -> int | None:
    """End of the first copy of the first phrase repeated back to back that ``accept(period, copies)``."""
    n = len(tokens)
    for i in range(n):
        for period in range(1, min(max_period, (n - i) // 2) + 1):
            unit = tokens[i : i + period]
            copies = 1
            while tokens[i + copies * period : i + (copies + 1) * period] == unit:
                copies += 1
            if copies > 1 and accept(period, copies):
                return i + period
    return None


def _is_loop(period: int, copies: int) -> bool:
    return copies >= (2 if period >= 4 else 4)


def _is_suspect(period: int, copies: int) -> bool:
    return copies >= (2 if period >= 2 else 3)


def repetition_cut(tokens: list[int]) -> list[int] | None:
    """The tokens up to the end of the first copy of a decoder loop, or None when there is no loop.

    A loop is a phrase immediately repeated: twice for phrases of 4+ tokens, 4 times for shorter
    ones (people do say "no, no, no"). Whisper's loops are far longer than either.
    """
    end = _tandem(tokens, _is_loop)
    return None if end is None else tokens[:end]


def looks_looped(tokens: list[int]) -> bool:
    """A loop, a phrase of 2+ tokens said twice in a row or a token three times: worth a second decode
    in the full window (Whisper repeats itself in short windows: "Xin thôi thôi mỗi")."""
    return _tandem(tokens, _is_suspect) is not None


class Engine:
    """A loaded Whisper model and its batched decode."""

    def __init__(self, model: object, info: EngineInfo, settings: AsrSettings) -> None:
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        self.model = model
        self.info = info
        self.settings = settings
        self.languages: frozenset[str] = frozenset(_LANGUAGE_CODES) if info.multilingual else frozenset({"en"})
        self._tokenizers: dict[str, object] = {}
        self._suppress: tuple[int, ...] | None = None
        self.window_retries = 0
        """Items decoded again in the full window after looping in a short one."""
        self.full_windows = 0
        """Windows decoded in the full 30 s window (requested or retried)."""
        self.full_window_s = 0.0
        """Seconds one full-window decode takes here (moving average; measured at load, then as it runs)."""

    @classmethod
    def load(cls, settings: AsrSettings, models_dir: Path) -> Engine:
        """Resolve, verify and load the configured model (blocking: call it off the event loop)."""
        from faster_whisper import WhisperModel

        started = time.monotonic()
        path = models.resolve(settings.model, models_dir)
        device = pick_device(settings.device)
        compute = pick_compute_type(settings.compute_type, device)
        if not (path / "tokenizer.json").is_file():
            # faster-whisper would fetch one from the Hugging Face hub: never at run time.
            raise EngineError(f"model {settings.model!r} at {path}: tokenizer.json is missing")
        try:
            model = WhisperModel(
                str(path),
                device=device,
                device_index=settings.device_index,
                compute_type=compute,
                cpu_threads=settings.cpu_threads,
                local_files_only=True,
            )
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"model {settings.model!r} ({device}, {compute}): cannot load it: {exc}") from exc
        info = EngineInfo(
            model=settings.model,
            path=str(path),
            device=device,
            compute_type=compute,
            multilingual=bool(model.model.is_multilingual),
            load_s=time.monotonic() - started,
        )
        engine = cls(model, info, settings)
        engine.warm_up()
        log.info(
            "model %s loaded from %s (%s, %s) in %.2f s; a full-window decode takes %.2f s",
            info.model,
            path,
            device,
            compute,
            time.monotonic() - started,
            engine.full_window_s,
        )
        return engine

    def _full_cost(self, seconds: float, items: int) -> None:
        self.full_windows += items
        per_item = seconds / max(1, items)
        self.full_window_s = per_item if not self.full_window_s else 0.7 * self.full_window_s + 0.3 * per_item

    def warm_up(self) -> None:
        """One full-window decode of silence: first-call set-up cost paid at start-up, and its cost measured."""
        language = "en" if not self.info.multilingual else (self.settings.language or "en")
        request = DecodeRequest(np.zeros(SAMPLE_RATE, dtype=np.float32), language, full=True, words=True)
        self.decode([request])  # the first call pays one-off set-up costs
        self.full_window_s = 0.0
        self.full_windows = 0
        self.decode([request])

    # -- language ---------------------------------------------------------------------------------

    def check_language(self, language: str | None) -> str | None:
        """The language code a stream decodes in, or None to detect it; ValueError names what is wrong."""
        if language is not None:
            code = language.replace("_", "-").split("-")[0].lower()
            if code not in self.languages:
                if not self.info.multilingual:
                    raise ValueError(
                        f"language {language!r}: model {self.info.model!r} is English-only; "
                        'set asr.model = "base" (multilingual) for other languages'
                    )
                raise ValueError(f"language {language!r}: not a language Whisper knows")
            return code
        if not self.info.multilingual:
            return "en"
        return None if self.settings.detect_language else "en"

    def _tokenizer(self, language: str) -> object:
        tok = self._tokenizers.get(language)
        if tok is None:
            from faster_whisper.tokenizer import Tokenizer

            tok = Tokenizer(self.model.hf_tokenizer, self.info.multilingual, task="transcribe", language=language)
            self._tokenizers[language] = tok
        return tok

    # -- decode -----------------------------------------------------------------------------------

    def decode(self, requests: list[DecodeRequest], max_retries: int | None = None) -> list[Decoded]:
        """Decode every request, batched; results in request order.

        At most ``max_retries`` looping items (in request order) are decoded again in the full
        window; the loops of the others are cut.
        """
        retries_left = len(requests) if max_retries is None else max_retries
        results: list[Decoded | None] = [None] * len(requests)
        groups: dict[tuple[str | None, int, bool, int], list[int]] = {}
        for i, r in enumerate(requests):
            if len(r.audio) == 0:
                results[i] = Decoded("", language=r.language)
                continue
            # Fitted windows of different lengths go in separate calls (padding costs compute).
            fit = next((b for b in FIT_BUCKETS_S if len(r.audio) / SAMPLE_RATE + 1 <= b), 30)
            groups.setdefault((r.language, r.beam_size, r.full, 30 if r.full else fit), []).append(i)
        for (language, beam, full, bucket), members in groups.items():
            for idx in _chunks(members, _per_call(bucket)):
                started = time.monotonic()
                out = self._decode_group([requests[i] for i in idx], language, beam, full=full)
                if full:
                    self._full_cost(time.monotonic() - started, len(idx))
                retry = (
                    [k for k, (_, looped) in enumerate(out) if looped and requests[idx[k]].retry] if not full else []
                )
                retry = retry[: max(0, retries_left)]
                retries_left -= len(retry)
                for k in retry:
                    log.debug("window retry: %r looped in a fitted window", out[k][0].text)
                for part in _chunks(retry, _per_call(30)):
                    self.window_retries += len(part)
                    started = time.monotonic()
                    again = self._decode_group([requests[idx[k]] for k in part], language, beam, full=True)
                    self._full_cost(time.monotonic() - started, len(part))
                    for k, res in zip(part, again, strict=True):
                        res[0].retried = True
                        out[k] = res
                for k, (res, _) in enumerate(out):
                    results[idx[k]] = res
        return [r if r is not None else Decoded("") for r in results]

    def _features(self, audios: list[np.ndarray], full: bool) -> tuple[np.ndarray, list[int]]:
        longest = max(len(a) for a in audios)
        frames = FULL_FRAMES if full else min(FULL_FRAMES, math.ceil(longest / SAMPLE_RATE + 1.0) * 100)
        n = frames * HOP
        feats = []
        for a in audios:
            padded = np.zeros(n, dtype=np.float32)
            padded[: min(len(a), n)] = a[:n]
            feats.append(self.model.feature_extractor(padded)[:, :frames])
        num_frames = [max(1, min(frames, len(a) // HOP)) for a in audios]
        return np.ascontiguousarray(np.stack(feats)), num_frames

    def _decode_group(
        self, requests: list[DecodeRequest], language: str | None, beam: int, *, full: bool
    ) -> list[tuple[Decoded, bool]]:
        from faster_whisper.transcribe import get_ctranslate2_storage, get_suppressed_tokens

        model = self.model
        audios = [r.audio for r in requests]
        feats, num_frames = self._features(audios, full)
        encoded = model.model.encode(get_ctranslate2_storage(feats), to_cpu=False)
        langs: list[str]
        if language is None:
            detected = model.model.detect_language(encoded)
            langs = [d[0][0][2:-2] for d in detected]
        else:
            langs = [language] * len(audios)
        base_tok = self._tokenizer(langs[0])
        if self._suppress is None:
            self._suppress = get_suppressed_tokens(base_tok, [-1])
        prompt_text = self.settings.initial_prompt
        previous = base_tok.encode(" " + prompt_text.strip()) if prompt_text else []
        prompts = [model.get_prompt(self._tokenizer(lang), previous, without_timestamps=True) for lang in langs]
        longest_s = max(len(a) for a in audios) / SAMPLE_RATE
        budget = int(longest_s * MAX_TOKENS_PER_S) + 10
        max_length = min(model.max_length, max(len(p) for p in prompts) + budget)
        raw = model.model.generate(
            encoded,
            prompts,
            beam_size=beam,
            max_length=max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=list(self._suppress),
        )
        out: list[tuple[Decoded, bool]] = []
        token_lists: list[list[int]] = []
        for a, lang, r in zip(audios, langs, raw, strict=True):
            tok = self._tokenizer(lang)
            tokens = [t for t in r.sequences_ids[0] if t < tok.eot]
            seq_len = len(r.sequences_ids[0])
            avg_logprob = r.scores[0] * seq_len / (seq_len + 1)
            allowed = int(len(a) / SAMPLE_RATE * MAX_TOKENS_PER_S) + 10
            cut = repetition_cut(tokens)
            looped = cut is not None or len(tokens) >= allowed or (not full and looks_looped(tokens))
            if cut is not None:
                tokens = cut
            tokens = tokens[:allowed]
            silent = r.no_speech_prob > SURE_NO_SPEECH or (
                r.no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD
            )
            text = "" if silent else tok.decode(tokens).strip()
            if not any(ch.isalnum() for ch in text):
                text, tokens = "", []
            token_lists.append(tokens)
            out.append((Decoded(text, [], lang, float(r.no_speech_prob), float(avg_logprob), tokens=tokens), looped))
        wanted = [tokens if r.words else [] for r, tokens in zip(requests, token_lists, strict=True)]
        self._align(encoded, langs, wanted, num_frames, [d for d, _ in out])
        return out

    def _align(
        self, encoded: object, langs: list[str], tokens: list[list[int]], num_frames: list[int], out: list[Decoded]
    ) -> None:
        """Word timestamps from cross-attention (one align call per language in the batch)."""
        from faster_whisper.transcribe import merge_punctuations

        if not any(tokens):
            return
        for lang in dict.fromkeys(langs):
            idx = [i for i, lg in enumerate(langs) if lg == lang and tokens[i]]
            if not idx:
                continue
            enc = _select(encoded, idx) if len(idx) != len(langs) else encoded
            tok = self._tokenizer(lang)
            texts = [tokens[i] for i in idx]
            alignments = self.model.find_alignment(tok, texts, enc, [num_frames[i] for i in idx])
            for i, alignment in zip(idx, alignments, strict=True):
                if not alignment:
                    continue
                merge_punctuations(alignment, _PREPEND, _APPEND)
                limit = num_frames[i] / 100
                out[i].words = [
                    DecodedWord(
                        w["word"],
                        round(min(float(w["start"]), limit), 3),
                        round(min(float(w["end"]), limit), 3),
                        float(w["probability"]),
                    )
                    for w in alignment
                    if w["word"].strip()
                ]


def _select(encoded: object, idx: list[int]) -> object:
    """Rows ``idx`` of an encoder output (mixed detected languages only)."""
    import ctranslate2

    view = encoded
    if getattr(view, "device", "cpu") != "cpu":
        view = view.to_device(ctranslate2.Device.cpu)
    array = np.asarray(view)[idx]
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(array))
