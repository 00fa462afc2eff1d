"""JSON from a client, parsed with limits: size, nesting depth, number length, string length, valid Unicode.

Pure functions on the calling thread (the event loop; a 1 MiB document parses in
milliseconds). Every way a client's JSON can be wrong or hostile ends in one
:class:`BadJson` (code ``bad_json``) whose message names the limit, never in
another exception: invalid UTF-8, syntax errors, ``NaN``/``Infinity``,
nesting deeper than ``max_depth`` (Python's own recursion limit is never reached),
a number literal longer than ``max_number_chars`` (or one that overflows to
infinity), a string or key longer than ``max_string_chars``, and a lone surrogate
(``"\\ud800"``), which is valid JSON but not Unicode text and would fail later
when the string is encoded (a log line, a reply, an upstream API).
"""

from __future__ import annotations

import json
import math
from typing import Any

from edgevoice.errors import CodedError

MAX_DEPTH = 32
"""Nesting of arrays and objects a client message may use."""
MAX_NUMBER_CHARS = 40
"""Longest number literal (digits, sign, exponent) accepted."""
MAX_STRING_CHARS = 65536
"""Longest string (or object key) accepted."""


class BadJson(CodedError):
    """The client's JSON cannot be used; ``message`` says why."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_json", message)


def _number_parsers(max_chars: int) -> tuple[Any, Any]:
    def parse_int(text: str) -> int:
        if len(text) > max_chars:
            raise BadJson(f"a number of {len(text)} characters (at most {max_chars})")
        return int(text)

    def parse_float(text: str) -> float:
        if len(text) > max_chars:
            raise BadJson(f"a number of {len(text)} characters (at most {max_chars})")
        value = float(text)
        if not math.isfinite(value):
            raise BadJson(f"the number {text} is too large")
        return value

    return parse_int, parse_float


def _reject_constant(name: str) -> Any:
    raise BadJson(f"{name} is not JSON")


def _check_string(text: str, max_chars: int, what: str) -> None:
    if len(text) > max_chars:
        raise BadJson(f"a {what} of {len(text)} characters (at most {max_chars})")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadJson(
                f"a {what} holds a lone surrogate (\\u{ord(text[exc.start]):04x}), which is not Unicode text"
            ) from None


def _check_tree(value: Any, max_depth: int, max_string: int) -> None:
    """Depth and strings of a parsed document, iteratively (no recursion on client data)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            _check_string(node, max_string, "string")
        elif isinstance(node, (dict, list)):
            if depth >= max_depth:
                raise BadJson(f"nested deeper than {max_depth} levels")
            if isinstance(node, dict):
                for key, item in node.items():
                    _check_string(key, max_string, "key")
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in node)


def parse_client_json(
    data: str | bytes | bytearray,
    *,
    max_bytes: int | None = None,
    max_depth: int = MAX_DEPTH,
    max_number_chars: int = MAX_NUMBER_CHARS,
    max_string_chars: int = MAX_STRING_CHARS,
) -> Any:
    """The JSON value in ``data`` (UTF-8 bytes or text) within the limits; raises :class:`BadJson` otherwise."""
    if max_bytes is not None and len(data) > max_bytes:
        raise BadJson(f"{len(data)} bytes of JSON (at most {max_bytes})")
    if isinstance(data, (bytes, bytearray)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadJson(f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    else:
        text = data
    parse_int, parse_float = _number_parsers(max_number_chars)
    try:
        value = json.loads(text, parse_int=parse_int, parse_float=parse_float, parse_constant=_reject_constant)
    except BadJson:
        raise
    except RecursionError:
        raise BadJson(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:  # json.JSONDecodeError and int() limits
        raise BadJson(f"not valid JSON: {exc}") from None
    _check_tree(value, max_depth, max_string_chars)
    return value
