"""The ``transcriptd`` command."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import psycopg

from daemon import __version__, exposure, notifications_command, operator_db, reconcile_command, search_command
from daemon.app import create_app, shutdown_budget
from daemon.config import Config, ConfigError, load_config
from daemon.decoding import epoch_seconds
from daemon.janitor import DAY_S
from daemon.logs import configure
from daemon.server import build_server
from daemon.sources import SOURCES
from storage import backup as backups
from storage import dead_letters, retention
from storage import export as exports
from storage.backend import describe
from storage.connection import StorageVersionError
from storage.errors import StorageUnavailable
from storage.migrations import migrate
from storage.postgres.connection import ServerUnreachable, is_postgres_url, where
from storage.replay import Parse, ReplayStats, StoredEvent

log = logging.getLogger("transcriptd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transcriptd",
        description="Receive conversation webhooks, answer in milliseconds, store every message once.",
    )
    parser.add_argument("--version", action="version", version=f"transcriptd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the daemon",
        description="Run the daemon. Settings: defaults < config.toml < TRANSCRIPTD_* environment < these flags.",
    )
    serve.add_argument("--config", type=Path, metavar="PATH", help="config file (default: ./config.toml if present)")
    serve.add_argument("--host", help="address to listen on (server.host)")
    serve.add_argument("--port", type=int, help="port to listen on (server.port)")
    serve.add_argument("--db", metavar="PATH|URL", help="SQLite database file, or a postgresql:// URL (storage.url)")
    serve.add_argument("--ack", choices=["durable", "enqueued"], help="when to answer a webhook (ingest.ack)")
    serve.add_argument(
        "--synchronous", choices=["full", "normal"], help="SQLite durability at commit (storage.synchronous)"
    )
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="(server.log_level)")

    export = commands.add_parser(
        "export",
        help="write one conversation's transcript",
        description="Write one conversation's transcript, messages in order (source, seq), system entries "
        "included and marked. Reads only: safe while the daemon is serving.",
    )
    export.add_argument("--conversation", required=True, metavar="ID", help="the conversation id")
    export.add_argument(
        "--format", choices=exports.FORMATS, default="jsonl", help="one JSON object per message, or Markdown"
    )
    export.add_argument("--output", type=Path, metavar="FILE", help="write here instead of standard output")
    _add_storage_options(export)

    backup = commands.add_parser(
        "backup",
        help="copy the database, online",
        description="Copy the database with SQLite's backup API, from one snapshot: safe while the daemon is "
        "serving, which it never blocks. The copy holds everything committed when the backup began.",
    )
    backup.add_argument("path", type=Path, metavar="PATH", help="the backup file to create")
    backup.add_argument("--force", action="store_true", help="replace PATH if it exists")
    backup.add_argument(
        "--step-pages",
        type=_positive_int,
        default=backups.DEFAULT_STEP_PAGES,
        metavar="N",
        help=f"database pages copied per step (default {backups.DEFAULT_STEP_PAGES})",
    )
    _add_storage_options(backup)

    replay_ = commands.add_parser(
        "replay",
        help="re-derive conversations and messages from the stored raw events",
        description="Parse every stored raw event again, in the order stored, and write its conversation and "
        "messages: the way out after a parsing bug is fixed. Idempotent; adds and corrects rows, deletes none.",
    )
    replay_.add_argument("--conversation", metavar="ID", help="only this conversation's events")
    replay_.add_argument(
        "--since",
        type=_instant,
        metavar="T",
        help="from the first event received at or after T (ISO-8601, naive is UTC, or Unix seconds)",
    )
    _add_storage_options(replay_)

    prune = commands.add_parser(
        "prune",
        help="delete conversations older than the retention period",
        description="Delete conversations last updated before the cutoff, with their messages and raw events, "
        "a few per transaction: safe while the daemon is serving.",
    )
    prune.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    prune.add_argument(
        "--older-than-days",
        type=_positive_float,
        metavar="N",
        help="the cutoff, in days before now (default: storage.retention_days; 0 there keeps everything)",
    )
    _add_storage_options(prune)

    delete = commands.add_parser(
        "delete",
        help="erase one conversation, and drop its later deliveries",
        description="Erase one conversation: its messages, raw events, dead letters and record, in one "
        "transaction, leaving a tombstone so that a late re-delivery is answered 2xx and stored nowhere. Safe "
        "while the daemon is serving, but its cache may still serve the conversation for up to cache.ttl_s: "
        "DELETE /conversations/{id} on the daemon evicts it at once. Backups made before keep the data.",
    )
    delete.add_argument("--conversation", required=True, metavar="ID", help="the conversation id")
    delete.add_argument(
        "--undo",
        action="store_true",
        help="lift the conversation's tombstone instead, so its next delivery is stored (nothing comes back)",
    )
    _add_storage_options(delete)

    dead = commands.add_parser(
        "dead-letters",
        help="list or retry the deliveries the database refused",
        description="Deliveries whose rows the database refused are answered 5xx and kept, raw body and error, "
        "in dead_letters. List them, or, once the cause is fixed, store them: safe while the daemon is serving.",
    )
    dead_commands = dead.add_subparsers(dest="dead_letters_command", required=True, metavar="ACTION")
    dead_list = dead_commands.add_parser(
        "list",
        help="the unresolved dead letters, oldest first (never their bodies)",
        description="Print the unresolved dead letters, oldest first: id, when it last failed, source, event "
        "type, conversation, attempts and error. Bodies are never printed. Reads only.",
    )
    dead_list.add_argument("--json", action="store_true", help="one JSON array of objects instead of lines")
    _add_storage_options(dead_list)
    dead_retry = dead_commands.add_parser(
        "retry",
        help="parse and store the unresolved dead letters again",
        description="Parse each unresolved dead letter's body again, as intake does, and store it (event "
        "included). A stored one is marked resolved; one still failing stays, one attempt more. Exit 1 if any "
        "still fails.",
    )
    dead_retry.add_argument(
        "--id",
        dest="ids",
        type=_positive_int,
        action="append",
        metavar="N",
        help="only this dead letter (repeat for several; default: every unresolved one)",
    )
    _add_storage_options(dead_retry)
    reconcile_command.add_parser(commands, _add_storage_options)
    search_command.add_parser(commands, _add_storage_options)
    notifications_command.add_parser(commands, _add_storage_options)
    return parser


def _add_storage_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--config", type=Path, metavar="PATH", help="config file (default: ./config.toml if present)")
    command.add_argument("--db", metavar="PATH|URL", help="SQLite database file, or a postgresql:// URL (storage.url)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def _instant(text: str) -> float:
    value = epoch_seconds(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (ISO-8601 or Unix seconds)")
    return value


def serve_overrides(args: argparse.Namespace) -> dict[str, object]:
    return {
        "server.host": args.host,
        "server.port": args.port,
        "storage.url": args.db,
        "ingest.ack": args.ack,
        "storage.synchronous": args.synchronous,
        "server.log_level": args.log_level,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        return operate(args)
    try:
        config = load_config(args.config, overrides=serve_overrides(args))
    except ConfigError as exc:
        print(f"transcriptd: {exc}", file=sys.stderr)
        return 2
    return serve(config)


def storage_problem(config: Config) -> str | None:
    """Open and migrate the database as the writer will, before the server starts: a file that is not
    SQLite, a read-only file or directory, or a too-old SQLite is then one line naming the cause, rather
    than a traceback out of the server's start-up; a PostgreSQL server that cannot be reached, one line
    naming its host and port (never the password). None when the database is usable."""
    if config.storage.postgres:
        return postgres_problem(config)
    try:
        with closing(operator_db.writer(config)) as conn:
            if applied := migrate(conn):
                log.info("applied migrations %s to %s", applied, config.storage.target)
    except (sqlite3.Error, OSError, StorageVersionError) as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None


def postgres_problem(config: Config) -> str | None:
    import psycopg

    from storage.postgres.connection import connect
    from storage.postgres.migrations import migrate as migrate_postgres

    url = config.storage.target
    try:
        with connect(url, synchronous=config.storage.synchronous) as conn:
            if applied := migrate_postgres(conn):
                log.info("applied migrations %s to %s", applied, describe(url))
    except StorageUnavailable as exc:
        return str(exc)
    except psycopg.Error as exc:
        return f"{exc.__class__.__name__}: {exc}".strip()
    return None


def serve(config: Config) -> int:
    if (refused := exposure.refusal(config)) is not None:
        # Before anything opens or listens, and as a bad setting: exit 2, which the systemd unit does not restart.
        print(f"transcriptd: {refused}", file=sys.stderr)
        return 2

    # Every request allocates thousands of short-lived objects (decoded entries, row tuples); the default
    # thresholds run a collection every few requests and a full one often enough to show in the ack p99
    # (measured: p99 at 16 senders ~120 ms -> ~78 ms). Start-up objects are frozen out of every pass.
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 50, 1_000)
    configure(config)
    if (warning := exposure.open_reads_warning(config)) is not None:
        log.warning("%s", warning)
    if (problem := storage_problem(config)) is not None:
        log.error(
            "%s",
            problem
            if config.storage.postgres
            else f"cannot use the database at {describe(config.storage.target)}: {problem}",
        )
        return 3
    app = create_app(config)
    server = build_server(
        config,
        app,
        graceful_shutdown_s=max(1, int(shutdown_budget(config).requests_s)),
        on_exit=app.state.changes_signal.close,
    )
    server.run()
    # uvicorn returns normally on SIGTERM/SIGINT after the lifespan drained; a failed start-up sets started=False.
    return 0 if server.started else 3


# --- operator commands ---------------------------------------------------------------------------------
# Results go to standard output, errors to standard error as "transcriptd: ...". Exit codes: 0 done, 1 the
# command failed (unknown conversation, no database, storage error), 2 a bad setting or argument (or a
# command not available on the database's backend), 3 the PostgreSQL server cannot be reached or refuses
# the connection.


class Failed(Exception):
    """An operator command could not do its job; the message says why (exit code 1)."""


def operate(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config, overrides={"storage.url": args.db})
    except ConfigError as exc:
        print(f"transcriptd: {exc}", file=sys.stderr)
        return 2
    command: Callable[[argparse.Namespace, Config], int] = OPERATIONS[args.command]
    try:
        return command(args, config)
    except ServerUnreachable as exc:
        # One line naming host:port/dbname and the reason, never the user or password.
        print(f"transcriptd: {exc}", file=sys.stderr)
        return 3
    except (Failed, operator_db.NoDatabase, backups.BackupError, StorageVersionError, StorageUnavailable) as exc:
        print(f"transcriptd: {exc}", file=sys.stderr)
    except BrokenPipeError:
        # The reader went away (``transcriptd export ... | head``): nothing more to say, to anyone.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (sqlite3.Error, psycopg.Error, OSError) as exc:
        reason = next(iter(str(exc).splitlines()), "")  # psycopg's own message runs on with details
        print(f"transcriptd: {args.command}: {exc.__class__.__name__}: {reason}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"transcriptd: {args.command} interrupted", file=sys.stderr)
        return 130
    return 1


def export_command(args: argparse.Namespace, config: Config) -> int:
    with operator_db.opened(config, reads_only=True) as db:
        # No transaction around the whole export: it would hold the daemon's WAL (or, on PostgreSQL, vacuum)
        # for as long as the output takes to write. The messages are read in chunks, each a short snapshot.
        head = db.export.conversation(db.conn, args.conversation)
        if head is None:
            raise Failed(f"no conversation {args.conversation!r} in {db.label}")
        if args.output is None:
            _write_all(sys.stdout.buffer, db.export.export(db.conn, head, args.format))
            sys.stdout.flush()
        else:
            with args.output.open("wb") as out:
                _write_all(out, db.export.export(db.conn, head, args.format))
    return 0


def _write_all(out: BinaryIO, chunks: Iterator[bytes]) -> None:
    for chunk in chunks:
        out.write(chunk)
    out.flush()


def backup_command(args: argparse.Namespace, config: Config) -> int:
    if is_postgres_url(config.storage.target):
        # A copy of a server's database is the server's own tool's job: a consistent snapshot, online.
        print(
            f"transcriptd: backup copies a SQLite file; {pg_dump_hint(config.storage.target, args.path)}",
            file=sys.stderr,
        )
        return 2
    if (problem := operator_db.missing(config)) is not None:
        raise Failed(problem)
    path = Path(config.storage.target)
    done = backups.backup(
        path,
        args.path,
        force=args.force,
        step_pages=args.step_pages,
        busy_timeout_ms=config.storage.busy_timeout_ms,
    )
    print(
        f"backed up {path} to {done.path}: {done.conversations} conversations, {done.messages} messages, "
        f"{done.events} events, {_size(done.size_bytes)} ({done.pages} pages in {done.steps} steps; integrity ok)"
    )
    if done.removed_leftovers:
        print(f"removed {len(done.removed_leftovers)} temporary files left by killed backups to {done.path}")
    return 0


def pg_dump_hint(url: str, target: Path) -> str:
    """How to back up the PostgreSQL database at ``url`` to ``target`` (user and password left out)."""
    return (
        f"on PostgreSQL back up with pg_dump: pg_dump --format=custom --file={target} "
        f"--dbname=postgresql://{where(url)} (add the user and password as for psql; see docs/postgresql.md)"
    )


def replay_parsers() -> dict[str, Parse]:
    """Each registered source's replay parser, by the source name its events are stored under."""
    return {source.name: source.replay for source in SOURCES}


MAX_REPORTED_FAILURES = 20


def replay_command(args: argparse.Namespace, config: Config) -> int:
    reported = 0

    def report(event: StoredEvent, message: str) -> None:
        nonlocal reported
        reported += 1
        if reported <= MAX_REPORTED_FAILURES:
            print(
                f"transcriptd: event {event.id} ({event.source} {event.event_type}, conversation "
                f"{event.conversation_id!r}) not replayed: {message}",
                file=sys.stderr,
            )

    with operator_db.opened(config) as db:
        if args.conversation is not None and not db.replay.has_events(db.conn, args.conversation):
            # As export does: a mistyped id is named, not reported as "replayed 0 events" with exit 0.
            raise Failed(f"no events of conversation {args.conversation!r} in {db.label}")
        stats = db.replay.replay(
            db.conn, replay_parsers(), conversation_id=args.conversation, since=args.since, on_failure=report
        )
    if reported > MAX_REPORTED_FAILURES:
        print(f"transcriptd: ... and {reported - MAX_REPORTED_FAILURES} more not replayed", file=sys.stderr)
    print(_replayed(stats))
    return 1 if stats.failed else 0


def _replayed(stats: ReplayStats) -> str:
    line = (
        f"replayed {stats.events} events in {stats.transactions} transactions: "
        f"{stats.inserted} messages inserted, {stats.updated} updated"
    )
    extra = [
        f"{stats.rejected_items} entries the parsers refuse" if stats.rejected_items else "",
        f"{stats.unparsed} events the parsers refuse" if stats.unparsed else "",
        f"{stats.refused} events the database refused" if stats.refused else "",
        f"{stats.unknown_source} events of a source without a parser" if stats.unknown_source else "",
    ]
    extra = [e for e in extra if e]
    return line + (f" ({'; '.join(extra)})" if extra else "")


def prune_command(args: argparse.Namespace, config: Config) -> int:
    # Opened first: a mistyped path or URL fails even when nothing would be deleted.
    with operator_db.opened(config, reads_only=args.dry_run) as db:
        flag: float | None = args.older_than_days
        days = flag if flag is not None else float(config.storage.retention_days)
        if days <= 0:
            print("no retention configured (storage.retention_days is 0: keep everything); nothing deleted")
            return 0
        cutoff = time.time() - days * DAY_S
        when = f"last updated before {_iso(cutoff)} (older than {days:g} days)"
        if args.dry_run:
            plan = db.retention.plan(db.conn, cutoff)
            print(
                f"would delete {plan.conversations} conversations, {plan.messages} messages, {plan.events} "
                f"events {when} (dry run: nothing deleted)"
            )
            return 0
        total, transactions = retention.Pruned(), 0
        while (pruned := db.retention.prune_batch_counts(db.conn, cutoff)).conversations:
            total += pruned
            transactions += 1
    print(
        f"deleted {total.conversations} conversations, {total.messages} messages, {total.events} events "
        f"{when}, in {transactions} transactions"
    )
    return 0


def delete_command(args: argparse.Namespace, config: Config) -> int:
    cid: str = args.conversation
    with operator_db.opened(config, migrates=True) as db:
        db.migrate(db.conn)  # a database of an older version gets its tombstones table first
        if args.undo:
            lifted = db.erasure.undo(db.conn, cid)
            if lifted is None:
                raise Failed(f"conversation {cid!r} has no tombstone in {db.label}: nothing to undo")
            print(
                f"lifted the tombstone of conversation {cid!r} (erased {_iso(lifted.deleted_at)}, "
                f"{lifted.dropped} deliveries dropped since): its next delivery is stored"
            )
            return 0
        erased = db.erasure.erase(db.conn, cid)
        if erased is None:
            raise Failed(f"no conversation {cid!r} in {db.label}")
    print(
        f"erased conversation {cid!r}: {erased.conversations} conversation, {erased.messages} messages, "
        f"{erased.events} events, {erased.dead_letters} dead letters; its later deliveries are dropped "
        "(a running daemon's cache may serve it for up to cache.ttl_s)"
    )
    return 0


def dead_letters_command(args: argparse.Namespace, config: Config) -> int:
    if args.dead_letters_command == "list":
        with operator_db.opened(config, reads_only=True) as db:
            letters = db.dead_letters.list_unresolved(db.conn)
        # Never the body: it may hold secrets (a callback URL's token, the sender's data).
        if args.json:
            print(json.dumps([_dead_letter_json(letter) for letter in letters], ensure_ascii=False, indent=1))
            return 0
        for letter in letters:
            print(
                f"{letter.id}  {_iso(letter.failed_at)}  {letter.source} {letter.event_type}  conversation "
                f"{letter.conversation_id!r}  attempts {letter.attempts}  {letter.error}"
            )
        print(f"{len(letters)} unresolved dead letter{'' if len(letters) == 1 else 's'}")
        return 0
    with operator_db.opened(config) as db:
        summary = db.dead_letters.retry(db.conn, replay_parsers(), args.ids)
        label = db.label
    for outcome in summary.outcomes:
        what = f"dead letter {outcome.id} ({outcome.source} {outcome.event_type}, "
        what += f"conversation {outcome.conversation_id!r})"
        if outcome.status == "stored":
            print(f"{what}: stored, {outcome.inserted} messages inserted")
        elif outcome.status == "already_stored":
            print(f"{what}: already stored (re-sent meanwhile); resolved")
        else:
            print(f"transcriptd: {what} still fails: {outcome.error}", file=sys.stderr)
    for unknown in summary.unknown_ids:
        print(f"transcriptd: no unresolved dead letter {unknown} in {label}", file=sys.stderr)
    stored, failed = len(summary.stored), len(summary.failed)
    tried = len(summary.outcomes)
    print(f"retried {tried} dead letter{'' if tried == 1 else 's'}: {stored} stored, {failed} still failing")
    return 1 if summary.failed or summary.unknown_ids else 0


def _dead_letter_json(letter: dead_letters.DeadLetter) -> dict[str, object]:
    return {
        "id": letter.id,
        "failed_at": _iso(letter.failed_at),
        "received_at": _iso(letter.received_at),
        "source": letter.source,
        "event_type": letter.event_type,
        "conversation_id": letter.conversation_id,
        "delivery_key": letter.delivery_key,
        "attempts": letter.attempts,
        "error": letter.error,
    }


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


OPERATIONS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "export": export_command,
    "backup": backup_command,
    "replay": replay_command,
    "prune": prune_command,
    "dead-letters": dead_letters_command,
    "delete": delete_command,
    "reconcile": reconcile_command.run,
    "search": search_command.run,
    "notifications": notifications_command.run,
}
