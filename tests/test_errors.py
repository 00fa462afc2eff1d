"""The shared vocabulary: one identifier check, one coded-error base for every client-facing error."""

from __future__ import annotations

import pytest

from edgevoice.errors import (
    BadIdentifier,
    BadLanguage,
    CodedError,
    DuplicateStream,
    RecognizerError,
    describe,
    identifier_field,
    is_identifier,
)
from edgevoice.events.hub import StreamError
from edgevoice.funvoice.gemini import LiveError
from edgevoice.sources.multicam import ProtocolError
from edgevoice.sources.seats import SeatError


@pytest.mark.parametrize("value", ["a", "table_05", "cam:1@door.2-b", "x" * 128])
def test_identifiers(value: str) -> None:
    assert is_identifier(value)


@pytest.mark.parametrize("value", ["", "x" * 129, "a b", "khách", "seat_1\n", "\nseat_1", "a/b", 5, None, ["a"]])
def test_not_identifiers(value: object) -> None:
    assert not is_identifier(value)


def test_identifier_field_names_the_field_and_the_value() -> None:
    assert identifier_field({"customer_id": "c1"}, "customer_id") == "c1"
    with pytest.raises(SeatError) as missing:
        identifier_field({}, "customer_id", SeatError)
    assert (missing.value.code, missing.value.message) == ("missing_field", "customer_id is required")
    with pytest.raises(ProtocolError) as bad:
        identifier_field({"session_id": "t 5\n"}, "session_id", ProtocolError)
    assert bad.value.code == "bad_identifier"
    assert bad.value.message == "session_id must be 1–128 characters from [A-Za-z0-9_.:@-], got 't 5\\n'"


def test_describe_quotes_and_cuts() -> None:
    assert describe("ab") == "'ab'"
    assert describe({"a": [1, None]}) == '{"a": [1, null]}'
    long = describe("x" * 500)
    assert len(long) == 60 and long.endswith("...")


def test_every_client_facing_error_is_coded() -> None:
    for cls in (ProtocolError, SeatError, StreamError, LiveError, RecognizerError):
        assert issubclass(cls, CodedError)
    live = LiveError("llm_rejected", "no key", fatal=True)
    assert (live.code, live.message, live.fatal, str(live)) == ("llm_rejected", "no key", True, "no key")
    assert (ProtocolError("bad_json", "x", "s1").stream_id, StreamError("unknown_stream", "y").code) == (
        "s1",
        "unknown_stream",
    )


def test_recognizer_errors_carry_their_code_and_stay_value_errors() -> None:
    for cls, code in (
        (BadIdentifier, "bad_identifier"),
        (BadLanguage, "bad_language"),
        (DuplicateStream, "duplicate_stream"),
    ):
        err = cls("why")
        assert isinstance(err, ValueError) and (err.code, err.message) == (code, "why")
