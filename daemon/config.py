"""One frozen, typed configuration: defaults < config.toml < TRANSCRIPTD_* environment < flags."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from daemon.signatures import parse_secrets
from daemon.sources import WEBHOOK_SOURCES
from daemon.sources.model import Secret, is_secret
from storage.backend import is_postgres_url

ENV_PREFIX = "TRANSCRIPTD_"
DEFAULT_CONFIG_FILE = Path("config.toml")

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]
Count = Annotated[int, msgspec.Meta(ge=1)]


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section, frozen=True):
    host: str = "127.0.0.1"
    port: Port = 8000
    shutdown_timeout_s: Positive = 25.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_header_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 64 * 1024
    header_timeout_s: Positive = 10.0
    body_timeout_s: Positive = 30.0
    keepalive_timeout_s: Count = 5
    max_connections: Count = 1024


class LoggingConfig(_Section, frozen=True):
    format: Literal["text", "json"] = "text"
    deliveries: bool = True


class StorageConfig(_Section, frozen=True):
    # A postgresql:// URL (replicas sharing one PostgreSQL), or a SQLite file's path; empty: ``path``. Logs
    # name it by host:port/dbname only, and its password is masked (daemon.logs.config_secrets).
    url: str = ""
    path: str = "data/transcriptd.db"
    synchronous: Literal["full", "normal"] = "full"
    cache_size_mib: Count = 64
    busy_timeout_ms: Annotated[int, msgspec.Meta(ge=0)] = 5000
    retention_days: NonNegative = 0.0
    # PostgreSQL only: the read connections each replica keeps (its writer has one more of its own).
    read_connections: Count = 4

    @property
    def target(self) -> str:
        """What the daemon stores into: ``url`` if set (a URL, or a path), else ``path``."""
        return self.url or self.path

    @property
    def postgres(self) -> bool:
        return is_postgres_url(self.target)


class IngestConfig(_Section, frozen=True):
    ack: Literal["durable", "enqueued"] = "durable"
    max_body_bytes: Count = 16 * 1024 * 1024
    mailbox_size: Count = 64
    max_inflight_mib: Count = 256
    max_inflight_messages: Count = 1_000_000
    batch_max_rows: Count = 20_000
    batch_max_delay_ms: NonNegative = 0.0
    ack_timeout_s: Positive = 10.0
    retry_after_s: Count = 1


if TYPE_CHECKING:

    class WebhooksConfig(_Section, frozen=True):
        """``webhooks.<source>``: one section per source of the registry that has settings."""

        def __getattr__(self, name: str) -> Any: ...

else:
    # Built from the registry, so a new source's settings need no line here.
    WebhooksConfig = msgspec.defstruct(
        "WebhooksConfig",
        [(s.name, s.settings, msgspec.field(default_factory=s.settings)) for s in WEBHOOK_SOURCES],
        bases=(_Section,),
        frozen=True,
        forbid_unknown_fields=True,
        kw_only=True,
        module=__name__,
    )


class ApiConfig(_Section, frozen=True):
    token: Secret = ""
    # A token that opens /metrics only: the scraper then holds no key to the transcripts.
    metrics_token: Secret = ""
    # Without api.token, serve refuses a non-loopback address unless this says reads are meant to be public.
    reads_open_to_everyone: bool = False


class CacheConfig(_Section, frozen=True):
    ttl_s: Positive = 60.0
    max_entries: Count = 10_000


class ReconcileConfig(_Section, frozen=True):
    # Seconds between the daemon's reconcile passes (for each source with webhooks.<source>.api_key); 0: off.
    interval_s: NonNegative = 300.0
    # A conversation that started here with no transcript after this long is fetched from the vendor.
    grace_s: NonNegative = 900.0
    # How far back each pass looks, in the vendor's list and here: longer than your longest call.
    window_s: Positive = 21600.0
    max_per_pass: Count = 200  # conversations fetched per source per pass, at most
    request_timeout_s: Positive = 10.0
    max_attempts: Count = 5  # per request: 429s (after Retry-After), 5xx and network errors are retried
    max_concurrent_requests: Count = 4  # per vendor


class ChangesConfig(_Section, frozen=True):
    # Record every commit's changes in the outbox (the feed and outbound notifications read it). Off only for
    # deployments that neither notify nor read the feed.
    enabled: bool = True
    # The longest a `GET /changes?wait=` long-poll waits, whatever longer `wait` it asks for.
    max_wait_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 60.0
    # Seconds between the comment lines that keep an idle `GET /changes/stream` open through proxies.
    heartbeat_s: Positive = 15.0


class SearchConfig(_Section, frozen=True):
    # The full-text index over messages (GET /search): kept in step with every write. Off empties it and
    # saves its cost at ingest; on again rebuilds it in the background.
    enabled: bool = True


class NotifyConfig(_Section, frozen=True):
    # Where each committed change is POSTed: a URL, a list of them, or (from the environment) several
    # separated by spaces. Empty: no outbound webhooks.
    url: str | list[str] = ""
    # Standard Webhooks signing key(s), whsec_<base64>; required with a url. Several, space-separated,
    # sign with each (a rotation: receivers accept any).
    signing_secret: Secret = ""
    # Seconds between attempts of one change, the last one repeating (each waited up to 25% longer, at
    # random); a 429 or 503 with Retry-After waits what the receiver asks instead. Space-separated in env.
    retry_schedule: list[NonNegative] | str = msgspec.field(default_factory=lambda: [1.0, 5.0, 30.0, 120.0, 600.0])
    max_age_s: Positive = 86_400.0  # a change not delivered after this long (since committed) is marked failed
    timeout_s: Positive = 10.0  # per attempt, the whole request
    max_parallel: Count = 8  # attempts in flight per receiver, each to a different conversation
    include_messages: bool = False  # the body carries the messages the change added or updated
    keep_days: NonNegative = 7.0  # delivered changes older than this leave the outbox; 0: keep them all

    def __post_init__(self) -> None:
        receivers = self.receivers
        for url in receivers:
            if not re.fullmatch(r"https?://[^\s/]+.*", url):
                raise ValueError(f"notify.url {url_label(url)!r} is not an http:// or https:// URL")
        if receivers and not self.signing_secret.strip():
            raise ValueError("notify.url is set without notify.signing_secret: every notification is signed")
        try:
            parse_secrets(self.signing_secret)
        except ValueError as exc:
            raise ValueError(f"notify.signing_secret: {exc}") from None
        if not self.schedule:
            raise ValueError("notify.retry_schedule needs at least one number of seconds")

    @property
    def receivers(self) -> tuple[str, ...]:
        urls = self.url.split() if isinstance(self.url, str) else self.url
        return tuple(dict.fromkeys(u.strip() for u in urls if u.strip()))

    @property
    def schedule(self) -> tuple[float, ...]:
        if not isinstance(self.retry_schedule, str):
            return tuple(self.retry_schedule)
        try:
            seconds = tuple(float(part) for part in self.retry_schedule.replace(",", " ").split())
        except ValueError:
            raise ValueError(f"notify.retry_schedule is not seconds: {self.retry_schedule!r}") from None
        if any(not 0 <= s < float("inf") for s in seconds):
            raise ValueError(f"notify.retry_schedule must be seconds >= 0: {self.retry_schedule!r}")
        return seconds


def url_label(url: str) -> str:
    """A URL without its query or credentials: what logs and errors may show of a receiver."""
    head = url.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = head.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else head[:60]


class Config(_Section, frozen=True):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    storage: StorageConfig = msgspec.field(default_factory=StorageConfig)
    ingest: IngestConfig = msgspec.field(default_factory=IngestConfig)
    webhooks: WebhooksConfig = msgspec.field(default_factory=WebhooksConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    cache: CacheConfig = msgspec.field(default_factory=CacheConfig)
    reconcile: ReconcileConfig = msgspec.field(default_factory=ReconcileConfig)
    changes: ChangesConfig = msgspec.field(default_factory=ChangesConfig)
    search: SearchConfig = msgspec.field(default_factory=SearchConfig)
    notify: NotifyConfig = msgspec.field(default_factory=NotifyConfig)

    def __post_init__(self) -> None:
        if self.notify.receivers and not self.changes.enabled:
            raise ValueError("notify.url is set with changes.enabled = false: there would be nothing to send")


class ConfigError(Exception):
    """A setting that cannot be used; the message names it."""


def setting_paths(struct: type[msgspec.Struct] = Config, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every leaf setting as a path of names, e.g. ("webhooks", "tavus", "token")."""
    for field in msgspec.structs.fields(struct):
        path = (*prefix, field.name)
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            yield from setting_paths(field.type, path)
        else:
            yield path


def secret_paths(struct: type[msgspec.Struct] = Config, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every setting marked ``Secret`` (``webhooks.tavus.token``, ``api.token``, ...)."""
    for field in msgspec.structs.fields(struct):
        path = (*prefix, field.name)
        if isinstance(field.type, type) and issubclass(field.type, msgspec.Struct):
            yield from secret_paths(field.type, path)
        elif is_secret(field.type):
            yield path


def env_name(path: tuple[str, ...]) -> str:
    return ENV_PREFIX + "_".join(path).upper()


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    known = {env_name(path): path for path in setting_paths()}
    overrides: dict[str, Any] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = known.get(name)
        if path is None:
            raise ConfigError(f"unknown environment variable {name}: no such setting")
        _set(overrides, path, value)
    return overrides


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_config(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config from the file (``config.toml`` in the working directory if present), env and flags.

    ``overrides`` are dotted setting names from command-line flags, e.g. ``{"server.port": 9000}``.
    """
    tree: dict[str, Any] = {}
    if path is not None or DEFAULT_CONFIG_FILE.is_file():
        file = path or DEFAULT_CONFIG_FILE
        try:
            tree = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    tree = _merge(tree, _env_overrides(os.environ if environ is None else environ))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set(tree, tuple(dotted.split(".")), value)
    try:
        # strict=False lets environment strings such as "8001" or "true" become ints and bools.
        return msgspec.convert(tree, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_name_setting(str(exc))) from None


def _name_setting(message: str) -> str:
    # msgspec says "... - at `$.server.port`"; say "server.port", the way config.toml and the docs do.
    head, _, where = message.partition(" - at `$")
    section = where.rstrip("`").lstrip(".")
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", head)
    if unknown:
        return f"unknown setting {'.'.join(filter(None, (section, unknown[1])))}"
    return f"{section}: {head}" if section else head
