"""The shared Whisper model and its batched decode (CTranslate2 through faster-whisper).

One :class:`Engine` per model. :meth:`Engine.decode` takes the audio of many streams
at once and batches it: encoder calls group requests of the same window length, then
ONE ``generate`` call per language and beam width and ONE alignment call per language
decode them all. It is blocking and not thread-safe: only the recognizer's inference
thread calls it.

The window, and why it is cheap. Whisper was trained on 30 s windows: audio, then
silence up to 30 s. Its decoder is only reliable when it sees that picture (a window
fitted to the audio makes it loop and drop words). Encoding the silent part is most of
the cost of a short utterance, and the encoder output of silence is the same for every
request. So (``asr.window = "shared"``, the default) each request is encoded in a
window fitted to its audio plus ``FIT_PAD_S`` of silence, rounded up to ``BUCKET_S``,
and it is followed by ``SHARED_TAIL_S`` of the encoder output of silence (up to 30 s in
all), computed once at start-up and shared by every decode. Silence is padded as
offline faster-whisper pads: zeros in the log-mel features. The multilingual model
decodes in the full window by default (``asr.multilingual_window``: on ``base`` the
shared one was measured to cost words). The decoder sees Whisper's
picture (speech, then seconds of silence); the encoder only computes the speech. Every
request is decoded on its own encoder output: nothing of one stream can appear in
another's text.

Verification: a decode that loops (a phrase repeated), runs past ``MAX_TOKENS_PER_S``,
leaves the end of the VAD's speech without words, or is empty on clear speech is
decoded again in the true full 30 s window (``verify``; counted in ``window_retries``),
whatever the load: at once, or, when the request asks to ``defer`` (the scheduler's finals), by the caller
(:attr:`Decoded.unverified`; decoded again with ``full_window`` in a batch of its own, so that one stream's
second look holds no other stream's final). A repetition that survives is cut to its first copy. Decoding is at
temperature 0 with no fallback (the fallback multiplies the cost on noise and is what
invents text).

The final check (:attr:`Engine.check`, the keyword rules) sees every final's text and
its other beam hypotheses, in either window. A final it doubts (a keyword among the
other hypotheses, or a near miss of one) sits on a decision boundary: tiny.en's text of
such a clip flips when its start moves by 256 samples (docs/benchmarks.md). So it is
decided by a vote, not by one alignment: ``VIEWS`` full-window decodes of the same
audio, the plain one and ones padded with silence as offline faster-whisper's VAD
chunks are, at seven phases of the mel hop (``VIEW_LEADS``, ``VIEW_TAIL_S``); the events
most of them fire win, and the text of a view that fires them stands (the plain one's if
it is among them, else the likeliest). The check never fires an event by itself: views
of the same audio do, and only by majority. A doubted final comes back
:attr:`Decoded.doubted` and is decoded again with ``review`` (the scheduler does it in a
batch of its own, so the other finals of its batch are not held). A review runs in
``REVIEW_STAGES``: when the first stage's four views agree they are a majority of the
seven and the vote is decided; otherwise it comes back doubted again, with the views so
far, and the scheduler runs the second stage after the finals that came meanwhile. The
outcome is that of all ``VIEWS`` voting; it costs four or seven full-window decodes
(counted in ``check_retries``; they are rare: a few in a thousand finals).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgevoice import modelstore as models
from edgevoice.config import AsrSettings
from edgevoice.recognition.types import SAMPLE_RATE, FinalCheck

log = logging.getLogger(__name__)

HOP = 160
"""Audio samples per mel frame."""
FULL_FRAMES = 3000
"""Mel frames of Whisper's native 30 s window (the encoder halves them)."""
FIT_PAD_S = 1.0
"""Silence encoded after the audio in a shared window (the encoder sees where the speech ends)."""
SHARED_TAIL_S = 10.0
"""Silence after the audio in a shared window, up to 30 s in all (the decoder attends to every frame: shorter
is cheaper, but windows of 10/20/30 s with 5 s of silence were measured to cost words on long turns)."""
BUCKET_S = 2
"""Encoded lengths are rounded up to a multiple of this: requests of one length share an encoder call,
and a request's encoder input depends on its own audio only, never on what it is batched with."""
ENCODE_BUDGET_S = 120.0
"""Most seconds of audio per encoder call (attention memory grows with the square of the window)."""
GENERATE_BATCH = 16
"""Most requests per generate call."""
MAX_TOKENS_PER_S = 12
"""Generated tokens allowed per second of audio (speech rarely exceeds ~8); more means a loop."""
NO_SPEECH_THRESHOLD = 0.6
LOGPROB_THRESHOLD = -1.0
"""Whisper's own rule: no_speech_prob above AND mean log-probability below -> nothing was said."""
SURE_NO_SPEECH = 0.85
"""no_speech_prob above which the text is dropped whatever its probability (tiny.en says "you" on silence at
0.99), unless the VAD heard CLEAR_SPEECH_S of speech in it (base is that sure of no speech on short real phrases)."""
CLEAR_SPEECH_S = 1.0
UNCOVERED_S = 1.0
"""Speech (by the VAD) this long after the last decoded word means the decoder stopped early: it goes on."""
MAX_CONTINUATIONS = 3
"""Most times a decode that stopped before the speech did is continued from its last word."""
PREVIOUS_CHARS = 200
"""Text a continuation is conditioned on."""
EMPTY_SPEECH_S = 1.0
"""An empty decode of at least this much VAD speech is verified in the full window."""
VIEW_TAIL_S = 0.2
"""Silence a padded view of a doubted final adds after it (with the stream's 0.2 s pad: offline's 0.4 s)."""
PADDED_VIEWS = 6
VIEWS = 1 + PADDED_VIEWS
VIEW_LEADS = tuple(k * SAMPLE_RATE // 10 + round((k + 1) * HOP / VIEWS) for k in range(PADDED_VIEWS))
"""Samples of silence each padded view adds before the final's audio: 0, 0.1, ... 0.5 s (its pre-roll then
spans 0.38-0.88 s about offline's 0.4 s), each plus a seventh more of the mel hop than the last (23 ... 137
samples), so that the seven views see the audio at seven phases of the hop: views at whole multiples of the
hop see the same mel frames shifted, and agree with the plain view more than other cuts of the same audio
do. The plain full window and these make the ``VIEWS`` that vote on a doubted final."""
REVIEW_STAGES = ((0, 1, 3, 5), (2, 4, 6))
"""The views (0 the plain one, i the one padded with ``VIEW_LEADS[i - 1]``) each stage of a review decodes:
four that agree are a majority of ``VIEWS``, and then the second stage cannot change the outcome."""
_PREPEND = "\"'“¿([{-"
_APPEND = "\"'.。,，!！?？:：”)]}、"


class EngineError(Exception):
    """The model cannot be loaded or a request is invalid."""


@dataclass(frozen=True, slots=True)
class DecodeRequest:
    """One piece of audio of one stream."""

    audio: np.ndarray
    """16 kHz mono float32, at most 30 s."""
    language: str | None
    """Language code; None detects it (multilingual models only)."""
    beam_size: int = 1
    verify: bool = True
    """Decode again in the full window when the shared-window decode looks wrong (finals)."""
    words: bool = True
    """Compute word timestamps (an alignment pass)."""
    speech_s: float = 0.0
    """Seconds of VAD speech in ``audio`` (0: unknown; verification then skips the speech checks)."""
    speech_end_s: float | None = None
    """Where the VAD's last speech ends in ``audio``: a decode whose words stop well before it is continued
    from its last word (with ``words``); None: never continued."""
    previous: str = ""
    """Text said just before ``audio`` in the same utterance (the decoder is conditioned on it)."""
    review: bool = False
    """A final the check doubted (its :attr:`Decoded.doubted`): decode its ``VIEWS`` and let them vote."""
    first: Decoded | None = None
    """With ``review``: the decode the check doubted (a full-window engine's is its plain view)."""
    defer: bool = False
    """With ``verify``: a decode that fails verification comes back :attr:`Decoded.unverified` instead of being
    decoded again at once; the caller decodes the request again with ``full_window`` (the scheduler does, in a
    batch of its own, so that one stream's second look holds no other stream's final)."""
    full_window: bool = False
    """Decode in the true 30 s window and verify no more: the second look of a deferred verification."""


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
    """Decoded again in the full window: it failed verification, or its views voted on a doubted final."""
    tokens: list[int] = field(default_factory=list)
    doubted: bool = False
    """The final check doubted this final: it is not the text yet; decode the request again with ``review``
    (the caller does, in a batch of its own, so that a doubt does not hold other streams' finals), with this
    as ``first``, until it comes back without the flag."""
    views: list[View] = field(default_factory=list)
    """With ``doubted``: the views of its review decoded so far (empty before the first stage)."""
    unverified: bool = False
    """It failed verification and its request asked to ``defer``: not its text yet; decode the request again
    with ``full_window``."""


@dataclass(slots=True)
class View:
    """One view of a doubted final's review: which (see ``REVIEW_STAGES``), its decode and the events it fires."""

    index: int
    result: Decoded
    fired: frozenset[str]

    @property
    def lead(self) -> float:
        """Silence the view added before the final's audio."""
        return VIEW_LEADS[self.index - 1] / SAMPLE_RATE if self.index else 0.0


@dataclass(frozen=True, slots=True)
class EngineInfo:
    model: str
    path: str
    device: str
    compute_type: str
    multilingual: bool
    load_s: float
    window: str = "shared"
    """The encoder window this engine decodes in (asr.window or asr.multilingual_window)."""


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


def encoded_frames(samples: int, full: bool) -> int:
    """Mel frames a request of ``samples`` is encoded in (a function of its length alone)."""
    if full:
        return FULL_FRAMES
    seconds = math.ceil((samples / SAMPLE_RATE + FIT_PAD_S) / BUCKET_S) * BUCKET_S
    return min(FULL_FRAMES, seconds * 100)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass(slots=True)
class _Work:
    """One request on its way through encode, generate, verify and align."""

    request: DecodeRequest
    frames: int = 0
    encoded: np.ndarray | None = None
    """Encoder output, always 1500 frames (the shared tail spliced on)."""
    result: Decoded | None = None
    suspect: str = ""
    """Why verification wants a full-window decode (empty: it does not)."""
    doubted: bool = False
    """The suspicion is the final check's."""
    retried: bool = False


class Engine:
    """A loaded Whisper model and its batched decode."""

    def __init__(self, model: Any, info: EngineInfo, settings: AsrSettings) -> None:
        from faster_whisper.tokenizer import _LANGUAGE_CODES

        self.model = model
        self.info = info
        self.settings = settings
        self.languages: frozenset[str] = frozenset(_LANGUAGE_CODES) if info.multilingual else frozenset({"en"})
        self._tokenizers: dict[str, Any] = {}
        self._suppress: list[int] | None = None
        self._silence: np.ndarray | None = None
        """Encoder output of a silent 30 s window: the shared tail of every shared window."""
        self.check: FinalCheck | None = None
        """Doubts finals from their text and beam, and names the events of a text (the keyword rules)."""
        self.window_retries = 0
        """Requests decoded again in the full window after failing verification."""
        self.check_retries = 0
        """Of those, requests the final check doubted."""
        self.full_windows = 0
        """Requests encoded in the full 30 s window (asr.window = "full", or retried)."""
        self.decoded = 0
        """Requests decoded."""
        self.continuations = 0
        """Decodes continued after the decoder stopped before the speech did."""
        self.encoded_s = 0.0
        """Seconds of audio window encoded (the encoder's work)."""

    @classmethod
    def load(
        cls, settings: AsrSettings, models_dir: Path, model: str | None = None, window: str | None = None
    ) -> Engine:
        """Resolve, verify and load ``model`` (default ``asr.model``, decoded in ``window``, default
        ``asr.window``); blocking: call it off the event loop."""
        from faster_whisper import WhisperModel

        name = model or settings.model
        started = time.monotonic()
        path = models.resolve(name, models_dir)
        device = pick_device(settings.device)
        compute = pick_compute_type(settings.compute_type, device)
        if not (path / "tokenizer.json").is_file():
            # faster-whisper would fetch one from the Hugging Face hub: never at run time.
            raise EngineError(f"model {name!r} at {path}: tokenizer.json is missing")
        try:
            whisper = WhisperModel(
                str(path),
                device=device,
                device_index=settings.device_index,
                compute_type=compute,
                cpu_threads=settings.cpu_threads,
                local_files_only=True,
            )
        except (RuntimeError, ValueError) as exc:
            raise EngineError(f"model {name!r} ({device}, {compute}): cannot load it: {exc}") from exc
        info = EngineInfo(
            model=name,
            path=str(path),
            device=device,
            compute_type=compute,
            multilingual=bool(whisper.model.is_multilingual),
            load_s=time.monotonic() - started,
            window=window or settings.window,
        )
        engine = cls(whisper, info, settings)
        engine.warm_up()
        log.info(
            "model %s loaded from %s (%s, %s, window %s) in %.2f s",
            info.model,
            path,
            device,
            compute,
            info.window,
            time.monotonic() - started,
        )
        return engine

    def warm_up(self) -> None:
        """Encode the shared silent window, then decode once (first-call set-up costs paid at start-up)."""
        feats = self._features([np.zeros(0, dtype=np.float32)], FULL_FRAMES)
        self._silence = self._encode(feats)[0]
        language = "en" if not self.info.multilingual else (self.settings.language or "en")
        self.decode([DecodeRequest(np.zeros(SAMPLE_RATE, dtype=np.float32), language, words=True)])
        self.window_retries = self.check_retries = self.full_windows = self.decoded = self.continuations = 0
        self.encoded_s = 0.0

    # -- language ---------------------------------------------------------------------------------

    def check_language(self, language: str | None) -> str | None:
        """The language code a stream decodes in, or None to detect it; ValueError names what is wrong."""
        if language is not None:
            code = language_code(language)
            if code not in self.languages:
                if not self.info.multilingual:
                    raise ValueError(
                        f"language {language!r}: model {self.info.model!r} is English-only; "
                        'set asr.multilingual_model (e.g. "base") for other languages'
                    )
                raise ValueError(f"language {language!r}: not a language Whisper knows")
            return code
        if not self.info.multilingual:
            return "en"
        return None if self.settings.detect_language else "en"

    def _tokenizer(self, language: str) -> Any:
        tok = self._tokenizers.get(language)
        if tok is None:
            from faster_whisper.tokenizer import Tokenizer

            tok = Tokenizer(self.model.hf_tokenizer, self.info.multilingual, task="transcribe", language=language)
            self._tokenizers[language] = tok
        return tok

    # -- decode -----------------------------------------------------------------------------------

    def decode(self, requests: Sequence[DecodeRequest]) -> list[Decoded]:
        """Decode every request, batched and verified; results in request order. A final the check
        doubts comes back :attr:`Decoded.doubted`; decoded again with ``review``, its views vote. One that
        fails verification with ``defer`` comes back :attr:`Decoded.unverified`; decode it with ``full_window``."""
        work = [_Work(r) for r in requests]
        live = [w for w in work if len(w.request.audio)]
        for w in work:
            if not len(w.request.audio):
                w.result = Decoded("", language=w.request.language)
        full = self.info.window == "full"
        reviews = [w for w in live if w.request.review]
        looks = [w for w in live if w.request.full_window and not w.request.review]
        first = [w for w in live if not w.request.review and not w.request.full_window]
        self._run(first, full=full, checked=True)
        suspect = [w for w in first if w.suspect and w.request.verify and not w.doubted and not full]
        for w in suspect:
            when = "later" if w.request.defer else "now"
            log.debug(
                "verify: %s (%r); decoding again in the full window %s", w.suspect, w.result and w.result.text, when
            )
        deferred = [w for w in suspect if w.request.defer]
        again = [w for w in suspect if not w.request.defer] + looks
        stages = [(w, self._stage(w)) for w in reviews]
        for w in again:
            w.retried = True
        started = sum(not self._views_so_far(w) for w in reviews)
        self.window_retries += len(again) + started
        self.check_retries += started
        if again or reviews:
            self._run(again + [v for _, vs in stages for _, v in vs], full=True)
        for w, vs in stages:
            self._tally(w, vs)
            w.retried = True
        for w in first:
            if w.doubted:
                assert w.result is not None
                log.debug("%s (%r): its views will vote", w.suspect, w.result.text)
                w.result.doubted = True
        for w in deferred:
            assert w.result is not None
            w.result.unverified = True
        self._continue([w for w in live if not w.doubted and not (w.result and w.result.unverified)])
        self.decoded += len(first)
        out = []
        for w in work:
            assert w.result is not None
            w.result.retried = w.retried
            out.append(w.result)
        return out

    def _run(self, work: list[_Work], *, full: bool, checked: bool = False) -> None:
        """Encode, generate and align ``work`` (batched); mark what verification should decode again
        (with ``checked``, finals the final check doubts too)."""
        self._encode_all(work, full=full)
        self._generate_all(work, checked=checked)
        self._align_all([w for w in work if w.request.words])
        for w in work:
            w.encoded = None

    @staticmethod
    def _views_so_far(w: _Work) -> list[View]:
        first = w.request.first
        return first.views if first is not None else []

    def _stage(self, w: _Work) -> list[tuple[int, _Work]]:
        """The views of a doubted final its review decodes now (the next of ``REVIEW_STAGES``), by index:
        the request as it is (unless the doubted decode was in the full window), or padded with silence."""
        done = {v.index for v in self._views_so_far(w)}
        if self._plain(w) is not None:
            done.add(0)
        todo = next((s for s in REVIEW_STAGES if not done.issuperset(s)), ())
        r = dataclasses.replace(w.request, verify=False, review=False, first=None)
        tail = np.zeros(int(VIEW_TAIL_S * SAMPLE_RATE), dtype=np.float32)
        views = []
        for i in todo:
            if i in done:
                continue
            if i == 0:
                views.append((0, _Work(r)))
                continue
            lead = np.zeros(VIEW_LEADS[i - 1], dtype=np.float32)
            audio = np.concatenate([lead, r.audio, tail])
            views.append((i, _Work(dataclasses.replace(r, audio=audio, speech_end_s=None))))
        return views

    def _plain(self, w: _Work) -> Decoded | None:
        """The doubted decode of a review when it is the plain full-window view (a full-window engine's)."""
        return w.request.first if self.info.window == "full" else None

    def _fired(self, w: _Work, d: Decoded) -> frozenset[str]:
        check = self.check
        return frozenset(check.match(d.text, d.language or w.request.language) if check else ())

    def _tally(self, w: _Work, stage: list[tuple[int, _Work]]) -> None:
        """Add a review stage's views to those so far: vote when it is decided, else the final comes back
        doubted with them (the next stage follows)."""
        views = list(self._views_so_far(w))
        plain = self._plain(w)
        if plain is not None and not any(v.index == 0 for v in views):
            plain = dataclasses.replace(plain, words=list(plain.words), doubted=False, views=[])
            views.append(View(0, plain, self._fired(w, plain)))
        for i, v in stage:
            assert v.result is not None  # views are never doubted
            views.append(View(i, v.result, self._fired(w, v.result)))
        views.sort(key=lambda v: v.index)
        most = max(Counter(v.fired for v in views).values())
        if len(views) < VIEWS and most <= VIEWS // 2:
            assert w.request.first is not None
            w.result = dataclasses.replace(w.request.first, views=views, doubted=True)
            w.doubted = True
            log.debug("final check: %d of %d views so far agree; the next stage follows", most, len(views))
            return
        self._vote(w, views)

    def _vote(self, w: _Work, views: list[View]) -> None:
        """The result of a doubted final: the events most views fire (a tie goes to the plain view's, then
        to the earliest view's), with the text of the plain view if it fires them, else of the likeliest
        view that does; word times are those of ``w``'s audio."""
        fired = [v.fired for v in views]
        counts = Counter(fired)
        most = max(counts.values())
        win = fired[0] if counts[fired[0]] == most else next(f for f in fired if counts[f] == most)
        chosen = (
            0
            if fired[0] == win
            else max((i for i, f in enumerate(fired) if f == win), key=lambda i: (views[i].result.avg_logprob, -i))
        )
        lead, result = views[chosen].lead, views[chosen].result
        limit = len(w.request.audio) / SAMPLE_RATE
        result.words = [
            DecodedWord(
                x.text,
                round(min(max(0.0, x.start - lead), limit), 3),
                round(min(max(0.0, x.end - lead), limit), 3),
                x.probability,
            )
            for x in result.words
        ]
        log.debug("final check: %d of %d views fire %s; %r stands", most, len(views), sorted(win), result.text)
        w.result = result

    def _continue(self, work: list[_Work]) -> None:
        """Where the decoder stopped before the speech did, decode on from its last word (conditioned on
        the text so far), as offline Whisper seeks to its last timestamp; at most MAX_CONTINUATIONS times."""
        for _ in range(MAX_CONTINUATIONS):
            todo = [w for w in work if w.request.words and _uncovered(w)]
            if not todo:
                return
            parts: list[tuple[_Work, _Work, float]] = []
            for w in todo:
                assert w.result is not None
                seek = w.result.words[-1].end
                r = w.request
                rest = dataclasses.replace(
                    r,
                    audio=r.audio[int(seek * SAMPLE_RATE) :],
                    speech_end_s=None if r.speech_end_s is None else r.speech_end_s - seek,
                    speech_s=0.0,
                    verify=False,  # the piece is never decoded again on its own
                    previous=(r.previous + " " + w.result.text).strip()[-PREVIOUS_CHARS:],
                )
                parts.append((w, _Work(rest), seek))
            self.continuations += len(parts)
            self._run([p for _, p, _ in parts], full=self.info.window == "full")
            for w, part, seek in parts:
                assert w.result is not None and part.result is not None
                if not part.result.words:  # nothing more to hear: stop here
                    w.request = dataclasses.replace(w.request, speech_end_s=None)
                    continue
                w.result.text = (w.result.text + " " + part.result.text).strip()
                w.result.tokens += part.result.tokens
                w.result.words += [
                    DecodedWord(x.text, round(x.start + seek, 3), round(x.end + seek, 3), x.probability)
                    for x in part.result.words
                ]

    def _features(self, audios: list[np.ndarray], frames: int) -> np.ndarray:
        """Log-mel features of each audio, zero-padded to ``frames`` in the feature domain, as offline
        faster-whisper pads a window (measured: padding with silent audio instead changes tiny.en's words,
        "say hello" -> "safer low")."""
        extract = self.model.feature_extractor
        feats = np.zeros((len(audios), extract.mel_filters.shape[0], frames), dtype=np.float32)
        for i, a in enumerate(audios):
            n = min(len(a) // HOP, frames)
            if n:
                feats[i, :, :n] = extract(a[: n * HOP])[:, :n]
        return feats

    def _encode(self, feats: np.ndarray) -> np.ndarray:
        from faster_whisper.transcribe import get_ctranslate2_storage

        return np.asarray(self.model.model.encode(get_ctranslate2_storage(feats), to_cpu=True))

    def _encode_all(self, work: list[_Work], *, full: bool) -> None:
        """Encoder output for every request: one call per window length (and memory budget)."""
        assert self._silence is not None
        by_frames: dict[int, list[_Work]] = {}
        for w in work:
            w.frames = encoded_frames(len(w.request.audio), full)
            by_frames.setdefault(w.frames, []).append(w)
        for frames, group in by_frames.items():
            per_call = max(1, int(ENCODE_BUDGET_S * 100 / frames))
            for i in range(0, len(group), per_call):
                part = group[i : i + per_call]
                encoded = self._encode(self._features([w.request.audio for w in part], frames))
                self.encoded_s += len(part) * frames / 100
                if frames == FULL_FRAMES:
                    self.full_windows += len(part)
                for w, enc in zip(part, encoded, strict=True):
                    w.encoded = (
                        enc
                        if frames == FULL_FRAMES
                        else np.concatenate([enc, self._silence[frames // 2 : _tail_end(frames)]])
                    )

    def _generate_all(self, work: list[_Work], *, checked: bool) -> None:
        """One generate call per language, beam width and prompt length (CTranslate2 needs them equal)."""
        groups: dict[tuple[str | None, int, int, int], list[_Work]] = {}
        for w in work:
            previous = self._previous_tokens(w.request)
            key = (w.request.language, w.request.beam_size, len(previous), len(_encoded(w)))
            groups.setdefault(key, []).append(w)
        for (language, beam, _, _), group in groups.items():
            for i in range(0, len(group), GENERATE_BATCH):
                self._generate(group[i : i + GENERATE_BATCH], language, beam, checked=checked)

    def _previous_tokens(self, request: DecodeRequest) -> list[int]:
        parts = [p for p in (self.settings.initial_prompt, request.previous) if p]
        if not parts:
            return []
        tok = self._tokenizer(request.language or "en")
        return list(tok.encode(" " + " ".join(p.strip() for p in parts)))[-(self.model.max_length // 2 - 1) :]

    def _generate(self, work: list[_Work], language: str | None, beam: int, *, checked: bool) -> None:
        """One generate call; with ``checked``, finals get the final check, on the whole beam (measured:
        asking CTranslate2 for every hypothesis leaves the best one unchanged)."""
        import ctranslate2
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self.model
        encoded = ctranslate2.StorageView.from_array(np.ascontiguousarray(np.stack([_encoded(w) for w in work])))
        if language is None:
            langs = [d[0][0][2:-2] for d in model.model.detect_language(encoded)]
        else:
            langs = [language] * len(work)
        if self._suppress is None:
            self._suppress = list(get_suppressed_tokens(self._tokenizer(langs[0]), [-1]))
        prompts = [
            model.get_prompt(self._tokenizer(lang), self._previous_tokens(w.request), without_timestamps=True)
            for w, lang in zip(work, langs, strict=True)
        ]
        longest_s = max(len(w.request.audio) for w in work) / SAMPLE_RATE
        max_length = min(model.max_length, len(prompts[0]) + int(longest_s * MAX_TOKENS_PER_S) + 10)
        check = self.check if checked and any(w.request.verify for w in work) else None
        raw = model.model.generate(
            encoded,
            prompts,
            beam_size=beam,
            num_hypotheses=beam if check is not None else 1,
            max_length=max_length,
            return_scores=True,
            return_no_speech_prob=True,
            suppress_blank=True,
            suppress_tokens=self._suppress,
        )
        for w, lang, r in zip(work, langs, raw, strict=True):
            w.result, w.suspect = self._result(w.request, lang, r)
            if check is not None and w.request.verify:  # suspect or not: a doubt is settled by the views
                tok = self._tokenizer(lang)
                others = [tok.decode([t for t in seq if t < tok.eot]).strip() for seq in r.sequences_ids[1:]]
                reason = check.doubt(w.result.text, others, lang)
                if reason:
                    w.suspect, w.doubted = "; ".join(filter(None, [w.suspect, f"final check: {reason}"])), True

    def _result(self, request: DecodeRequest, language: str, r: Any) -> tuple[Decoded, str]:
        """The text of one generate result, and why it is suspect (empty when it is not)."""
        tok = self._tokenizer(language)
        tokens = [t for t in r.sequences_ids[0] if t < tok.eot]
        seq_len = len(r.sequences_ids[0])
        avg_logprob = r.scores[0] * seq_len / (seq_len + 1)
        seconds = len(request.audio) / SAMPLE_RATE
        allowed = int(seconds * MAX_TOKENS_PER_S) + 10
        suspect = ""
        cut = repetition_cut(tokens)
        if cut is not None:
            tokens, suspect = cut, "loop"
        elif len(tokens) >= allowed:
            suspect = "too many tokens"
        elif looks_looped(tokens):
            suspect = "repetition"
        tokens = tokens[:allowed]
        sure = r.no_speech_prob > SURE_NO_SPEECH and request.speech_s < CLEAR_SPEECH_S
        silent = sure or (r.no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD)
        text = "" if silent else tok.decode(tokens).strip()
        if not any(ch.isalnum() for ch in text):
            text, tokens = "", []
        if not text and not suspect and request.speech_s >= EMPTY_SPEECH_S:
            suspect = "empty on speech"
        decoded = Decoded(text, [], language, float(r.no_speech_prob), float(avg_logprob), tokens=tokens)
        return decoded, suspect

    def _align_all(self, work: list[_Work]) -> None:
        """Word timestamps from cross-attention: one align call per language."""
        from faster_whisper.transcribe import merge_punctuations

        by_lang: dict[str, list[_Work]] = {}
        for w in work:
            assert w.result is not None
            if w.result.tokens:
                by_lang.setdefault(f"{w.result.language or 'en'}:{len(_encoded(w))}", []).append(w)
        for key, group in by_lang.items():
            import ctranslate2

            tok = self._tokenizer(key.split(":")[0])
            for i in range(0, len(group), GENERATE_BATCH):
                part = group[i : i + GENERATE_BATCH]
                encoded = ctranslate2.StorageView.from_array(
                    np.ascontiguousarray(np.stack([_encoded(w) for w in part]))
                )
                frames = [max(1, min(FULL_FRAMES, len(w.request.audio) // HOP)) for w in part]
                tokens = [w.result.tokens for w in part if w.result is not None]
                alignments = self.model.find_alignment(tok, tokens, encoded, frames)
                for w, alignment, n in zip(part, alignments, frames, strict=True):
                    assert w.result is not None
                    if not alignment:
                        continue
                    merge_punctuations(alignment, _PREPEND, _APPEND)
                    limit = n / 100
                    w.result.words = [
                        DecodedWord(
                            a["word"],
                            round(min(float(a["start"]), limit), 3),
                            round(min(float(a["end"]), limit), 3),
                            float(a["probability"]),
                        )
                        for a in alignment
                        if a["word"].strip()
                    ]


def _encoded(w: _Work) -> np.ndarray:
    assert w.encoded is not None
    return w.encoded


def _uncovered(w: _Work) -> bool:
    """Whether the VAD heard speech well after the last decoded word (the decoder stopped early)."""
    end = w.request.speech_end_s
    if end is None or w.result is None or not w.result.words:
        return False
    return end - w.result.words[-1].end > UNCOVERED_S


def language_code(language: str) -> str:
    """``vi-VN`` -> ``vi``."""
    return language.replace("_", "-").split("-")[0].lower()


def _tail_end(frames: int) -> int:
    """Encoder frames (of 1500) a shared window ends at: its audio plus SHARED_TAIL_S of silence."""
    return min(FULL_FRAMES, frames + int(SHARED_TAIL_S * 100)) // 2
