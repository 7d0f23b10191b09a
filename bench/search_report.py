"""The search section of BENCHMARKS.md, from bench/results/search.json (``python -m bench.search``)."""

from __future__ import annotations

import statistics
from typing import Any

from bench.report import table


def search_section(search: dict[str, Any]) -> list[str]:
    ingest, found = search["ingest"], search["search"]
    medians = ingest["median_rows_per_s"]
    rows = []
    for variant, label in (
        ("index", "index on (the default)"),
        ("search.enabled=false", "index off (`search.enabled = false`)"),
    ):
        runs = ingest["runs"][variant]
        p99 = statistics.median(run["latency_ms"]["p99"] for run in runs)
        rows.append(
            [
                label,
                f"{medians[variant]:,.0f}",
                " / ".join(f"{run['rows_per_s']:,.0f}" for run in runs),
                f"{p99:.1f} ms",
            ]
        )
    kinds = [
        [
            kind,
            f"{figures['latency_ms']['p50']} ms",
            f"{figures['latency_ms']['p99']} ms",
            f"{figures['hits_per_page']:.1f}",
        ]
        for kind, figures in found["by_kind"].items()
    ]
    overall = found["latency_ms"]
    kinds.append(["**all**", f"{overall['p50']} ms", f"{overall['p99']} ms", ""])
    return [
        "## Search",
        "",
        f"`python -m bench.search`: durable ingest at {ingest['senders']} senders of {ingest['webhooks']} Tavus "
        f"transcripts ({ingest['messages_per_webhook']} messages each, varied text) into a fresh database, in "
        f"{len(ingest['runs']['index'])} alternated rounds of each variant:",
        "",
        *table(["variant", "median rows/s", "each round", "median ack p99"], rows),
        "",
        f"The index costs {ingest['cost']:.0%} of durable throughput (median against median).",
        "",
        f"Search latency over {found['messages_stored']:,} stored messages ({found['database_bytes'] / 2**30:.2f} "
        f"GiB, the index {found['index_bytes'] / 2**20:,.0f} MiB of it), one `GET /search` at a time over HTTP, "
        "20 hits a page:",
        "",
        *table(["query", "p50", "p99", "hits a page"], kinds),
    ]
