"""The disk spool: one writer thread that group-commits to SQLite; the event loop never waits on disk.

Every change (append, delete after delivery, failure bookkeeping, dead-letter)
is a command on a queue. The writer thread takes the first command, gathers
whatever else arrives within ``events.commit_window_ms``, applies them all in
one transaction and commits once (one fsync for the batch), then resolves the
callers' futures on the loop. An append therefore returns only once its event
is on disk.

Bounds (``max_events``, ``max_bytes``, the state directory's free-disk floor)
are enforced at append time with ``full_policy``: ``refuse_new`` fails the
append with :class:`SpoolFull`; ``drop_oldest`` first drops the oldest dead
letters (for the byte and disk bounds), then the oldest waiting events, and
reports them. A maintenance tick (1 s) moves events older than ``max_age_s``
to the dead-letter table and picks up rows that the operator CLI re-queued.
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
from edgevoice.delivery.api import DeliveryState, SpoolFull
from edgevoice.delivery.store import Event

log = logging.getLogger(__name__)

MAX_BATCH = 1024
TICK_S = 1.0
_SQLITE_CORRUPT, _SQLITE_FULL, _SQLITE_NOTADB = 11, 13, 26


class SpoolError(Exception):
    """The spool could not store or change an event (I/O error, closed spool)."""


class SpoolListener(Protocol):
    """What the spool reports, on the event loop, in commit order."""

    def spool_added(self, events: list[Event]) -> None:
        """Events now waiting: committed appends, and events the operator re-queued."""

    def spool_removed(self, events: list[Event], state: DeliveryState, detail: str) -> None:
        """Waiting events the spool itself removed: dropped when full, or dead-lettered for age."""


@dataclass(slots=True)
class _Cmd:
    kind: str
    args: tuple[Any, ...]
    fut: asyncio.Future[Any] | None = None


@dataclass(slots=True)
class _Counts:
    waiting: int = 0
    waiting_bytes: int = 0
    dead: int = 0
    dead_bytes: int = 0


@dataclass
class SpoolStats:
    """Writer-side counters (read from the loop; ints are replaced atomically)."""

    commits: int = 0
    appended: int = 0
    refused: int = 0
    dropped: int = 0
    expired: int = 0
    last_error: str | None = None
    full_reason: str | None = None
    batch_sizes: list[int] = field(default_factory=list)


def _errcode(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_corruption(exc: sqlite3.Error) -> bool:
    """True when SQLite says the file is damaged or not a database (not for locks or permissions)."""
    code = _errcode(exc)
    if code is not None:
        return code in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    text = str(exc).lower()
    return "malformed" in text or "not a database" in text


def _is_full(exc: sqlite3.Error) -> bool:
    code = _errcode(exc)
    return code == _SQLITE_FULL if code is not None else "disk is full" in str(exc).lower()


def move_aside(path: Path, now: datetime | None = None) -> Path:
    """Rename a damaged spool (and its -wal/-shm) to ``<name>.corrupt-<UTC timestamp>``; return the new path."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            src.rename(target.with_name(target.name + suffix))
    return target


def open_file(path: Path) -> tuple[sqlite3.Connection, Path | None]:
    """Open (or create) the spool; a damaged file is moved aside and a fresh one started."""
    conn: sqlite3.Connection | None = None
    try:
        conn = store.connect(path, create=True, check_same_thread=False)
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
        conn = store.connect(path, create=True, check_same_thread=False)
        store.ensure_schema(conn)
        salvaged = store.salvage(moved, conn)
        if salvaged:
            log.warning(
                "spool: %d event(s) readable in the damaged file were put in the dead-letter table; "
                "check them with `edgevoice spool dead` and send them with `edgevoice spool retry`",
                salvaged,
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
        self._queue: queue.SimpleQueue[_Cmd] = queue.SimpleQueue()
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._fatal: BaseException | None = None
        self._data_version = 0
        self._scanned_upto = 0
        self._own_since_scan: set[int] = set()
        self._max_own_seq = 0
        self._next_tick = 0.0
        self._batch_full: str | None = None

    # -- lifecycle ---------------------------------------------------------

    async def open(self) -> list[Event]:
        """Open the file (off the loop), start the writer; return the waiting events in seq order."""
        self._loop = asyncio.get_running_loop()
        waiting = await asyncio.to_thread(self._open_sync)
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()
        return waiting

    def _open_sync(self) -> list[Event]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn, self.moved_aside = open_file(self.path)
        self._recount()
        waiting = store.waiting(self._conn)
        self._scanned_upto = waiting[-1].seq if waiting else 0
        self._data_version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        return waiting

    def _recount(self) -> None:
        assert self._conn is not None
        s = store.stats(self._conn, self.path)
        self.counts = _Counts(s.waiting, s.waiting_bytes, s.dead, s.dead_bytes)

    async def close(self) -> None:
        """Commit what is queued, then close the file."""
        if self._thread is None or self._closed:
            return
        fut = self._submit("close", ())
        self._closed = True
        try:
            await fut
        finally:
            await asyncio.to_thread(self._thread.join, 30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._fatal is None

    # -- commands (called on the loop) -------------------------------------

    def _submit(self, kind: str, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        assert self._loop is not None, "spool not open"
        fut = self._loop.create_future()
        if self._closed or self._fatal is not None:
            fut.set_exception(SpoolError(f"spool {self.path} is closed" + (f": {self._fatal}" if self._fatal else "")))
            return fut
        self._queue.put(_Cmd(kind, args, fut))
        return fut

    async def append(self, event_id: str, customer_id: str, event: str, session_id: str | None) -> Event:
        """Store one event; returns it (with its seq) once committed. Raises SpoolFull or SpoolError."""
        return await self._submit("append", (event_id, customer_id, event, session_id))

    def delete(self, event_id: str) -> asyncio.Future[Any]:
        """Forget a delivered event (from the waiting or dead-letter table)."""
        return self._quiet(self._submit("delete", (event_id,)))

    def record_failure(self, event_id: str, attempts: int, error: str) -> asyncio.Future[Any]:
        """Remember a failed attempt (shown by ``spool list``)."""
        return self._quiet(self._submit("fail", (event_id, attempts, error[:500])))

    def bury(
        self, event_id: str, reason: str, status: int | None = None, response: str | None = None
    ) -> asyncio.Future[Any]:
        """Move a waiting event to the dead-letter table."""
        return self._quiet(self._submit("bury", (event_id, reason, status, response)))

    async def barrier(self) -> None:
        """Wait until every command queued before it is committed (and run a maintenance tick)."""
        await self._submit("tick", ())

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
            window = self.settings.commit_window_ms / 1000
            running = True
            while running:
                timeout = max(0.0, self._next_tick - time.monotonic())
                try:
                    first = self._queue.get(timeout=timeout)
                except queue.Empty:
                    self._next_tick = time.monotonic() + TICK_S  # even if the tick fails: no busy loop
                    self._execute([_Cmd("tick", ())])
                    continue
                batch = [first]
                deadline = time.monotonic() + window
                while len(batch) < MAX_BATCH and batch[-1].kind != "close":
                    try:
                        batch.append(self._queue.get_nowait())
                        continue
                    except queue.Empty:
                        pass
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(self._queue.get(timeout=remaining))
                    except queue.Empty:
                        break
                if time.monotonic() >= self._next_tick:
                    self._next_tick = time.monotonic() + TICK_S
                    batch.append(_Cmd("tick", ()))
                self._execute(batch)
                running = not any(c.kind == "close" for c in batch)
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

    def _fail_pending(self) -> None:
        while True:
            try:
                cmd = self._queue.get_nowait()
            except queue.Empty:
                return
            self._post([(cmd.fut, None, SpoolError(f"spool {self.path} is closed"))], [], [])

    def _execute(self, batch: list[_Cmd]) -> None:
        """Apply a batch in one transaction; if it fails, apply its commands one by one."""
        try:
            outcome = self._transaction(batch)
        except sqlite3.Error as exc:
            if len(batch) == 1:
                err: Exception = SpoolFull(f"disk full: {exc}") if _is_full(exc) else SpoolError(f"spool: {exc}")
                self.stats.last_error = str(exc)
                log.error("spool %s: %s failed: %s", self.path, batch[0].kind, exc)
                self._post([(batch[0].fut, None, err)], [], [])
                return
            for cmd in batch:
                self._execute([cmd])
            return
        self._post(*outcome)

    def _transaction(
        self, batch: list[_Cmd]
    ) -> tuple[list[tuple[Any, Any, Exception | None]], list[Event], list[tuple[list[Event], DeliveryState, str]]]:
        conn = self._conn
        assert conn is not None
        now = time.time()
        saved = _Counts(**{k: getattr(self.counts, k) for k in _Counts.__slots__})
        results: list[tuple[Any, Any, Exception | None]] = []
        added: list[Event] = []
        removed: list[tuple[list[Event], DeliveryState, str]] = []
        own: list[int] = []
        stats_delta = {"appended": 0, "refused": 0, "dropped": 0, "expired": 0}
        self._batch_full: str | None = None
        conn.execute("BEGIN IMMEDIATE")
        try:
            appends = [c for c in batch if c.kind == "append"]
            for cmd in batch:
                if cmd.kind == "delete":
                    self._delete(conn, *cmd.args)
                    results.append((cmd.fut, None, None))
                elif cmd.kind == "fail":
                    conn.execute(
                        "UPDATE events SET attempts = ?, last_error = ? WHERE id = ?",
                        (cmd.args[1], cmd.args[2], cmd.args[0]),
                    )
                    results.append((cmd.fut, None, None))
                elif cmd.kind == "bury":
                    results.append((cmd.fut, self._bury(conn, *cmd.args, now=now), None))
                elif cmd.kind in ("tick", "close"):
                    results.append((cmd.fut, None, None))
            if any(c.kind in ("tick", "close") for c in batch):
                removed.extend(self._tick(conn, now, added, stats_delta))
            if appends:
                free = self._free_bytes()
                for cmd in appends:
                    try:
                        ev, dropped = self._append(conn, cmd.args, now, free)
                    except SpoolFull as exc:
                        stats_delta["refused"] += 1
                        results.append((cmd.fut, None, exc))
                        continue
                    free -= ev.size
                    if dropped:
                        gone = {d.seq for d in dropped}
                        added[:] = [a for a in added if a.seq not in gone]
                        stats_delta["dropped"] += len(dropped)
                        removed.append((dropped, "dropped", "spool full: dropped as the oldest"))
                    own.append(ev.seq)
                    added.append(ev)
                    stats_delta["appended"] += 1
                    results.append((cmd.fut, ev, None))
            conn.execute("COMMIT")
        except BaseException:
            self.counts = saved
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if removed or any(c.kind not in ("tick", "close") for c in batch):  # a commit that wrote something
            self.stats.commits += 1
            self.stats.batch_sizes.append(len(appends))
        if len(self.stats.batch_sizes) > 10_000:
            del self.stats.batch_sizes[:5000]
        for k, v in stats_delta.items():
            setattr(self.stats, k, getattr(self.stats, k) + v)
        self._own_since_scan.update(own)
        if own:
            self._max_own_seq = max(self._max_own_seq, *own)
        refused = stats_delta["refused"]
        if refused:
            log.warning("spool full (%s): refused %d new event(s) (full_policy=refuse_new)", self._batch_full, refused)
        if stats_delta["dropped"]:
            ids = [e.id for evs, st, _ in removed if st == "dropped" for e in evs]
            log.warning(
                "spool full (%s): dropped %d oldest event(s) (full_policy=drop_oldest): %s",
                self._batch_full,
                len(ids),
                ", ".join(ids[:10]) + (" …" if len(ids) > 10 else ""),
            )
        return results, added, removed

    def _delete(self, conn: sqlite3.Connection, event_id: str) -> None:
        row = conn.execute("DELETE FROM events WHERE id = ? RETURNING size", (event_id,)).fetchone()
        if row:
            self.counts.waiting -= 1
            self.counts.waiting_bytes -= row[0]
            return
        row = conn.execute("DELETE FROM dead WHERE id = ? RETURNING size", (event_id,)).fetchone()
        if row:  # delivered after all, while being dead-lettered for age
            self.counts.dead -= 1
            self.counts.dead_bytes -= row[0]

    def _bury(
        self,
        conn: sqlite3.Connection,
        event_id: str,
        reason: str,
        status: int | None,
        response: str | None,
        *,
        now: float,
    ) -> bool:
        row = conn.execute("SELECT size FROM events WHERE id = ?", (event_id,)).fetchone()
        if row is None or not store.move_to_dead(conn, event_id, reason, status, response, now):
            return False
        new_size = conn.execute("SELECT size FROM dead WHERE id = ?", (event_id,)).fetchone()[0]
        self.counts.waiting -= 1
        self.counts.waiting_bytes -= row[0]
        self.counts.dead += 1
        self.counts.dead_bytes += new_size
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
        self, conn: sqlite3.Connection, args: tuple[Any, ...], now: float, free: int
    ) -> tuple[Event, list[Event]]:
        event_id, customer_id, event, session_id = args
        size = store.row_size(customer_id, event, session_id)
        dropped: list[Event] = []
        reason = self._full_reason(size, free)
        if reason is None:
            self.stats.full_reason = None  # room again
        while reason is not None:
            self.stats.full_reason = self._batch_full = reason
            if self.settings.full_policy == "refuse_new":
                raise SpoolFull(f"spool full: {reason}; new event {event} for customer {customer_id} refused")
            victim = self._drop_one(conn, prefer_dead=not reason.startswith("max_events"))
            if victim is None:
                raise SpoolFull(f"spool full: {reason} and nothing left to drop; event {event} refused")
            if isinstance(victim, Event):
                dropped.append(victim)
            if reason.startswith("free disk"):
                break  # the dropped row's pages are reused by the new one; the file does not grow
            reason = self._full_reason(size, free)
        cur = conn.execute(
            "INSERT INTO events (id, customer_id, event, session_id, created, attempts, size) VALUES (?, ?, ?, ?, ?, 0, ?)",
            (event_id, customer_id, event, session_id, now, size),
        )
        self.counts.waiting += 1
        self.counts.waiting_bytes += size
        return Event(int(cur.lastrowid or 0), event_id, customer_id, event, session_id, now, 0, None, size), dropped

    def _drop_one(self, conn: sqlite3.Connection, *, prefer_dead: bool) -> Event | bool | None:
        """Delete the oldest dead letter (when preferred and any) or the oldest waiting event."""
        if prefer_dead:
            row = conn.execute("DELETE FROM dead WHERE seq = (SELECT MIN(seq) FROM dead) RETURNING id, size").fetchone()
            if row:
                self.counts.dead -= 1
                self.counts.dead_bytes -= row[1]
                log.warning("spool full: dropped the oldest dead letter %s", row[0])
                return True
        victims = store.waiting(conn, limit=1)
        if not victims:
            return None
        conn.execute("DELETE FROM events WHERE seq = ?", (victims[0].seq,))
        self.counts.waiting -= 1
        self.counts.waiting_bytes -= victims[0].size
        return victims[0]

    def _tick(
        self, conn: sqlite3.Connection, now: float, added: list[Event], stats_delta: dict[str, int]
    ) -> list[tuple[list[Event], DeliveryState, str]]:
        """Maintenance: pick up rows re-queued by another process; dead-letter expired events."""
        removed: list[tuple[list[Event], DeliveryState, str]] = []
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._data_version = version
            rows = store.waiting(conn, after_seq=self._scanned_upto)
            external = [r for r in rows if r.seq not in self._own_since_scan]
            if external:
                log.info("spool: %d event(s) re-queued by another process", len(external))
                added.extend(external)
            if rows:
                self._scanned_upto = max(self._scanned_upto, rows[-1].seq)
            self._recount()
        self._scanned_upto = max(self._scanned_upto, self._max_own_seq)
        self._own_since_scan.clear()
        cutoff = now - self.settings.max_age_s
        expired = store.expired(conn, cutoff, limit=1000)
        if expired:
            reason = f"expired: older than max_age_s={self.settings.max_age_s:g}"
            for ev in expired:
                self._bury(conn, ev.id, reason, None, ev.last_error, now=now)
            stats_delta["expired"] += len(expired)
            log.warning(
                "spool: %d event(s) older than %g s moved to dead-letter", len(expired), self.settings.max_age_s
            )
            removed.append((expired, "dead", reason))
        return removed

    def _post(
        self,
        results: list[tuple[Any, Any, Exception | None]],
        added: list[Event],
        removed: list[tuple[list[Event], DeliveryState, str]],
    ) -> None:
        """Hand one batch's outcome to the loop: listener first (in commit order), then the callers."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._deliver, results, added, removed)

    def _deliver(
        self,
        results: list[tuple[Any, Any, Exception | None]],
        added: list[Event],
        removed: list[tuple[list[Event], DeliveryState, str]],
    ) -> None:
        if self.listener is not None:
            for events, state, detail in removed:
                self.listener.spool_removed(events, state, detail)
            if added:
                self.listener.spool_added(added)
        for fut, value, exc in results:
            if fut is None or fut.done():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(value)
