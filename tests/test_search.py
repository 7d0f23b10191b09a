"""GET /search over real HTTP against the daemon in a subprocess, on SQLite and on PostgreSQL: hits and
ranks, every filter, the query language, bad syntax, paging, read-your-writes, erasure, the token; and
(SQLite's FTS5) the index built for a database that had messages before it existed, with progress."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.backend import is_postgres_url
from storage.migrations import _statements, available
from storage.search import MAX_ID, MIN_ID, RANK_WINDOW, QuerySyntaxError, SearchQuery, candidates, fts_expression, parse
from tests.conftest import Storage
from tests.daemon_process import Daemon, managed, rows, start_daemon, transcriptd
from tests.payloads import encode, transcription_ready

TOKEN = "read-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, module_storage: Storage) -> Iterator[Daemon]:
    """One daemon for the module's HTTP tests, on each backend in turn."""
    workdir = tmp_path_factory.mktemp("search")
    with managed(start_daemon(workdir, module_storage.target, env={"TRANSCRIPTD_API_TOKEN": TOKEN})) as running:
        yield running


@pytest.fixture(scope="module")
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=daemon.base_url, headers=AUTH, trust_env=False, timeout=30) as client:
        yield client


def post(http: httpx.Client, cid: str, messages: list[dict[str, Any]]) -> None:
    response = http.post(f"/conversations/{cid}/messages", json=messages)
    assert response.status_code == 200, response.text


def search(http: httpx.Client, q: str, **params: Any) -> dict[str, Any]:
    response = http.get("/search", params={"q": q, **params})
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


def hits(http: httpx.Client, q: str, **params: Any) -> list[tuple[str, int]]:
    return [(hit["conversation_id"], hit["seq"]) for hit in search(http, q, **params)["hits"]]


def test_a_hit_carries_its_message_a_marked_snippet_and_a_rank(http: httpx.Client) -> None:
    post(
        http,
        "hit-1",
        [{"role": "user", "content": "Hello, I would like a refund for my <b>order</b>", "timestamp": 1e9}],
    )
    (hit,) = search(http, "refund")["hits"]
    assert hit["conversation_id"] == "hit-1"
    assert hit["source"] == "api"
    assert hit["seq"] == 0
    assert hit["role"] == "user"
    assert hit["timestamp"] == 1e9
    assert hit["snippet"] == "Hello, I would like a refund for my <b>order</b>"
    assert [hit["snippet"][start:end] for start, end in hit["marks"]] == ["refund"]
    assert isinstance(hit["rank"], float)


def test_ranks_put_the_better_match_first(http: httpx.Client) -> None:
    post(
        http,
        "rank-1",
        [
            {"role": "user", "content": "zephyrine once, among many other words that dilute it a great deal here"},
            {"role": "user", "content": "zephyrine zephyrine zephyrine"},
        ],
    )
    found = search(http, "zephyrine")["hits"]
    assert [hit["seq"] for hit in found] == [1, 0]
    assert found[0]["rank"] > found[1]["rank"]


def test_words_phrases_prefixes_and_exclusions(http: httpx.Client) -> None:
    post(
        http,
        "lang-1",
        [
            {"role": "user", "content": "the quokka ate the blue quince"},
            {"role": "user", "content": "a blue quokka, then quince"},
            {"role": "user", "content": "quokkas everywhere"},
        ],
    )
    assert sorted(hits(http, "quokka quince")) == [("lang-1", 0), ("lang-1", 1)]
    assert hits(http, '"blue quince"') == [("lang-1", 0)]
    assert hits(http, '"blue quokka"') == [("lang-1", 1)]
    assert sorted(hits(http, "quokk*")) == [("lang-1", 0), ("lang-1", 1), ("lang-1", 2)]
    assert sorted(hits(http, "quokka -quince")) == []
    assert hits(http, 'quokk* -"blue"') == [("lang-1", 2)]
    assert hits(http, "quokka -ate") == [("lang-1", 1)]
    # Operators typed as words are words: nothing the user types becomes FTS5 syntax.
    assert hits(http, "quokka OR nothing") == []
    assert hits(http, "quokka NEAR quince") == []


def test_accents_and_case_do_not_matter(http: httpx.Client) -> None:
    post(http, "accent-1", [{"role": "user", "content": "Je voudrais une RÉSERVATION à Zürich, s'il vous plaît"}])
    for q in ("reservation", "Réservation", "RESERV*", "zurich", '"a zurich"', "PLAIT"):
        assert hits(http, q) == [("accent-1", 0)], q


def test_the_system_prompt_is_left_out_unless_asked(http: httpx.Client) -> None:
    post(
        http,
        "sys-1",
        [
            {"role": "system", "content": "You are Xanthippe, a support agent"},
            {"role": "user", "content": "Xanthippe?"},
        ],
    )
    assert hits(http, "xanthippe") == [("sys-1", 1)]
    assert sorted(hits(http, "xanthippe", include_system="true")) == [("sys-1", 0), ("sys-1", 1)]
    assert hits(http, "xanthippe", role="system") == [("sys-1", 0)]


def test_every_filter(http: httpx.Client) -> None:
    post(http, "flt-1", [{"role": "user", "content": "marmalade one", "timestamp": 1000}])
    post(http, "flt-1", [{"role": "assistant", "content": "marmalade two", "timestamp": 2000}])
    post(http, "flt-2", [{"role": "user", "content": "marmalade three", "timestamp": "1970-01-01T00:50:00Z"}])
    body = transcription_ready("flt-3", turns=0)
    body["properties"]["transcript"].append({"role": "user", "content": "marmalade four", "timestamp": 4000.0})
    assert http.post("/webhooks/tavus", content=encode(body)).status_code == 200
    everything = {("flt-1", 0), ("flt-1", 1), ("flt-2", 0), ("flt-3", 1)}
    assert set(hits(http, "marmalade")) == everything
    assert set(hits(http, "marmalade", role="assistant")) == {("flt-1", 1)}
    assert set(hits(http, "marmalade", source="tavus")) == {("flt-3", 1)}
    assert set(hits(http, "marmalade", source="api")) == everything - {("flt-3", 1)}
    assert set(hits(http, "marmalade", conversation_id="flt-1")) == {("flt-1", 0), ("flt-1", 1)}
    assert set(hits(http, "marmalade", since="2000")) == {("flt-1", 1), ("flt-2", 0), ("flt-3", 1)}
    assert set(hits(http, "marmalade", until="1970-01-01T00:50:00Z")) == {("flt-1", 0), ("flt-1", 1)}
    assert set(hits(http, "marmalade", since=2000, until=4000)) == {("flt-1", 1), ("flt-2", 0)}
    assert set(hits(http, "marmalade", conversation_id="nobody")) == set()


@pytest.mark.parametrize(
    ("q", "named"),
    [
        ('"unclosed phrase', "not closed"),
        ("-only -exclusions", "only exclusions"),
        ("in*side", "* goes only at the end"),
        ("*", "start of a word"),
        ('"..."', "holds no word"),
        ("!!! ???", "nothing to search for"),
        ('say"what"', "inside the word"),
        ("x" * 1001, "over 1000 characters"),
        (" ".join(["w"] * 33), "at most 32"),
    ],
)
def test_a_query_that_cannot_be_read_is_a_422_naming_the_problem(http: httpx.Client, q: str, named: str) -> None:
    response = http.get("/search", params={"q": q})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["field"] == "query.q"
    assert named in error["message"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, "query.q"),
        ({"q": ""}, "query.q"),
        ({"q": "a", "limit": "0"}, "query.limit"),
        ({"q": "a", "limit": "101"}, "query.limit"),
        ({"q": "a", "since": "yesterday"}, "query.since"),
        ({"q": "a", "source": "nowhere"}, "query.source"),
        ({"q": "a", "cursor": "not-ours"}, "query.cursor"),
        ({"q": "a", "include_system": "maybe"}, "query.include_system"),
        ({"q": "a", "colour": "red"}, "query.colour"),
    ],
)
def test_bad_parameters_are_422s_naming_them(http: httpx.Client, params: dict[str, str], field: str) -> None:
    response = http.get("/search", params=params)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    # An unknown parameter is named in the message, at the query as a whole (as on every read endpoint).
    assert error["field"] == field or (error["field"] == "query" and field.removeprefix("query.") in error["message"])


def test_pages_follow_the_ranking_without_repeats_or_gaps(http: httpx.Client) -> None:
    # Ties included: several messages with the same text score the same, and the id breaks the tie.
    texts = [("pangolin " * (1 + i % 4)) + "filler " * (i % 5) for i in range(23)]
    post(http, "page-1", [{"role": "user", "content": text} for text in texts])
    whole = search(http, "pangolin", limit=100)["hits"]
    assert len(whole) == 23
    for limit in (1, 4, 23):
        seen: list[dict[str, Any]] = []
        url: str | None = f"/search?q=pangolin&limit={limit}"
        while url is not None:
            response = http.get(url)
            assert response.status_code == 200, response.text
            page = response.json()
            assert len(page["hits"]) <= limit
            seen += page["hits"]
            url = page["next"]
        assert [(h["seq"], h["rank"]) for h in seen] == [(h["seq"], h["rank"]) for h in whole]
    ranks = [hit["rank"] for hit in whole]
    assert ranks == sorted(ranks, reverse=True)


def test_a_message_is_found_right_after_its_200(http: httpx.Client) -> None:
    for i in range(20):
        word = f"fresh{i}word"
        post(http, "ryw-1", [{"role": "user", "content": f"just said {word}"}])
        assert hits(http, word) == [("ryw-1", i)]


def test_a_changed_message_is_found_by_its_new_text_only(http: httpx.Client) -> None:
    post(http, "upd-1", [{"role": "user", "content": "first draft quetzal", "id": "m-1"}])
    post(http, "upd-1", [{"role": "user", "content": "second draft ocelot", "id": "m-1"}])
    assert hits(http, "quetzal") == []
    assert hits(http, "ocelot") == [("upd-1", 0)]


def test_erasure_removes_the_hits(http: httpx.Client) -> None:
    post(http, "erase-1", [{"role": "user", "content": "platypus secrets"}])
    post(http, "erase-2", [{"role": "user", "content": "platypus stays"}])
    assert sorted(hits(http, "platypus")) == [("erase-1", 0), ("erase-2", 0)]
    assert http.delete("/conversations/erase-1").status_code == 200
    assert hits(http, "platypus") == [("erase-2", 0)]
    assert hits(http, "secrets") == []


def test_the_token_is_required(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.base_url, trust_env=False) as anonymous:
        assert anonymous.get("/search", params={"q": "anything"}).status_code == 401
        wrong = anonymous.get("/search", params={"q": "anything"}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        right = anonymous.get("/search", params={"q": "anything"}, headers=AUTH)
        assert right.status_code == 200


# Pieces of FTS5's own syntax and of ours, glued in any order; and any text at all.
PIECES = [*"abcé \"*-_.:()^+~\\'\x00\t\ufdd0", "NEAR", "OR", "AND", "NOT", "col:", "{a b}"]
QUERY_TEXT = st.lists(st.sampled_from(PIECES), max_size=20).map("".join) | st.text(max_size=40)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(q=QUERY_TEXT)
def test_any_query_is_a_200_or_a_422_over_http(http: httpx.Client, q: str) -> None:
    response = http.get("/search", params={"q": q})
    assert response.status_code in (200, 422), response.text
    if response.status_code == 422:
        assert response.json()["error"]["field"] == "query.q"


@pytest.fixture(scope="module")
def fts_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(tmp_path_factory.mktemp("fts") / "t.db", isolation_level=None)
    for migration in available():
        for statement in _statements(migration.sql):
            conn.execute(statement)
    conn.execute("INSERT INTO conversations (id, source, created_at, updated_at) VALUES ('c', 'api', 0, 0)")
    conn.execute(
        "INSERT INTO messages (conversation_id, source, seq, role, content, created_at) "
        "VALUES ('c', 'api', 0, 'user', 'abc é NOT near or and', 0)"
    )
    yield conn
    conn.close()


@settings(max_examples=2000, deadline=None)
@given(q=QUERY_TEXT)
def test_whatever_parses_is_an_expression_sqlite_runs(fts_db: sqlite3.Connection, q: str) -> None:
    try:
        expression = fts_expression(parse(q))
    except QuerySyntaxError:
        return
    statement = candidates(SearchQuery(text=q), expression, None, MIN_ID, MAX_ID)
    fts_db.execute(statement.sql, statement.params).fetchall()  # raises if FTS5 cannot read it


def old_database(path: Path, messages: int) -> None:
    """A database of the version before search, holding ``messages`` messages."""
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL)"
        )
        for migration in available():
            if migration.name == "search":
                break
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (migration.version, migration.name))
        conn.execute("BEGIN")  # one transaction, not one per row
        conn.execute("INSERT INTO conversations (id, source, created_at, updated_at) VALUES ('old', 'api', 0, 0)")
        conn.executemany(
            "INSERT INTO messages (conversation_id, source, seq, role, content, created_at) "
            "VALUES ('old', 'api', ?, ?, ?, 0)",
            [(i, "user", f"old message number{i} about a lighthouse") for i in range(messages)],
        )
        conn.execute("COMMIT")
    conn.close()


def test_rebuild_indexes_an_older_database_with_progress(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old_database(db, 10_000)
    done = transcriptd("search", "rebuild", "--db", str(db), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stdout.splitlines() if line.startswith("indexed ")]
    assert progress[0].startswith("indexed 4000 of 10000 messages")
    assert progress[-1] == "indexed 10000 of 10000 messages (100%)"
    assert "complete: 10000 messages indexed" in done.stdout
    assert rows(db, "SELECT count(*) FROM search_backfill") == [(0,)]
    assert rows(db, "SELECT rowid FROM messages_fts WHERE messages_fts MATCH 'number9999'") == [(10000,)]
    assert rows(db, "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'lighthouse'") == [(10_000,)]
    again = transcriptd("search", "rebuild", "--db", str(db), cwd=tmp_path)
    assert "nothing to index" in again.stdout


def test_the_daemon_indexes_an_older_database_at_start_up(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old_database(db, 9_000)
    with managed(start_daemon(tmp_path, db)) as running, httpx.Client(base_url=running.base_url) as client:
        # Messages written while the backfill runs are indexed by the triggers, the older ones by the backfill.
        new = client.post("/conversations/new/messages", json=[{"role": "user", "content": "a new lighthouse"}])
        assert new.status_code == 200
        deadline = time.monotonic() + 60
        while "search index complete" not in running.log():
            assert time.monotonic() < deadline, running.log_tail()
            time.sleep(0.1)
        found = client.get("/search", params={"q": "lighthouse", "limit": 100, "conversation_id": "new"}).json()
        assert [hit["conversation_id"] for hit in found["hits"]] == ["new"]
        assert found["partial"] is False
        assert client.get("/search", params={"q": "number8999"}).json()["hits"][0]["seq"] == 8999
        total = 0
        url: str | None = "/search?q=lighthouse&limit=100"
        while url is not None:
            page = client.get(url).json()
            total += len(page["hits"])
            url = page["next"]
        assert total == 9_001
        assert "search index: 9000 messages to index" in running.log()


def test_turned_off_the_index_is_emptied_and_turned_on_it_is_rebuilt(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    with managed(start_daemon(tmp_path, db)) as running, httpx.Client(base_url=running.base_url) as client:
        assert client.post("/conversations/c/messages", json=[{"role": "user", "content": "walrus"}]).status_code == 200
        running.stop()
    with managed(start_daemon(tmp_path, db, env={"TRANSCRIPTD_SEARCH_ENABLED": "false"})) as off:
        with httpx.Client(base_url=off.base_url) as client:
            assert client.get("/search", params={"q": "walrus"}).status_code == 404
            assert (
                client.post("/conversations/c/messages", json=[{"role": "user", "content": "walrus 2"}]).status_code
                == 200
            )
        assert rows(db, "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'walrus'") == [(0,)]
        off.stop()
    with managed(start_daemon(tmp_path, db)) as on, httpx.Client(base_url=on.base_url) as client:
        deadline = time.monotonic() + 60
        while (found := client.get("/search", params={"q": "walrus"}).json())["partial"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [hit["seq"] for hit in found["hits"]] == [0, 1] or [hit["seq"] for hit in found["hits"]] == [1, 0]


def test_a_word_in_more_messages_than_the_window_ranks_the_newest(tmp_path: Path) -> None:
    db = tmp_path / "big.db"
    old_database(db, RANK_WINDOW + 50)
    assert transcriptd("search", "rebuild", "--db", str(db), cwd=tmp_path).returncode == 0
    with managed(start_daemon(tmp_path, db)) as running, httpx.Client(base_url=running.base_url) as client:
        seen: list[int] = []
        url: str | None = "/search?q=lighthouse&limit=100"
        while url is not None:
            page = client.get(url).json()
            assert page["older_not_ranked"] is True
            seen += [hit["seq"] for hit in page["hits"]]
            url = page["next"]
            if len(seen) == 100:
                new = client.post("/conversations/new/messages", json=[{"role": "user", "content": "lighthouse"}])
                assert new.status_code == 200
        # A message arriving while the pages are read waits for a new search: the window stays put.
        assert sorted(seen) == list(range(50, RANK_WINDOW + 50))
        rare = client.get("/search", params={"q": "number7"}).json()
        assert rare["older_not_ranked"] is False
        assert [hit["seq"] for hit in rare["hits"]] == [7]
        newest = client.get("/search", params={"q": "lighthouse", "limit": 1, "conversation_id": "new"}).json()
        assert [hit["conversation_id"] for hit in newest["hits"]] == ["new"]


def index_agrees(db: Path | str) -> None:
    """FTS5's own check of an external-content index against the messages table: raises if they differ."""
    with sqlite3.connect(db, isolation_level=None) as conn:
        conn.execute("INSERT INTO messages_fts (messages_fts, rank) VALUES ('integrity-check', 1)")
    conn.close()


def test_the_index_agrees_with_the_messages_after_every_kind_of_write(http: httpx.Client, daemon: Daemon) -> None:
    # Runs after the tests above in this module (inserts, changed messages, erasure) on the same database.
    post(
        http, "agree-1", [{"role": "user", "content": "one", "id": "a"}, {"role": "user", "content": "two", "id": "a"}]
    )
    body = transcription_ready("agree-2", turns=3)
    assert http.post("/webhooks/tavus", content=encode(body)).status_code == 200
    body["properties"]["transcript"][2]["content"] = "a changed turn about a capybara"
    body["webhook_id"] = "another delivery"
    assert http.post("/webhooks/tavus", content=encode(body)).status_code == 200
    assert hits(http, "capybara") == [("agree-2", 2)]
    assert hits(http, "two", conversation_id="agree-1") == [("agree-1", 0)]
    assert hits(http, "one", conversation_id="agree-1") == []
    if not is_postgres_url(str(daemon.db_path)):
        # FTS5 keeps a separate index that can drift from its table; PostgreSQL's is an index on the
        # messages themselves, kept by the server.
        index_agrees(Path(daemon.db_path))


def test_retention_takes_the_index_entries_with_the_messages(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old_database(db, 100)
    assert transcriptd("search", "rebuild", "--db", str(db), cwd=tmp_path).returncode == 0
    assert rows(db, "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'lighthouse'") == [(100,)]
    pruned = transcriptd("prune", "--older-than-days", "1", "--db", str(db), cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    assert rows(db, "SELECT count(*) FROM messages") == [(0,)]
    assert rows(db, "SELECT count(*) FROM messages_fts WHERE messages_fts MATCH 'lighthouse'") == [(0,)]
    index_agrees(db)
