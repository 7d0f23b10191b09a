"""Search on PostgreSQL against SQLite's: the same messages written through both backends, the same
queries asked of both Readers, and the same hits, snippets and marks (ranks are each engine's own: BM25
on SQLite, ts_rank on PostgreSQL, so order is compared where ranks tie). And the snippet cutter against
FTS5's own snippet() on random texts."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage.connection import open_writer
from storage.deliveries import Record
from storage.migrations import migrate
from storage.postgres.connection import connect
from storage.postgres.queries import Reader as PgReader
from storage.postgres.search import literal, term_query, tsquery
from storage.postgres.snippet import phrases, snippet
from storage.postgres.writes import write_batch as pg_write_batch
from storage.queries import Reader as LiteReader
from storage.search import (
    ELLIPSIS,
    MARK_CLOSE,
    MARK_OPEN,
    RANK_WINDOW,
    SNIPPET_TOKENS,
    CursorError,
    QuerySyntaxError,
    SearchPage,
    SearchQuery,
    Term,
    fts_expression,
    parse,
)
from storage.writes import commit_batch
from tests.test_postgres_writes import NOW, append, ready

CORPUS: list[tuple[str, str, str, float | None]] = [
    ("s-1", "user", "Hello, I would like a refund for my order", 1000.0),
    ("s-1", "assistant", "Your Réservation is confirmed. The full refund will follow.", 1001.0),
    ("s-1", "user", "RÉSERVATION number two: call back tomorrow", 1002.0),
    ("s-1", "system", "You are a helpful agent. Never promise a refund.", None),
    ("s-2", "user", "The café was closed; I want my money back", 2000.0),
    ("s-2", "assistant", "We will send an e-mail about the refund within 3.14 days", 2001.0),
    ("s-2", "user", "don't call back, leave a voicemail", 2002.0),
    ("s-2", "tool", "refunded order #42 for a naïve user", 2003.0),
    ("s-3", "user", "full refund please, full refund", None),
    ("s-3", "assistant", "refund refund refund", None),
    (
        "s-4",
        "user",
        "A long story first. It goes on and on about nothing at all, word after word after word, until "
        "at last: the refund arrives, late, and then the story goes on again for a while longer still.",
        3000.0,
    ),
    ("tie-a", "user", "identical refund request text", 4000.0),
    ("tie-b", "user", "identical refund request text", 4000.0),
    ("tie-c", "user", "identical refund request text", 4000.0),
    ("s-5", "user", "L'école AND the NOT near OR col:umn (x) ^y 'quoted' back\\slash", 5000.0),
]

QUERIES = [
    "refund",
    "REFUND",
    "reservation",
    "réservation",
    "RESERVATION confirmed",
    "cafe",
    "CAFÉ",
    '"full refund"',
    '"refund full"',
    '"money back"',
    "refun*",
    "réserv*",
    "re*",
    "refund -voicemail",
    'call -"call back"',
    "naive",
    "e-mail",
    "mail",
    "3.14",
    "don't",
    "#42",
    "order refund",
    "agent",
    "identical",
    "AND",
    "NOT refund",
    "OR near",
    "col:umn",
    "(x)",
    "^y",
    "'quoted'",
    "back\\slash",
    "ecole",
    "l'ecole",
    "story refund",
    "zzz-nothing",
    "refund -refund",
]

FILTERS: list[dict[str, Any]] = [
    {},
    {"include_system": True},
    {"role": "system"},
    {"role": "user"},
    {"source": "api"},
    {"source": "tavus"},
    {"conversation_id": "s-2"},
    {"conversation_id": "no-such"},
    {"since": 1001.0},
    {"until": 2001.0},
    {"since": 1001.0, "until": 2002.5, "role": "assistant"},
]


@dataclass
class Both:
    lite: LiteReader
    pg: PgReader


def corpus_deliveries() -> list[Record]:
    deliveries = []
    for i, (cid, role, content, timestamp) in enumerate(CORPUS):
        message: dict[str, Any] = {"role": role, "content": content}
        if timestamp is not None:
            message["timestamp"] = timestamp
        deliveries.append(append(cid, [message], at=NOW + i))
    deliveries.append(ready("t-1", turns=6, at=NOW + 100))
    return deliveries


async def open_both(postgres_url: str, path: Path, deliveries: list[Record], per_batch: int = 1) -> Both:
    lite = open_writer(path)
    migrate(lite)
    with connect(postgres_url) as pg:
        # One delivery per commit unless told otherwise: ids are then in the same order on both backends.
        for start in range(0, len(deliveries), per_batch):
            batch = deliveries[start : start + per_batch]
            commit_batch(lite, batch)
            pg_write_batch(pg, batch)
    lite.close()
    both = Both(LiteReader(path), PgReader(postgres_url))
    await both.lite.open()
    await both.pg.open()
    return both


@pytest.fixture
async def both(postgres_url: str, tmp_path: Path) -> AsyncIterator[Both]:
    readers = await open_both(postgres_url, tmp_path / "t.db", corpus_deliveries())
    try:
        yield readers
    finally:
        await readers.lite.close()
        await readers.pg.close()


def found(page: SearchPage) -> dict[tuple[str, str, int], tuple[str, list[tuple[int, int]], str, float | None]]:
    return {(h.conversation_id, h.source, h.seq): (h.snippet, h.marks, h.role, h.timestamp) for h in page.hits}


async def every_page(reader: LiteReader | PgReader, query: SearchQuery) -> list[SearchPage]:
    pages = [await reader.search(query)]
    while pages[-1].next is not None:
        pages.append(await reader.search(SearchQuery(**{**_fields(query), "cursor": pages[-1].next})))
    return pages


def _fields(query: SearchQuery) -> dict[str, Any]:
    return {name: getattr(query, name) for name in query.__struct_fields__}


@pytest.mark.anyio
async def test_every_query_and_filter_finds_the_same_hits_snippets_and_marks(both: Both) -> None:
    nonempty = 0
    for text in QUERIES:
        for filters in FILTERS:
            query = SearchQuery(text=text, limit=100, **filters)
            lite, pg = await both.lite.search(query), await both.pg.search(query)
            assert found(pg) == found(lite), (text, filters)
            assert (pg.next, pg.partial, pg.older_not_ranked) == (None, False, False)
            ranks = [hit.rank for hit in pg.hits]
            assert ranks == sorted(ranks, reverse=True)
            assert all(rank > 0 for rank in ranks)
            nonempty += bool(pg.hits)
    assert nonempty > 60  # the corpus answers most of them


@pytest.mark.anyio
async def test_accents_case_phrases_prefixes_and_exclusions_on_postgresql(both: Both) -> None:
    async def hits(text: str, **filters: Any) -> set[tuple[str, int]]:
        page = await both.pg.search(SearchQuery(text=text, limit=100, **filters))
        return {(hit.conversation_id, hit.seq) for hit in page.hits}

    assert await hits("reservation") == await hits("RÉSERVATION") == {("s-1", 1), ("s-1", 2)}
    assert await hits("cafe") == {("s-2", 0)}
    assert await hits('"full refund"') == {("s-1", 1), ("s-3", 0)}
    assert ("s-2", 3) in await hits("refun*")  # refunded
    assert ("s-2", 3) not in await hits("refund")
    assert ("s-2", 2) not in await hits("call -voicemail")
    assert await hits("agent") == set()
    assert ("s-1", 3) in await hits("agent", include_system=True)
    assert await hits("refund", conversation_id="s-3") == {("s-3", 0), ("s-3", 1)}
    page = await both.pg.search(SearchQuery(text="réservation", conversation_id="s-1"))
    assert sorted((hit.seq, hit.snippet, hit.marks) for hit in page.hits) == [
        (1, "Your Réservation is confirmed. The full refund will follow.", [(5, 16)]),
        (2, "RÉSERVATION number two: call back tomorrow", [(0, 11)]),
    ]


@pytest.mark.anyio
async def test_tied_ranks_page_in_the_same_order_on_both(both: Both) -> None:
    for limit in (1, 2):
        query = SearchQuery(text="identical request", limit=limit)
        lite = [(h.conversation_id, h.seq) for page in await every_page(both.lite, query) for h in page.hits]
        pg_pages = await every_page(both.pg, query)
        pg = [(h.conversation_id, h.seq) for page in pg_pages for h in page.hits]
        assert pg == lite == [("tie-a", 0), ("tie-b", 0), ("tie-c", 0)]
        assert len(pg_pages) == -(-3 // limit)


@pytest.mark.anyio
async def test_cursor_pages_cover_the_hits_without_repeats_and_bad_cursors_are_refused(both: Both) -> None:
    for text in ("refund", "re*", "refund -voicemail"):
        whole = await both.pg.search(SearchQuery(text=text, limit=100))
        paged = [key for page in await every_page(both.pg, SearchQuery(text=text, limit=2)) for key in found(page)]
        assert len(paged) == len(set(paged))
        assert set(paged) == set(found(whole))
        assert paged == list(found(whole))  # the same ranking, cut in pages
    for cursor in ("not-a-cursor", "WzEsMiwzXQ==", ""):
        for reader in (both.lite, both.pg):
            with pytest.raises(CursorError):
                await reader.search(SearchQuery(text="refund", cursor=cursor or "@@"))


@pytest.mark.anyio
async def test_the_same_syntax_errors_on_both(both: Both) -> None:
    for text in ('"full refund', "-voicemail", "re*fund", '"..."', 'say"what"', "*", "", "a" * 1001):
        messages = []
        for reader in (both.lite, both.pg):
            with pytest.raises(QuerySyntaxError) as raised:
                await reader.search(SearchQuery(text=text))
            messages.append(str(raised.value))
        assert messages[0] == messages[1], text


@pytest.mark.anyio
async def test_a_nul_or_a_control_character_is_no_server_error(both: Both) -> None:
    for query in (
        SearchQuery(text="refund\x00order"),
        SearchQuery(text='"full\x00refund"'),
        SearchQuery(text="refund", conversation_id="s-1\x00"),
        SearchQuery(text="refund", source="a\x00", role="u\x00"),
        SearchQuery(text="\x01refund\x7f"),
    ):
        lite, pg = await both.lite.search(query), await both.pg.search(query)
        assert found(pg) == found(lite), query
    with pytest.raises(QuerySyntaxError):
        await both.pg.search(SearchQuery(text="lone \ud800 surrogate"))


PIECES = [*"abcé \"*-_.:()^+~\\'\x00\t&|!<>", "NEAR", "OR", "AND", "NOT", "col:", "{a b}", "refund", "e-mail"]
QUERY_TEXT = st.lists(st.sampled_from(PIECES), max_size=12).map("".join) | st.text(max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=QUERY_TEXT)
def test_any_query_that_parses_runs_on_postgresql(postgres_url: str, text: str) -> None:
    """No text reaches the server as tsquery syntax: whatever parses runs, whatever does not is refused
    by the parser before the server sees it."""
    try:
        terms = parse(text)
    except QuerySyntaxError:
        return
    with connect(postgres_url) as conn:
        lexemes: dict[int, list[tuple[str, int]]] = {}
        for i, term in enumerate(terms, start=1):
            rows = conn.execute(
                "SELECT l.lexeme, p.pos FROM unnest(search_document(%s)) AS l, unnest(l.positions) AS p (pos)"
                " ORDER BY p.pos",
                ("".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in term.text),),
            ).fetchall()
            lexemes[i] = [(str(lexeme), int(pos)) for lexeme, pos in rows]
            piece = term_query(term, lexemes[i])
            if piece is not None:
                conn.execute("SELECT %s::tsquery", (piece,))  # raises if the server cannot read it
        whole = tsquery(terms, lexemes)
        if whole is not None:
            conn.execute("SELECT count(*) FROM messages AS m WHERE search_document(m.content) @@ %s::tsquery", (whole,))


def test_a_literal_is_exactly_its_lexeme(postgres_url: str) -> None:
    with connect(postgres_url) as conn:
        for lexeme in ("it's", "back\\slash", "a:b", "x & y", "!", "<->", "'"):
            row = conn.execute("SELECT tsquery_phrase(%s::tsquery, %s::tsquery)::text", (literal(lexeme), "'z'"))
            assert row.fetchone() == (f"{literal(lexeme)} <-> 'z'",)
            assert term_query(Term(lexeme), [(lexeme, 1)]) == f"({literal(lexeme)})"


@pytest.mark.anyio
async def test_more_matches_than_the_window_rank_the_newest(postgres_url: str, tmp_path: Path) -> None:
    messages = [{"role": "user", "content": f"lighthouse number{i}"} for i in range(RANK_WINDOW + 30)]
    deliveries = [append("big", messages[i : i + 1000], at=NOW + i) for i in range(0, len(messages), 1000)]
    both = await open_both(postgres_url, tmp_path / "big.db", deliveries, per_batch=len(deliveries))
    try:
        query = SearchQuery(text="lighthouse", limit=1000)
        first = {name: await reader.search(query) for name, reader in (("lite", both.lite), ("pg", both.pg))}
        assert first["pg"].older_not_ranked is True
        assert first["lite"].older_not_ranked is True
        seqs: list[int] = []
        pages = 0
        page: SearchPage | None = first["pg"]
        while page is not None:
            seqs += [hit.seq for hit in page.hits]
            pages += 1
            page = (
                None
                if page.next is None
                else await both.pg.search(SearchQuery(text="lighthouse", limit=1000, cursor=page.next))
            )
        assert sorted(seqs) == list(range(30, RANK_WINDOW + 30))
        rare = await both.pg.search(SearchQuery(text="number7"))
        assert (rare.older_not_ranked, [hit.seq for hit in rare.hits]) == (False, [7])
        assert found(rare) == found(await both.lite.search(SearchQuery(text="number7")))
    finally:
        await both.lite.close()
        await both.pg.close()


WORDS = ["refund", "order", "Réservation", "reservation", "café", "cafe", "the", "a", "of", "call", "back"]
WORDS += ["full", "please.", "Thanks:", "yes", "e-mail", "don't", "ÉCOLE", "école", "naïve", "xxx"]
SEPARATORS = [" ", " ", "  ", ". ", ", ", ": ", "\n", "-", "", ".\t"]


def test_snippets_cut_and_mark_as_fts5s_snippet_does() -> None:
    rng = random.Random(7)
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE VIRTUAL TABLE f USING fts5(content, tokenize = 'unicode61 remove_diacritics 2')")
    texts = []
    for i in range(600):
        text = "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(rng.randint(1, 70)))
        texts.append(text)
        conn.execute("INSERT INTO f (rowid, content) VALUES (?, ?)", (i, text))
    compared = 0
    for text in (
        "refund",
        "reservation",
        '"full refund"',
        "cafe refun*",
        "e-mail",
        "don't",
        "ecole -naive",
        "the",
        "call back",
        '"please thanks"',
        "re*",
        "order refund the",
        "x* a",
    ):
        terms = parse(text)
        for rowid, expected in conn.execute(
            "SELECT rowid, snippet(f, 0, ?, ?, ?, ?) FROM f WHERE f MATCH ?",
            (MARK_OPEN, MARK_CLOSE, ELLIPSIS, SNIPPET_TOKENS, fts_expression(terms)),
        ):
            assert snippet(texts[rowid], phrases(terms)) == expected, (text, texts[rowid])
            compared += 1
    assert compared > 1200
    conn.close()


VOCABULARY = ["refund", "REFUND", "réserv", "cafe", "full", "call", "back", "order", "the", "naïve", "e-mail", "don't"]
VOCABULARY += ["identical", "story", "word", "école", "money", "zzz", "AND", "NOT", "(x)", "col:umn", "#42"]


@pytest.mark.anyio
async def test_random_queries_find_the_same_hits_snippets_and_marks(both: Both) -> None:
    rng = random.Random(11)
    compared = 0
    for _ in range(300):
        pieces = []
        for _ in range(rng.randint(1, 4)):
            word = rng.choice(VOCABULARY)
            shape = rng.random()
            if shape < 0.2:
                word = f"{word[: rng.randint(1, len(word))]}*"
            elif shape < 0.35:
                word = f'"{word} {rng.choice(VOCABULARY)}"'
            elif shape < 0.45:
                word = f"-{word}"
            pieces.append(word)
        query = SearchQuery(text=" ".join(pieces), limit=100, include_system=rng.random() < 0.3)
        try:
            lite = await both.lite.search(query)
        except QuerySyntaxError:
            with pytest.raises(QuerySyntaxError):
                await both.pg.search(query)
            continue
        assert found(await both.pg.search(query)) == found(lite), query.text
        compared += bool(lite.hits)
    assert compared > 50
