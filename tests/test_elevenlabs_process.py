"""ElevenLabs webhooks against a real `transcriptd serve`: a chunked audio body over real HTTP, every event
type stored, and `transcriptd replay` re-deriving exactly what intake stored."""

from __future__ import annotations

import base64
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import execute
from tests.daemon_process import managed, rows, start_daemon, transcriptd
from tests.test_elevenlabs_intake import SECRET, fixture, signed
from tests.test_operations import table

pytestmark = pytest.mark.slow

ENV = {"TRANSCRIPTD_WEBHOOKS_ELEVENLABS_SIGNING_SECRET": SECRET}


def chunks(body: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_every_event_type_over_real_http_and_replay_rederives_it(tmp_path: Path, target: str) -> None:
    db_path = target
    mp3 = bytes(range(256)) * (13 * 4096)  # 13 MiB: its base64 is over ingest.max_body_bytes
    audio = json.dumps(
        {
            "type": "post_call_audio",
            "event_timestamp": 1739537319,
            "data": {"agent_id": "xyz", "conversation_id": "abc", "full_audio": base64.b64encode(mp3).decode()},
        }
    ).encode()
    bodies = [
        fixture("post_call_transcription.json"),
        fixture("post_call_transcription_tools.json"),
        fixture("call_initiation_failure_twilio.json"),
        json.dumps(
            {"type": "post_call_something_new", "event_timestamp": 3, "data": {"conversation_id": "abc"}}
        ).encode(),
    ]
    with managed(start_daemon(tmp_path, db_path, env=ENV)) as daemon:
        url = f"{daemon.base_url}/webhooks/elevenlabs"
        with httpx.Client(timeout=60) as client:
            # Chunked, as ElevenLabs sends audio: no Content-Length, the limit is checked as it streams.
            answer = client.post(url, content=chunks(audio), headers=signed(audio))
            assert answer.status_code == 200, answer.text
            assert "content-length" not in answer.request.headers
            for body in bodies:
                answer = client.post(url, content=body, headers=signed(body))
                assert answer.status_code == 200, answer.text
            unsigned = client.post(url, content=bodies[0])
            assert unsigned.status_code == 401
        assert daemon.stop(signal.SIGTERM) == 0
        assert SECRET not in daemon.log()

    ((kept,),) = rows(db_path, "SELECT body FROM events WHERE event_type = 'post_call_audio'")
    assert len(kept) < 400
    assert json.loads(kept)["data"]["full_audio"]["mp3_bytes"] == len(mp3)
    assert rows(db_path, "SELECT count(*) FROM messages") == [(9,)]
    assert rows(db_path, "SELECT id, status, end_reason FROM conversations ORDER BY id") == [
        ("abc", "failed", "busy"),  # a failure after the transcript: failed wins, as for any source
        ("conv_tools", "ended", "Client disconnected: 1000"),
    ]

    ignore = ("created_at", "updated_at")
    messages, conversations = table(db_path, "messages", ignore=("id",)), table(db_path, "conversations", ignore=ignore)
    execute(db_path, "DELETE FROM messages; DELETE FROM conversations")
    done = transcriptd("replay", "--db", db_path, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "replayed 5 events" in done.stdout, done.stdout
    assert "9 messages inserted" in done.stdout, done.stdout
    assert table(db_path, "messages", ignore=("id",)) == messages
    assert table(db_path, "conversations", ignore=ignore) == conversations
