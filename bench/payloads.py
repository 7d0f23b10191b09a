"""Tavus callback bodies as Tavus sends them: fixed generators for the bench and the tests."""

from __future__ import annotations

import json
import random
from typing import Any

SYSTEM_PROMPT = "You are Ana, a patient support agent. " * 120  # several KB, like a real persona


def envelope(conversation_id: str, event_type: str, properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "properties": properties,
        "conversation_id": conversation_id,
        "webhook_url": "https://example.test/webhooks/tavus/s3cr3t-callback-token",
        "event_type": event_type,
        "message_type": "application" if event_type.startswith("application.") else "system",
        "timestamp": "2025-03-01T10:15:30.123456Z",
    }
    body.update(extra)
    return body


def transcript(
    turns: int, *, seed: int = 0, timestamps: str = "epoch", content_chars: int = 200
) -> list[dict[str, Any]]:
    """A system entry, then ``turns`` alternating user/assistant entries of about ``content_chars``."""
    rng = random.Random(seed)
    entries: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for i in range(turns):
        words: list[str] = []
        while sum(len(w) + 1 for w in words) < content_chars:
            words.append(rng.choice(["hello", "olá", "thanks", "appointment", "Tuesday", "😀", "price", "ok"]))
        entry: dict[str, Any] = {"role": "user" if i % 2 == 0 else "assistant", "content": " ".join(words)}
        if timestamps == "epoch":
            entry["timestamp"] = 1740824130.0 + i * 2.5
        elif timestamps == "iso":
            entry["timestamp"] = f"2025-03-01T10:{15 + i // 24 % 40:02d}:{(i * 2) % 60:02d}.500000Z"
        if i % 3 == 0:
            entry["seconds_from_start"] = i * 2.5
            entry["duration"] = 1.25
            entry["inference_id"] = f"inf-{seed}-{i}"
        entries.append(entry)
    return entries


def transcription_ready(conversation_id: str, turns: int = 100, **kwargs: Any) -> dict[str, Any]:
    return envelope(
        conversation_id,
        "application.transcription_ready",
        {"replica_id": "r79e1c033f", "transcript": transcript(turns, **kwargs)},
    )


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()
