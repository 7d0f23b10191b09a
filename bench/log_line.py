"""What one delivery's log line costs the event loop: ``delivery_log.stored`` through the daemon's own handler,
mask and formatter (``daemon.logs.configure``), written line-buffered to /dev/null as the daemon's stderr is.

    python -m bench.log_line [--format text|json] [--lines 20000] [--instructions]

The time per line is the median of five batches: on a shared machine it moves with the load. The
instruction count does not: ``--instructions`` runs this module under callgrind twice, without lines and
with ``--lines``, and divides the difference (None when valgrind is not installed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from daemon import delivery_log
from daemon.config import load_config
from daemon.inflight import InFlight
from daemon.logs import configure
from storage.deliveries import Record, WriteResult

FORMATS = ("text", "json")
BATCHES = 5
REPO = Path(__file__).resolve().parent.parent
INSTRUCTION_LINES = 2000


def _configured(fmt: str) -> None:
    settings = {"storage.path": os.devnull, "logging.format": fmt, "webhooks.tavus.token": "bench-tavus-token"}
    # Line-buffered, as the daemon's stderr: every line is its own write, as deployed. Open until the process
    # ends, as stderr is.
    stream = open(os.devnull, "w", buffering=1)  # noqa: SIM115
    configure(load_config(Path(os.devnull), environ={}, overrides=settings), stream=stream)


def _delivery() -> tuple[InFlight, WriteResult]:
    # A 100-turn Tavus transcript, as bench.load sends: 101 messages, ~40 KB.
    record = Record(
        key="tavus:load-000123:application.transcription_ready",
        source="tavus",
        event_type="application.transcription_ready",
        conversation_id="load-000123",
        received_at=time.time(),
        body=b"x" * 40_000,
    )
    return InFlight(record), WriteResult(received=101, inserted=101, updated=0)


def _write(lines: int) -> None:
    delivery, result = _delivery()
    started = time.perf_counter()
    for _ in range(lines):
        delivery_log.stored(delivery, result, "stored", started)


def microseconds_per_line(fmt: str, lines: int) -> float:
    """The median time of a line over ``BATCHES`` batches, in this process (configured for ``fmt``)."""
    _configured(fmt)
    _write(200)  # warm
    batches = []
    for _ in range(BATCHES):
        started = time.perf_counter()
        _write(lines)
        batches.append((time.perf_counter() - started) / lines * 1e6)
    return round(statistics.median(batches), 2)


def instructions_per_line(fmt: str, lines: int = INSTRUCTION_LINES) -> int | None:
    """Instructions per line under callgrind (a subprocess each run); None without valgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        return None

    def collected(count: int) -> int:
        argv = [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable]
        argv += ["-m", "bench.log_line", "--format", fmt, "--lines", str(count), "--write-only"]
        run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=True)
        (line,) = [line for line in run.stderr.splitlines() if "Collected :" in line]
        return int(line.split()[-1])

    return round((collected(lines) - collected(0)) / lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", choices=FORMATS, default="text")
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--instructions", action="store_true", help="count instructions under callgrind as well")
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)  # callgrind's runs
    args = parser.parse_args(argv)
    if args.write_only:
        _configured(args.format)
        _write(200)
        _write(args.lines)
        return 0
    print(f"{args.format}: {microseconds_per_line(args.format, args.lines)} us a line")
    if args.instructions:
        print(f"{args.format}: {instructions_per_line(args.format)} instructions a line")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
