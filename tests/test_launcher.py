"""The ``transcriptd`` console script starts from ``transcriptd_cli``, which refuses, in one line, a ``daemon`` or
``storage`` package that is not ours (python-daemon installs a ``daemon`` too) instead of an ImportError."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from daemon import __version__
from tests.daemon_process import daemon_env

# The console script pip made from pyproject's [project.scripts], beside the interpreter of this environment.
CONSOLE_SCRIPT = Path(sys.executable).parent / "transcriptd"


def commands() -> list[list[str]]:
    assert CONSOLE_SCRIPT.is_file(), f"no {CONSOLE_SCRIPT}: install the project (make test does)"
    return [[str(CONSOLE_SCRIPT)], [sys.executable, "-m", "transcriptd_cli"]]


def run(argv: list[str], cwd: Path, first_on_path: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = daemon_env()
    if first_on_path is not None:
        env["PYTHONPATH"] = os.pathsep.join((str(first_on_path), env["PYTHONPATH"]))
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_the_console_script_is_the_launcher() -> None:
    (entry,) = entry_points(group="console_scripts", name="transcriptd")
    assert entry.value == "transcriptd_cli:main"
    assert "from transcriptd_cli import main" in CONSOLE_SCRIPT.read_text(encoding="utf-8")


@pytest.mark.parametrize("argv", commands(), ids=["console-script", "python-m"])
def test_version_prints_the_version(tmp_path: Path, argv: list[str]) -> None:
    done = run([*argv, "--version"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"transcriptd {__version__}"


@pytest.mark.parametrize("argv", commands(), ids=["console-script", "python-m"])
@pytest.mark.parametrize("package", ["daemon", "storage"])
def test_a_shadowing_package_is_named_in_one_line_not_a_traceback(
    tmp_path: Path, argv: list[str], package: str
) -> None:
    shadows = tmp_path / "elsewhere"
    (shadows / package).mkdir(parents=True)
    # What python-daemon's package looks like from here: a top-level name, none of our modules.
    fake = shadows / package / "__init__.py"
    fake.write_text("class DaemonContext:\n    pass\n")
    done = run([*argv, "--version"], tmp_path, first_on_path=shadows)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"transcriptd: the {package!r} package found first ({fake})"), lines[0]
    assert "environment of its own" in lines[0]
    assert "Traceback" not in done.stderr
