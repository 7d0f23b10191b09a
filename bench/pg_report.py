"""The PostgreSQL section of BENCHMARKS.md, from ``bench/results/pg_ceiling.json`` (``bench.pg_ceiling``)."""

from __future__ import annotations

from typing import Any


def postgres_section(result: dict[str, Any]) -> list[str]:
    from bench.report import table  # bench.report renders this section: imported when called, not at load

    settings = result["settings"]
    ceiling = result["copy"]["rows_per_s"]
    rows = []
    for label, key in (
        ("`COPY messages FROM STDIN` (binary): the ceiling", "copy"),
        ("a plain loop of one `INSERT ... SELECT FROM unnest(...)` per transcript", "unnest"),
        ("transcriptd's group commit (`storage.postgres.writes`), driven directly", "group_commit"),
    ):
        run = result[key]
        rows.append(
            [
                label,
                f"{run['rows_per_s']:,.0f}",
                f"{run['rows_per_s'] / ceiling:.0%}",
                f"{run['commits_per_s']:,.1f}",
                f"{run['rows'] / run['commits']:,.0f}",
            ]
        )
    return [
        "## PostgreSQL: the server's ceiling and the group commit",
        "",
        f"`python -m bench.pg_ceiling`: {settings['transcripts']} Tavus transcripts of {settings['turns']} messages, "
        f"committed {settings['per_commit']} transcripts at a time (`synchronous_commit = "
        f"{settings['synchronous_commit']}`), into a fresh database on PostgreSQL {result['server_version']} on "
        f"this machine; the median of {settings['rounds']} alternated rounds. COPY and the unnest loop write the "
        "message rows only (their conversations exist before the clock starts); the group commit also writes "
        "the conversations, the events with their raw bodies, and the counts. No HTTP: the daemon on PostgreSQL "
        "is measured once it is wired to this backend.",
        "",
        *table(["what", "messages/s", "of COPY", "commits/s", "rows per commit"], rows),
    ]
