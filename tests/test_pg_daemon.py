"""bench.pg_daemon against the real server: two real ``transcriptd serve`` replicas on one fresh database.

The figures are not asserted (they depend on the machine); what is: the load reaches both replicas, every
acknowledged transcript is found stored once, the replicas' commit counters account for exactly the rows
sent, and COPY wrote what it was given.
"""

from __future__ import annotations

from bench.pg_daemon import run
from tests.postgres_tools import SERVER_URL

MESSAGES = 101  # a 100-turn transcript and its system entry


def test_two_replicas_share_the_senders_and_store_every_acknowledged_transcript() -> None:
    result = run(SERVER_URL, [2], [4], requests=12, single=2, per_sender=1, copy_transcripts=3)
    (measured,) = result["runs"]
    assert measured["statuses"] == {"200": 12}
    assert (measured["lost"], measured["excess"]) == (0, 0)
    assert len(measured["commits_by_replica"]) == 2
    assert all(commits > 0 for commits in measured["commits_by_replica"])
    assert measured["rows_committed"] == 12 * MESSAGES
    assert measured["copy"]["before"]["rows"] == measured["copy"]["after"]["rows"] == 3 * MESSAGES
    assert result["claim"]["of_copy"] is None  # 4 senders: not the claim's run
