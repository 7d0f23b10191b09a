"""No command or option ships undocumented: every option of every subcommand shows in its ``--help``
(run as operators run it, a real process), and every subcommand is named in the README."""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

import pytest

from daemon.cli import build_parser
from tests.daemon_process import REPO, cli_argv, daemon_env


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    found = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    assert len(found) == 1, found
    return dict(found[0].choices)


COMMANDS = subcommands()


def help_text(tmp_path: Path, *args: str) -> str:
    done = subprocess.run(
        cli_argv(*args, "--help"),
        cwd=tmp_path,
        env=daemon_env({"COLUMNS": "100"}),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def expected_words(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string (``--db``, ``-h``), and each positional argument's name as help shows it."""
    words: list[str] = []
    for action in parser._actions:
        if action.option_strings:
            words += action.option_strings
        elif not isinstance(action, argparse._SubParsersAction):
            words.append(str(action.metavar or action.dest))
    return words


def test_there_are_subcommands_and_serve_is_one() -> None:
    assert "serve" in COMMANDS
    assert {"export", "backup", "replay", "prune"} <= set(COMMANDS)


def test_top_level_help_lists_every_subcommand_and_option(tmp_path: Path) -> None:
    text = help_text(tmp_path)
    for word in [*COMMANDS, *expected_words(build_parser())]:
        assert word in text, f"{word!r} is missing from `transcriptd --help`:\n{text}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_lists_every_option(tmp_path: Path, command: str) -> None:
    text = help_text(tmp_path, command)
    assert f"transcriptd {command}" in text
    for word in expected_words(COMMANDS[command]):
        assert word in text, f"{word!r} is missing from `transcriptd {command} --help`:\n{text}"
    # Each option has a help line of its own, not only a mention in the usage line.
    options = text.partition("options:")[2]
    for action in COMMANDS[command]._actions:
        for option in action.option_strings:
            assert option in options, f"{option!r} has no help line in `transcriptd {command} --help`"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_is_in_the_readme(command: str) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert f"transcriptd {command}" in readme, f"README.md does not mention `transcriptd {command}`"
