"""Accuracy on real human speech: streaming at N real-time streams and ``edgevoice transcribe``, beside offline.

    .venv/bin/python -m bench.bench_accuracy [--streams 1 8 16] [--eval-dir ../shared/eval]
        [--min-seconds 90] [--no-transcribe] [--kinds read long keyword] [--shifts N] [--json FILE]

Material (bench/corpus.py): the real recordings of ``--eval-dir`` (en, vi, de) and
pocketsphinx's LibriVox sentences; long conversational turns joined from them (20-30 s
of speech with no pause an endpoint would take); and keyword utterances, espeak-ng
speech with the seed's phrases ("hello"/"sorry", "xin chào"/"xin lỗi") at the start,
middle or end of a sentence in 6 voices, plus sentences without them.

Models: the daemon's defaults: ``tiny.en`` for English, the multilingual ``base``
beside it for vi and de (int8 on the CPU). Offline is plain faster-whisper on the
same model files: ``transcribe(beam_size=5, vad_filter=True, language=...)``,
measured in the same run. Every path decodes a clip as the streams hear it, with
1.2 s of silence on each side (tiny.en's text of a short espeak-ng phrase was
measured to change with the silence around it, offline's too).

Streaming: N streams of one recognizer in one process (at 1 stream every language in
turn; at more, English streams on tiny.en), each playing a playlist in 100 ms chunks at
real-time pace; stream i plays the material from offset i/N on,
clips separated by 1.2 s of silence, repeated until ``--min-seconds``, so that
together the streams cover everything at least once. A clip's text is every final
whose middle lies within its span. Transcribe: every clip through
``edgevoice transcribe``'s path (transcribe_with).

``--shifts N``: every clip N times, with 0, 512/N, ... more samples of silence before it:
the N places in a VAD window (512 samples) where a stream's cut can fall, so that
``transcribe`` and offline, which cut one place each, decode every cut a stream can
make (with ``--no-transcribe --streams`` it only repeats the material).

Printed per path: WER by language and kind (read clips, long turns) and the ratio
to offline on exactly the same clips; keyword recall against what offline decoding
of the same utterances hears (an event counts when offline's text fires it), false
hits (an event fired on an utterance whose reference lacks its phrase); the worst
lag over the run. Normalisation: openai-whisper's EnglishTextNormalizer for en;
lower case without punctuation, diacritics kept, for vi (syllables) and de.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jiwer
import numpy as np

from bench.corpus import DEFAULT_EVAL, Clip, corpus
from edgevoice import modelstore
from edgevoice.config import AsrSettings, KeywordSettings
from edgevoice.events.keywords import KeywordMatcher
from edgevoice.metrics import Metrics
from edgevoice.recognition.recognizer import WhisperRecognizer
from edgevoice.recognition.types import SAMPLE_RATE, Transcript
from edgevoice.recognition.vad import WINDOW
from edgevoice.transcribe import transcribe_with
from tests.support.speech import silence, synth, trim

CHUNK_S = 0.1
GAP_S = 1.2
MODELS = Path(os.environ.get("EDGEVOICE_TEST_MODELS", "/tmp/edgevoice-models"))
VOICES = [
    {"voice": "en-us", "pitch": 50},
    {"voice": "en-us+f4", "pitch": 80},
    {"voice": "en-gb", "pitch": 35},
    {"voice": "en-us+m3", "pitch": 30},
    {"voice": "en-gb+f3", "pitch": 60},
    {"voice": "en-us+f2", "pitch": 70},
]
VI_VOICES = [{"voice": v, "pitch": p} for v, p in (("vi", 50), ("vi+f4", 80), ("vi+m3", 35))]
EN_KEYWORD_LINES = [
    "Hello, can we see the menu please?",
    "Well, hello there, it is nice to see you again.",
    "We only came in to say hello.",
    "Sorry, we are ready to order now.",
    "I am so sorry about the spilled water.",
    "We are a little late tonight, sorry.",
    "Could we have some more bread please?",
    "The soup was delicious, thank you.",
]
VI_KEYWORD_LINES = ["xin chào các bạn", "xin lỗi tôi muốn đổi món", "tôi muốn gọi món"]


def keyword_clips() -> list[Clip]:
    clips = []
    for i, line in enumerate(EN_KEYWORD_LINES):
        for k, voice in enumerate(VOICES):
            if (i + k) % 2 == 0:  # half the voice x line grid: 24 utterances
                clips.append(Clip(f"kw_en_{i}_{k}", "en", trim(synth(line, **voice)), line, "keyword"))  # type: ignore[arg-type]
    for i, line in enumerate(VI_KEYWORD_LINES):
        for k, voice in enumerate(VI_VOICES):
            clips.append(Clip(f"kw_vi_{i}_{k}", "vi", trim(synth(line, **voice)), line, "keyword"))  # type: ignore[arg-type]
    return clips


def shifted(clips: list[Clip], n: int) -> list[Clip]:
    """Each clip at the n cuts of a VAD window (``name@samples``); the clips as they are when n is 1."""
    if n == 1:
        return clips
    return [
        replace(
            c,
            name=f"{c.name}@{k * WINDOW // n}",
            audio=np.concatenate([np.zeros(k * WINDOW // n, np.float32), c.audio]),
        )
        for c in clips
        for k in range(n)
    ]


def normalizer(language: str) -> Any:
    if language == "en":
        from whisper_normalizer.english import EnglishTextNormalizer

        return EnglishTextNormalizer()
    from whisper_normalizer.basic import BasicTextNormalizer

    return BasicTextNormalizer()


def wer(pairs: list[tuple[str, str]], language: str) -> float:
    norm = normalizer(language)
    refs = [" ".join(norm(r).split()) for r, _ in pairs]
    hyps = [" ".join(norm(h).split()) for _, h in pairs]
    keep = [(r, h) for r, h in zip(refs, hyps, strict=True) if r]
    return float(jiwer.wer([r for r, _ in keep], [h or "-" for _, h in keep]))


@dataclass
class Played:
    clip: Clip
    start: float
    end: float
    finals: list[Transcript] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(t.text for t in self.finals)


def model_for(language: str) -> str:
    return "tiny.en" if language == "en" else "base"


def as_played(clip: Clip) -> np.ndarray:
    """The clip as a stream hears it: GAP_S of silence on each side (every path decodes this same audio;
    measured: tiny.en's text of a short espeak-ng phrase changes with the silence around it, offline too)."""
    return np.concatenate([silence(GAP_S), clip.audio, silence(GAP_S)]).astype(np.float32)


def offline_texts(clips: list[Clip]) -> dict[str, str]:
    from faster_whisper import WhisperModel

    out = {}
    for name in sorted({model_for(c.language) for c in clips}):
        path = modelstore.resolve(name, MODELS)
        model = WhisperModel(str(path), device="cpu", compute_type="int8", cpu_threads=2)
        for c in clips:
            if model_for(c.language) == name:
                segments, _ = model.transcribe(as_played(c), beam_size=5, language=c.language, vad_filter=True)
                out[c.name] = " ".join(s.text.strip() for s in segments)
    return out


def allocate(clips: list[Clip], n: int) -> list[dict[str, int]]:
    """Streams per language for one run of n streams (a stream speaks one language): one stream runs
    each language in turn; more streams are all English (tiny.en, the capacity target), since the
    multilingual model's share of a 2-core CPU is a few streams (docs/benchmarks.md)."""
    languages = sorted({c.language for c in clips})
    if n == 1:
        return [{lang: 1} for lang in languages]
    return [{"en": n}]


def playlists(clips: list[Clip], n: int, min_seconds: float) -> list[list[Clip]]:
    """Stream i plays the clips from offset i*len/n on (wrapping), at least min_seconds and its share."""
    total = sum(c.seconds + GAP_S for c in clips)
    share = max(min_seconds, total / n)
    lists = []
    for i in range(n):
        k, seconds, mine = i * len(clips) // n, 0.0, []
        while seconds < share:
            c = clips[k % len(clips)]
            mine.append(c)
            seconds += c.seconds + GAP_S
            k += 1
        lists.append(mine)
    return lists


async def stream_run(rec: WhisperRecognizer, lists: list[list[Clip]]) -> tuple[list[Played], float]:
    """Every playlist on its own stream at real-time pace; the clips with their finals, and the worst lag."""
    played: list[Played] = []
    worst = 0.0
    streams = []
    per_stream: list[list[Played]] = []
    for i, mine in enumerate(lists):
        got: list[Transcript] = []
        s = rec.open_stream(f"bench-{i}", language=mine[0].language, on_transcript=got.append)
        streams.append((s, got, mine))
    audios = []
    for _, _, mine in streams:
        t = GAP_S
        parts = [silence(GAP_S)]
        items = []
        for c in mine:
            items.append(Played(c, t, t + c.seconds))
            parts += [c.audio, silence(GAP_S)]
            t += c.seconds + GAP_S
        audios.append(np.concatenate(parts))
        per_stream.append(items)
    chunk = int(CHUNK_S * SAMPLE_RATE)

    async def feed(k: int) -> None:
        s, audio = streams[k][0], audios[k]
        await asyncio.sleep(k * 0.137 % 1.0)  # staggered
        start = time.monotonic()
        for j, i in enumerate(range(0, len(audio), chunk)):
            delay = start + j * CHUNK_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            s.feed(audio[i : i + chunk])
        await s.finish()

    async def sample() -> None:
        nonlocal worst
        while True:
            await asyncio.sleep(0.5)
            worst = max([worst] + [s.lag_s for s, _, _ in streams])

    sampler = asyncio.create_task(sample())
    await asyncio.gather(*(feed(k) for k in range(len(streams))))
    sampler.cancel()
    for s, _, _ in streams:
        s.close()
    for (_, got, _), items in zip(streams, per_stream, strict=True):
        for t in got:
            if not (t.final and t.text):
                continue
            mid = (t.start + t.end) / 2
            owner = min(items, key=lambda p: 0 if p.start - 0.6 <= mid <= p.end + 0.6 else abs(mid - p.start))
            owner.finals.append(t)
        played += items
    return played, worst


async def transcribe_run(rec: WhisperRecognizer, clips: list[Clip]) -> list[Played]:
    out = []
    for c in clips:
        finals, _ = await transcribe_with(rec, as_played(c), language=c.language, stream_id="file")
        out.append(Played(c, 0.0, c.seconds, finals))
    return out


def report(name: str, played: list[Played], offline: dict[str, str], matcher: KeywordMatcher) -> dict[str, Any]:
    rows: dict[str, Any] = {"path": name}
    groups: dict[tuple[str, str], list[Played]] = defaultdict(list)
    for p in played:
        groups[(p.clip.language, p.clip.kind)].append(p)
    for (lang, kind), ps in sorted(groups.items()):
        if kind == "keyword":
            continue
        ours = wer([(p.clip.reference, p.text) for p in ps], lang)
        theirs = wer([(p.clip.reference, offline[p.clip.name]) for p in ps], lang)
        rows[f"{lang}/{kind}"] = {
            "clips": len(ps),
            "wer": round(ours, 4),
            "offline": round(theirs, 4),
            "ratio": round(ours / theirs, 3) if theirs else None,
        }
    heard = fired = both = false = offline_fired = expected_n = 0
    missed: list[str] = []
    for p in played:
        if p.clip.kind != "keyword":
            continue
        lang = p.clip.language
        expected = set(matcher.match(p.clip.reference, lang))
        off = set(matcher.match(offline[p.clip.name], lang)) & expected
        ours = set(matcher.match(p.text, lang))
        heard += len(off)
        both += len(off & ours)
        if off - ours:
            missed.append(f"{p.clip.name}: offline {offline[p.clip.name]!r}, streaming {p.text!r}")
        fired += len(ours & expected)
        offline_fired += len(off)
        expected_n += len(expected)
        false += len(ours - expected)
    rows["keywords"] = {
        "offline_heard": heard,
        "fired_of_those": both,
        "recall_vs_offline": round(both / heard, 3) if heard else None,
        "fired": fired,
        "expected": expected_n,
        "offline_fired": offline_fired,
        "false_hits": false,
        "missed": missed,
    }
    return rows


def show(rows: dict[str, Any]) -> None:
    parts = [f"{rows['path']:<14}"]
    for key, v in rows.items():
        if "/" in key:
            parts.append(f"{key} {v['wer']:.3f}/{v['offline']:.3f}={v['ratio']}")
    k = rows["keywords"]
    parts.append(
        f"kw {k['fired_of_those']}/{k['offline_heard']} of offline's (fired {k['fired']}, offline "
        f"{k['offline_fired']}, of {k['expected']} said) false {k['false_hits']}"
    )
    if "max_lag_s" in rows:
        parts.append(f"max lag {rows['max_lag_s']:.1f} s")
    print("  ".join(parts), flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="*", default=[1, 8, 16])
    ap.add_argument("--eval-dir", type=Path, default=DEFAULT_EVAL)
    ap.add_argument("--min-seconds", type=float, default=90.0, help="shortest playlist per stream")
    ap.add_argument("--no-transcribe", action="store_true")
    ap.add_argument("--window", default="shared", choices=["shared", "full"])
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--kinds", nargs="+", default=["read", "long", "keyword"], choices=["read", "long", "keyword"])
    ap.add_argument("--shifts", type=int, default=1, help="cuts per clip (1 to 512): see above")
    args = ap.parse_args()
    if not 1 <= args.shifts <= WINDOW:
        ap.error(f"--shifts {args.shifts}: must be 1 to {WINDOW}")
    clips = corpus(args.eval_dir) + keyword_clips()
    clips = shifted([c for c in clips if c.seconds <= 60 and c.kind in args.kinds], args.shifts)
    print(
        f"# {len(clips)} clips, {sum(c.seconds for c in clips):.0f} s "
        f"({', '.join(f'{k} {sum(c.kind == k for c in clips)}' for k in ('read', 'long', 'keyword'))}); "
        f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    started = time.monotonic()
    offline = await asyncio.to_thread(offline_texts, clips)
    print(f"# offline decoded in {time.monotonic() - started:.0f} s", flush=True)
    matcher = KeywordMatcher(KeywordSettings())
    settings = AsrSettings(window=args.window)
    results = []
    if not args.no_transcribe:
        rec = await asyncio.to_thread(WhisperRecognizer.load, settings, MODELS, Metrics())
        rec.check_finals(matcher)  # as the daemon's stream hub does
        rows = report("transcribe", await transcribe_run(rec, clips), offline, matcher)
        results.append(rows)
        show(rows)
        for line in rows["keywords"]["missed"]:
            print(f"    missed {line}")
    for n in args.streams:
        rec = await asyncio.to_thread(WhisperRecognizer.load, settings, MODELS, Metrics())
        rec.check_finals(matcher)
        rec.start()
        try:
            played, worst = [], 0.0
            for run in allocate(clips, n):
                lists = [
                    pl
                    for lang, k in run.items()
                    for pl in playlists([c for c in clips if c.language == lang], k, args.min_seconds)
                ]
                got, lag = await stream_run(rec, lists)
                played, worst = played + got, max(worst, lag)
            health = rec.health()
        finally:
            await asyncio.to_thread(rec.stop)
        rows = report(f"{n} stream(s)", played, offline, matcher)
        rows["max_lag_s"] = round(worst, 2)
        rows["load"] = round(os.getloadavg()[0], 1)
        rows["asr"] = {
            k: health[k] for k in ("decoded", "window_retries", "check_retries", "continuations", "partials_skipped")
        }
        results.append(rows)
        show(rows)
        for line in rows["keywords"]["missed"]:
            print(f"    missed {line}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    lags = [r["max_lag_s"] for r in results if "max_lag_s" in r]
    print(
        f"# done in {time.monotonic() - started:.0f} s; median max lag {statistics.median(lags) if lags else 0:.1f} s"
    )


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
