from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec
import pytest

from daemon.config import Config, ConfigError, env_name, load_config, setting_paths
from tests.receiver import SIGNING_SECRET

REPO = Path(__file__).resolve().parent.parent


def test_config_toml_lists_every_setting_with_its_default() -> None:
    from_file = tomllib.loads((REPO / "config.toml").read_text())
    assert msgspec.convert(from_file, Config) == Config()

    def leaves(tree: dict[str, object], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
        found: set[tuple[str, ...]] = set()
        for key, value in tree.items():
            found |= leaves(value, (*prefix, key)) if isinstance(value, dict) else {(*prefix, key)}
        return found

    assert leaves(from_file) == set(setting_paths())


def test_every_setting_in_config_toml_has_a_comment() -> None:
    for line in (REPO / "config.toml").read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line, f"config.toml: no comment on {line!r}"


def test_precedence_is_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text('[server]\nport = 9001\nhost = "0.0.0.0"\n[storage]\npath = "file.db"\n')
    env = {"TRANSCRIPTD_SERVER_PORT": "9002", "TRANSCRIPTD_WEBHOOKS_TAVUS_TOKEN": "from-env"}
    config = load_config(file, environ=env, overrides={"server.port": 9003, "server.host": None})
    assert config.server.port == 9003  # flag
    assert config.webhooks.tavus.token == "from-env"  # env
    assert config.server.host == "0.0.0.0"  # file (a flag left unset does not override)
    assert config.storage.path == "file.db"  # file
    assert config.ingest.ack == "durable"  # default
    assert load_config(file, environ=env).server.port == 9002


def test_environment_strings_become_typed_values(tmp_path: Path) -> None:
    env = {
        "TRANSCRIPTD_INGEST_ACK_TIMEOUT_S": "2.5",
        "TRANSCRIPTD_STORAGE_SYNCHRONOUS": "normal",
        "TRANSCRIPTD_INGEST_MAILBOX_SIZE": "8",
    }
    config = load_config(Path("/dev/null"), environ=env)
    assert config.ingest.ack_timeout_s == 2.5
    assert config.storage.synchronous == "normal"
    assert config.ingest.mailbox_size == 8


@pytest.mark.parametrize(
    ("toml", "env", "named"),
    [
        ("[server]\nprot = 1\n", {}, "prot"),
        ("[srever]\nport = 1\n", {}, "srever"),
        ("[webhooks.tavus]\ntokn = 'x'\n", {}, "tokn"),
        ("[server]\nport = 'eighty'\n", {}, "server.port"),
        ("[server]\nport = 70000\n", {}, "server.port"),
        ("[ingest]\nack = 'sometimes'\n", {}, "ingest.ack"),
        ("", {"TRANSCRIPTD_SERVER_PORT": "x"}, "server.port"),
        ("", {"TRANSCRIPTD_SERVER_PROT": "1"}, "TRANSCRIPTD_SERVER_PROT"),
        ("[server\n", {}, "not valid TOML"),
        ("[notify]\nurl = 'https://app.test/hooks'\n", {}, "notify.signing_secret"),
        (f"[notify]\nurl = 'ftp://app.test/hooks'\nsigning_secret = '{SIGNING_SECRET}'\n", {}, "notify.url"),
        ("[notify]\nsigning_secret = 'whsec_!!'\n", {}, "notify.signing_secret"),
        ("", {"TRANSCRIPTD_NOTIFY_RETRY_SCHEDULE": "soon"}, "notify.retry_schedule"),
        ("[notify]\nretry_schedule = []\n", {}, "notify.retry_schedule"),
        (
            f"[changes]\nenabled = false\n[notify]\nurl = 'http://a.test/h'\nsigning_secret = '{SIGNING_SECRET}'\n",
            {},
            "changes.enabled",
        ),
    ],
)
def test_a_bad_setting_stops_start_up_naming_it(tmp_path: Path, toml: str, env: dict[str, str], named: str) -> None:
    file = tmp_path / "c.toml"
    file.write_text(toml)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("[", r"\[")):
        load_config(file, environ=env)


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_env_names_follow_section_and_key() -> None:
    names = {env_name(path) for path in setting_paths()}
    assert {"TRANSCRIPTD_SERVER_PORT", "TRANSCRIPTD_STORAGE_PATH", "TRANSCRIPTD_WEBHOOKS_TAVUS_TOKEN"} <= names


def test_readme_documents_every_setting_and_its_environment_variable() -> None:
    readme = (REPO / "README.md").read_text()
    for path in setting_paths():
        assert f"`{'.'.join(path)}`" in readme, f"README does not document {'.'.join(path)}"
        assert env_name(path) in readme


def test_notify_takes_one_url_a_list_or_several_in_the_environment(tmp_path: Path) -> None:
    file = tmp_path / "c.toml"
    file.write_text(f"[notify]\nurl = ['http://a.test/h', 'http://b.test/h']\nsigning_secret = '{SIGNING_SECRET}'\n")
    assert load_config(file, environ={}).notify.receivers == ("http://a.test/h", "http://b.test/h")
    env = {"TRANSCRIPTD_NOTIFY_URL": "http://a.test/h http://b.test/h?t=1", "TRANSCRIPTD_NOTIFY_RETRY_SCHEDULE": "1 5"}
    notify = load_config(file, environ=env).notify
    assert notify.receivers == ("http://a.test/h", "http://b.test/h?t=1")
    assert notify.schedule == (1.0, 5.0)
