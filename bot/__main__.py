"""Entry point: ``python -m bot`` runs the Discord bot; subcommands run the engine's tools.

python -m bot                      run the bot (no subcommand)
python -m bot imagine "PROMPT" --out FILE [...]
python -m bot sync [--clear]       push (or remove) the slash commands now
python -m bot check                diagnose the set-up
python -m bot backup FILE          copy the job store while the bot runs
python -m bot --version
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from bot import __version__
from bot.settings import Settings, SettingsError, load_settings

# discord.py (imported later, lazily) imports audioop for voice, which this bot never uses: don't warn about it.
warnings.filterwarnings("ignore", message="'audioop' is deprecated", category=DeprecationWarning)

EXIT_CONFIG = 2


DESCRIPTION = """Self-hosted /imagine Discord bot.

With no subcommand, `python -m bot` runs the bot: it connects to Discord and serves /imagine until SIGTERM or
Ctrl-C. The subcommands below are one-off tools and do not run the bot."""

EPILOG = """Settings come from the environment and from .env in the current directory (see .env.example);
`python -m bot check` says which .env it read."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bot",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"imagine-bot {__version__}")
    commands = parser.add_subparsers(dest="command", title="subcommands (each runs once and exits)")
    from bot.service.cli import add_imagine_arguments

    add_imagine_arguments(commands.add_parser("imagine", help="generate images from the command line"))
    sync = commands.add_parser("sync", help="sync the slash commands with Discord now")
    sync.add_argument("--clear", action="store_true", help="remove this bot's commands instead")
    commands.add_parser("check", help="validate settings, backend, token and data directory")
    backup = commands.add_parser(
        "backup", help="copy DATA_DIR/bot.sqlite3 to FILE with SQLite's online backup (safe while running)"
    )
    backup.add_argument(
        "file", type=Path, metavar="FILE", help="where to write the copy (replaced if it exists)"
    )
    return parser


def fail(message: str, status: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def log_secrets(settings: Settings) -> list[str]:
    """Every secret the logs must scrub: the token, the backend key and the database password."""
    secrets = [s.get_secret_value() for s in (settings.discord_token,) if s] + settings.backend_keys()
    if settings.database_url is not None:
        from bot.engine.store_pg import dsn_secrets

        secrets.extend(dsn_secrets(settings.database_url.get_secret_value()))
    return secrets


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        return fail(str(exc), EXIT_CONFIG)
    from bot.logs import configure_logging

    configure_logging(settings.log_level, settings.log_format, log_secrets(settings))
    try:
        return asyncio.run(_dispatch(settings, args))
    except KeyboardInterrupt:
        return 130


async def _dispatch(settings: Settings, args: argparse.Namespace) -> int:
    from bot.engine.store import StoreError

    try:
        if args.command == "imagine":
            from bot.service.cli import run_imagine

            return await run_imagine(settings, args)
        if args.command == "check":
            from bot.service.check import run_check

            return await run_check(settings)
        if args.command == "backup":
            from bot.service.backup import run_backup

            return await run_backup(settings, args.file)
        if args.command == "sync":
            from bot.service.app import run_sync

            return await run_sync(settings, clear=args.clear)
        from bot.service.app import run_bot

        return await run_bot(settings)
    except SettingsError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except StoreError as exc:
        return fail(exc.message, EXIT_CONFIG)


if __name__ == "__main__":
    sys.exit(main())
