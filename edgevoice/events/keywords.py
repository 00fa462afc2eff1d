"""Keyword rules: turn recognized text into experience-event names.

Text and phrases are normalized the same way: Unicode NFC, case folding, and
(when ``ignore_diacritics``) accents stripped so that "xin chao" matches
"xin chào" (Vietnamese "đ" folds to "d"). Both are split into words (``\\w+``),
so punctuation never matters and a phrase only matches whole words. Phrases
with at least six letters tolerate ``max_edits`` character edits over the
matched words (Levenshtein, via rapidfuzz), which absorbs small recognition
errors such as a split or merged word.

:meth:`KeywordMatcher.doubt` tells the recognizer which finals are worth decoding again
in Whisper's full window before they are trusted: those whose beam held a keyword the
best hypothesis lacks, and those coming within one more letter edit of a phrase than a
match allows ("the lone air" for "hello there"). A missed keyword is an event that never
happens; the full window is how offline Whisper hears the same audio.
"""

from __future__ import annotations

import itertools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from rapidfuzz.distance import Levenshtein

from edgevoice.config import KeywordSettings

_WORD = re.compile(r"\w+")
_FOLD = str.maketrans({"đ": "d", "ð": "d", "ø": "o", "ł": "l", "ß": "ss", "æ": "ae", "œ": "oe", "ı": "i"})
MIN_FUZZY_LETTERS = 6
"""Phrases shorter than this (letters, spaces excluded) must match exactly."""


def normalize(text: str, *, ignore_diacritics: bool) -> str:
    """NFC + casefold, and accents stripped when ``ignore_diacritics``."""
    text = unicodedata.normalize("NFC", text).casefold()
    if ignore_diacritics:
        decomposed = unicodedata.normalize("NFD", text)
        text = "".join(c for c in decomposed if not unicodedata.combining(c)).translate(_FOLD)
        text = unicodedata.normalize("NFC", text)
    return text


def words(text: str, *, ignore_diacritics: bool) -> list[str]:
    """The normalized words of ``text``."""
    return _WORD.findall(normalize(text, ignore_diacritics=ignore_diacritics))


def _base_language(language: str | None) -> str | None:
    return language.split("-")[0].split("_")[0].casefold() if language else None


@dataclass(frozen=True, slots=True)
class _Phrase:
    event: str
    words: tuple[str, ...]
    joined: str
    letters: str
    """The phrase's letters without spaces (for the near-miss check across word boundaries)."""
    max_edits: int
    languages: frozenset[str]


class KeywordMatcher:
    """Matches the configured keyword rules against transcript text (immutable; rebuild it to reload)."""

    def __init__(self, settings: KeywordSettings) -> None:
        self.settings = settings
        self._ignore = settings.ignore_diacritics
        phrases: list[_Phrase] = []
        for rule in settings.rules:
            langs = frozenset(b for b in (_base_language(x) for x in rule.languages) if b)
            for phrase in rule.phrases:
                ws = tuple(words(phrase, ignore_diacritics=self._ignore))
                if not ws:
                    continue
                letters = sum(len(w) for w in ws)
                edits = settings.max_edits if letters >= MIN_FUZZY_LETTERS else 0
                phrases.append(_Phrase(rule.event, ws, " ".join(ws), "".join(ws), edits, langs))
        self._phrases = tuple(phrases)

    @property
    def events(self) -> list[str]:
        """Every event name the rules can fire, in rule order."""
        return list(dict.fromkeys(p.event for p in self._phrases))

    def match(self, text: str, language: str | None = None) -> list[str]:
        """Event names whose phrases occur in ``text``, in order of first occurrence, each once.

        Rules restricted to languages apply only when ``language`` (e.g. "vi" or "vi-VN")
        is one of them; with no language every rule applies.
        """
        found = self.find(text, language)
        return list(dict.fromkeys(event for _, event in sorted(found, key=lambda x: x[0])))

    def doubt(self, text: str, alternatives: Sequence[str], language: str | None = None) -> str:
        """Why a final's text should not be trusted before full-window views of it vote ("" if not).

        ``alternatives`` are the decoder's other beam hypotheses of the same audio. Doubtful: an
        alternative fires an event ``text`` does not, or ``text`` comes within ``max_edits + 1``
        letter edits of a phrase (spaces ignored; not inside one longer word: "shellfish" is not
        near "hello") without firing its event. Either way the majority of the views decides, so
        this can cost decodes but never invents an event.
        """
        fired = set(self.match(text, language))
        for alt in alternatives:
            missing = [e for e in self.match(alt, language) if e not in fired]
            if missing:
                return f"{missing[0]} in the beam"
        tokens = words(text, ignore_diacritics=self._ignore)
        letters = "".join(tokens)
        if not letters:
            return ""
        ends = list(itertools.accumulate(len(t) for t in tokens))
        lang = _base_language(language)
        for p in self._phrases:
            if p.event in fired or (p.languages and lang is not None and lang not in p.languages):
                continue
            if substring_distance(p.letters, letters, p.max_edits + 1, ends) <= p.max_edits + 1:
                return f"near {p.joined!r}"
        return ""

    def find(self, text: str, language: str | None = None) -> list[tuple[int, str]]:
        """(word index, event) for the first occurrence of each matching phrase."""
        tokens = words(text, ignore_diacritics=self._ignore)
        if not tokens:
            return []
        lang = _base_language(language)
        hits: dict[str, int] = {}
        for p in self._phrases:
            if p.languages and lang is not None and lang not in p.languages:
                continue
            pos = self._locate(tokens, p)
            if pos is not None and (p.event not in hits or pos < hits[p.event]):
                hits[p.event] = pos
        return [(pos, event) for event, pos in hits.items()]

    @staticmethod
    def _locate(tokens: list[str], p: _Phrase) -> int | None:
        n = len(p.words)
        # Windows of n words, and n±1 when edits are allowed (a merged or split word).
        sizes = (n,) if p.max_edits == 0 else tuple(s for s in (n, n - 1, n + 1) if s >= 1)
        for i in range(len(tokens)):
            for size in sizes:
                if i + size > len(tokens):
                    continue
                window = tokens[i : i + size]
                if p.max_edits == 0:
                    if tuple(window) == p.words:
                        return i
                    continue
                if Levenshtein.distance(" ".join(window), p.joined, score_cutoff=p.max_edits) <= p.max_edits:
                    return i
        return None


def substring_distance(needle: str, haystack: str, cutoff: int, ends: Sequence[int] = ()) -> int:
    """Fewest character edits turning ``needle`` into some substring of ``haystack`` (semi-global
    Levenshtein); any value above ``cutoff`` is returned as ``cutoff + 1``.

    ``ends``: where the words of ``haystack`` end (letter offsets). With them, a substring lying inside
    one word longer than ``len(needle) + cutoff`` does not count ("hell" in "shellfish" is not near
    "hello"; "helo" across "the lone" is).
    """
    if not needle:
        return 0
    n = len(haystack)
    prev = [(0, j) for j in range(n + 1)]  # (cost, where the substring starts)
    for i, ch in enumerate(needle, 1):
        cur = [(i, 0)] + [(0, 0)] * n
        for j, other in enumerate(haystack, 1):
            up, left, diag = prev[j], cur[j - 1], prev[j - 1]
            cur[j] = min((up[0] + 1, up[1]), (left[0] + 1, left[1]), (diag[0] + (ch != other), diag[1]))
        if min(c for c, _ in cur) > cutoff:
            return cutoff + 1
        prev = cur
    best = cutoff + 1
    longest = len(needle) + cutoff
    for j in range(n + 1):
        cost, begin = prev[j]
        if cost < best and not (ends and _inside_long_word(begin, j, ends, longest)):
            best = cost
    return best


def _inside_long_word(begin: int, end: int, ends: Sequence[int], longest: int) -> bool:
    """Whether letters [begin, end) lie inside one word of more than ``longest`` letters."""
    word_start = 0
    for word_end in ends:
        if begin < word_end:
            return end <= word_end and word_end - word_start > longest
        word_start = word_end
    return False
