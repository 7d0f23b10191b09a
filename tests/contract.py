"""The answer contract every endpoint keeps, checked the same way by the fuzzers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def check_answer(status: int, header: Callable[[str], str | None], body: Callable[[], Any], text: str) -> None:
    """Never a 5xx but a 503 that says when to retry; every error in the one JSON shape, with a message,
    and a field path on a 422."""
    assert status < 500 or (status == 503 and header("retry-after")), (status, text)
    if status < 400:
        return
    assert header("content-type") == "application/json", text
    error = body()["error"]
    assert error["status"] == status
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    if status == 422:
        assert isinstance(error["field"], str)
        assert error["field"]
