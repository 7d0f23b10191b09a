"""Tavus bodies for tests: the bench's fixed generators (kept in one place)."""

from bench.payloads import SYSTEM_PROMPT, encode, envelope, transcript, transcription_ready

__all__ = ["SYSTEM_PROMPT", "encode", "envelope", "transcript", "transcription_ready"]
