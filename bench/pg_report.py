"""The PostgreSQL section of BENCHMARKS.md: the server's ceiling beside the group commit
(``bench/results/pg_ceiling.json``, ``bench.pg_ceiling``), then the daemon itself, replicas and senders
(``bench/results/pg_daemon.json``, ``bench.pg_daemon``)."""

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
        "## PostgreSQL",
        "",
        "### The server's ceiling and the group commit",
        "",
        f"`python -m bench.pg_ceiling`: {settings['transcripts']} Tavus transcripts of {settings['turns']} messages, "
        f"committed {settings['per_commit']} transcripts at a time (`synchronous_commit = "
        f"{settings['synchronous_commit']}`), into a fresh database on PostgreSQL {result['server_version']} on "
        f"this machine; the median of {settings['rounds']} alternated rounds. COPY and the unnest loop write the "
        "message rows only (their conversations exist before the clock starts); the group commit also writes "
        "the conversations, the events with their raw bodies, and the counts. No HTTP: the daemon itself is in "
        "the next table.",
        "",
        *table(["what", "messages/s", "of COPY", "commits/s", "rows per commit"], rows),
    ]


def daemon_section(result: dict[str, Any], ceiling: dict[str, Any] | None = None) -> list[str]:
    """``ceiling``: ``bench.pg_ceiling``'s result of the same run, if there is one: the claim is also given
    against its COPY, measured on its own (a fresh table, several rounds)."""
    from bench.report import table  # as above: bench.report imports this module

    settings = result["settings"]
    rows = []
    for run in result["runs"]:
        latency = run["latency_ms"] or {}
        rows.append(
            [
                str(run["replicas"]),
                str(run["senders"]),
                f"{run['messages_per_s']:,.0f}",
                f"{run['of_copy']:.2f}",
                f"{run['copy']['rows_per_s']:,.0f}",
                *(f"{latency[q]:,.0f}" if q in latency else "—" for q in ("p50", "p95", "p99")),
                f"{run['commits_per_s']:,.1f}",
                f"{run['rows_per_commit']:,.0f}",
                _answers(run),
            ]
        )
    lost = sum(run["lost"] + run["excess"] for run in result["runs"])
    checked = sum(run["ok"] for run in result["runs"])
    stored = (
        f"All {checked:,} transcripts answered 200 were found with every message, once."
        if not lost
        else f"**{lost} of the {checked:,} transcripts answered 200 were not stored exactly once**: see "
        "`pg_daemon.json`."
    )
    return [
        "### transcriptd serve on PostgreSQL: replicas and senders",
        "",
        f"`python -m bench.pg_daemon`: real `transcriptd serve --db postgresql://...` processes, "
        f"{' and then '.join(map(str, settings['replicas']))} replicas on one fresh database (ack "
        f"`{settings['ack']}`, `storage.synchronous = {settings['synchronous']}`: a 200 is committed), taking "
        f"{settings['turns']}-message Tavus transcripts over loopback from closed loops of "
        f"{', '.join(map(str, settings['senders']))} senders, each sending to the replicas in turn as a "
        f"round-robin balancer would. Each run's share of COPY divides it by binary `COPY` of "
        f"{settings['copy_transcripts']} transcripts ({settings['copy_per_commit']} per commit) into the same "
        "table, timed just before and just after it on the same server (their mean, in the COPY column): a "
        "server whose speed drifts during the step drifts for both. COPY is one connection committing one "
        "batch at a time; replicas commit side by side, each on its writer's connection, so a share can pass 1. "
        "Commits/s and rows per commit are the "
        "replicas' own counters (`/metrics`), summed; ack latencies are the senders'. The clients and the "
        f"server share this machine's {result['machine']['cpus']} CPUs with the daemons.",
        "",
        *table(
            [
                "replicas",
                "senders",
                "messages/s",
                "of COPY",
                "COPY rows/s",
                "ack p50 ms",
                "p95 ms",
                "p99 ms",
                "commits/s",
                "rows per commit",
                "answers",
            ],
            rows,
        ),
        "",
        _claim(result, ceiling) + " " + stored,
    ]


def _answers(run: dict[str, Any]) -> str:
    return ", ".join(
        f"{count} x {'no answer' if status == '0' else status}" for status, count in run["statuses"].items()
    )


def _claim(result: dict[str, Any], ceiling: dict[str, Any] | None) -> str:
    claim = result["claim"]
    where = f"Durable ingest through {claim['replicas']} replicas at {claim['senders']} senders"
    ratio = claim["of_copy"]
    if ratio is None:
        return f"{where} was not measured in this run."
    runs = [r for r in result["runs"] if (r["replicas"], r["senders"]) == (claim["replicas"], claim["senders"])]
    also = (
        f" Against the ceiling step's COPY ({ceiling['copy']['rows_per_s']:,.0f} rows/s, a fresh table): "
        f"{runs[0]['messages_per_s'] / ceiling['copy']['rows_per_s']:.2f}."
        if ceiling and runs
        else ""
    )
    verdict = (
        "meets the goal"
        if ratio >= claim["goal"]
        else "meets the floor, not the goal"
        if ratio >= claim["at_least"]
        else "**is under the floor**"
    )
    target = f"at least {claim['at_least']}, goal {claim['goal']}"
    return f"{where}: {ratio:.2f} of COPY's rows/s ({target}): it {verdict}.{also}"
