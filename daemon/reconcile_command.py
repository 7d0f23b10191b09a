"""``transcriptd reconcile``: fetch back from a vendor's API the conversations the webhooks missed.

It lists the vendor's conversations started in the window (``--since``, paging through the list), or
takes one (``--conversation``), fetches those missing here or incomplete (no transcript, not ended),
and writes them through its own writer connection, one transaction per conversation, as the other
operator commands do: safe while the daemon serves the same file (each transaction waits at most
``storage.busy_timeout_ms`` for the daemon's writer). Exit codes: 0 every conversation found is stored;
1 some could not be completed (named on standard error), or the vendor's list or the database failed;
2 a bad argument or setting (no ``webhooks.<source>.api_key``).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import anyio

from daemon import operator_db
from daemon.config import Config
from daemon.reconcile import Tally, deliveries_of, vendor_http
from daemon.sources import SOURCES, Source
from daemon.vendor_http import HttpPolicy, VendorApiError, VendorHttp
from storage.errors import StorageRejected

API_SOURCES: dict[str, Source[Any]] = {source.name: source for source in SOURCES if source.api is not None}
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
DEFAULT_SINCE = "24h"


def duration(text: str) -> float:
    """Seconds from ``90m``, ``3h``, ``2d`` (or ``45s``)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (a number and s, m, h or d: 90m, 3h, 2d)")
    return float(match[1]) * _UNITS[match[2]]


def add_parser(commands: Any, storage_options: Callable[[argparse.ArgumentParser], None]) -> None:
    costs = "; ".join(f"{name}: {source.api.calls}" for name, source in API_SOURCES.items() if source.api)
    command = commands.add_parser(
        "reconcile",
        help="fetch from a vendor's API the conversations its webhooks did not deliver",
        description="List the vendor's conversations started in the window, fetch those missing here or "
        "incomplete (no transcript, not ended) with webhooks.<source>.api_key, and store them as their webhooks "
        "would have: safe while the daemon is serving. Exit 0 when every conversation found is stored, 1 when "
        f"some could not be, 2 on a bad argument or setting. API calls: {costs}.",
    )
    command.add_argument("--source", required=True, choices=sorted(API_SOURCES), help="the vendor")
    command.add_argument(
        "--since",
        type=duration,
        default=duration(DEFAULT_SINCE),
        metavar="DURATION",
        help=f"the window: conversations started in the last DURATION (90m, 3h, 2d; default {DEFAULT_SINCE})",
    )
    command.add_argument("--conversation", metavar="ID", help="only this conversation, fetched even if complete")
    command.add_argument("--dry-run", action="store_true", help="list what would be fetched; fetch and store nothing")
    storage_options(command)


class Progress:
    """A one-line progress bar on a terminal; nothing otherwise (a cron job's log stays clean)."""

    WIDTH = 30

    def __init__(self, out: TextIO, total: int) -> None:
        self.out, self.total, self.done = out, total, 0
        self.shown = out.isatty() and total > 0

    def advance(self) -> None:
        self.done += 1
        if self.shown:
            filled = self.WIDTH * self.done // self.total
            bar = "#" * filled + "-" * (self.WIDTH - filled)
            self.out.write(f"\r[{bar}] {self.done}/{self.total} conversations")
            self.out.flush()

    def close(self) -> None:
        if self.shown:
            self.out.write("\r" + " " * (self.WIDTH + 40) + "\r")
            self.out.flush()


def run(args: argparse.Namespace, config: Config) -> int:
    source = API_SOURCES[args.source]
    policy = HttpPolicy(
        timeout_s=config.reconcile.request_timeout_s,
        max_attempts=config.reconcile.max_attempts,
        max_concurrency=config.reconcile.max_concurrent_requests,
    )
    http = vendor_http(source, config.webhooks, policy)
    if http is None:
        print(f"transcriptd: reconcile needs webhooks.{source.name}.api_key (the vendor's API key)", file=sys.stderr)
        return 2
    with operator_db.opened(config, migrates=True) as db:
        db.migrate(db.conn)  # as serve does at start-up: the tables this version writes are there
        try:
            tally, listing_error = anyio.run(_reconcile, source, config.webhooks, http, db, args, backend="asyncio")
        except ExceptionGroup as group:
            # A storage fault out of the task group: raised as itself, so the command reports it in one line.
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
    return _report(source.name, args, tally, listing_error, http)


async def _reconcile(
    source: Source[Any], webhooks: Any, http: VendorHttp, db: operator_db.Database[Any], args: argparse.Namespace
) -> tuple[Tally, str | None]:
    tally = Tally()
    assert source.api is not None
    client = source.api.build(http)
    async with http:
        if args.conversation is not None:
            ids = [args.conversation]
        else:
            try:
                listed = [item async for item in client.recent(time.time() - args.since)]
            except VendorApiError as exc:
                return tally, str(exc)
            ids = list(dict.fromkeys(item.conversation_id for item in listed))
        tally.listed = len(ids)
        here = await anyio.to_thread.run_sync(db.local_state, db.conn, source.name, ids)
        todo = ids if args.conversation is not None else [c for c in ids if c not in here or not here[c].complete]
        tally.missing = len(todo)
        if args.dry_run:
            for cid in todo:
                print(f"would fetch {source.name} conversation {cid!r} ({_state(here.get(cid))})")
            return tally, None
        progress = Progress(sys.stdout, len(todo))
        writing = anyio.Lock()
        slots = anyio.Semaphore(http.policy.max_concurrency)

        async def one(cid: str) -> None:
            async with slots:
                try:
                    fetched = await client.fetch(cid)
                except VendorApiError as exc:
                    tally.failed[cid] = str(exc)
                    progress.advance()
                    return
            tally.fetched += 1
            deliveries, problems = deliveries_of(source, webhooks, fetched, time.time())
            for problem in problems:
                print(f"transcriptd: {source.name} conversation {cid!r}: {problem}", file=sys.stderr)
            async with writing:  # one connection: one transaction at a time
                outcomes = await anyio.to_thread.run_sync(db.write_batch, db.conn, deliveries) if deliveries else []
            refused = [str(outcome) for outcome in outcomes if isinstance(outcome, StorageRejected)]
            tally.count(outcome for outcome in outcomes if not isinstance(outcome, StorageRejected))
            if refused:
                tally.failed[cid] = refused[0]
            elif not fetched.ended:
                tally.in_progress += 1
            progress.advance()

        try:
            async with anyio.create_task_group() as tg:
                for cid in todo:
                    tg.start_soon(one, cid)
        finally:
            progress.close()
    return tally, None


def _state(local: Any) -> str:
    if local is None:
        return "not here"
    return f"here: {local.status}, {local.message_count} messages"


def _report(name: str, args: argparse.Namespace, tally: Tally, listing_error: str | None, http: VendorHttp) -> int:
    if listing_error is not None:
        print(f"transcriptd: could not list {name} conversations: {listing_error}", file=sys.stderr)
    for cid, why in sorted(tally.failed.items()):
        print(f"transcriptd: {name} conversation {cid!r} not completed: {why}", file=sys.stderr)
    window = f"conversation {args.conversation!r}" if args.conversation else f"since {_iso(time.time() - args.since)}"
    print(f"{name} {window}: found {tally.listed}, {tally.missing} missing or incomplete here")
    stats = http.stats
    api = f"API: {stats.requests} requests, {stats.rate_limited} answered 429, {stats.retries} retried"
    if args.dry_run:
        print(f"dry run: nothing fetched or stored; {api}")
        return 1 if listing_error else 0
    print(
        f"fetched {tally.fetched}, stored {tally.stored} ({tally.messages} messages inserted, {tally.updated} "
        f"updated), {tally.in_progress} still in progress at the vendor, {len(tally.failed)} could not be "
        f"completed; {api}"
    )
    return 1 if listing_error or tally.failed else 0


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
