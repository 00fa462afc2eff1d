"""Shared fixtures: real speech, real daemons."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.receiver import Receiver


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start real daemons in subprocesses; all are killed at teardown."""
    started: list[Daemon] = []

    def make(env: dict[str, str] | None = None, config: str | None = None, start: bool = True, **kw: object) -> Daemon:
        sub = tmp_path / f"d{len(started)}"
        sub.mkdir()
        d = Daemon(sub, env=env, config=config, **kw)  # type: ignore[arg-type]
        started.append(d)
        return d.start() if start else d

    yield make
    for d in started:
        d.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A real experience-event API on 127.0.0.1 (see tests/support/receiver.py)."""
    with Receiver() as rx:
        yield rx
