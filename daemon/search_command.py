"""``transcriptd search rebuild``: fill the search index for the messages it lacks (after the migration
that created it, or with ``--from-scratch`` all of them again), a chunk per transaction, with progress.

Safe while the daemon is serving: each chunk is one short write transaction, as the daemon's own backfill
(daemon.indexing) does, and both go on from where the other stopped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from daemon import operator_db
from daemon.config import Config

# Without a terminal (a cron job, a log): one line per tenth of the way, not one per chunk.
LINES_WITHOUT_TERMINAL = 10


def add_parser(commands: Any, storage_options: Callable[[argparse.ArgumentParser], None]) -> None:
    search = commands.add_parser(
        "search",
        help="the full-text search index",
        description="The full-text index behind GET /search.",
    )
    actions = search.add_subparsers(dest="search_command", required=True, metavar="ACTION")
    rebuild = actions.add_parser(
        "rebuild",
        help="index the messages the search index lacks, with progress",
        description="Index the messages stored before the search index existed (the daemon also does this at "
        "start-up), a chunk per transaction, with progress: safe while the daemon is serving. Searches say "
        "`partial` until it is done.",
    )
    rebuild.add_argument("--from-scratch", action="store_true", help="empty the index and index every message again")
    storage_options(rebuild)


class Progress:
    """``indexed N of M messages (P%)``: rewritten in place on a terminal, a line per tenth otherwise."""

    def __init__(self, out: TextIO, total: int) -> None:
        self.out, self.total, self.done, self.lines = out, total, 0, 0
        self.terminal = out.isatty()

    def advance(self, indexed: int) -> None:
        self.done += indexed
        line = f"indexed {self.done} of {self.total} messages ({100 * self.done // max(self.total, 1)}%)"
        if self.terminal:
            self.out.write(f"\r{line}")
        elif self.done * LINES_WITHOUT_TERMINAL >= (self.lines + 1) * self.total:
            self.lines = self.done * LINES_WITHOUT_TERMINAL // max(self.total, 1)
            self.out.write(f"{line}\n")
        self.out.flush()

    def close(self) -> None:
        if self.terminal and self.done:
            self.out.write("\n")
            self.out.flush()


def run(args: argparse.Namespace, config: Config) -> int:
    with operator_db.opened(config, migrates=True) as db:
        index = db.search_index
        conn = db.conn
        db.migrate(conn)  # a database of an older version gets its index (empty) here
        if not config.search.enabled:
            print("transcriptd: search is turned off (search.enabled = false): nothing to index", file=sys.stderr)
            return 2
        index.configure(conn, enabled=True)
        if args.from_scratch:
            index.rebuild(conn)
        state = index.state(conn)
        if state.complete:
            print("the search index is complete: nothing to index")
            return 0
        progress = Progress(sys.stdout, state.pending)
        started = time.monotonic()
        try:
            while indexed := index.step(conn):
                progress.advance(indexed)
        finally:
            progress.close()
    print(f"the search index is complete: {progress.done} messages indexed in {time.monotonic() - started:.1f} s")
    return 0
