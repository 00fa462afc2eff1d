"""The shared parser for client JSON: every hostile shape is one BadJson naming the limit, never another error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgevoice.errors import describe
from edgevoice.server.clientjson import MAX_DEPTH, BadJson, parse_client_json


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{not json", "not valid JSON"),
        (b'{"a": "\xff"}', "not UTF-8 text (byte 0xff at offset 7)"),
        ("[" * 100_000 + "]" * 100_000, f"nested deeper than {MAX_DEPTH} levels"),
        ("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), f"nested deeper than {MAX_DEPTH} levels"),
        ('{"a": {"b": ' * 40 + "1" + "}}" * 40, "nested deeper"),
        ("1" + "0" * 100_000, "a number of 100001 characters"),
        ("-" + "9" * 41, "a number of 42 characters"),
        ("1e999", "the number 1e999 is too large"),
        ('{"x": NaN}', "NaN is not JSON"),
        ("[-Infinity]", "-Infinity is not JSON"),
        ('"\\ud800"', "lone surrogate (\\ud800)"),
        ('{"\\udc00x": 1}', "a key holds a lone surrogate (\\udc00)"),
        (json.dumps("x" * 70_000), "a string of 70000 characters"),
    ],
)
def test_hostile_json_is_one_clear_error(data: str | bytes, message: str) -> None:
    with pytest.raises(BadJson) as err:
        parse_client_json(data)
    assert err.value.code == "bad_json"
    assert message in err.value.message, err.value.message
    err.value.message.encode("utf-8")  # always printable and sendable


def test_limits_are_parameters() -> None:
    assert parse_client_json("[[[1]]]", max_depth=3) == [[[1]]]
    with pytest.raises(BadJson, match="nested deeper than 2"):
        parse_client_json("[[[1]]]", max_depth=2)
    with pytest.raises(BadJson, match="at most 10"):
        parse_client_json(b'{"a": "long enough"}', max_bytes=10)
    with pytest.raises(BadJson, match="a string of 5"):
        parse_client_json('"abcde"', max_string_chars=4)


@pytest.mark.parametrize(
    "value",
    [{"type": "ping"}, [1, 2.5, -3e10, True, None], "xin chào 😀", {"nested": {"deep": [[[]]]}}, 12345678901234567890],
)
def test_ordinary_json_passes(value: Any) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assert parse_client_json(text) == value
    assert parse_client_json(text.encode()) == value


def test_describe_never_returns_unencodable_text() -> None:
    for value in (["\ud800"], {"k": "\udfff"}, "\ud83d", 10**5000):
        describe(value).encode("utf-8")
    assert describe(["\ud800"]) == '["\\ud800"]'
