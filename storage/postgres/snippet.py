"""Snippets for search hits on PostgreSQL, cut and marked as SQLite's FTS5 ``snippet()`` does.

PostgreSQL's ``ts_headline`` cannot serve: it matches the text as stored against the query's lexemes,
which are folded with ``unaccent``, so "Réservation" would not be marked for ``reservation``, and it
picks its fragment by rules of its own. So the text of each hit is tokenised here as FTS5's
``unicode61 remove_diacritics 2`` tokenises (runs of letters, digits and private-use characters;
combining marks continue a token; case and accents folded), the query's words and phrases are found in
it, and the 16-token window is chosen, cut and marked by FTS5's own rules (its ``fts5SnippetFunction``):
the same ``snippet`` and ``marks`` on both backends for the same message and query.

Where PostgreSQL's parser and unicode61 split a text differently (an e-mail address or a URL is one
PostgreSQL token), a hit may have no span found here: its snippet is the text's start, unmarked.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from storage.search import ELLIPSIS, MARK_CLOSE, MARK_OPEN, SNIPPET_TOKENS, Term


@dataclass(frozen=True, slots=True)
class Token:
    start: int  # character offsets in the text: text[start:end]
    end: int
    folded: str


@dataclass(frozen=True, slots=True)
class Phrase:
    words: tuple[str, ...]  # folded tokens, adjacent and in order
    prefix: bool  # the last one is a prefix


def _starts_token(char: str) -> bool:
    if char.isascii():
        return char.isalnum()
    return unicodedata.category(char)[0] in "LN" or unicodedata.category(char) == "Co"


def _continues_token(char: str) -> bool:
    return _starts_token(char) or (not char.isascii() and unicodedata.combining(char) > 0)


def fold(text: str) -> str:
    """Lower case without diacritics: ``Réservation`` -> ``reservation``."""
    decomposed = unicodedata.normalize("NFD", text.lower())
    return "".join(char for char in decomposed if not unicodedata.combining(char))


def tokens(text: str) -> list[Token]:
    out: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        if not _starts_token(text[i]):
            i += 1
            continue
        start = i
        i += 1
        while i < n and _continues_token(text[i]):
            i += 1
        out.append(Token(start, i, fold(text[start:i])))
    return out


def phrases(terms: list[Term]) -> list[Phrase]:
    """The FTS5 phrases of a query's terms, in its expression's order (storage.search.fts_expression):
    the words and phrases to find, then the excluded ones (which a hit never holds)."""
    ordered = [term for term in terms if not term.excluded] + [term for term in terms if term.excluded]
    return [Phrase(tuple(token.folded for token in tokens(term.text)), term.prefix) for term in ordered]


def _instances(doc: list[Token], found: list[Phrase]) -> list[tuple[int, int, int]]:
    """(position, phrase index, phrase size) of every match, by position then phrase, as FTS5 lists them."""
    out = []
    for ip, phrase in enumerate(found):
        size = len(phrase.words)
        if size == 0:
            continue
        for pos in range(len(doc) - size + 1):
            if all(doc[pos + j].folded == word for j, word in enumerate(phrase.words[:-1])):
                last = doc[pos + size - 1].folded
                if last == phrase.words[-1] or (phrase.prefix and last.startswith(phrase.words[-1])):
                    out.append((pos, ip, size))
    out.sort(key=lambda instance: (instance[0], instance[1]))
    return out


def _c_half(value: int) -> int:
    """``value / 2`` in C: truncated toward zero."""
    return value // 2 if value >= 0 else -((-value) // 2)


def _score(instances: list[tuple[int, int, int]], count: int, start: int, width: int) -> tuple[int, int]:
    """FTS5's score of the window of ``width`` tokens from ``start`` (1000 per phrase seen, 1 per repeat),
    and where the window would start to centre the matches in it."""
    seen: set[int] = set()
    score, first, last = 0, -1, 0
    for pos, ip, size in instances:
        if start <= pos < start + width:
            score += 1 if ip in seen else 1000
            seen.add(ip)
            if first < 0:
                first = pos
            last = pos + size
    adjusted = first - _c_half(width - (last - first))
    if adjusted + width > count:
        adjusted = count - width
    return score, max(adjusted, 0)


def _sentence_starts(text: str, doc: list[Token]) -> list[int]:
    """The positions of the tokens that start a sentence for FTS5: the first, and any after ". " or ": "."""
    starts = []
    for pos, token in enumerate(doc):
        if pos == 0:
            starts.append(0)
            continue
        i = token.start - 1
        while i >= 0 and text[i] in " \t\n\r":
            i -= 1
        if i != token.start - 1 and i >= 0 and text[i] in ".:":
            starts.append(pos)
    return starts


def _coalesced(instances: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """The matches as [first, last] token ranges, overlapping ones merged."""
    ranges: list[tuple[int, int]] = []
    for pos, _, size in instances:
        end = pos + size - 1
        if ranges and pos <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
        else:
            ranges.append((pos, end))
    return ranges


def snippet(text: str, found: list[Phrase], width: int = SNIPPET_TOKENS) -> str:
    """``text`` cut to the best ``width`` tokens around the matches of ``found``, with ``ELLIPSIS`` where
    cut and each match between ``MARK_OPEN`` and ``MARK_CLOSE`` (storage.search.marked reads them)."""
    doc = tokens(text)
    count = len(doc)
    instances = _instances(doc, found)
    best_score, best_start = 0, 0
    starts = _sentence_starts(text, doc)
    for pos, _, _ in instances:
        score, adjusted = _score(instances, count, pos, width)
        if score > best_score:
            best_score, best_start = score, adjusted
        if starts and count > width:
            jj = 0
            while jj < len(starts) - 1 and starts[jj + 1] <= pos:
                jj += 1
            if starts[jj] < pos:
                score, _ = _score(instances, count, starts[jj], width)
                score += 120 if starts[jj] == 0 else 100
                if score > best_score:
                    best_score, best_start = score, starts[jj]
    first, last = best_start, best_start + width - 1
    ranges = [r for r in _coalesced(instances) if r[0] >= first]
    out: list[str] = [ELLIPSIS] if first > 0 else []
    offset = 0
    current = ranges.pop(0) if ranges else (-1, -1)
    for pos, token in enumerate(doc):
        if pos < first or pos > last:
            continue
        if first and pos == first:
            offset = token.start
        if pos == current[0]:
            out += [text[offset : token.start], MARK_OPEN]
            offset = token.start
        if pos == current[1]:
            out += [text[offset : token.end], MARK_CLOSE]
            offset = token.end
            current = ranges.pop(0) if ranges else (-1, -1)
        if pos == last:
            out.append(text[offset : token.end])
            offset = token.end
            if current[0] <= pos < current[1]:
                out.append(MARK_CLOSE)
    out.append(text[offset:] if last >= count - 1 else ELLIPSIS)
    return "".join(out)
