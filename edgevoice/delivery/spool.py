"""The disk spool: one writer thread that group-commits to SQLite; the event loop never waits on disk.

Thread model: every change (append, delete after delivery, failure
bookkeeping, dead-letter, session records) is a typed command on a queue. The
writer thread takes the first command, gathers whatever else arrives within
``events.commit_window_ms``, applies them all in one transaction and commits
once (one fsync for the batch), then resolves the callers' futures on the
loop. An append therefore returns once its event is on disk — or, while the
disk cannot be written, once it is held in memory (below).

Bounds: ``max_events`` and ``max_bytes`` are enforced at append time with
``full_policy``: ``refuse_new`` fails the append with :class:`SpoolFull`;
``drop_oldest`` first drops the oldest dead letters (for the byte and disk
bounds), then the oldest waiting events, and reports them. At most
``MAX_BATCH`` commands per transaction; at most ``memory_max_events`` events
held in memory.

**When the disk does not answer** (a lock held by another process for longer
than ``lock_timeout_s``, an I/O error, a full disk, free disk below
``state.min_free_mb``, a file damaged at run time) nothing accepted is lost:
the commands that could not be committed stay in memory, in order, and are
retried with a capped backoff until the disk answers; appends arriving
meanwhile are accepted into memory (``Event.seq`` 0) up to
``events.memory_max_events`` (then :class:`SpoolFull`). Deliveries of events
already on disk go on; held events are handed to the sender once committed.
:attr:`Spool.degraded` says why (``/health``, a metric). A file found damaged
(at start or at run time) is moved aside and a fresh one started with
everything still readable in it — waiting events stay waiting, in their order.

**Age** is measured on the spool clock (:meth:`Spool.clock`): monotonic time
while the daemon runs, carried across restarts in the file (saved every
``CLOCK_SAVE_S`` while events wait, and at close; a crash loses at most that
much ageing). A maintenance tick (1 s) moves events waiting longer than
``max_age_s`` to the dead-letter table and picks up rows that the operator CLI
re-queued (an event re-queued from the dead letters takes back its place in
its customer's order).

**Customer sessions** (crash recovery for the hub), all committed in the same
group commit as the events around them, in call order:

- ``await spool.append(id, customer, event, session_id, effect="keyword")``:
  the event, plus "``event`` fired in (session, customer)";
- ``await spool.append(id, customer, "SESSION_END", session_id, effect="end")``:
  the event, plus forgetting the session (its streams and keywords);
- ``spool.attach_stream(session_id, customer_id, stream_id)`` /
  ``spool.detach_stream(...)``: which streams feed an open session;
- ``spool.open_sessions() -> list[OpenSession]``: what was recorded as open
  when the spool was opened, i.e. who was seated when the daemon last stopped
  (after SIGKILL or power loss), with their stream ids and fired keywords.

After a crash the hub either **ends** each open session at start
(``submit(customer, "SESSION_END", session_id=…, effect="end")``: exactly one
SESSION_END, since the end and the session record change in one commit), or
**resumes** it (seeds the customer's fired keywords from ``keywords`` so none
fires twice, and detaches the stale ``streams`` that do not come back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from edgevoice.config import EventsSettings
from edgevoice.delivery import store
from edgevoice.delivery.api import DeliveryState, SessionEffect, SpoolFull
from edgevoice.delivery.store import Event, OpenSession

log = logging.getLogger(__name__)

MAX_BATCH = 1024
TICK_S = 1.0
CLOCK_SAVE_S = 60.0
"""How often the spool clock is written while events wait."""
RETRY_FIRST_S, RETRY_CAP_S = 0.25, 5.0
"""Backoff between attempts to write while the disk does not answer."""
RETRY_LOCK_WAIT_MS = 200
"""Lock wait of each retry once degraded (new events are held in memory meanwhile)."""
CLOSE_BUDGET_S = 5.0
"""How long close keeps retrying held commands before it gives them up (logged, with their payloads)."""
REMIND_S = 60.0

_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_NOMEM, _SQLITE_READONLY, _SQLITE_IOERR = 5, 6, 7, 8, 10
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_CANTOPEN, _SQLITE_PROTOCOL, _SQLITE_NOTADB = 11, 13, 14, 15, 26
_UNAVAILABLE = {
    _SQLITE_BUSY,
    _SQLITE_LOCKED,
    _SQLITE_NOMEM,
    _SQLITE_READONLY,
    _SQLITE_IOERR,
    _SQLITE_CORRUPT,
    _SQLITE_FULL,
    _SQLITE_CANTOPEN,
    _SQLITE_PROTOCOL,
    _SQLITE_NOTADB,
}


class SpoolError(Exception):
    """The spool cannot take the command (closed spool, or a command SQLite refuses: a bug)."""


class SpoolListener(Protocol):
    """What the spool reports, on the event loop, in commit order."""

    def spool_added(self, events: list[Event]) -> None:
        """Events now waiting on disk: committed appends, and events the operator re-queued."""

    def spool_removed(self, events: list[Event], state: DeliveryState, detail: str) -> None:
        """Waiting events the spool itself removed: dropped when full, or dead-lettered for age."""

    def spool_state(self, degraded: str | None) -> None:
        """The spool stopped (reason) or started again (None) being writable."""

    def spool_replaced(self, moved_aside: Path) -> None:
        """The file was damaged at run time, moved aside and replaced; events known in memory may be missing."""


# -- commands --------------------------------------------------------------------


@dataclass(slots=True)
class _Append:
    event: Event
    effect: SessionEffect | None
    fut: asyncio.Future[Event] | None
    held: bool = False


@dataclass(slots=True)
class _Delete:
    event_id: str
    fut: asyncio.Future[None] | None


@dataclass(slots=True)
class _Fail:
    event_id: str
    attempts: int
    error: str
    fut: asyncio.Future[None] | None


@dataclass(slots=True)
class _Bury:
    event_id: str
    reason: str
    status: int | None
    response: str | None
    fut: asyncio.Future[bool] | None


@dataclass(slots=True)
class _Stream:
    session_id: str
    customer_id: str
    stream_id: str
    attached: bool
    fut: asyncio.Future[None] | None
    wall: float = 0.0


@dataclass(slots=True)
class _Restore:
    events: list[Event]
    fut: asyncio.Future[None] | None


@dataclass(slots=True)
class _Tick:
    fut: asyncio.Future[None] | None


@dataclass(slots=True)
class _Close:
    fut: asyncio.Future[None] | None


_Command = _Append | _Delete | _Fail | _Bury | _Stream | _Restore | _Tick | _Close
_Ordered = (_Append, _Stream)
"""Commands that keep their relative order when some are held (events and session records)."""

_Result = tuple["asyncio.Future[Any] | None", object, BaseException | None]
_Removed = tuple[list[Event], DeliveryState, str]


@dataclass(slots=True)
class _Counts:
    waiting: int = 0
    waiting_bytes: int = 0
    dead: int = 0
    dead_bytes: int = 0

    def copy(self) -> _Counts:
        return _Counts(self.waiting, self.waiting_bytes, self.dead, self.dead_bytes)


@dataclass
class SpoolStats:
    """Writer-side counters (read from the loop; ints are replaced atomically)."""

    commits: int = 0
    appended: int = 0
    refused: int = 0
    dropped: int = 0
    expired: int = 0
    held_total: int = 0
    write_failures: int = 0
    replaced: int = 0
    last_error: str | None = None
    full_reason: str | None = None
    batch_sizes: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Outcome:
    results: list[_Result] = field(default_factory=list)
    added: list[Event] = field(default_factory=list)
    removed: list[_Removed] = field(default_factory=list)
    held: list[_Command] = field(default_factory=list)
    held_reason: str | None = None


class _Unavailable(Exception):
    """Internal: the disk did not answer (``reason``); the commands are kept and retried."""

    def __init__(self, reason: str, corrupt: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.corrupt = corrupt


# -- errors and damaged files ----------------------------------------------------


def _errcode(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else int(code) & 0xFF


def is_corruption(exc: sqlite3.Error) -> bool:
    """True when SQLite says the file is damaged or not a database (not for locks or permissions)."""
    code = _errcode(exc)
    if code is not None:
        return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def unavailable_reason(exc: sqlite3.Error, lock_timeout_s: float) -> str | None:
    """Why the disk did not answer (worth retrying), or None for an error retrying cannot fix (a bug)."""
    code = _errcode(exc)
    text = str(exc)
    if code is None:
        low = text.lower()
        if "locked" in low or "busy" in low:
            code = _SQLITE_BUSY
        elif "disk is full" in low:
            code = _SQLITE_FULL
        elif "malformed" in low or "not a database" in low:
            code = _SQLITE_CORRUPT
        elif "disk i/o" in low or "unable to open" in low or "readonly" in low:
            code = _SQLITE_IOERR
    if code not in _UNAVAILABLE:
        return None
    if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return f"spool locked by another process for more than {lock_timeout_s:g} s ({text})"
    if code == _SQLITE_FULL:
        return f"disk full ({text})"
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return f"spool file damaged ({text})"
    return f"spool cannot be written: {getattr(exc, 'sqlite_errorname', None) or 'error'} ({text})"


def move_aside(path: Path, now: datetime | None = None) -> Path:
    """Rename a damaged spool (and its -wal/-shm) to ``<name>.corrupt-<UTC timestamp>``; return the new path."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            src.rename(target.with_name(target.name + suffix))
    return target


def open_file(
    path: Path, *, busy_timeout_ms: int = store.BUSY_TIMEOUT_MS, min_seq: int = 0
) -> tuple[sqlite3.Connection, Path | None]:
    """Open (or create) the spool; a damaged file is moved aside and a fresh one started with what it still holds.

    ``min_seq``: a fresh file hands out event numbers above it (the writer's highest, when replacing at run time).
    """
    conn: sqlite3.Connection | None = None
    try:
        conn = store.connect(path, create=True, check_same_thread=False, busy_timeout_ms=busy_timeout_ms)
        verdict = store.quick_check(conn)
        if verdict != "ok":
            raise sqlite3.DatabaseError(f"quick_check: {verdict}")
        store.ensure_schema(conn)
        return conn, None
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        if type(exc) is not sqlite3.DatabaseError and not is_corruption(exc):
            raise SpoolError(f"spool {path}: cannot open it: {exc}") from None
        try:
            moved = move_aside(path)
        except OSError as err:
            raise SpoolError(f"spool {path} is damaged ({exc}) and cannot be moved aside: {err}") from None
        log.error("spool %s is damaged (%s): moved it aside to %s and started a fresh spool", path, exc, moved)
        conn = store.connect(path, create=True, check_same_thread=False, busy_timeout_ms=busy_timeout_ms)
        store.ensure_schema(conn)
        got = store.salvage(moved, conn)
        if min_seq:
            store.begin(conn)
            store.raise_sequence(conn, min_seq)
            store.commit(conn)
        if got.waiting or got.dead or got.sessions:
            log.warning(
                "spool: recovered from the damaged file %d waiting event(s) (queued again, in their order), "
                "%d dead letter(s) and %d open customer session(s)",
                got.waiting,
                got.dead,
                got.sessions,
            )
        return conn, moved


class Spool:
    """The durable queue of waiting events, written by one thread."""

    def __init__(
        self,
        path: Path,
        settings: EventsSettings,
        *,
        min_free_mb: int = 0,
        listener: SpoolListener | None = None,
    ) -> None:
        self.path = path
        self.settings = settings
        self.min_free_bytes = min_free_mb << 20
        self.listener = listener
        self.stats = SpoolStats()
        self.counts = _Counts()
        self.moved_aside: Path | None = None
        self.degraded: str | None = None
        """Why the spool cannot be written now (None while it can); set by the writer thread."""
        self.degraded_since: float | None = None
        """``time.monotonic()`` when it became degraded."""
        self.held = 0
        """Events accepted into memory and not yet on disk."""
        self._queue: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._fatal: BaseException | None = None
        self._data_version = 0
        self._scanned_upto = 0
        self._own_since_scan: set[int] = set()
        self._max_own_seq = 0
        self._top_seq = 0
        self._next_tick = 0.0
        self._backlog: list[_Command] = []
        self._held_streams = 0
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST_S
        self._reminded = 0.0
        self._clock_base = 0.0
        self._clock_mono = time.monotonic()
        self._clock_saved = 0.0
        self._sessions: list[OpenSession] = []

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> list[Event]:
        """Open the file (off the loop), start the writer; return the waiting events in delivery order."""
        self._loop = asyncio.get_running_loop()
        waiting = await asyncio.to_thread(self._open_sync)
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()
        return waiting

    @property
    def _lock_ms(self) -> int:
        return int(self.settings.lock_timeout_s * 1000)

    def _open_sync(self) -> list[Event]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn, self.moved_aside = open_file(self.path, busy_timeout_ms=self._lock_ms)
        self._after_open(self._conn)
        self._sessions = store.open_sessions(self._conn)
        waiting = store.waiting(self._conn)
        self._scanned_upto = max((e.seq for e in waiting), default=0)
        return waiting

    def _after_open(self, conn: sqlite3.Connection) -> None:
        self._recount()
        self._clock_base = max(self._clock_base + time.monotonic() - self._clock_mono, store.read_clock(conn))
        self._clock_mono = time.monotonic()
        self._top_seq = max(self._top_seq, store.max_seq(conn))
        self._data_version = store.data_version(conn)

    def _recount(self) -> None:
        assert self._conn is not None
        s = store.stats(self._conn, self.path)
        self.counts = _Counts(s.waiting, s.waiting_bytes, s.dead, s.dead_bytes)

    async def close(self) -> None:
        """Commit what is queued (and what is held, if the disk answers within a few seconds), then close the file."""
        if self._thread is None or self._closed:
            return
        fut: asyncio.Future[None] = self._future()
        self._put(_Close(fut), fut)  # a dead writer: fails at once instead of waiting forever
        self._closed = True
        try:
            await fut
        finally:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._fatal is None

    def clock(self) -> float:
        """The spool clock: seconds of daemon run time, monotonic, carried across restarts (safe from any thread)."""
        return self._clock_base + (time.monotonic() - self._clock_mono)

    def open_sessions(self) -> list[OpenSession]:
        """The customer sessions recorded as open when the spool was opened (who was seated at the last stop)."""
        return list(self._sessions)

    # -- commands (called on the loop) -------------------------------------

    def _future(self) -> asyncio.Future[Any]:
        assert self._loop is not None, "spool not open"
        return self._loop.create_future()

    def _check_open(self) -> SpoolError | None:
        if self._closed or self._fatal is not None:
            return SpoolError(f"spool {self.path} is closed" + (f": {self._fatal}" if self._fatal else ""))
        return None

    def _put(self, cmd: _Command, fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
        err = self._check_open()
        if err is not None:
            fut.set_exception(err)
        else:
            self._queue.put(cmd)
        return fut

    async def append(
        self,
        event_id: str,
        customer_id: str,
        event: str,
        session_id: str | None,
        *,
        effect: SessionEffect | None = None,
    ) -> Event:
        """Store one event (and its ``effect`` on its session, in the same commit).

        Returns it once committed (``seq`` > 0), or once held in memory because the disk does not answer
        (``seq`` 0; written as soon as it does). Raises SpoolFull, or SpoolError when closed.
        """
        if effect is not None and session_id is None:
            raise ValueError(f"effect={effect!r} needs a session_id")
        size = store.row_size(customer_id, event, session_id)
        ev = Event(0, event_id, customer_id, event, session_id, time.time(), 0, None, size, None, self.clock())
        fut: asyncio.Future[Event] = self._future()
        result: Event = await self._put(_Append(ev, effect, fut), fut)
        return result

    def delete(self, event_id: str) -> asyncio.Future[None]:
        """Forget a delivered event (from the waiting or dead-letter table)."""
        fut: asyncio.Future[None] = self._future()
        return self._quiet(self._put(_Delete(event_id, fut), fut))

    def record_failure(self, event_id: str, attempts: int, error: str) -> asyncio.Future[None]:
        """Remember a failed attempt (shown by ``spool list``)."""
        fut: asyncio.Future[None] = self._future()
        return self._quiet(self._put(_Fail(event_id, attempts, error[:500], fut), fut))

    def bury(
        self, event_id: str, reason: str, status: int | None = None, response: str | None = None
    ) -> asyncio.Future[bool]:
        """Move a waiting event to the dead-letter table."""
        fut: asyncio.Future[bool] = self._future()
        return self._quiet(self._put(_Bury(event_id, reason, status, response, fut), fut))

    def attach_stream(self, session_id: str, customer_id: str, stream_id: str) -> asyncio.Future[None]:
        """Record that ``stream_id`` feeds the customer session (opens the session record)."""
        fut: asyncio.Future[None] = self._future()
        return self._quiet(self._put(_Stream(session_id, customer_id, stream_id, True, fut, time.time()), fut))

    def detach_stream(self, session_id: str, customer_id: str, stream_id: str) -> asyncio.Future[None]:
        """Record that ``stream_id`` left the customer session (the session stays recorded until its end)."""
        fut: asyncio.Future[None] = self._future()
        return self._quiet(self._put(_Stream(session_id, customer_id, stream_id, False, fut), fut))

    def restore(self, events: list[Event]) -> asyncio.Future[None]:
        """Write back waiting events known in memory that the file lacks (after it was replaced)."""
        fut: asyncio.Future[None] = self._future()
        return self._quiet(self._put(_Restore([e for e in events if e.seq > 0], fut), fut))

    async def barrier(self) -> None:
        """Wait until every command queued before it is committed or held in memory (and run a maintenance tick)."""
        fut: asyncio.Future[None] = self._future()
        await self._put(_Tick(fut), fut)

    @staticmethod
    def _quiet(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
        def done(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.error("spool: %s", f.exception())

        fut.add_done_callback(done)
        return fut

    # -- the writer thread -------------------------------------------------

    def _run(self) -> None:
        try:
            closing = False
            while not closing:
                batch = self._gather()
                closing = any(isinstance(c, _Close) for c in batch)
                if self._backlog:
                    self._admit(batch)
                    if not closing and time.monotonic() < self._retry_at:
                        continue
                    work, self._backlog = self._backlog, []
                else:
                    work = batch
                if time.monotonic() >= self._next_tick and not any(isinstance(c, (_Tick, _Close)) for c in work):
                    work.append(_Tick(None))
                if any(isinstance(c, _Tick) for c in work) or not work:
                    self._next_tick = time.monotonic() + TICK_S  # even if the tick fails: no busy loop
                if not work:
                    work = [_Tick(None)]
                self._apply(work)
            if self._backlog:
                self._close_degraded()
        except BaseException as exc:  # pragma: no cover - a bug; fail loudly rather than hang callers
            self._fatal = exc
            log.exception("spool writer died")
        finally:
            self._fail_pending()
            if self._conn is not None:
                try:
                    self._conn.close()
                except sqlite3.Error as exc:  # pragma: no cover
                    log.error("spool close: %s", exc)

    def _gather(self) -> list[_Command]:
        """The next batch: the first command (waiting at most until the next tick or retry), then the window's."""
        deadline = self._retry_at if self._backlog else self._next_tick
        try:
            first = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return []
        batch = [first]
        window_end = time.monotonic() + self.settings.commit_window_ms / 1000
        while len(batch) < MAX_BATCH and not isinstance(batch[-1], _Close):
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = window_end - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _apply(self, work: list[_Command]) -> None:
        """Commit ``work``; keep what the disk did not take (in order) for the next attempt."""
        outcome = self._execute(work)
        if outcome.held:
            self._hold(outcome.held, outcome.held_reason or "spool cannot be written")
        elif self.degraded is not None:
            self._recovered()

    def _execute(self, work: list[_Command]) -> _Outcome:
        """Apply ``work`` in one transaction; if SQLite refuses it for another reason, isolate the bad command."""
        try:
            outcome = self._transaction(work)
        except _Unavailable as exc:
            if exc.corrupt:
                self._replace_damaged()
            return _Outcome(held=work, held_reason=exc.reason)
        except sqlite3.Error as exc:
            if len(work) == 1:
                self.stats.last_error = str(exc)
                log.error("spool %s: %s failed: %s", self.path, type(work[0]).__name__.strip("_").lower(), exc)
                self._post(_Outcome(results=[(work[0].fut, None, SpoolError(f"spool: {exc}"))]))
                return _Outcome()
            for i, cmd in enumerate(work):
                one = self._execute([cmd])
                if one.held:
                    return _Outcome(held=one.held + work[i + 1 :], held_reason=one.held_reason)
            return _Outcome()
        self._post(outcome)
        return outcome

    def _ensure_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            try:
                self._conn, moved = open_file(self.path, busy_timeout_ms=self._lock_ms, min_seq=self._top_seq)
            except (SpoolError, sqlite3.Error, OSError) as exc:
                raise _Unavailable(f"spool cannot be opened ({exc})") from None
            self._after_open(self._conn)
            self._scanned_upto = max(self._scanned_upto, self._top_seq)
            if moved is not None:
                self.moved_aside = moved
                self.stats.replaced += 1
                self._post_call(self._replaced, moved)
        if self.degraded is not None:
            store.set_busy_timeout(self._conn, RETRY_LOCK_WAIT_MS)
        return self._conn

    def _transaction(self, batch: list[_Command]) -> _Outcome:
        conn = self._ensure_conn()
        saved = self.counts.copy()
        out = _Outcome()
        own: list[int] = []
        delta = {"appended": 0, "refused": 0, "dropped": 0, "expired": 0}
        full_reason: str | None = None
        wrote = False
        try:
            try:
                store.begin(conn)
                free = self._free_bytes() if any(isinstance(c, _Append) for c in batch) else 0
                for cmd in batch:
                    if out.held and isinstance(cmd, _Ordered):
                        out.held.append(cmd)  # behind a held event: keep the order
                        continue
                    if isinstance(cmd, _Append):
                        try:
                            ev, dropped, full_reason = self._append(conn, cmd, free, full_reason)
                        except SpoolFull as exc:
                            full_reason = self.stats.full_reason
                            delta["refused"] += 1
                            out.results.append((cmd.fut, None, exc))
                            continue
                        if ev is None:  # the disk floor: keep it in memory
                            out.held.append(cmd)
                            out.held_reason = full_reason
                            continue
                        free -= ev.size
                        if dropped:
                            gone = {d.seq for d in dropped}
                            out.added[:] = [a for a in out.added if a.seq not in gone]
                            delta["dropped"] += len(dropped)
                            out.removed.append((dropped, "dropped", "spool full: dropped as the oldest"))
                        own.append(ev.seq)
                        out.added.append(ev)
                        delta["appended"] += 1
                        out.results.append((cmd.fut, ev, None))
                    elif isinstance(cmd, _Delete):
                        self._delete(conn, cmd.event_id)
                        out.results.append((cmd.fut, None, None))
                    elif isinstance(cmd, _Fail):
                        store.record_failure(conn, cmd.event_id, cmd.attempts, cmd.error)
                        out.results.append((cmd.fut, None, None))
                    elif isinstance(cmd, _Bury):
                        out.results.append((cmd.fut, self._bury(conn, cmd.event_id, cmd.reason, cmd.status,
                                                                cmd.response), None))  # fmt: skip
                    elif isinstance(cmd, _Stream):
                        if cmd.attached:
                            store.session_attach(conn, cmd.session_id, cmd.customer_id, cmd.stream_id, cmd.wall)
                        else:
                            store.session_detach(conn, cmd.session_id, cmd.customer_id, cmd.stream_id)
                        out.results.append((cmd.fut, None, None))
                    elif isinstance(cmd, _Restore):
                        n = store.restore_events(conn, cmd.events)
                        if n:
                            log.warning("spool: wrote back %d waiting event(s) known in memory", n)
                        out.results.append((cmd.fut, None, None))
                    else:  # _Tick, _Close
                        out.results.append((cmd.fut, None, None))
                    wrote = wrote or not isinstance(cmd, (_Tick, _Close))
                if any(isinstance(c, (_Tick, _Close)) for c in batch):
                    out.removed.extend(
                        self._tick(conn, out.added, delta, closing=any(isinstance(c, _Close) for c in batch))
                    )
                if any(isinstance(c, _Restore) for c in batch):
                    self._recount()
                store.commit(conn)
            except BaseException:
                self.counts = saved
                with contextlib.suppress(sqlite3.Error):
                    store.rollback(conn)
                raise
        except sqlite3.Error as exc:
            reason = unavailable_reason(exc, self.settings.lock_timeout_s)
            if reason is None:
                raise
            self.stats.write_failures += 1
            self.stats.last_error = reason
            raise _Unavailable(reason, corrupt=is_corruption(exc)) from None
        for ev in out.added:
            self._top_seq = max(self._top_seq, ev.seq)
        if out.removed or wrote:
            self.stats.commits += 1
            self.stats.batch_sizes.append(delta["appended"])
        if len(self.stats.batch_sizes) > 10_000:
            del self.stats.batch_sizes[:5000]
        for k, v in delta.items():
            setattr(self.stats, k, getattr(self.stats, k) + v)
        self._own_since_scan.update(own)
        if own:
            self._max_own_seq = max(self._max_own_seq, *own)
        if delta["refused"]:
            log.warning(
                "spool full (%s): refused %d new event(s) (full_policy=refuse_new)", full_reason, delta["refused"]
            )
        if delta["dropped"]:
            ids = [e.id for evs, st, _ in out.removed if st == "dropped" for e in evs]
            log.warning(
                "spool full (%s): dropped %d oldest event(s) (full_policy=drop_oldest): %s",
                full_reason,
                len(ids),
                ", ".join(ids[:10]) + (" …" if len(ids) > 10 else ""),
            )
        return out

    def _delete(self, conn: sqlite3.Connection, event_id: str) -> None:
        gone = store.delete_event(conn, event_id)
        if gone is None:
            return
        table, size = gone
        if table == "events":
            self.counts.waiting -= 1
            self.counts.waiting_bytes -= size
        else:  # delivered after all, while being dead-lettered for age
            self.counts.dead -= 1
            self.counts.dead_bytes -= size

    def _bury(
        self, conn: sqlite3.Connection, event_id: str, reason: str, status: int | None, response: str | None
    ) -> bool:
        size = store.waiting_size(conn, event_id)
        if size is None or not store.move_to_dead(conn, event_id, reason, status, response, time.time()):
            return False
        self.counts.waiting -= 1
        self.counts.waiting_bytes -= size
        self.counts.dead += 1
        self.counts.dead_bytes += store.dead_size(conn, event_id) or 0
        return True

    def _free_bytes(self) -> int:
        if not self.min_free_bytes:
            return 1 << 62
        try:
            return shutil.disk_usage(self.path.parent).free
        except OSError:
            return 1 << 62

    def _full_reason(self, size: int, free: int) -> str | None:
        s, c = self.settings, self.counts
        if c.waiting + 1 > s.max_events:
            return f"max_events={s.max_events} reached"
        if c.waiting_bytes + c.dead_bytes + size > s.max_bytes:
            return f"max_bytes={s.max_bytes} reached ({c.waiting_bytes + c.dead_bytes} bytes stored)"
        if free - size < self.min_free_bytes:
            return f"free disk below state.min_free_mb={self.min_free_bytes >> 20} ({free >> 20} MiB free)"
        return None

    def _append(
        self, conn: sqlite3.Connection, cmd: _Append, free: int, full: str | None
    ) -> tuple[Event | None, list[Event], str | None]:
        """Insert one event (making room per ``full_policy``); None when the disk floor keeps it in memory."""
        ev = cmd.event
        dropped: list[Event] = []
        reason = self._full_reason(ev.size, free)
        if reason is None:
            self.stats.full_reason = None  # room again
        while reason is not None:
            self.stats.full_reason = full = reason
            disk = reason.startswith("free disk")
            if self.settings.full_policy == "refuse_new":
                if disk:
                    return None, dropped, reason
                raise SpoolFull(f"spool full: {reason}; new event {ev.event} for customer {ev.customer_id} refused")
            victim = self._drop_one(conn, prefer_dead=not reason.startswith("max_events"))
            if victim is None:
                if disk:
                    return None, dropped, reason
                raise SpoolFull(f"spool full: {reason} and nothing left to drop; event {ev.event} refused")
            if isinstance(victim, Event):
                dropped.append(victim)
            if disk:
                break  # the dropped row's pages are reused by the new one; the file does not grow
            reason = self._full_reason(ev.size, free)
        ev.seq = store.insert_event(conn, ev)
        if cmd.effect == "keyword" and ev.session_id is not None:
            store.session_keyword(conn, ev.session_id, ev.customer_id, ev.event, ev.created)
        elif cmd.effect == "end" and ev.session_id is not None:
            store.session_end(conn, ev.session_id, ev.customer_id)
        self.counts.waiting += 1
        self.counts.waiting_bytes += ev.size
        return ev, dropped, full

    def _drop_one(self, conn: sqlite3.Connection, *, prefer_dead: bool) -> Event | bool | None:
        """Delete the oldest dead letter (when preferred and any) or the oldest waiting event."""
        if prefer_dead:
            gone = store.delete_oldest_dead(conn)
            if gone:
                self.counts.dead -= 1
                self.counts.dead_bytes -= gone[1]
                log.warning("spool full: dropped the oldest dead letter %s", gone[0])
                return True
        victims = store.waiting(conn, limit=1)
        if not victims:
            return None
        store.delete_waiting_seq(conn, victims[0].seq)
        self.counts.waiting -= 1
        self.counts.waiting_bytes -= victims[0].size
        return victims[0]

    def _tick(
        self, conn: sqlite3.Connection, added: list[Event], delta: dict[str, int], *, closing: bool
    ) -> list[_Removed]:
        """Maintenance: pick up rows re-queued by another process; dead-letter expired events; save the clock."""
        removed: list[_Removed] = []
        version = store.data_version(conn)
        if version != self._data_version:
            self._data_version = version
            rows = store.waiting(conn, after_seq=self._scanned_upto)
            external = [r for r in rows if r.seq not in self._own_since_scan]
            if external:
                log.info("spool: %d event(s) re-queued by another process", len(external))
                added.extend(external)
            if rows:
                self._scanned_upto = max(self._scanned_upto, *(r.seq for r in rows))
            self._recount()
        self._scanned_upto = max(self._scanned_upto, self._max_own_seq)
        self._own_since_scan.clear()
        now = self.clock()
        expired = store.expired(conn, now - self.settings.max_age_s, limit=1000)
        if expired:
            reason = f"expired: waited longer than max_age_s={self.settings.max_age_s:g}"
            for ev in expired:
                self._bury(conn, ev.id, reason, None, ev.last_error)
            delta["expired"] += len(expired)
            log.warning(
                "spool: %d event(s) waiting longer than %g s moved to dead-letter",
                len(expired),
                self.settings.max_age_s,
            )
            removed.append((expired, "dead", reason))
        mono = time.monotonic()
        if closing or (self.counts.waiting and mono - self._clock_saved >= CLOCK_SAVE_S):
            store.write_clock(conn, now)
            self._clock_saved = mono
        return removed

    # -- degraded mode (writer thread) ---------------------------------------

    def _hold(self, cmds: list[_Command], reason: str) -> None:
        """Keep ``cmds`` (in order) for the next attempt; accept their events into memory, up to the bound."""
        first = self.degraded is None
        now = time.monotonic()
        if first:
            self.degraded_since = self._reminded = now
            self._retry_delay = RETRY_FIRST_S
        else:
            self._retry_delay = min(RETRY_CAP_S, self._retry_delay * 2)
        changed = self.degraded != reason
        self.degraded = reason  # before any caller learns its event is held
        if first:
            log.error(
                "spool %s: %s; keeping new events in memory (at most events.memory_max_events=%d) and retrying",
                self.path,
                reason,
                self.settings.memory_max_events,
            )
        self._backlog = []
        self.held = self._held_streams = 0
        self._admit(cmds)
        if changed:
            self._post_call(self._state_changed, reason)
        if not first and now - self._reminded >= REMIND_S:
            self._reminded = now
            log.error(
                "spool %s still cannot be written after %.0f s: %s; %d event(s) held in memory",
                self.path,
                now - (self.degraded_since or now),
                reason,
                self.held,
            )
        self._retry_at = now + self._retry_delay

    def _admit(self, cmds: list[_Command]) -> None:
        """Add commands to the backlog: events accepted into memory (or refused beyond the bound), barriers answered."""
        results: list[_Result] = []
        bound = self.settings.memory_max_events
        for cmd in cmds:
            if isinstance(cmd, _Append):
                if not cmd.held:
                    if self.held >= bound:
                        self.stats.refused += 1
                        err = SpoolFull(
                            f"spool unavailable ({self.degraded or 'cannot be written'}) and "
                            f"events.memory_max_events={bound} events already held in memory; "
                            f"event {cmd.event.event} for customer {cmd.event.customer_id} refused"
                        )
                        log.error("%s", err)
                        results.append((cmd.fut, None, err))
                        continue
                    cmd.held = True
                    self.stats.held_total += 1
                    results.append((cmd.fut, cmd.event, None))
                self.held += 1
            elif isinstance(cmd, _Stream):
                if self._held_streams >= bound:
                    log.error("spool unavailable: session record for stream %s not kept (bound reached)", cmd.stream_id)
                    continue
                self._held_streams += 1
            elif isinstance(cmd, _Fail):  # only the latest failure of an event matters
                self._backlog = [c for c in self._backlog if not (isinstance(c, _Fail) and c.event_id == cmd.event_id)]
            elif isinstance(cmd, _Tick):
                if cmd.fut is not None:
                    results.append((cmd.fut, None, None))
                continue
            self._backlog.append(cmd)
        if results:
            self._post(_Outcome(results=results))

    def _recovered(self) -> None:
        since = self.degraded_since or time.monotonic()
        log.warning(
            "spool %s can be written again after %.1f s; events held in memory are on disk",
            self.path,
            time.monotonic() - since,
        )
        self.degraded = self.degraded_since = None
        self.held = self._held_streams = 0
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                store.set_busy_timeout(self._conn, self._lock_ms)
        self._post_call(self._state_changed, None)

    def _replace_damaged(self) -> None:
        """The file went bad under us: close it; the next attempt moves it aside and starts afresh from what it holds."""
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _close_degraded(self) -> None:
        """Closing with held commands: keep trying for a few seconds, then give them up, loudly, with their payloads."""
        deadline = time.monotonic() + CLOSE_BUDGET_S
        while self._backlog and time.monotonic() < deadline:
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
            work, self._backlog = self._backlog, []
            self._apply(work)
        lost = [c for c in self._backlog if isinstance(c, _Append)]
        for cmd in lost:
            ev = cmd.event
            log.error(
                'EVENT LOST at shutdown: %s for customer %s (id %s, session %s) never reached the disk (%s): {"UUID": %s, "EVENT": %s}',
                ev.event,
                ev.customer_id,
                ev.id,
                ev.session_id,
                self.degraded,
                ev.customer_id,
                ev.event,
            )
        others = len(self._backlog) - len(lost) - sum(isinstance(c, _Close) for c in self._backlog)
        if others:
            log.error(
                "spool: %d delivery or session record(s) never reached the disk (delivered events may be sent again)",
                others,
            )
        self._post(_Outcome(results=[(c.fut, None, None) for c in self._backlog if not isinstance(c, _Append)]))
        self._backlog = []

    def _fail_pending(self) -> None:
        results: list[_Result] = []
        while True:
            try:
                cmd = self._queue.get_nowait()
            except queue.Empty:
                break
            results.append((cmd.fut, None, SpoolError(f"spool {self.path} is closed")))
        if results:
            self._post(_Outcome(results=results))

    # -- handing results to the loop -------------------------------------------

    def _post_call(self, func: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(func, *args)

    def _post(self, outcome: _Outcome) -> None:
        """Hand one batch's outcome to the loop: listener first (in commit order), then the callers."""
        self._post_call(self._deliver, outcome)

    def _deliver(self, outcome: _Outcome) -> None:
        if self.listener is not None:
            for events, state, detail in outcome.removed:
                self.listener.spool_removed(events, state, detail)
            if outcome.added:
                self.listener.spool_added(outcome.added)
        for fut, value, exc in outcome.results:
            if fut is None or fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)

    def _state_changed(self, degraded: str | None) -> None:
        if self.listener is not None:
            self.listener.spool_state(degraded)

    def _replaced(self, moved: Path) -> None:
        if self.listener is not None:
            self.listener.spool_replaced(moved)
