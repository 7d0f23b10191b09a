"""Full-text search on PostgreSQL: storage.search's query language and pages, over the GIN index of
``search_document(content)`` (migration 0008: ``to_tsvector('simple', unaccent(content))``).

The query is parsed by storage.search (the same syntax errors, the same limits), then each term is
turned into lexemes by the server's own ``search_document``, so a query folds case and accents exactly as
the index did. The ``tsquery`` is assembled here from those lexemes, each a quoted tsquery literal, and
bound as one parameter: nothing the user types reaches SQL, and no word is ever read as an operator.

- a word or a phrase: its lexemes adjacent and in order (``'full' <-> 'refund'``), as FTS5 reads a
  quoted string; a word PostgreSQL splits (``e-mail``) is the phrase of its parts;
- ``refun*``: the last lexeme a prefix (``'refun':*``);
- ``-word``: ``& !(...)``.

A term whose text the server makes no lexeme of matches nothing, as an FTS5 string with no token does; an
excluded one is no condition.

Ranking: ``ts_rank`` with the document's length normalisation (flag 1), best first, ties by id, among
the newest ``RANK_WINDOW`` matches, and a cursor of the same shape as SQLite's. The ranks are not BM25's:
compare them only within one search, as on SQLite. ``partial`` is always false: the server maintains the
index in every write's own transaction. Snippets are cut and marked as FTS5's are (storage.postgres.snippet).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from storage import search as fts
from storage.postgres.snippet import phrases, snippet
from storage.search import RANK_WINDOW, Cursor, SearchPage, SearchQuery, Statement, Term

if TYPE_CHECKING:
    from storage.postgres.queries import Reader

Query = Callable[[str, tuple[Any, ...]], Awaitable[list[tuple[Any, ...]]]]

# Each term's lexemes, by position, as the index would store them: the index's own function folds them.
LEXEMES = """
SELECT t.i, l.lexeme, p.pos
FROM unnest(%s::text[]) WITH ORDINALITY AS t (text, i)
CROSS JOIN LATERAL unnest(search_document(t.text)) AS l
CROSS JOIN LATERAL unnest(l.positions) AS p (pos)
ORDER BY t.i, p.pos
"""

MATCH = "search_document(m.content) @@ %s::tsquery"
SCORE = "-ts_rank(search_document(m.content), %s::tsquery, 1)::float8"


def literal(lexeme: str) -> str:
    """A tsquery operand that is exactly ``lexeme``: quoted, its quotes doubled and backslashes escaped."""
    return "'" + lexeme.replace("\\", "\\\\").replace("'", "''") + "'"


def term_query(term: Term, lexemes: list[tuple[str, int]]) -> str | None:
    """The tsquery of one term from its (lexeme, position) pairs in position order; None if it has none."""
    if not lexemes:
        return None
    last = lexemes[-1][0]
    parts: list[str] = []
    previous = 0
    for i, (lexeme, position) in enumerate(lexemes):
        operand = literal(lexeme)
        # A prefix: its last lexeme, and the hyphenated whole ending in it ("e-ma*": 'e-ma'), PostgreSQL
        # storing "e-mail" as 'e-mail', 'e', 'mail'.
        if term.prefix and (i == len(lexemes) - 1 or (lexeme.endswith("-" + last) and "-" in lexeme)):
            operand += ":*"
        if parts:
            parts.append(f"<{max(position - previous, 1)}>")
        parts.append(operand)
        previous = position
    return "(" + " ".join(parts) + ")"


def tsquery(terms: list[Term], lexemes: dict[int, list[tuple[str, int]]]) -> str | None:
    """The query's tsquery text, or None when a term to find has no lexeme (nothing can match)."""
    wanted: list[str] = []
    unwanted: list[str] = []
    for i, term in enumerate(terms, start=1):
        piece = term_query(term, lexemes.get(i, []))
        if piece is None:
            if term.excluded:
                continue
            return None
        (unwanted if term.excluded else wanted).append(piece)
    return " & ".join(wanted + [f"!{piece}" for piece in unwanted])


def _filters(query: SearchQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("source", query.source), ("role", query.role), ("conversation_id", query.conversation_id)):
        if value is not None:
            where.append(f"m.{column} = %s")
            params.append(value)
    if query.role is None and not query.include_system:
        where.append("m.role != 'system'")
    if query.since is not None:
        where.append("coalesce(m.timestamp, m.created_at) >= %s")
        params.append(query.since)
    if query.until is not None:
        where.append("coalesce(m.timestamp, m.created_at) < %s")
        params.append(query.until)
    return where, params


def bounds(query: SearchQuery) -> Statement:
    """The ids a search looks between: up to the newest message now (a cursor keeps it), and for one
    conversation, its own first and last."""
    if query.conversation_id is None:
        return Statement("SELECT NULL::bigint, max(id) FROM messages", ())
    return Statement("SELECT min(id), max(id) FROM messages WHERE conversation_id = %s", (query.conversation_id,))


def window(query: SearchQuery, expression: str, low: int, high: int) -> Statement:
    """The id of the newest match between ``low`` and ``high`` left out of the ranking window (no row:
    every match fits)."""
    where, params = _filters(query)
    sql = (
        f"SELECT m.id FROM messages AS m WHERE {MATCH} AND m.id BETWEEN %s AND %s "  # noqa: S608
        + "".join(f"AND {condition} " for condition in where)
        + f"ORDER BY m.id DESC LIMIT 1 OFFSET {RANK_WINDOW}"
    )
    return Statement(sql, (expression, low, high, *params))


def candidates(query: SearchQuery, expression: str, cursor: Cursor | None, low: int, high: int) -> Statement:
    """The ids and scores (negated ranks: lower is better, as FTS5's) of one page of hits within the window,
    one more than ``limit``, best first, ties by id: a total order, so pages follow without repeats or gaps."""
    where, params = _filters(query)
    where[:0] = [MATCH, "m.id BETWEEN %s AND %s"]
    params[:0] = [expression, low, high]
    params += [query.limit + 1, 0 if cursor is None else cursor.offset]
    # Assembled from the constant fragments above; every value is a parameter.
    sql = (
        f"SELECT m.id, {SCORE} AS score FROM messages AS m "  # noqa: S608
        f"WHERE {' AND '.join(where)} ORDER BY score, m.id LIMIT %s OFFSET %s"
    )
    return Statement(sql, (expression, *params))


def details(rowids: list[int]) -> Statement:
    """The message of each of ``rowids``, in any order, with its text for the snippet."""
    return Statement(
        "SELECT id, conversation_id, source, seq, role, timestamp, content FROM messages WHERE id = ANY(%s)",
        (rowids,),
    )


async def search(reader: Reader, query: SearchQuery) -> SearchPage:
    """One page of hits for ``query``; QuerySyntaxError or CursorError (both ValueError) for bad input."""
    return await reader.search(query)


async def run(query_rows: Query, query: SearchQuery) -> SearchPage:
    """One page of hits for ``query``, reading with ``query_rows`` (a Reader's); QuerySyntaxError or
    CursorError (both ValueError) for bad input."""
    for text in (query.text, query.source, query.role, query.conversation_id):
        fts.check_text(text)
    terms = fts.parse(query.text)
    cursor = None if query.cursor is None else fts.decode_cursor(query.cursor)
    expression: str | None = None
    # PostgreSQL's text cannot hold U+0000, so no message stored matches a filter holding it (and the
    # server would refuse the parameter).
    if not any("\x00" in (value or "") for value in (query.source, query.role, query.conversation_id)):
        # Control characters separate words, as storage.search.parse reads them; the server's parser
        # must see them so too (and cannot take a NUL).
        texts = ["".join(" " if fts._blank(char) else char for char in term.text) for term in terms]
        lexemes: dict[int, list[tuple[str, int]]] = {}
        for i, lexeme, position in await query_rows(LEXEMES, (texts,)):
            lexemes.setdefault(i, []).append((lexeme, position))
        expression = tsquery(terms, lexemes)
    if cursor is not None:
        low, high, older = cursor.low, cursor.high, cursor.older
    elif expression is None:
        low, high, older = fts.MIN_ID, fts.MIN_ID, False
    else:
        ((first, last),) = await query_rows(*bounds(query).astuple())
        low, high = fts.MIN_ID if first is None else first, fts.MIN_ID if last is None else last
        older = False
        left_out = await query_rows(*window(query, expression, low, high).astuple())
        older = bool(left_out)
        if left_out:
            low = left_out[0][0] + 1
    offset = 0 if cursor is None else cursor.offset
    if expression is None:
        return fts.page(query, offset, [], [], low=low, high=high, older=older, partial=False)
    ranked = await query_rows(*candidates(query, expression, cursor, low, high).astuple())
    rows: list[tuple[Any, ...]] = []
    if ranked:
        found = phrases(terms)
        details_rows = await query_rows(*details([r[0] for r in ranked[: query.limit]]).astuple())
        rows = [(*row[:6], snippet(row[6], found)) for row in details_rows]
    ranks = [(r[0], r[1]) for r in ranked]
    return fts.page(query, offset, ranks, rows, low=low, high=high, older=older, partial=False)
