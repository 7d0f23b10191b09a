"""Logging: the text and JSON formats, the mask on every secret, the session-wide leak check, the systemd unit."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from daemon.config import ConfigError, IngestConfig, ServerConfig, load_config
from daemon.logs import (
    HANDLER_NAME,
    REDACTED,
    TEXT_FORMAT,
    JsonFormatter,
    RedactSecrets,
    TextFormatter,
    config_secrets,
    configure,
)
from daemon.sources.elevenlabs import ElevenLabsSettings
from tests.conftest import TEST_SECRETS, SecretLeakCapture, leaked_lines, leaks_in_log_files, make_config
from tests.payloads import encode, envelope

REPO = Path(__file__).resolve().parent.parent
TAVUS_TOKEN, API_TOKEN, CALLBACK_TOKEN = TEST_SECRETS[0], TEST_SECRETS[1], TEST_SECRETS[2]
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error")

Configure = Callable[..., io.StringIO]


@pytest.fixture
def configured() -> Iterator[Configure]:
    """``configured(**settings)`` runs ``configure`` into a StringIO; logging is put back as it was afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    uvicorn_state = {
        name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate) for name in _UVICORN_LOGGERS
    }
    showwarning = warnings.showwarning

    def run(**settings: Any) -> io.StringIO:
        stream = io.StringIO()
        configure(make_config(Path("unused.db"), **settings), stream=stream)
        return stream

    try:
        yield run
    finally:
        for handler in root.handlers:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)
        logging.captureWarnings(False)
        warnings.showwarning = showwarning
        for name, (own, propagate) in uvicorn_state.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = own
            logger.propagate = propagate


def our_handler() -> logging.Handler:
    (handler,) = [h for h in logging.getLogger().handlers if h.get_name() == HANDLER_NAME]
    return handler


def record(msg: str, *args: object, exc: bool = False, stack: str | None = None) -> logging.LogRecord:
    """A record handed straight to a handler: a secret in it never reaches the other handlers (nor the leak check)."""
    exc_info = None
    if exc:
        try:
            raise ValueError(f"the token {TAVUS_TOKEN} was refused")
        except ValueError:
            exc_info = sys.exc_info()
    made = logging.LogRecord("transcriptd.test", logging.ERROR, __file__, 1, msg, args, exc_info)
    made.stack_info = stack
    return made


# --- formats ------------------------------------------------------------------------------------------


def test_json_format_writes_one_object_per_line_with_the_fields(configured: Configure) -> None:
    stream = configured(**{"logging.format": "json"})
    log = logging.getLogger("transcriptd.test")
    before = datetime.now(UTC)
    log.info("stored %d rows of %s", 3, "c1")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("commit failed\non two lines")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"ts", "level", "logger", "message"}
    assert (first["level"], first["logger"], first["message"]) == ("INFO", "transcriptd.test", "stored 3 rows of c1")
    assert first["ts"].endswith("Z")
    ts = datetime.fromisoformat(first["ts"])
    assert ts.utcoffset() == timedelta(0)
    assert before - timedelta(seconds=1) <= ts <= datetime.now(UTC)
    assert set(second) == {"ts", "level", "logger", "message", "exc"}
    assert (second["level"], second["message"]) == ("ERROR", "commit failed\non two lines")
    assert second["exc"].startswith("Traceback (most recent call last):")
    assert second["exc"].endswith("RuntimeError: boom")


def test_text_format_is_the_format_of_before(configured: Configure) -> None:
    stream = configured()
    formatter = our_handler().formatter
    assert formatter is not None
    assert formatter._fmt == "%(asctime)s %(levelname)s %(name)s: %(message)s" == TEXT_FORMAT
    logging.getLogger("transcriptd.test").warning("mailbox of %s is full", "c1")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING transcriptd\.test: mailbox of c1 is full\n", stream.getvalue()
    )


def test_the_level_is_server_log_level(configured: Configure) -> None:
    stream = configured(**{"server.log_level": "warning"})
    log = logging.getLogger("transcriptd.test")
    log.info("not shown")
    log.warning("shown")
    assert logging.getLogger().level == logging.WARNING
    assert "not shown" not in stream.getvalue()
    assert "shown" in stream.getvalue()


def test_configuring_again_replaces_the_handler(configured: Configure) -> None:
    configured()
    stream = configured(**{"logging.format": "json"})
    logging.getLogger("transcriptd.test").warning("once")
    assert [json.loads(line)["message"] for line in stream.getvalue().splitlines()] == ["once"]


def test_uvicorn_logs_through_the_same_handler(configured: Configure) -> None:
    stream = configured(**{"logging.format": "json"})

    async def app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover - never called
        pass

    # As cli.serve sets uvicorn up after configure(): its Config configures its logging on construction.
    uvicorn.Config(app, log_config=None, access_log=False)
    logging.getLogger("uvicorn.error").info("Uvicorn running on http://127.0.0.1:8000")
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["logger"] == "uvicorn.error"


def test_python_warnings_are_logged_in_the_format(configured: Configure) -> None:
    stream = configured(**{"logging.format": "json"})
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        logging.captureWarnings(True)  # catch_warnings put the original showwarning back
        warnings.warn("careful", UserWarning, stacklevel=1)
    (line,) = stream.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["logger"] == "py.warnings"
    assert "UserWarning: careful" in entry["message"]


def test_the_format_is_a_setting_with_its_environment_variable() -> None:
    assert load_config(Path("/dev/null"), environ={}).logging.format == "text"
    assert load_config(Path("/dev/null"), environ={"TRANSCRIPTD_LOGGING_FORMAT": "json"}).logging.format == "json"
    with pytest.raises(ConfigError, match=r"logging\.format"):
        load_config(Path("/dev/null"), environ={"TRANSCRIPTD_LOGGING_FORMAT": "xml"})


# --- secrets ------------------------------------------------------------------------------------------


def test_every_secret_setting_is_masked() -> None:
    config = make_config(Path("unused.db"), **{"webhooks.tavus.token": TAVUS_TOKEN, "api.token": API_TOKEN})
    assert sorted(config_secrets(config)) == sorted([TAVUS_TOKEN, API_TOKEN])
    assert config_secrets(make_config(Path("unused.db"))) == []  # an unset token masks nothing


@pytest.mark.parametrize(
    ("msg", "args"),
    [
        pytest.param(f"refused token {TAVUS_TOKEN}", (), id="in-the-message"),
        pytest.param("refused token %s", (TAVUS_TOKEN,), id="in-the-arguments"),
        pytest.param("header Authorization: Bearer %s", (API_TOKEN,), id="api-token"),
        # Not configured here: the path rule masks any token, a wrong or an old one too.
        pytest.param('"POST %s HTTP/1.1" 401', (f"/webhooks/tavus/{CALLBACK_TOKEN}",), id="webhook-path"),
        pytest.param("url %s", (f"https://host/webhooks/tavus/{CALLBACK_TOKEN}?x=1",), id="webhook-url-with-query"),
        pytest.param("event %r", (envelope("c1", "system.shutdown", {}),), id="webhook_url-in-a-dict"),
        pytest.param("body %r", (encode(envelope("c1", "system.shutdown", {})),), id="webhook_url-in-raw-bytes"),
        pytest.param(
            "event %s",
            (json.dumps({"webhook_url": f"https://hooks.test/cb?sig={CALLBACK_TOKEN}&v=1"}),),
            id="webhook_url-anywhere-in-the-url",
        ),
        pytest.param("callback webhook_url=%s", (f"https://hooks.test/cb/{CALLBACK_TOKEN}",), id="webhook_url=value"),
    ],
)
@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_are_masked(configured: Configure, fmt: str, msg: str, args: tuple[object, ...]) -> None:
    stream = configured(**{"logging.format": fmt, "webhooks.tavus.token": TAVUS_TOKEN, "api.token": API_TOKEN})
    handled = record(msg, *args)
    our_handler().handle(handled)
    out = stream.getvalue()
    assert REDACTED in out
    assert leaked_lines(out) == []
    # The record itself is masked: a handler that sees it after ours prints no secret either.
    assert leaked_lines(handled.getMessage()) == []


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_exception_and_stack_text_is_masked(configured: Configure, fmt: str) -> None:
    stream = configured(**{"logging.format": fmt, "webhooks.tavus.token": TAVUS_TOKEN})
    stack = f"Stack (most recent call last):\n{''.join(traceback.format_stack(limit=1))}  /webhooks/tavus/{TAVUS_TOKEN}"
    our_handler().handle(record("the commit failed", exc=True, stack=stack))
    out = stream.getvalue()
    assert "ValueError: the token [redacted] was refused" in (json.loads(out)["exc"] if fmt == "json" else out)
    assert leaked_lines(out) == []


def test_the_mask_is_idempotent_and_keeps_the_rest() -> None:
    mask = RedactSecrets([TAVUS_TOKEN, ""])
    once = mask.redact(f'POST /webhooks/tavus/{TAVUS_TOKEN} {{"webhook_url": "https://h/x", "event_type": "e"}}')
    assert once == 'POST /webhooks/tavus/[redacted] {"webhook_url": "[redacted]", "event_type": "e"}'
    assert mask.redact(once) == once
    assert mask.redact("POST /webhooks/tavus HTTP/1.1") == "POST /webhooks/tavus HTTP/1.1"


def test_a_message_whose_arguments_do_not_format_is_masked_not_raised(configured: Configure) -> None:
    stream = configured(**{"webhooks.tavus.token": TAVUS_TOKEN})
    our_handler().handle(record(f"token {TAVUS_TOKEN} rows %d", "many"))
    assert "could not be formatted" in stream.getvalue()
    assert leaked_lines(stream.getvalue()) == []


# --- the session-wide leak check (tests/conftest.py) -----------------------------------------------------


def test_the_leak_check_finds_a_secret_in_text_records_and_daemon_log_files() -> None:
    assert leaked_lines(f"ok\nINFO transcriptd: POST /webhooks/tavus/{TAVUS_TOKEN}\nok") == [
        f"INFO transcriptd: POST /webhooks/tavus/{TAVUS_TOKEN}"
    ]
    assert leaked_lines("INFO transcriptd: POST /webhooks/tavus/[redacted]") == []

    capture = SecretLeakCapture()
    capture.handle(record("token %s", API_TOKEN))  # straight to the handler, not through the logging tree
    assert len(capture.leaks) == 1
    assert API_TOKEN in capture.leaks[0]
    client = logging.LogRecord("httpx", logging.INFO, __file__, 1, "POST /webhooks/tavus/%s", (TAVUS_TOKEN,), None)
    capture.handle(client)  # the test's own HTTP client is not the daemon
    assert len(capture.leaks) == 1

    # Outside pytest's base temp directory, which the session check scans at the end.
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory) / "test_x0" / "work"
        workdir.mkdir(parents=True)
        (workdir / "transcriptd-1.log").write_text(f"INFO uvicorn.error: ready\nPOST /x/{CALLBACK_TOKEN}\n")
        (workdir / "transcriptd.db").write_text(CALLBACK_TOKEN)  # the database holds raw bodies: not a log
        (leak,) = leaks_in_log_files(Path(directory))
    assert leak.endswith(f"transcriptd-1.log: POST /x/{CALLBACK_TOKEN}")


# --- deployment -------------------------------------------------------------------------------------------


def unit_settings() -> dict[str, list[str]]:
    """The systemd unit's settings (a key may repeat), comments left out."""
    settings: dict[str, list[str]] = {}
    for line in (REPO / "deploy" / "transcriptd.service").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def seconds(span: str) -> float:
    """A systemd time span such as ``30``, ``30s``, ``1min 10s``."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    assert parts, span
    return sum(float(n) * units[unit] for n, unit in parts)


def test_the_systemd_unit_waits_longer_than_the_drain() -> None:
    unit = unit_settings()
    (stop,) = unit["TimeoutStopSec"]
    assert seconds(stop) > ServerConfig().shutdown_timeout_s
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["ExecStart"] == ["/opt/transcriptd/.venv/bin/transcriptd serve --config /etc/transcriptd/config.toml"]
    # Secrets come from the EnvironmentFile, never from the unit (systemctl show prints Environment=).
    assert not [value for value in unit.get("Environment", []) if "TOKEN" in value.upper()]
    assert unit["EnvironmentFile"] == ["-/etc/transcriptd/env"]


def test_the_proxy_in_the_deployment_guide_takes_the_largest_body() -> None:
    guide = (REPO / "docs" / "deployment.md").read_text()
    general, elevenlabs = (int(n) * 1024 * 1024 for n in re.findall(r"client_max_body_size\s+(\d+)m;", guide))
    assert general >= IngestConfig().max_body_bytes
    assert elevenlabs >= ElevenLabsSettings().max_body_bytes  # its own location: audio bodies are large


def test_each_rotated_signing_secret_is_masked_alone() -> None:
    first, second = "whsec_QUFBQUFBQUFBQUFBQUFBQQ==", "whsec_QkJCQkJCQkJCQkJCQkJCQg=="
    config = make_config(Path("/dev/null"), **{"webhooks.tavus.signing_secret": f"{first} {second}"})
    secrets = config_secrets(config)
    for secret in (first, second, first.removeprefix("whsec_"), second.removeprefix("whsec_")):
        assert secret in secrets


@pytest.mark.parametrize("created", [1_767_225_599.9996, 1_767_225_600.0, 1_767_225_600.25, 1_767_225_601.5])
def test_the_text_line_is_what_the_standard_formatter_writes(created: float) -> None:
    # The formatter keeps the last second it formatted: each record is formatted after one of another second.
    ours, standard = TextFormatter(), logging.Formatter(TEXT_FORMAT)
    for when in (created - 1, created, created):
        made = record("mailbox of %s is full", "c1")
        made.created, made.msecs = when, int((when - int(when)) * 1000) + 0.0
        assert ours.format(made) == standard.format(made)
    with_exc = record("commit failed", exc=True, stack="Stack (most recent call last):\n  here")
    assert ours.format(with_exc) == standard.format(with_exc)


@pytest.mark.parametrize("created", [1_767_225_599.9996, 1_767_225_600.0, 1_767_225_600.25, 1_767_225_601.5])
def test_the_json_time_is_the_records_time_in_utc_to_the_millisecond(created: float) -> None:
    formatter = JsonFormatter()
    for when in (created - 1, created, created):
        made = record("x")
        made.created, made.msecs = when, int((when - int(when)) * 1000) + 0.0
        ts = json.loads(formatter.format(made))["ts"]
        expected = datetime.fromtimestamp(int(when), UTC).replace(microsecond=int(made.msecs) * 1000)
        assert ts == expected.isoformat(timespec="milliseconds").replace("+00:00", "Z")
