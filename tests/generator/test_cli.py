"""The CLI skeleton: help with examples, version, and user errors as one line, exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from tritonforge.generator import cli

from tritonforge import __version__

GENERATOR = str(Path(sys.executable).parent / "generator")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tritonforge.generator.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_version_is_the_package_version():
    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"generator {__version__}"


def test_help_lists_every_command_with_examples():
    result = _run("--help")
    assert result.returncode == 0
    for name in cli.COMMANDS:
        assert name in result.stdout
    assert "examples:" in result.stdout


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_command_has_examples_in_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_no_command_prints_help_and_fails():
    result = _run()
    assert result.returncode == 1 and "usage:" in result.stdout


def test_user_error_is_one_line_without_traceback(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITONSERVER", str(tmp_path / "missing-tritonserver"))
    monkeypatch.setenv("TRITONFORGE_CACHE", str(tmp_path / "cache"))
    result = subprocess.run([GENERATOR, "demo", "-o", str(tmp_path / "repo")],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: TRITONSERVER=")
    assert "Traceback" not in result.stderr


def test_the_console_script_is_installed():
    result = subprocess.run([GENERATOR, "--version"], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and __version__ in result.stdout
