"""``edgevoice spool``: inspect and repair the event spool, also while the daemon runs.

The commands open the daemon's own SQLite file (WAL mode lets them read while
it writes; ``retry`` and ``purge-dead`` take the write lock for a moment). The
daemon notices re-queued events within a second.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

from edgevoice.config import load_settings
from edgevoice.delivery import store

Row = TypeVar("Row", store.Event, store.DeadEvent)


def _open(args: argparse.Namespace) -> tuple[sqlite3.Connection, Path]:
    settings = load_settings(getattr(args, "config", None))
    path = store.spool_path(settings.state.path())
    conn = store.connect(path, create=False)
    try:
        store.ensure_schema(conn)  # a spool written by an older version is migrated (no-op otherwise)
    except BaseException:
        conn.close()
        raise
    return conn, path


def _age(created: float, now: float) -> str:
    return _duration(max(0.0, now - created))


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def cmd_stats(args: argparse.Namespace, conn: sqlite3.Connection, path: Path) -> int:
    data = store.stats(conn, path).as_dict()
    if args.json:
        print(json.dumps(data))
        return 0
    age = data["oldest_age_s"]
    print(f"spool:      {data['path']}")
    print(f"waiting:    {data['waiting']} event(s) for {data['customers']} customer(s)")
    print(f"oldest:     {_duration(age) if isinstance(age, float) else '-'}")
    print(f"dead:       {data['dead']} event(s)")
    print(f"data bytes: {data['data_bytes']}  (file {data['file_bytes']} bytes)")
    return 0


def _print_rows(args: argparse.Namespace, rows: Sequence[Row], header: str, line: Callable[[Row, float], str]) -> int:
    """Rows as JSON lines (``--json``) or as a table: ``header``, then ``line(row, now)`` for each."""
    if args.json:
        for r in rows:
            print(json.dumps(asdict(r), ensure_ascii=False))
        return 0
    now = time.time()
    print(header)
    for r in rows:
        print(line(r, now))
    return 0


def _waiting_line(r: store.Event, now: float) -> str:
    err = r.last_error or ""
    return f"{r.id:36}  {r.customer_id:24}  {r.event:16}  {_age(r.created, now):>6}  {r.attempts:>5}  {err}"


def _dead_line(r: store.DeadEvent, now: float) -> str:
    response = (r.response or "").replace("\n", " ")[:80]
    return f"{r.id:36}  {r.customer_id:24}  {r.event:16}  {_age(r.died, now):>6}  {r.reason[:24]:24}  {response}"


def cmd_list(args: argparse.Namespace, conn: sqlite3.Connection, path: Path) -> int:
    rows = store.waiting(conn, customer=args.customer, limit=args.limit)
    header = f"{'ID':36}  {'CUSTOMER':24}  {'EVENT':16}  {'AGE':>6}  {'TRIES':>5}  LAST ERROR"
    return _print_rows(args, rows, header, _waiting_line)


def cmd_dead(args: argparse.Namespace, conn: sqlite3.Connection, path: Path) -> int:
    rows = store.dead_letters(conn, customer=args.customer, limit=args.limit)
    header = f"{'ID':36}  {'CUSTOMER':24}  {'EVENT':16}  {'DIED':>6}  {'REASON':24}  RESPONSE"
    return _print_rows(args, rows, header, _dead_line)


def cmd_retry(args: argparse.Namespace, conn: sqlite3.Connection, path: Path) -> int:
    if args.all == bool(args.ids):
        print("edgevoice spool retry: give event ID(s) or --all (not both)", file=sys.stderr)
        return 2
    moved = store.retry_dead(conn, None if args.all else list(args.ids))
    missing = [] if args.all else sorted(set(args.ids) - set(moved))
    print(f"re-queued {len(moved)} event(s); the daemon sends them within a second or two")
    for event_id in missing:
        print(f"edgevoice spool retry: no dead letter with id {event_id}", file=sys.stderr)
    return 1 if missing else 0


def cmd_purge_dead(args: argparse.Namespace, conn: sqlite3.Connection, path: Path) -> int:
    print(f"deleted {store.purge_dead(conn)} dead letter(s)")
    return 0


SpoolCommand = Callable[[argparse.Namespace, sqlite3.Connection, Path], int]
"""A ``spool`` action: runs on an open spool connection, returns the exit status."""


def _run(func: SpoolCommand) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            conn, path = _open(args)
        except store.SpoolMissing as exc:
            print(f"edgevoice spool: {exc}", file=sys.stderr)
            return 1
        except sqlite3.Error as exc:
            print(f"edgevoice spool: cannot open the spool: {exc}", file=sys.stderr)
            return 1
        try:
            return int(func(args, conn, path))
        except sqlite3.Error as exc:
            print(f"edgevoice spool: {exc}", file=sys.stderr)
            return 1
        finally:
            conn.close()

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    spool = subparsers.add_parser("spool", help="inspect and repair the event spool (safe while the daemon runs)")
    sub = spool.add_subparsers(dest="spool_command", required=True, metavar="ACTION")

    p = sub.add_parser("stats", help="counts: waiting, dead, oldest age, size")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_run(cmd_stats))

    for name, func, what in (("list", cmd_list, "waiting events"), ("dead", cmd_dead, "dead letters")):
        p = sub.add_parser(name, help=f"show {what}, oldest first")
        p.add_argument("--customer", help="only this customer's events")
        p.add_argument("--limit", type=int, default=100, help="most rows shown (default 100; -1 for all)")
        p.add_argument("--json", action="store_true", help="one JSON object per line")
        p.set_defaults(func=_run(func))

    p = sub.add_parser("retry", help="move dead letters back to the waiting queue")
    p.add_argument("ids", nargs="*", metavar="ID", help="event ids (from `spool dead`)")
    p.add_argument("--all", action="store_true", help="every dead letter")
    p.set_defaults(func=_run(cmd_retry))

    p = sub.add_parser("purge-dead", help="delete every dead letter")
    p.set_defaults(func=_run(cmd_purge_dead))
