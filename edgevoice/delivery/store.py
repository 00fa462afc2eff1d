"""The spool's SQLite file: schema, connections and the queries shared by the daemon and the operator CLI.

One file, ``<state.dir>/spool.sqlite3``, in WAL mode with ``synchronous=FULL``:
a commit is on disk before it returns. Two tables:

- ``events``: waiting events, delivered in ``seq`` order per customer;
- ``dead``: events that will not be retried without an operator (a 4xx
  answer, or older than ``events.max_age_s``), with the reason and response.

Only the daemon's writer thread writes during normal operation; the CLI may
write too (``retry``, ``purge-dead``) while the daemon runs — SQLite's locking
serialises them, and the daemon notices through ``PRAGMA data_version``.
"""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SPOOL_FILE = "spool.sqlite3"
BUSY_TIMEOUT_MS = 10_000
ROW_OVERHEAD = 160
"""Bytes counted per row on top of its text (row header, id index entry, customer and time indexes)."""
RESPONSE_LIMIT = 2000
"""Characters of a failed response kept in the dead-letter table."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    customer_id TEXT NOT NULL,
    event TEXT NOT NULL,
    session_id TEXT,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_customer ON events (customer_id, seq);
CREATE INDEX IF NOT EXISTS events_created ON events (created);
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
    size INTEGER NOT NULL
);
"""

_EVENT_COLS = "seq, id, customer_id, event, session_id, created, attempts, last_error, size"
_DEAD_COLS = "seq, id, customer_id, event, session_id, created, attempts, died, reason, status, response, size"


class SpoolMissing(Exception):
    """No spool file exists at the path (the daemon has not run yet)."""


@dataclass(slots=True)
class Event:
    """A waiting event as stored."""

    seq: int
    id: str
    customer_id: str
    event: str
    session_id: str | None
    created: float
    attempts: int = 0
    last_error: str | None = None
    size: int = 0


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

    def as_dict(self, now: float | None = None) -> dict[str, object]:
        now = time.time() if now is None else now
        age = None if self.oldest_created is None else round(max(0.0, now - self.oldest_created), 3)
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


def connect(path: Path, *, create: bool, check_same_thread: bool = True) -> sqlite3.Connection:
    """Open the spool with the durability settings; ``create=False`` never creates a file."""
    if not create and not path.exists():
        raise SpoolMissing(f"no spool at {path} (the daemon has not run with this state directory yet)")
    uri = f"file:{path}?mode={'rwc' if create else 'rw'}"
    conn = sqlite3.connect(
        uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000, check_same_thread=check_same_thread
    )
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        conn.close()
        raise sqlite3.OperationalError(f"{path}: cannot switch to WAL mode (got {mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA journal_size_limit=4194304")
    return conn


def quick_check(conn: sqlite3.Connection) -> str:
    """``"ok"`` or SQLite's description of the damage."""
    rows = conn.execute("PRAGMA quick_check").fetchall()
    return "; ".join(str(r[0]) for r in rows[:5])


def ensure_schema(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)


def stats(conn: sqlite3.Connection, path: Path) -> Stats:
    waiting, customers, oldest, wbytes = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT customer_id), MIN(created), COALESCE(SUM(size), 0) FROM events"
    ).fetchone()
    dead, dbytes = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM dead").fetchone()
    file_bytes = sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())
    return Stats(str(path), waiting, dead, customers, oldest, wbytes, dbytes, file_bytes)


def waiting(
    conn: sqlite3.Connection, *, after_seq: int = 0, customer: str | None = None, limit: int = -1
) -> list[Event]:
    """Waiting events in delivery order (seq), optionally of one customer."""
    sql = f"SELECT {_EVENT_COLS} FROM events WHERE seq > ?"
    args: list[object] = [after_seq]
    if customer is not None:
        sql += " AND customer_id = ?"
        args.append(customer)
    sql += " ORDER BY seq LIMIT ?"
    args.append(limit)
    return [Event(*r) for r in conn.execute(sql, args)]


def expired(conn: sqlite3.Connection, cutoff: float, limit: int = -1) -> list[Event]:
    """Waiting events created before ``cutoff`` (epoch seconds)."""
    sql = f"SELECT {_EVENT_COLS} FROM events WHERE created < ? ORDER BY created LIMIT ?"
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


def move_to_dead(
    conn: sqlite3.Connection, event_id: str, reason: str, status: int | None, response: str | None, now: float
) -> bool:
    """Move one waiting event to the dead-letter table (inside the caller's transaction)."""
    response = None if response is None else response[:RESPONSE_LIMIT]
    cur = conn.execute(
        "INSERT OR REPLACE INTO dead (id, customer_id, event, session_id, created, attempts, died, reason, status,"
        " response, size) SELECT id, customer_id, event, session_id, created, attempts, ?, ?, ?, ?, size + ?"
        " FROM events WHERE id = ?",
        (now, reason, status, response, len((response or "").encode()) + len(reason.encode()), event_id),
    )
    if cur.rowcount:
        conn.execute("DELETE FROM events WHERE id = ?", (event_id,))
    return bool(cur.rowcount)


def retry_dead(conn: sqlite3.Connection, ids: list[str] | None) -> list[str]:
    """Move dead letters (all when ``ids`` is None) to the end of the waiting queue; returns the ids moved.

    A retried event starts afresh: attempts 0 and its age counted from now (so max_age_s does not expire it again).
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = dead_letters(conn) if ids is None else [d for i in ids for d in _dead_by_id(conn, i)]
        now = time.time()
        for d in rows:
            conn.execute(
                "INSERT OR IGNORE INTO events (id, customer_id, event, session_id, created, attempts, last_error, size)"
                " VALUES (?, ?, ?, ?, ?, 0, 'retried by operator', ?)",
                (d.id, d.customer_id, d.event, d.session_id, now, row_size(d.customer_id, d.event, d.session_id)),
            )
            conn.execute("DELETE FROM dead WHERE id = ?", (d.id,))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return [d.id for d in rows]


def _dead_by_id(conn: sqlite3.Connection, event_id: str) -> list[DeadEvent]:
    return [DeadEvent(*r) for r in conn.execute(f"SELECT {_DEAD_COLS} FROM dead WHERE id = ?", (event_id,))]


def purge_dead(conn: sqlite3.Connection) -> int:
    conn.execute("BEGIN IMMEDIATE")
    try:
        n = conn.execute("DELETE FROM dead").rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return n


def salvage(damaged: Path, conn: sqlite3.Connection) -> int:
    """Copy whatever rows can still be read from a damaged spool into ``conn``'s dead-letter table.

    Rows from a damaged file are not trusted enough to be sent on their own; as dead
    letters an operator can look at them and re-queue them. Reads a copy, so the
    damaged file stays as it was found. Returns the number of rows salvaged.
    """
    rows: list[tuple[object, ...]] = []
    with tempfile.TemporaryDirectory(prefix="edgevoice-salvage-") as tmp:
        copy = Path(tmp) / SPOOL_FILE
        for suffix in ("", "-wal"):
            src = damaged.with_name(damaged.name + suffix)
            if src.exists():
                shutil.copyfile(src, copy.with_name(copy.name + suffix))
        reason = f"salvaged from damaged spool {damaged.name}"
        queries = (
            f"SELECT id, customer_id, event, session_id, created, attempts, '{reason}', NULL, last_error FROM events ORDER BY seq",
            "SELECT id, customer_id, event, session_id, created, attempts, reason, status, response FROM dead ORDER BY seq",
        )
        try:
            src_conn = sqlite3.connect(copy)
        except sqlite3.Error:
            return 0
        try:
            for sql in queries:
                try:
                    for r in src_conn.execute(sql):
                        rows.append(r)
                except sqlite3.Error:
                    continue  # keep what was read before the damage
        finally:
            src_conn.close()
    now = time.time()
    kept = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for r in rows:
            event_id, customer_id, event, session_id = r[0], r[1], r[2], r[3]
            if not all(isinstance(v, str) and v for v in (event_id, customer_id, event)):
                continue
            if session_id is not None and not isinstance(session_id, str):
                session_id = None
            size = row_size(customer_id, event, session_id, str(r[8] or ""))  # type: ignore[arg-type]
            cur = conn.execute(
                "INSERT OR IGNORE INTO dead (id, customer_id, event, session_id, created, attempts, died, reason,"
                " status, response, size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    event_id,
                    customer_id,
                    event,
                    session_id,
                    r[4] if isinstance(r[4], float) else now,
                    r[5] if isinstance(r[5], int) else 0,
                    now,
                    str(r[6]),
                    r[7] if isinstance(r[7], int) else None,
                    None if r[8] is None else str(r[8])[:RESPONSE_LIMIT],
                    size,
                ),
            )
            kept += cur.rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return kept
