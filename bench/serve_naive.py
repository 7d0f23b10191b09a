"""The naive webhook handler (bench.naive) as a real HTTP server, for load runs against it and transcriptd.

    python -m bench.serve_naive --variant before|after --db PATH [--host 127.0.0.1] [--port 8001]
                                [--round-trip-ms 0] [--cache memory|redis] [--redis-url URL]

It runs under uvicorn exactly as ``transcriptd serve`` does (uvloop when installed, httptools, no access
log, no server header, the same signal handling), so what a load run sees between the two is the handlers'
doing, not the servers'. ``--round-trip-ms`` is the simulated network round trip of each database statement
and of each cache command, whether Redis (``--cache redis``) or the dict standing in for it
(``--cache memory``), so that runs with and without Redis compare. ``--redis-url`` must name a database of
its own, not 0 (default: the bench's database 15). SIGTERM or SIGINT stops it: in-flight requests finish,
and the ``after`` variant drains its background work before the process exits (status 0).

Start it from code with :func:`start_naive`, and transcriptd with :func:`bench.processes.start_transcriptd`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from starlette.applications import Starlette

from bench.naive import NaiveCache, SimulatedCache, Variant, create_naive_app
from bench.processes import Log, free_port, start_server
from bench.redis_cache import DEFAULT_URL, RedisCache, check_redis_url
from daemon.server import DrainingServer, event_loop  # the daemon's own choices, so both run alike

HOST = "127.0.0.1"
# What ``transcriptd serve`` grants open requests at shutdown by default; the naive handler's own
# background work is drained by its lifespan afterwards, whatever this says.
GRACEFUL_SHUTDOWN_S = 10


def build_app(
    db: Path, variant: Variant, *, round_trip_ms: float = 0.0, cache: str = "memory", redis_url: str = DEFAULT_URL
) -> Starlette:
    """The naive app; with Redis, the client is closed once the lifespan has drained the background work.

    Either cache pays ``round_trip_ms`` per command, as the database pays it per statement.
    """
    delay_s = round_trip_ms / 1000
    store: NaiveCache
    redis: RedisCache | None = None
    if cache == "redis":
        check_redis_url(redis_url)
        store = redis = RedisCache(redis_url, command_delay_s=delay_s)
    elif cache == "memory":
        store = SimulatedCache(delay_s)
    else:
        raise ValueError(f"unknown cache {cache!r}")
    app = create_naive_app(db, variant=variant, cache=store, statement_delay_s=delay_s)
    if redis is not None:
        inner = app.router.lifespan_context

        @asynccontextmanager
        async def lifespan(app: Starlette) -> AsyncIterator[None]:
            try:
                async with inner(app):
                    yield
            finally:
                await redis.aclose()

        app.router.lifespan_context = lifespan
    return app


def serve(
    app: Starlette, *, host: str = HOST, port: int = 8001, log_level: str = "warning", tune_gc: bool = False
) -> int:
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if tune_gc:
        # transcriptd's own collector settings (daemon/cli.py), to compare the handlers with the runtime equal.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 1_000)
    server = DrainingServer(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            loop=event_loop(),
            http="httptools",
            lifespan="on",
            access_log=False,
            log_config=None,
            log_level=log_level,
            server_header=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
    )
    server.run()
    return 0 if server.started else 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serve_naive", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=["before", "after"], required=True)
    parser.add_argument("--db", type=Path, required=True, metavar="PATH", help="SQLite file (created and migrated)")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--round-trip-ms", type=float, default=0.0, help="simulated round trip per statement/command")
    parser.add_argument("--cache", choices=["memory", "redis"], default="memory")
    parser.add_argument(
        "--redis-url", default=DEFAULT_URL, help=f"a database of its own, not 0 (default {DEFAULT_URL})"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="warning")
    parser.add_argument("--tune-gc", action="store_true", help="transcriptd's garbage collector settings")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        app = build_app(
            args.db, args.variant, round_trip_ms=args.round_trip_ms, cache=args.cache, redis_url=args.redis_url
        )
    except ValueError as exc:  # a Redis URL naming database 0: a usage error, not a crash
        parser.error(str(exc))
    return serve(app, host=args.host, port=args.port, log_level=args.log_level, tune_gc=args.tune_gc)


# --- for orchestrators and tests ------------------------------------------------------------------------


def start_naive(
    db: Path,
    variant: Variant,
    *,
    round_trip_ms: float = 0.0,
    cache: str = "memory",
    redis_url: str = DEFAULT_URL,
    tune_gc: bool = False,
    log: Log = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """``python -m bench.serve_naive`` on a free loopback port, once it listens: the process and the port.

    ``log`` takes its standard output and error (default: inherited). Stop it with SIGTERM and ``wait()``.
    A Redis URL naming database 0 is refused here, before anything is started.
    """
    if cache == "redis":
        check_redis_url(redis_url)
    port = free_port()
    argv = ["-m", "bench.serve_naive", "--variant", variant, "--db", str(db), "--port", str(port)]
    argv += ["--round-trip-ms", str(round_trip_ms), "--cache", cache, "--redis-url", redis_url]
    argv += ["--tune-gc"] if tune_gc else []
    return start_server(argv, port, log=log), port


if __name__ == "__main__":
    raise SystemExit(main())
