"""``transcriptd notifications``: the outbound webhooks not delivered, and sending the failed ones again.

``list`` reads only. ``retry`` makes failed changes pending again (due now, with a fresh
``notify.max_age_s``) through its own writer connection, in one short transaction: safe while the
daemon serves the same file, whose sender sees them at its next look (within a second or so).
Exit codes: 0 done; 1 nothing matched (``retry --change N`` of a change owed to nobody), or the
database failed; 2 a bad argument or setting.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from daemon import operator_db
from daemon.config import Config, url_label
from storage import notifications


def add_parser(commands: Any, storage_options: Callable[[argparse.ArgumentParser], None]) -> None:
    command = commands.add_parser(
        "notifications",
        help="list the outbound webhooks not delivered, or send the failed ones again",
        description="Outbound webhooks (notify.url): each committed change is sent to each receiver until it "
        "answers 2xx, or marked failed after notify.max_age_s. List what is pending or failed, or make failed "
        "changes pending again: safe while the daemon is serving.",
    )
    actions = command.add_subparsers(dest="notifications_command", required=True, metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="the changes not delivered, oldest first",
        description="Print each change not delivered to a receiver, oldest first: its id (chg_<position>), "
        "the receiver (without its query), the conversation, pending or failed, attempts, the next attempt "
        "and the last error. Reads only.",
    )
    listing.add_argument("--failed", action="store_true", help="only the failed ones (given up)")
    listing.add_argument("--json", action="store_true", help="one JSON array of objects instead of lines")
    storage_options(listing)
    retry = actions.add_parser(
        "retry",
        help="send failed changes again",
        description="Make failed changes pending again, due now and with a fresh notify.max_age_s: every "
        "failed one (--all-failed), or one change (--change N, failed or still pending: tried now). The "
        "daemon sends them within a second or so, in order per conversation.",
    )
    which = retry.add_mutually_exclusive_group(required=True)
    which.add_argument("--change", type=_position, metavar="N", help="only this change (N or chg_N)")
    which.add_argument("--all-failed", action="store_true", help="every failed change, for every receiver")
    storage_options(retry)


def _position(text: str) -> int:
    digits = text.removeprefix("chg_")
    if not (digits.isascii() and digits.isdigit()) or int(digits) < 1:
        raise argparse.ArgumentTypeError(f"not a change id: {text!r} (a position, or chg_<position>)")
    return int(digits)


def run(args: argparse.Namespace, config: Config) -> int:
    listing = args.notifications_command == "list"
    with operator_db.opened(config, reads_only=listing, migrates=not listing) as db:
        if listing:
            rows = _undelivered(db, failed_only=args.failed)
        else:
            db.migrate(db.conn)  # a database of an older version gets the tables first
            count = db.notifications.retry(db.conn, time.time(), args.change)
    if listing:
        return _list(args, rows)
    if args.change is not None and not count:
        print(f"transcriptd: change chg_{args.change} is owed to no receiver (delivered, or unknown)", file=sys.stderr)
        return 1
    what = f"change chg_{args.change}" if args.change is not None else "failed changes"
    print(f"{what}: {count} to send again (one per receiver), due now")
    return 0


def _undelivered(db: operator_db.Database[Any], *, failed_only: bool) -> list[notifications.Pending]:
    assert db.notifications is not None
    conn = db.conn
    if (
        isinstance(conn, sqlite3.Connection)
        and not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'notifications'").fetchone()
    ):
        return []  # a database the daemon has not migrated yet
    return db.notifications.undelivered(conn, failed_only=failed_only)


def _list(args: argparse.Namespace, rows: list[notifications.Pending]) -> int:
    if args.json:
        print(json.dumps([_as_json(row) for row in rows], ensure_ascii=False, indent=1))
        return 0
    for row in rows:
        state = f"failed {_iso(row.failed_at)}" if row.failed_at is not None else f"next {_iso(row.next_attempt_at)}"
        print(
            f"chg_{row.position}  {url_label(row.receiver)}  conversation {row.conversation_id!r}  "
            f"{'failed' if row.failed_at is not None else 'pending'}  attempts {row.attempts}  {state}  "
            f"{row.last_error or ''}".rstrip()
        )
    kind = "failed" if args.failed else "undelivered"
    print(f"{len(rows)} {kind} change{'' if len(rows) == 1 else 's'}")
    return 0


def _as_json(row: notifications.Pending) -> dict[str, object]:
    return {
        "id": f"chg_{row.position}",
        "position": row.position,
        "receiver": url_label(row.receiver),
        "conversation_id": row.conversation_id,
        "state": "failed" if row.failed_at is not None else "pending",
        "attempts": row.attempts,
        "started_at": _iso(row.started_at),
        "next_attempt_at": None if row.failed_at is not None else _iso(row.next_attempt_at),
        "failed_at": None if row.failed_at is None else _iso(row.failed_at),
        "last_status": row.last_status,
        "last_error": row.last_error,
    }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
