"""Full-text search over messages: the query language, its translation to FTS5, and the search itself.

The index is ``messages_fts``, an FTS5 table over ``messages.content`` (external content: the text is
stored once, in ``messages``), tokenised by ``unicode61 remove_diacritics 2``, so case and accents do not
matter: ``reservation`` finds ``Réservation``. Every insert, update and delete of messages keeps it in step,
in the same transaction: a message answered 200 is found at once,
and an erasure takes its index entries with it (see storage.search_index).

The query language (docs/search.md), words separated by spaces, every one required:

- ``refund``: a word; ``"full refund"``: a phrase, its words adjacent and in order;
- ``refun*``: a word starting so (``*`` only at the end of a word outside quotes);
- ``-voicemail``, ``-"call back"``: leave out the messages holding it.

Nothing the user types reaches MATCH as it is: each term becomes an FTS5 string (double quotes, inner
quotes doubled) and the terms are joined with ``AND`` and ``NOT`` here. What cannot be read (an unclosed
quote, a ``*`` inside a word, only exclusions, nothing to search for) raises :class:`QuerySyntaxError`
naming the problem, which the API answers 422.

Marks in snippets: a hit's ``snippet`` is plain text, and ``marks`` lists the matched spans in it as
``[start, end)`` offsets in characters (Unicode code points). Nothing in the text is markup, so an HTML
page escapes the text between the offsets and wraps each span in ``<mark>`` itself; a client that only
prints the snippet can ignore ``marks``.

Hits come best first (BM25), among the newest RANK_WINDOW matches at most (``older_not_ranked`` says when
older ones matched too); the cursor carries the window and the position in it.

Entry points: ``Reader.search(query)`` (storage.queries), or :func:`search` with a Reader.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from storage.queries import Reader

# The index's table, and what the snippet() calls mark a match with: two Unicode noncharacters (reserved
# for a program's internal use), turned into offsets before anything leaves this module.
FTS_TABLE = "messages_fts"
MARK_OPEN = "\ufdd0"
MARK_CLOSE = "\ufdd1"
ELLIPSIS = "…"
SNIPPET_TOKENS = 16
MAX_QUERY_CHARS = 1000
MAX_TERMS = 32


class QuerySyntaxError(ValueError):
    """A search query this module cannot read; the message names the problem for the user."""


@dataclass(frozen=True, slots=True)
class Term:
    text: str
    phrase: bool = False  # written between quotes
    prefix: bool = False  # ends with *: a word starting so
    excluded: bool = False  # written with a leading -


def parse(text: str) -> list[Term]:
    """The terms of a query, or QuerySyntaxError naming what is wrong (positions count from 1)."""
    if len(text) > MAX_QUERY_CHARS:
        raise QuerySyntaxError(f"the query is over {MAX_QUERY_CHARS} characters")
    terms: list[Term] = []
    i, n = 0, len(text)
    while i < n:
        if _blank(text[i]):
            i += 1
            continue
        start = i
        excluded = text[i] == "-" and i + 1 < n and not _blank(text[i + 1])
        if excluded:
            i += 1
        if text[i] == '"':
            end = text.find('"', i + 1)
            if end < 0:
                raise QuerySyntaxError(f'the quote (") at character {i + 1} is not closed')
            inner = text[i + 1 : end]
            if not _has_word(inner):
                raise QuerySyntaxError(f"the phrase at character {i + 1} holds no word to search for")
            terms.append(Term(inner, phrase=True, excluded=excluded))
            i = end + 1
            if i < n and not _blank(text[i]):
                raise QuerySyntaxError(f"put a space after the phrase ending at character {end + 1}")
            continue
        end = i
        while end < n and not _blank(text[end]):
            end += 1
        word = text[i:end]
        if '"' in word:
            raise QuerySyntaxError(f'a quote (") inside the word at character {start + 1}: put a phrase apart')
        prefix = word.endswith("*")
        stem = word.rstrip("*") if prefix else word
        if "*" in stem or (prefix and len(word) - len(stem) > 1):
            raise QuerySyntaxError(f"* goes only at the end of a word (the word at character {start + 1})")
        if not _has_word(stem):
            if prefix:
                raise QuerySyntaxError(f"* needs the start of a word before it (character {start + 1})")
            i = end
            continue  # punctuation alone: the index holds no such token, so it is no condition
        terms.append(Term(stem, prefix=prefix, excluded=excluded))
        i = end
    if not terms:
        raise QuerySyntaxError('nothing to search for: give a word, a "phrase" or a prefix*')
    if len(terms) > MAX_TERMS:
        raise QuerySyntaxError(f"at most {MAX_TERMS} words and phrases in a query")
    if all(term.excluded for term in terms):
        raise QuerySyntaxError("only exclusions: give at least one word or phrase to find")
    return terms


def _blank(char: str) -> bool:
    # Control characters separate words too: FTS5 reads a NUL as the end of its expression.
    return char.isspace() or ord(char) < 32 or ord(char) == 127


def _has_word(text: str) -> bool:
    return any(char.isalnum() for char in text)


def fts_expression(terms: list[Term]) -> str:
    """The FTS5 MATCH expression of ``terms``: each one an FTS5 string, so no user text is an operator."""

    def quoted(term: Term) -> str:
        text = "".join(" " if _blank(char) else char for char in term.text)
        return '"' + text.replace('"', '""') + '"' + ("*" if term.prefix else "")

    wanted = " AND ".join(quoted(term) for term in terms if not term.excluded)
    unwanted = "".join(f" NOT {quoted(term)}" for term in terms if term.excluded)
    return f"({wanted}){unwanted}" if unwanted else wanted


def check_text(text: str | None) -> None:
    """QuerySyntaxError unless ``text`` can be sent to SQLite (a lone surrogate cannot be encoded)."""
    try:
        (text or "").encode("utf-8")
    except UnicodeEncodeError:
        raise QuerySyntaxError("the query is not valid Unicode text") from None


class SearchQuery(msgspec.Struct, frozen=True, kw_only=True):
    """What to search: ``text`` in the query language above, and filters that must all hold (None: any)."""

    text: str
    source: str | None = None
    role: str | None = None
    conversation_id: str | None = None
    since: float | None = None  # Unix seconds, inclusive: the message's timestamp, else when it was stored
    until: float | None = None  # Unix seconds, exclusive
    include_system: bool = False  # system prompts are left out unless asked (or role="system")
    limit: int = 20
    cursor: str | None = None  # SearchPage.next of the previous page


class SearchHit(msgspec.Struct, kw_only=True):
    conversation_id: str
    source: str
    seq: int
    role: str
    timestamp: float | None
    snippet: str  # plain text around the match, "…" where cut
    marks: list[tuple[int, int]]  # the matched spans in snippet: [start, end) in code points
    rank: float  # relevance (BM25): higher is better; compare only within one search


class SearchPage(msgspec.Struct, kw_only=True):
    hits: list[SearchHit]
    next: str | None  # the cursor of the following page, None on the last one
    partial: bool = False  # the index is still being built: older messages may be missing
    # More messages matched than a search ranks (RANK_WINDOW): the hits are the best of the newest ones.
    older_not_ranked: bool = False


def marked(snippet: str) -> tuple[str, list[tuple[int, int]]]:
    """The text of a snippet() result without its marks, and the marked spans as offsets in that text."""
    out: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    opened: int | None = None
    for char in snippet:
        if char == MARK_OPEN:
            opened = length if opened is None else opened
        elif char == MARK_CLOSE:
            if opened is not None and length > opened:
                spans.append((opened, length))
            opened = None
        else:
            out.append(char)
            length += 1
    return "".join(out), spans


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    """Where a page ended: how many hits came before the next one, and the ranking window of the first page,
    so that every page ranks the same messages (new ones arriving meanwhile wait for a new search).

    An offset, not the last hit's (score, id): a write between two pages changes every score a little (BM25
    reads the whole index's statistics), so a score kept from one page is not comparable with the next
    page's; the order of the window's messages among themselves barely moves."""

    offset: int
    low: int  # the window: messages low <= id <= high
    high: int
    older: bool  # older messages matched too, left out of the window


MIN_ID = -(2**63)
MAX_ID = 2**63 - 1


def encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode()


def decode_cursor(text: str) -> Cursor:
    """The cursor a page gave out; CursorError for anything else."""
    try:
        cursor = msgspec.json.decode(base64.urlsafe_b64decode(text.encode()), type=Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        raise CursorError("not a cursor this API gave out") from None
    if not (0 <= cursor.offset <= MAX_ID and MIN_ID <= cursor.low <= MAX_ID and MIN_ID <= cursor.high <= MAX_ID):
        raise CursorError("not a cursor this API gave out")
    return cursor


class CursorError(ValueError):
    """A cursor that this module did not give out."""


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: tuple[Any, ...]

    def astuple(self) -> tuple[str, tuple[Any, ...]]:
        return self.sql, self.params


# Relevance is computed for every message a search ranks: for a word in most messages of a large database
# that is seconds (measured: 1.6 s for a word in 865,000 of 1,000,000 messages). So a search ranks the
# newest RANK_WINDOW messages that match (filters applied), and says when older ones matched too.
RANK_WINDOW = 10_000


JOIN = f"{FTS_TABLE} AS f JOIN messages AS m ON m.id = f.rowid"


def _filters(query: SearchQuery) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    for column, value in (("source", query.source), ("role", query.role), ("conversation_id", query.conversation_id)):
        if value is not None:
            where.append(f"m.{column} = ?")
            params.append(value)
    if query.role is None and not query.include_system:
        where.append("m.role != 'system'")
    if query.since is not None:
        where.append("coalesce(m.timestamp, m.created_at) >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append("coalesce(m.timestamp, m.created_at) < ?")
        params.append(query.until)
    return where, params


def bounds(query: SearchQuery) -> Statement:
    """The ids a search looks between: up to the newest message now (a cursor keeps it, so later pages
    rank the same messages), and for one conversation, its own first and last. FTS5 seeks to a range of
    ids: one conversation's messages, stored together, are a short walk rather than every match."""
    if query.conversation_id is None:
        return Statement("SELECT NULL, max(id) FROM messages", ())
    return Statement("SELECT min(id), max(id) FROM messages WHERE conversation_id = ?", (query.conversation_id,))


def window(query: SearchQuery, expression: str, low: int, high: int) -> Statement:
    """The id of the newest match between ``low`` and ``high`` left out of the ranking window (no row:
    every match fits)."""
    where, params = _filters(query)
    sql = (
        f"SELECT f.rowid FROM {JOIN} WHERE {FTS_TABLE} MATCH ? AND f.rowid BETWEEN ? AND ? "  # noqa: S608
        + "".join(f"AND {condition} " for condition in where)
        + f"ORDER BY f.rowid DESC LIMIT 1 OFFSET {RANK_WINDOW}"
    )
    return Statement(sql, (expression, low, high, *params))


def candidates(query: SearchQuery, expression: str, cursor: Cursor | None, low: int, high: int) -> Statement:
    """The ids and scores of one page of hits within the window (one more than ``limit``: whether a next
    page exists), best first, ties by id: a total order, so pages follow without repeats or gaps."""
    where, params = _filters(query)
    where[:0] = [f"{FTS_TABLE} MATCH ?", "f.rowid BETWEEN ? AND ?"]
    params[:0] = [expression, low, high]
    params += [query.limit + 1, 0 if cursor is None else cursor.offset]
    # Assembled from the constant fragments above; every value is a parameter.
    sql = (
        f"SELECT f.rowid, f.rank FROM {JOIN} "  # noqa: S608
        f"WHERE {' AND '.join(where)} ORDER BY f.rank, f.rowid LIMIT ? OFFSET ?"
    )
    return Statement(sql, tuple(params))


def details(expression: str, rowids: list[int]) -> Statement:
    """The message and its snippet for each of ``rowids`` (hits of ``expression``), in any order."""
    marks = ", ".join("?" * len(rowids))
    sql = (
        "SELECT m.id, m.conversation_id, m.source, m.seq, m.role, m.timestamp, "  # noqa: S608
        f"snippet({FTS_TABLE}, 0, ?, ?, ?, ?) FROM {FTS_TABLE} JOIN messages AS m ON m.id = {FTS_TABLE}.rowid "
        f"WHERE {FTS_TABLE} MATCH ? AND {FTS_TABLE}.rowid IN ({marks})"
    )
    return Statement(sql, (MARK_OPEN, MARK_CLOSE, ELLIPSIS, SNIPPET_TOKENS, expression, *rowids))


def page(
    query: SearchQuery,
    offset: int,
    ranked: list[tuple[int, float]],
    rows: list[tuple[Any, ...]],
    *,
    low: int,
    high: int,
    older: bool,
    partial: bool,
) -> SearchPage:
    """Assemble a page from the ranked candidates and their details (a message erased in between is left out)."""
    by_id = {row[0]: row for row in rows}
    hits = []
    for rowid, score in ranked[: query.limit]:
        row = by_id.get(rowid)
        if row is None:
            continue
        text, spans = marked(row[6])
        hits.append(
            SearchHit(
                conversation_id=row[1],
                source=row[2],
                seq=row[3],
                role=row[4],
                timestamp=row[5],
                snippet=text,
                marks=spans,
                rank=-score,
            )
        )
    following = None
    if len(ranked) > query.limit:
        following = encode_cursor(Cursor(offset + query.limit, low, high, older))
    return SearchPage(hits=hits, next=following, partial=partial, older_not_ranked=older)


async def search(reader: Reader, query: SearchQuery) -> SearchPage:
    """One page of hits for ``query``; QuerySyntaxError or CursorError (both ValueError) for bad input."""
    return await reader.search(query)
