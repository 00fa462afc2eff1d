"""Logging to journald (structured fields) under systemd, else to stderr."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: str = "INFO") -> None:
    """Route the root logger to journald when ``$JOURNAL_STREAM`` is set, else stderr."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler | None = None
    if os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER="edgevoice")
            handler.setFormatter(logging.Formatter("%(message)s"))
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)


def fields(**values: object) -> dict[str, dict[str, str]]:
    """``extra=`` for a log call: journald fields such as SESSION_ID, CUSTOMER_ID, STREAM_ID, EVENT."""
    return {"extra": {k.upper(): str(v) for k, v in values.items() if v is not None}}
