"""Decoding helpers shared by the intake formats: JSON bodies, lists item by item, timestamps."""

from __future__ import annotations

import hashlib
import math
from datetime import datetime
from typing import Any, TypeVar

import msgspec

from daemon.errors import InvalidHeader, InvalidPayload, MalformedJSON, Problem

T = TypeVar("T")


def decode(body: bytes, type_: type[T], *, path: str = "$") -> T:
    """Decode ``body`` as ``type_``: malformed JSON is a 400, JSON of the wrong shape a 422 with its path.

    Lax about scalars (``"12.5"`` for a number): a sender's formatting is no reason to lose a delivery.
    """
    try:
        return msgspec.json.decode(body, type=type_, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidPayload([validation_problem(exc, path)]) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedJSON(f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise MalformedJSON(f"the JSON is nested too deeply (at {path})") from None


def validation_problem(exc: msgspec.ValidationError, path: str) -> Problem:
    message, sep, where = str(exc).partition(" - at `")
    field = path + where.rstrip("`")[1:] if sep else path
    return Problem(message, field)


def decode_items(raws: list[msgspec.Raw], type_: type[T], *, path: str) -> tuple[list[tuple[int, T]], list[Problem]]:
    """Decode each item on its own, so one bad item does not cost the good ones: (index, item) pairs
    for the good, a problem naming ``path[index].field`` for each bad one."""
    good: list[tuple[int, T]] = []
    problems: list[Problem] = []
    decoder = msgspec.json.Decoder(type_, strict=False)
    for index, raw in enumerate(raws):
        try:
            good.append((index, decoder.decode(raw)))
        except msgspec.ValidationError as exc:
            problems.append(validation_problem(exc, f"{path}[{index}]"))
        except RecursionError:
            problems.append(Problem("nested too deeply", f"{path}[{index}]"))
    return good, problems


def epoch_seconds(value: float | str | None) -> float | None:
    """Unix seconds from either form senders use: a number, or an ISO-8601 string (naive means UTC).

    A value that is neither is dropped rather than refused: it would cost the message for the sake of
    an optional field, and the raw body keeps the original.
    """
    if value.__class__ is float:  # the common case first: this runs once per message
        return value if math.isfinite(value) else None
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) else None
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        return number if math.isfinite(number) else None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return (parsed - datetime(1970, 1, 1)).total_seconds()
    return parsed.timestamp()


def body_key(source: str, body: bytes, *extra: str) -> str:
    digest = hashlib.sha256(body)
    for part in extra:
        digest.update(b"\0" + part.encode())
    return f"{source}:sha256:{digest.hexdigest()}"


# A sender's id becomes part of a unique key, stored once per delivery: ids are short (Standard Webhooks'
# msg_... ids, UUIDs), and one of megabytes would be stored, indexed and compared as a key.
MAX_ID_CHARS = 256


def delivery_key(source: str, body: bytes, headers: Any, *extra: str) -> str:
    """The idempotency key: the sender's ``webhook-id`` (or ``Idempotency-Key``) where given, else the body's hash.

    An id over :data:`MAX_ID_CHARS` is a 400 naming its header: nothing of the delivery is stored."""
    name, given = "webhook-id", headers.get("webhook-id")
    if not given:
        name, given = "idempotency-key", headers.get("idempotency-key")
    if given:
        if len(given) > MAX_ID_CHARS:
            raise InvalidHeader(
                f"the {name} header is {len(given)} characters; at most {MAX_ID_CHARS}", field=f"headers.{name}"
            )
        return ":".join((source, "id", *extra, given))
    return body_key(source, body, *extra)
