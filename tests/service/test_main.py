"""``python -m bot`` itself: --version, --help and the one-line failures of the entry point, as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import bot

ROOT = Path(__file__).resolve().parents[2]


def run_bot_cli(*args: str, cwd: Path = ROOT, **settings: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "IMAGE_", "DATA_", "LOG_"))}
    env.update({"PYTHONPATH": str(ROOT), **{k.upper(): v for k, v in settings.items()}})
    return subprocess.run(
        [sys.executable, "-m", "bot", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_version_is_the_one_in_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert bot.__version__ == project["version"]
    done = run_bot_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"imagine-bot {project['version']}"


def test_help_says_that_no_subcommand_runs_the_bot() -> None:
    done = run_bot_cli("--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "With no subcommand, `python -m bot` runs the bot" in text
    for command in ("imagine", "sync", "check", "backup"):
        assert command in text


def test_a_missing_token_says_where_no_env_file_was_found(tmp_path: Path) -> None:
    done = run_bot_cli(cwd=tmp_path, data_dir=str(tmp_path / "data"), log_level="INFO")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: DISCORD_TOKEN: required to run the Discord bot (see .env.example); "
        f"no .env found at {tmp_path / '.env'}"
    ]


def test_license_and_changelog_match_the_project() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    license_text = (ROOT / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n")
    assert "Copyright (c) 2026 imagine-bot contributors" in license_text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert f"## [{project['version']}]" in changelog  # the version released is recorded
