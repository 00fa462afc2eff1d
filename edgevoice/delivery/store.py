"""The spool's SQLite file: schema, connections and every query, named, for the daemon and the operator CLI.

Thread model: plain functions on a connection the caller owns; nothing here
starts a thread or keeps state. Bounds: queries that can return many rows take
a ``limit``.

One file, ``<state.dir>/spool.sqlite3``, in WAL mode with ``synchronous=FULL``:
a commit is on disk before it returns. Tables (schema version 2, see
:func:`ensure_schema`; a version-1 spool is migrated in place):

- ``events``: waiting events, delivered per customer in ``COALESCE(ord, seq)``
  order (``ord`` keeps the place of an event re-queued from the dead letters);
  ``enqueued`` is the spool clock (see ``meta``) when the event was queued;
- ``dead``: events that will not be retried without an operator (a permanent
  4xx answer, or waiting longer than ``events.max_age_s``), with the reason;
- ``meta``: ``clock``, the spool's monotonic clock in seconds: time the daemon
  ran, kept across restarts, never the wall clock (ages survive an NTP step);
- ``sessions``, ``session_streams``, ``session_keywords``: the customer
  sessions open now, their open streams and the keywords already fired, for
  crash recovery (see :mod:`edgevoice.delivery.spool`).

Only the daemon's writer thread writes during normal operation; the CLI may
write too (``retry``, ``purge-dead``) while the daemon runs — SQLite's locking
serialises them, and the daemon notices through ``PRAGMA data_version``.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

SPOOL_FILE = "spool.sqlite3"
SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 10_000
"""Default wait for another connection's lock (the CLI's; the daemon's writer takes ``events.lock_timeout_s``)."""
ROW_OVERHEAD = 160
"""Bytes counted per row on top of its text (row header, id index entry, customer and age indexes)."""
RESPONSE_LIMIT = 2000
"""Characters of a failed response kept in the dead-letter table."""

_TABLES = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    event TEXT NOT NULL,
    session_id TEXT,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    size INTEGER NOT NULL,
    ord INTEGER,
    enqueued REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    event TEXT NOT NULL,
    session_id TEXT,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL,
    died REAL NOT NULL,
    reason TEXT NOT NULL,
    status INTEGER,
    response TEXT,
    size INTEGER NOT NULL,
    ord INTEGER,
    enqueued REAL NOT NULL DEFAULT 0
);
"""
_V2 = """
CREATE INDEX IF NOT EXISTS events_customer ON events (customer_id, seq);
CREATE INDEX IF NOT EXISTS events_enqueued ON events (enqueued);
DROP INDEX IF EXISTS events_created;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT NOT NULL, customer_id TEXT NOT NULL, opened REAL NOT NULL,
    PRIMARY KEY (session_id, customer_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_streams (
    session_id TEXT NOT NULL, customer_id TEXT NOT NULL, stream_id TEXT NOT NULL,
    PRIMARY KEY (session_id, customer_id, stream_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_keywords (
    session_id TEXT NOT NULL, customer_id TEXT NOT NULL, keyword TEXT NOT NULL,
    PRIMARY KEY (session_id, customer_id, keyword)) WITHOUT ROWID;
"""

_EVENT_COLS = "seq, id, customer_id, event, session_id, created, attempts, last_error, size, ord, enqueued"
_DEAD_COLS = (
    "seq, id, customer_id, event, session_id, created, attempts, died, reason, status, response, size, ord, enqueued"
)


class SpoolMissing(Exception):
    """No spool file exists at the path (the daemon has not run yet)."""


@dataclass(slots=True)
class Event:
    """A waiting event as stored; ``seq`` is 0 while it is only held in memory (not yet on disk)."""

    seq: int
    id: str
    customer_id: str
    event: str
    session_id: str | None
    created: float
    """Wall-clock time it was accepted (shown to people; never used for its age)."""
    attempts: int = 0
    last_error: str | None = None
    size: int = 0
    ord: int | None = None
    """Delivery position when it is not ``seq`` (an event re-queued from the dead letters keeps its place)."""
    enqueued: float = 0.0
    """Spool clock when it was queued: its age is ``clock - enqueued``."""

    @property
    def order(self) -> int:
        """Its position in its customer's queue."""
        return self.seq if self.ord is None else self.ord


@dataclass(frozen=True, slots=True)
class DeadEvent:
    """An event in the dead-letter table."""

    seq: int
    id: str
    customer_id: str
    event: str
    session_id: str | None
    created: float
    attempts: int
    died: float
    reason: str
    status: int | None
    response: str | None
    size: int
    ord: int | None = None
    enqueued: float = 0.0


@dataclass(frozen=True, slots=True)
class OpenSession:
    """A customer session that was open when the spool was last written (for recovery after a crash)."""

    session_id: str
    customer_id: str
    streams: tuple[str, ...]
    """Stream ids that were attached, sorted."""
    keywords: frozenset[str]
    """Keyword events already fired (and committed with their event) in this session."""
    opened: float
    """Wall-clock time the session was first recorded."""


@dataclass(frozen=True, slots=True)
class Stats:
    """Counts for ``spool stats`` and ``/health``."""

    path: str
    waiting: int
    dead: int
    customers: int
    oldest_created: float | None
    waiting_bytes: int
    dead_bytes: int
    file_bytes: int
    oldest_enqueued: float | None = None
    clock: float = 0.0

    def as_dict(self, now: float | None = None) -> dict[str, object]:
        """JSON-able counts; ``oldest_age_s`` is on the spool clock (as stored: up to a minute behind a running daemon)."""
        age = None if self.oldest_enqueued is None else round(max(0.0, self.clock - self.oldest_enqueued), 3)
        return {
            "path": self.path,
            "waiting": self.waiting,
            "dead": self.dead,
            "customers": self.customers,
            "oldest_age_s": age,
            "data_bytes": self.waiting_bytes + self.dead_bytes,
            "file_bytes": self.file_bytes,
        }


def row_size(customer_id: str, event: str, session_id: str | None, extra: str | None = None) -> int:
    """Bytes an event is counted for against ``events.max_bytes``."""
    n = len(customer_id.encode()) + len(event.encode()) + len((session_id or "").encode()) + 36
    return n + len((extra or "").encode()) + ROW_OVERHEAD


def spool_path(state_dir: Path) -> Path:
    return state_dir / SPOOL_FILE


# -- connections and transactions ------------------------------------------------


def connect(
    path: Path, *, create: bool, check_same_thread: bool = True, busy_timeout_ms: int = BUSY_TIMEOUT_MS
) -> sqlite3.Connection:
    """Open the spool with the durability settings; ``create=False`` never creates a file."""
    if not create and not path.exists():
        raise SpoolMissing(f"no spool at {path} (the daemon has not run with this state directory yet)")
    uri = f"file:{path}?mode={'rwc' if create else 'rw'}"
    conn = sqlite3.connect(
        uri, uri=True, isolation_level=None, timeout=busy_timeout_ms / 1000, check_same_thread=check_same_thread
    )
    try:
        set_busy_timeout(conn, busy_timeout_ms)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{path}: cannot switch to WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA journal_size_limit=4194304")
    except BaseException:
        conn.close()
        raise
    return conn


def set_busy_timeout(conn: sqlite3.Connection, ms: int) -> None:
    """How long a statement waits for another connection's lock before SQLITE_BUSY."""
    conn.execute(f"PRAGMA busy_timeout={int(ms)}")


def begin(conn: sqlite3.Connection) -> None:
    """Start a write transaction now (takes the write lock, waiting up to the busy timeout)."""
    conn.execute("BEGIN IMMEDIATE")


def commit(conn: sqlite3.Connection) -> None:
    conn.execute("COMMIT")


def rollback(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if any (SQLite may already have rolled it back after an I/O error)."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def quick_check(conn: sqlite3.Connection) -> str:
    """``"ok"`` or SQLite's description of the damage."""
    rows = conn.execute("PRAGMA quick_check").fetchall()
    return "; ".join(str(r[0]) for r in rows[:5])


def data_version(conn: sqlite3.Connection) -> int:
    """Changes when another connection commits (the CLI re-queued or purged something)."""
    return int(conn.execute("PRAGMA data_version").fetchone()[0])


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {str(r[1]) for r in conn.execute(f"PRAGMA table_info({table})")}


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the tables, or migrate a version-1 spool (kept events keep their wall-clock age as their clock age)."""
    if int(conn.execute("PRAGMA user_version").fetchone()[0]) >= SCHEMA_VERSION:
        return
    begin(conn)
    try:
        existed = bool(conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'events'").fetchone())
        for stmt in _TABLES.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        if existed:
            for table in ("events", "dead"):
                cols = _columns(conn, table)
                if "ord" not in cols:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN ord INTEGER")
                if "enqueued" not in cols:
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN enqueued REAL NOT NULL DEFAULT 0")
            # The clock starts at 0 here: an event already waiting keeps the age it had by the wall clock.
            conn.execute("UPDATE events SET enqueued = MIN(0.0, created - ?)", (time.time(),))
        for stmt in _V2.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        commit(conn)
    except BaseException:
        rollback(conn)
        raise


# -- reading ---------------------------------------------------------------------


def stats(conn: sqlite3.Connection, path: Path) -> Stats:
    waiting, customers, oldest, wbytes, oldest_enq = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT customer_id), MIN(created), COALESCE(SUM(size), 0), MIN(enqueued) FROM events"
    ).fetchone()
    dead, dbytes = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM dead").fetchone()
    file_bytes = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())
    return Stats(str(path), waiting, dead, customers, oldest, wbytes, dbytes, file_bytes, oldest_enq, read_clock(conn))


def waiting(
    conn: sqlite3.Connection, *, after_seq: int = 0, customer: str | None = None, limit: int = -1
) -> list[Event]:
    """Waiting events in delivery order (per customer: ``COALESCE(ord, seq)``), optionally of one customer."""
    sql = f"SELECT {_EVENT_COLS} FROM events WHERE seq > ?"
    args: list[object] = [after_seq]
    if customer is not None:
        sql += " AND customer_id = ?"
        args.append(customer)
    sql += " ORDER BY COALESCE(ord, seq), seq LIMIT ?"
    args.append(limit)
    return [Event(*r) for r in conn.execute(sql, args)]


def expired(conn: sqlite3.Connection, cutoff: float, limit: int = -1) -> list[Event]:
    """Waiting events queued before ``cutoff`` on the spool clock."""
    sql = f"SELECT {_EVENT_COLS} FROM events WHERE enqueued < ? ORDER BY enqueued LIMIT ?"
    return [Event(*r) for r in conn.execute(sql, (cutoff, limit))]


def dead_letters(conn: sqlite3.Connection, *, customer: str | None = None, limit: int = -1) -> list[DeadEvent]:
    sql = f"SELECT {_DEAD_COLS} FROM dead"
    args: list[object] = []
    if customer is not None:
        sql += " WHERE customer_id = ?"
        args.append(customer)
    sql += " ORDER BY seq LIMIT ?"
    args.append(limit)
    return [DeadEvent(*r) for r in conn.execute(sql, args)]


def waiting_size(conn: sqlite3.Connection, event_id: str) -> int | None:
    row = conn.execute("SELECT size FROM events WHERE id = ?", (event_id,)).fetchone()
    return None if row is None else int(row[0])


def dead_size(conn: sqlite3.Connection, event_id: str) -> int | None:
    row = conn.execute("SELECT size FROM dead WHERE id = ?", (event_id,)).fetchone()
    return None if row is None else int(row[0])


def max_seq(conn: sqlite3.Connection) -> int:
    """The highest ``events.seq`` ever handed out in this file."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    top = conn.execute("SELECT MAX(seq) FROM events").fetchone()[0]
    return max(int(row[0]) if row else 0, int(top or 0))


# -- the clock -------------------------------------------------------------------


def read_clock(conn: sqlite3.Connection) -> float:
    """The stored spool clock, never behind an event queued before it was stored (0 for a new spool)."""
    row = conn.execute("SELECT value FROM meta WHERE key = 'clock'").fetchone()
    stored = float(row[0]) if row and isinstance(row[0], (int, float)) else 0.0
    top = conn.execute("SELECT MAX(enqueued) FROM events").fetchone()[0]
    return max(stored, float(top or 0.0))


def write_clock(conn: sqlite3.Connection, value: float) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('clock', ?)", (value,))


# -- writing (inside the caller's transaction) -----------------------------------


def insert_event(conn: sqlite3.Connection, ev: Event) -> int:
    """Insert a new waiting event; returns its ``seq``."""
    cur = conn.execute(
        "INSERT INTO events (id, customer_id, event, session_id, created, attempts, last_error, size, ord, enqueued)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (ev.id, ev.customer_id, ev.event, ev.session_id, ev.created, ev.attempts, ev.last_error, ev.size, ev.ord,
         ev.enqueued),
    )  # fmt: skip
    return int(cur.lastrowid or 0)


def restore_events(conn: sqlite3.Connection, events: Iterable[Event]) -> int:
    """Put back events known in memory (same seq, order and age) that a fresh file lacks; returns rows added."""
    n = 0
    for ev in events:
        cur = conn.execute(
            f"INSERT OR IGNORE INTO events ({_EVENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (ev.seq, ev.id, ev.customer_id, ev.event, ev.session_id, ev.created, ev.attempts, ev.last_error,
             ev.size, ev.ord, ev.enqueued),
        )  # fmt: skip
        n += cur.rowcount
    return n


def raise_sequence(conn: sqlite3.Connection, seq: int) -> None:
    """Make new events get a ``seq`` above ``seq`` (a fresh file must not reuse the numbers of the damaged one)."""
    if conn.execute("UPDATE sqlite_sequence SET seq = MAX(seq, ?) WHERE name = 'events'", (seq,)).rowcount == 0:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('events', ?)", (seq,))


def delete_event(conn: sqlite3.Connection, event_id: str) -> tuple[str, int] | None:
    """Forget a delivered event; returns (``"events"`` or ``"dead"``, its size), or None when it is not stored."""
    for table in ("events", "dead"):
        row = conn.execute(f"DELETE FROM {table} WHERE id = ? RETURNING size", (event_id,)).fetchone()
        if row:
            return table, int(row[0])
    return None


def delete_waiting_seq(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute("DELETE FROM events WHERE seq = ?", (seq,))


def delete_oldest_dead(conn: sqlite3.Connection) -> tuple[str, int] | None:
    """Drop the oldest dead letter; returns (its id, its size)."""
    row = conn.execute("DELETE FROM dead WHERE seq = (SELECT MIN(seq) FROM dead) RETURNING id, size").fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def record_failure(conn: sqlite3.Connection, event_id: str, attempts: int, error: str) -> None:
    conn.execute("UPDATE events SET attempts = ?, last_error = ? WHERE id = ?", (attempts, error, event_id))


def move_to_dead(
    conn: sqlite3.Connection, event_id: str, reason: str, status: int | None, response: str | None, now: float
) -> bool:
    """Move one waiting event to the dead-letter table, keeping its place in its customer's order."""
    response = None if response is None else response[:RESPONSE_LIMIT]
    cur = conn.execute(
        "INSERT OR REPLACE INTO dead (id, customer_id, event, session_id, created, attempts, died, reason, status,"
        " response, size, ord, enqueued) SELECT id, customer_id, event, session_id, created, attempts, ?, ?, ?, ?,"
        " size + ?, COALESCE(ord, seq), enqueued FROM events WHERE id = ?",
        (now, reason, status, response, len((response or "").encode()) + len(reason.encode()), event_id),
    )
    if cur.rowcount:
        conn.execute("DELETE FROM events WHERE id = ?", (event_id,))
    return bool(cur.rowcount)


# -- customer sessions -----------------------------------------------------------


def _session_row(conn: sqlite3.Connection, session_id: str, customer_id: str, now: float) -> None:
    conn.execute(
        "INSERT OR IGNORE INTO sessions (session_id, customer_id, opened) VALUES (?, ?, ?)",
        (session_id, customer_id, now),
    )


def _session_fact(
    conn: sqlite3.Connection, table: str, column: str, session_id: str, customer_id: str, value: str, now: float
) -> None:
    """Open the session if needed and record one fact of it (``table``/``column`` are this module's names)."""
    _session_row(conn, session_id, customer_id, now)
    conn.execute(
        f"INSERT OR IGNORE INTO {table} (session_id, customer_id, {column}) VALUES (?, ?, ?)",
        (session_id, customer_id, value),
    )


def session_attach(conn: sqlite3.Connection, session_id: str, customer_id: str, stream_id: str, now: float) -> None:
    """Record a stream attached to a customer session (opening the session)."""
    _session_fact(conn, "session_streams", "stream_id", session_id, customer_id, stream_id, now)


def session_detach(conn: sqlite3.Connection, session_id: str, customer_id: str, stream_id: str) -> None:
    """Record a stream detached; the session stays open until :func:`session_end`."""
    conn.execute(
        "DELETE FROM session_streams WHERE session_id = ? AND customer_id = ? AND stream_id = ?",
        (session_id, customer_id, stream_id),
    )


def session_keyword(conn: sqlite3.Connection, session_id: str, customer_id: str, keyword: str, now: float) -> None:
    """Record a keyword fired in a session."""
    _session_fact(conn, "session_keywords", "keyword", session_id, customer_id, keyword, now)


def session_end(conn: sqlite3.Connection, session_id: str, customer_id: str) -> None:
    """Forget a customer session: its row, streams and fired keywords."""
    for table in ("session_keywords", "session_streams", "sessions"):
        conn.execute(f"DELETE FROM {table} WHERE session_id = ? AND customer_id = ?", (session_id, customer_id))


def open_sessions(conn: sqlite3.Connection) -> list[OpenSession]:
    """Every recorded open session, oldest first, with its streams and fired keywords."""
    streams: dict[tuple[str, str], list[str]] = {}
    for sid, cid, stream in conn.execute("SELECT session_id, customer_id, stream_id FROM session_streams"):
        streams.setdefault((sid, cid), []).append(stream)
    keywords: dict[tuple[str, str], set[str]] = {}
    for sid, cid, kw in conn.execute("SELECT session_id, customer_id, keyword FROM session_keywords"):
        keywords.setdefault((sid, cid), set()).add(kw)
    return [
        OpenSession(
            sid, cid, tuple(sorted(streams.get((sid, cid), ()))), frozenset(keywords.get((sid, cid), ())), opened
        )
        for sid, cid, opened in conn.execute(
            "SELECT session_id, customer_id, opened FROM sessions ORDER BY opened, session_id, customer_id"
        )
    ]


# -- operator commands (their own transactions) ----------------------------------


def retry_dead(conn: sqlite3.Connection, ids: list[str] | None) -> list[str]:
    """Move dead letters (all when ``ids`` is None) back to the waiting queue; returns the ids moved.

    A retried event takes back its place in its customer's order (ahead of that
    customer's later events still waiting) and starts afresh: attempts 0, its
    age counted from now (so ``max_age_s`` does not expire it again at once).
    """
    begin(conn)
    try:
        rows = dead_letters(conn) if ids is None else [d for i in ids for d in _dead_by_id(conn, i)]
        now, clock = time.time(), read_clock(conn)
        for d in rows:
            conn.execute(
                "INSERT OR IGNORE INTO events (id, customer_id, event, session_id, created, attempts, last_error, size,"
                " ord, enqueued) VALUES (?, ?, ?, ?, ?, 0, 'retried by operator', ?, ?, ?)",
                (d.id, d.customer_id, d.event, d.session_id, now, row_size(d.customer_id, d.event, d.session_id),
                 d.ord, clock),
            )  # fmt: skip
            conn.execute("DELETE FROM dead WHERE id = ?", (d.id,))
        commit(conn)
    except BaseException:
        rollback(conn)
        raise
    return [d.id for d in rows]


def _dead_by_id(conn: sqlite3.Connection, event_id: str) -> list[DeadEvent]:
    return [DeadEvent(*r) for r in conn.execute(f"SELECT {_DEAD_COLS} FROM dead WHERE id = ?", (event_id,))]


def purge_dead(conn: sqlite3.Connection) -> int:
    begin(conn)
    try:
        n = int(conn.execute("DELETE FROM dead").rowcount)
        commit(conn)
    except BaseException:
        rollback(conn)
        raise
    return n


# -- salvage ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Salvaged:
    """What :func:`salvage` recovered from a damaged spool."""

    waiting: int = 0
    dead: int = 0
    sessions: int = 0


def _text(v: object) -> str | None:
    return v if isinstance(v, str) and v else None


def _num(v: object, default: float) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default


def _int(v: object) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _read_rows(src: sqlite3.Connection, sql: str) -> list[tuple[object, ...]]:
    """Rows up to the first damaged page (what was read before stays)."""
    rows: list[tuple[object, ...]] = []
    try:
        for r in src.execute(sql):
            rows.append(tuple(r))
    except sqlite3.Error:
        pass
    return rows


def salvage(damaged: Path, conn: sqlite3.Connection) -> Salvaged:
    """Copy what can still be read from a damaged spool into ``conn`` (a fresh spool), as it was.

    Waiting events stay waiting (same seq, order and age: they are sent as if
    nothing happened; a duplicate is caught by its Idempotency-Key), dead
    letters stay dead letters, open sessions stay open. Rows whose fields do
    not read as what they should be are skipped. Reads a copy, so the damaged
    file stays as it was found.
    """
    with tempfile.TemporaryDirectory(prefix="edgevoice-salvage-") as tmp:
        copy = Path(tmp) / SPOOL_FILE
        for suffix in ("", "-wal"):
            src = damaged.with_name(damaged.name + suffix)
            if src.exists():
                shutil.copyfile(src, copy.with_name(copy.name + suffix))
        try:
            src_conn = sqlite3.connect(copy)
        except sqlite3.Error:
            return Salvaged()
        try:
            try:
                ecols, dcols = _columns(src_conn, "events"), _columns(src_conn, "dead")
            except sqlite3.Error:
                ecols, dcols = set(), set()
            v2 = {"ord", "enqueued"}
            ev_sql = f"SELECT {_EVENT_COLS if v2 <= ecols else _EVENT_COLS.replace(', ord, enqueued', ', NULL, NULL')} FROM events ORDER BY seq"
            dead_sql = f"SELECT {_DEAD_COLS if v2 <= dcols else _DEAD_COLS.replace(', ord, enqueued', ', NULL, NULL')} FROM dead ORDER BY seq"
            ev_rows = _read_rows(src_conn, ev_sql) if ecols else []
            dead_rows = _read_rows(src_conn, dead_sql) if dcols else []
            sess = _read_rows(src_conn, "SELECT session_id, customer_id, opened FROM sessions")
            streams = _read_rows(src_conn, "SELECT session_id, customer_id, stream_id FROM session_streams")
            kws = _read_rows(src_conn, "SELECT session_id, customer_id, keyword FROM session_keywords")
            clock = _read_rows(src_conn, "SELECT value FROM meta WHERE key = 'clock'")
        finally:
            src_conn.close()
    now = time.time()
    n_wait = n_dead = n_sess = 0
    begin(conn)
    try:
        top = 0
        for r in ev_rows:
            seq, event_id, customer_id, event, session_id = _int(r[0]), _text(r[1]), _text(r[2]), _text(r[3]), r[4]
            if seq is None or seq <= 0 or event_id is None or customer_id is None or event is None:
                continue
            sid = session_id if isinstance(session_id, str) else None
            last_error = r[7] if isinstance(r[7], str) else None
            ev = Event(seq, event_id, customer_id, event, sid, _num(r[5], now), _int(r[6]) or 0, last_error,
                       row_size(customer_id, event, sid), _int(r[9]), _num(r[10], 0.0))  # fmt: skip
            n_wait += restore_events(conn, [ev])
            top = max(top, seq)
        if top:
            raise_sequence(conn, top)
        for r in dead_rows:
            event_id, customer_id, event, session_id = _text(r[1]), _text(r[2]), _text(r[3]), r[4]
            if event_id is None or customer_id is None or event is None:
                continue
            sid = session_id if isinstance(session_id, str) else None
            reason = _text(r[8]) or f"salvaged from damaged spool {damaged.name}"
            response = None if r[10] is None else str(r[10])[:RESPONSE_LIMIT]
            cur = conn.execute(
                "INSERT OR IGNORE INTO dead (id, customer_id, event, session_id, created, attempts, died, reason,"
                " status, response, size, ord, enqueued) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (event_id, customer_id, event, sid, _num(r[5], now), _int(r[6]) or 0, _num(r[7], now), reason,
                 _int(r[9]), response, row_size(customer_id, event, sid, (response or "") + reason), _int(r[12]),
                 _num(r[13], 0.0)),
            )  # fmt: skip
            n_dead += cur.rowcount
        for r in sess:
            if _text(r[0]) and _text(r[1]):
                _session_row(conn, str(r[0]), str(r[1]), _num(r[2], now))
                n_sess += 1
        for r in streams:
            if _text(r[0]) and _text(r[1]) and _text(r[2]):
                session_attach(conn, str(r[0]), str(r[1]), str(r[2]), now)
        for r in kws:
            if _text(r[0]) and _text(r[1]) and _text(r[2]):
                session_keyword(conn, str(r[0]), str(r[1]), str(r[2]), now)
        if clock:
            write_clock(conn, _num(clock[0][0], 0.0))
        commit(conn)
    except BaseException:
        rollback(conn)
        raise
    return Salvaged(n_wait, n_dead, n_sess)
