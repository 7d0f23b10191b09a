"""The viewer's Jinja2 environment: autoescaped everywhere, and the filters its templates use.

Every transcript text, id, role and vendor field reaches HTML through autoescaping; nothing is marked safe
except what :func:`marked` builds from escaped pieces.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import msgspec
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from markupsafe import Markup, escape

from daemon.ids import quoted

HERE = Path(__file__).resolve().parent
STYLESHEET = (HERE / "static" / "viewer.css").read_bytes()
KNOWN_ROLES = frozenset({"system", "user", "assistant", "tool"})


def when(seconds: float | None) -> str:
    """Unix seconds as a UTC time a person reads: ``2026-12-06 04:10:03 UTC``."""
    if seconds is None:
        return "—"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(seconds: float | None) -> str:
    """For ``<time datetime=…>``."""
    if seconds is None:
        return ""
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).isoformat(timespec="seconds")


def clock(seconds: float | None) -> str:
    """Seconds from the start of a call as ``m:ss`` (``h:mm:ss`` past an hour)."""
    if seconds is None:
        return ""
    whole = max(int(seconds), 0)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def pretty(value: Any) -> str:
    """A JSON value indented, or a text that holds JSON indented; any other text as it is."""
    if isinstance(value, str):
        text: str = value
        try:
            value = msgspec.json.decode(text)
        except msgspec.DecodeError:
            return text
    formatted: bytes = msgspec.json.format(msgspec.json.encode(value), indent=2)
    return formatted.decode()


def web_link(uri: str | None) -> str | None:
    """A vendor's URL as a link target only when it is http(s): a ``javascript:`` or ``data:`` one stays text."""
    if uri and uri.lower().startswith(("https://", "http://")):
        return uri
    return None


def role_class(role: str) -> str:
    """A CSS class for a role: the generic endpoint stores any role its sender wrote."""
    return f"role-{role}" if role in KNOWN_ROLES else "role-other"


def marked(snippet: str, marks: list[tuple[int, int]]) -> Markup:
    """A search snippet with its matched spans (``[start, end)`` offsets) as ``<mark>``; everything else, the
    transcript's own ``<`` and ``&`` included, escaped."""
    parts: list[str] = []
    done = 0
    for start, end in sorted(marks):
        if start < done or end > len(snippet):
            continue  # overlapping or out of range: left unmarked rather than cut the text
        parts.append(str(escape(snippet[done:start])))
        parts.append(f"<mark>{escape(snippet[start:end])}</mark>")
        done = end
    parts.append(str(escape(snippet[done:])))
    return Markup("".join(parts))  # noqa: S704 (every piece is escaped above)


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, whatever its name: there is no template that should not escape
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(when=when, iso=iso, clock=clock, pretty=pretty, q=quoted, role_class=role_class)
    env.globals.update(web_link=web_link, marked=marked)
    return env
