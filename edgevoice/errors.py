"""The shared vocabulary: what an identifier is, and errors that carry a client-facing code.

Pure functions and exception classes, no I/O and no edgevoice imports, so every
layer may use them. Every identifier a client or the configuration names (stream,
session, customer, FunVoiceChat user) is checked by :func:`is_identifier`; every
error whose ``code`` a client is told (``/asr-multicam`` ``error`` messages, the
seat endpoints' JSON, FunVoiceChat) is a :class:`CodedError`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import ClassVar, TypeGuard

IDENTIFIER_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"
"""An identifier, anchored (for pydantic's ``pattern``); :func:`is_identifier` matches it whole."""
IDENTIFIER_RULE = "1–128 characters from [A-Za-z0-9_.:@-]"
"""The rule in words, for error messages."""
_IDENTIFIER = re.compile(IDENTIFIER_PATTERN)


def is_identifier(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a string of 1–128 characters from ``[A-Za-z0-9_.:@-]`` (no trailing newline)."""
    return isinstance(value, str) and _IDENTIFIER.fullmatch(value) is not None


def describe(value: object, limit: int = 60) -> str:
    """A short printable form of a client's value for an error message (quoted, cut at ``limit``, always encodable)."""
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=repr)
    except (ValueError, RecursionError):  # an int past Python's digit limit, a cycle, deep nesting
        text = f"<{type(value).__name__}>"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate becomes \\ud800
    return text if len(text) <= limit else text[: limit - 3] + "..."


class CodedError(Exception):
    """An error a client is told about: a stable machine-readable ``code`` and a ``message`` for a person."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def identifier_field(obj: Mapping[str, object], name: str, error: type[CodedError] = CodedError) -> str:
    """``obj[name]`` when it is an identifier; else raise ``error`` coded ``missing_field`` or ``bad_identifier``."""
    value = obj.get(name)
    if value is None:
        raise error("missing_field", f"{name} is required")
    if not is_identifier(value):
        raise error("bad_identifier", f"{name} must be {IDENTIFIER_RULE}, got {describe(value)}")
    return value


class RecognizerError(CodedError, ValueError):
    """The recognizer refuses to open a stream; the subclass says why (and sets the code)."""

    CODE: ClassVar[str] = "recognizer_error"

    def __init__(self, message: str) -> None:
        super().__init__(self.CODE, message)


class BadIdentifier(RecognizerError):
    """The stream id is not an identifier."""

    CODE = "bad_identifier"


class BadLanguage(RecognizerError):
    """The model cannot decode the language asked for."""

    CODE = "bad_language"


class DuplicateStream(RecognizerError):
    """A stream with this id is still open in the recognizer."""

    CODE = "duplicate_stream"
