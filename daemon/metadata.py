"""Callback metadata: the query parameters of a webhook URL (``?user_id=42``), kept on the conversation.

Apps put their own ids in the callback URL to tie a call to their user. Every parameter but ``token``
becomes a key of the conversation's metadata, a JSON object of strings, merged key by key across
deliveries (the writer merges it in SQL, with ``json_patch``). Bounded per delivery and per conversation;
a parameter over a bound is named in a 422, and the rest of the delivery is still stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import msgspec

from daemon.errors import Problem
from storage.statements import MAX_METADATA_KEYS

MAX_KEYS = MAX_METADATA_KEYS  # per delivery, and per conversation once merged (the writer's SQL checks that)
MAX_KEY_LENGTH = 64
MAX_VALUE_LENGTH = 512
# Letters, digits and _ . : -: safe in a JSON path, and in the read API's ``metadata.<key>=`` filter.
KEY = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# A secret some deployments carry in the query string instead of the path: never metadata.
RESERVED = frozenset({"token"})


def from_query(params: Iterable[tuple[str, str]]) -> tuple[str | None, list[Problem]]:
    """The metadata of a request's query parameters, as JSON text (None: there is none), and a problem
    for each parameter refused. A repeated key keeps its last value."""
    found: dict[str, str] = {}
    problems: list[Problem] = []
    for key, value in params:
        if key in RESERVED:
            continue
        field = f"query.{key[:MAX_KEY_LENGTH]}"
        if not KEY.fullmatch(key):
            problems.append(
                Problem(f"a metadata key is 1-{MAX_KEY_LENGTH} characters of letters, digits and _.:-", field)
            )
        elif len(value) > MAX_VALUE_LENGTH:
            problems.append(Problem(f"a metadata value is at most {MAX_VALUE_LENGTH} characters", field))
        elif key not in found and len(found) >= MAX_KEYS:
            problems.append(Problem(f"at most {MAX_KEYS} metadata keys per conversation", field))
        else:
            found[key] = value
    return (msgspec.json.encode(found).decode() if found else None), problems
