"""The registry: the one list of sources. Everything that differs per source is read from here.

To add a source, write its module (one ``SOURCE = Source(...)``) and add it to ``SOURCES``: see
docs/adding-a-source.md. tests/test_sources.py fails when a registered source lacks a part.
"""

from __future__ import annotations

from typing import Any

from daemon.sources import elevenlabs, generic, retell, tavus, vapi
from daemon.sources.model import Source

SOURCES: tuple[Source[Any], ...] = (
    tavus.SOURCE,
    generic.SOURCE,
    vapi.SOURCE,
    retell.SOURCE,
    elevenlabs.SOURCE,
)

BY_NAME: dict[str, Source[Any]] = {source.name: source for source in SOURCES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
# Sources with a webhooks.<name> settings section (the generic endpoint has none).
WEBHOOK_SOURCES: tuple[Source[Any], ...] = tuple(source for source in SOURCES if source.settings is not None)
EVENT_TYPES: frozenset[str] = frozenset().union(*(source.events for source in SOURCES))

__all__ = ["BY_NAME", "EVENT_TYPES", "NAMES", "SOURCES", "WEBHOOK_SOURCES", "Source"]
