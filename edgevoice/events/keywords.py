"""Keyword rules: turn recognized text into experience-event names.

Text and phrases are normalized the same way: Unicode NFC, case folding, and
(when ``ignore_diacritics``) accents stripped so that "xin chao" matches
"xin chào" (Vietnamese "đ" folds to "d"). Both are split into words (``\\w+``),
so punctuation never matters and a phrase only matches whole words. Phrases
with at least six letters tolerate ``max_edits`` character edits over the
matched words (Levenshtein, via rapidfuzz), which absorbs small recognition
errors such as a split or merged word.
"""

from __future__ import annotations

import re
import unicodedata
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
                phrases.append(_Phrase(rule.event, ws, " ".join(ws), edits, langs))
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
