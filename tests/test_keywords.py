"""Keyword rules: normalization, word boundaries, diacritics, edit tolerance, languages."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgevoice.config import KeywordRule, KeywordSettings
from edgevoice.events.keywords import KeywordMatcher, normalize


@pytest.fixture
def default() -> KeywordMatcher:
    return KeywordMatcher(KeywordSettings())


@pytest.mark.parametrize(
    ("text", "events"),
    [
        ("xin chào các bạn", ["SAY_HELLO"]),
        ("Xin Chào!", ["SAY_HELLO"]),
        ("XIN LỖI tôi muốn đổi món", ["SAY_SORRY"]),
        ("xin chao", ["SAY_HELLO"]),  # diacritic-insensitive
        ("xin loi", ["SAY_SORRY"]),
        ("Hello, how are you?", ["SAY_HELLO"]),
        ("I'm so sorry.", ["SAY_SORRY"]),
        ("Sorry... hello!", ["SAY_SORRY", "SAY_HELLO"]),  # order of occurrence
        ("hello hello hello", ["SAY_HELLO"]),  # each once
        ("xinchào", ["SAY_HELLO"]),  # merged words: one edit
        ("xin chàoo", ["SAY_HELLO"]),  # one extra letter
        ("tôi muốn gọi món", []),
        ("Othello was sorrowful", []),  # word boundaries
        ("hell o", []),  # short phrases match exactly
        ("helo", []),
        ("", []),
        ("   ,.!  ", []),
    ],
)
def test_default_rules(default: KeywordMatcher, text: str, events: list[str]) -> None:
    assert default.match(text, "vi") == events


def test_nfc_and_nfd_input_match_the_same(default: KeywordMatcher) -> None:
    nfd = unicodedata.normalize("NFD", "xin lỗi")
    assert nfd != "xin lỗi"
    assert default.match(nfd) == ["SAY_SORRY"]


def test_diacritics_can_be_required() -> None:
    strict = KeywordMatcher(KeywordSettings(ignore_diacritics=False, max_edits=0))
    assert strict.match("xin chào") == ["SAY_HELLO"]
    assert strict.match("xin chao") == []
    assert strict.match("XIN CHÀO") == ["SAY_HELLO"]


def test_vietnamese_d_folds() -> None:
    m = KeywordMatcher(KeywordSettings(rules=[KeywordRule(event="ORDER_CHANGE", phrases=["đổi món"])], max_edits=0))
    assert m.match("tôi muốn doi mon") == ["ORDER_CHANGE"]
    assert normalize("Đổi", ignore_diacritics=True) == "doi"


def test_edit_tolerance_is_bounded() -> None:
    rule = KeywordRule(event="THANKS", phrases=["thank you"])
    one = KeywordMatcher(KeywordSettings(rules=[rule], max_edits=1))
    assert one.match("thank yu") == ["THANKS"]
    assert one.match("thanks you") == ["THANKS"]
    assert one.match("thnk yu") == []
    none = KeywordMatcher(KeywordSettings(rules=[rule], max_edits=0))
    assert none.match("thank yu") == []
    two = KeywordMatcher(KeywordSettings(rules=[rule], max_edits=2))
    assert two.match("thnk yu") == ["THANKS"]


def test_rules_per_language() -> None:
    settings = KeywordSettings(
        rules=[
            KeywordRule(event="SAY_HELLO", phrases=["xin chào"], languages=["vi"]),
            KeywordRule(event="SAY_HELLO", phrases=["hello"], languages=["en"]),
            KeywordRule(event="SAY_BYE", phrases=["bye"]),
        ]
    )
    m = KeywordMatcher(settings)
    assert m.match("hello bye", "vi") == ["SAY_BYE"]
    assert m.match("hello bye", "en-US") == ["SAY_HELLO", "SAY_BYE"]
    assert m.match("xin chào", "vi-VN") == ["SAY_HELLO"]
    assert m.match("xin chào", "en") == []
    assert m.match("xin chào hello") == ["SAY_HELLO"]  # no language: every rule
    assert m.events == ["SAY_HELLO", "SAY_BYE"]


def test_multiword_phrase_needs_whole_words() -> None:
    m = KeywordMatcher(KeywordSettings(rules=[KeywordRule(event="BILL", phrases=["the bill"])], max_edits=0))
    assert m.match("can I have the bill please") == ["BILL"]
    assert m.match("other bill") == []
    assert m.match("the billing") == []


@given(st.text(max_size=200), st.sampled_from([None, "vi", "en", "vi-VN", "zz"]))
def test_never_crashes(text: str, language: str | None) -> None:
    events = KeywordMatcher(KeywordSettings()).match(text, language)
    assert set(events) <= {"SAY_HELLO", "SAY_SORRY"}
    assert len(events) == len(set(events))


@given(st.text(alphabet=st.characters(categories=["Ll", "Lu", "Zs", "Po"]), max_size=40))
def test_phrase_found_wherever_it_is_embedded(filler: str) -> None:
    m = KeywordMatcher(KeywordSettings())
    assert "SAY_SORRY" in m.match(f"{filler} xin lỗi. {filler}", "vi")


@pytest.mark.parametrize(
    ("text", "alternatives", "doubt"),
    [
        # Heard by tiny.en in the shared window where the full window hears the keyword (espeak-ng clips).
        ("We only came into safer low.", ["We only came in to say hello."], "SAY_HELLO in the beam"),
        ("Well, the lone air, it is nice to see you again.", [], "near 'hello'"),
        ("Xin tốt, tốt, tốt!", [], "near 'xin loi'"),
        ("Sorri, we are ready to order now.", [], "near 'sorry'"),
        # Nothing to doubt: the keyword is heard, or nothing comes near one.
        ("Hello, can we see the menu please?", ["Hello, can we see the menu, please?"], ""),
        ("Well, hello there.", ["Well, the lone air."], ""),
        ("Could we have some more bread please?", ["Could we have some more bread, please?"], ""),
        ("The soup was delicious, thank you.", [], ""),
        ("My son is allergic to peanuts and shellfish.", [], ""),  # "hell" inside a longer word
        ("I think the fellow was right.", [], "near 'hello'"),  # a word near the phrase
        ("", [], ""),
    ],
)
def test_doubt_names_what_deserves_the_full_window(
    default: KeywordMatcher, text: str, alternatives: list[str], doubt: str
) -> None:
    assert default.doubt(text, alternatives, "en") == doubt


def test_doubt_follows_rule_languages() -> None:
    m = KeywordMatcher(KeywordSettings(rules=[KeywordRule(event="SAY_SORRY", phrases=["xin lỗi"], languages=["vi"])]))
    assert m.doubt("xin tốt", [], "vi") == "near 'xin loi'"
    assert m.doubt("xin tốt", ["xin lỗi"], "en") == ""  # the rule does not apply to English streams


def test_ordinary_text_is_rarely_doubted(default: KeywordMatcher) -> None:
    """The check costs a full-window decode per doubted final: ordinary sentences must not trigger it."""
    sentences = [
        "Could we get a table by the window please",
        "I would like the chicken with rice and a glass of water",
        "The weather has been lovely all week",
        "Can you bring the bill when you have a moment",
        "My brother works at the hospital downtown",
        "We are waiting for two more friends",
        "Is there anything vegetarian on the menu",
        "That was the best noodle soup I have had in years",
        "Do you take credit cards or only cash",
        "Let me think about it for a minute",
    ]
    assert [s for s in sentences if default.doubt(s, [], "en")] == []


@given(st.text(max_size=40), st.text(max_size=40))
def test_substring_distance_bounds(needle: str, haystack: str) -> None:
    from rapidfuzz.distance import Levenshtein

    from edgevoice.events.keywords import substring_distance

    d = substring_distance(needle, haystack, 3)
    assert 0 <= d <= 4
    assert d <= min(Levenshtein.distance(needle, haystack), 4)  # a substring is never farther than the whole
    if needle and needle in haystack:
        assert d == 0
    ends = [len(haystack)]  # one word: substrings inside it may not count, the whole never gets nearer
    assert substring_distance(needle, haystack, 3, ends) >= d
