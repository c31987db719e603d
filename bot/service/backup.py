"""``python -m bot backup FILE``: a consistent copy of the job store while the bot keeps running.

SQLite's online backup API copies the database in one step under a read transaction: in WAL mode (the
store's mode) that snapshot never blocks the running bot's writes, and the copy is of one moment, whatever
was written during it. The copy is written beside FILE, checked (``PRAGMA quick_check``) and only then renamed
to FILE, so FILE is either the old file or a complete backup, never half of one. Restoring is copying FILE
back to ``DATA_DIR/bot.sqlite3`` while the bot is stopped.

Only ``bot.sqlite3`` is copied: the image cache (``DATA_DIR/cache``) is disposable and rebuilt as used.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from bot.settings import Settings

DATABASE_NAME = "bot.sqlite3"


class BackupError(Exception):
    """The backup could not be made; the message is one line saying why and what to check."""


@dataclass(frozen=True)
class BackupReport:
    source: Path
    target: Path
    jobs: int
    size: int


def backup_sync(source: Path, target: Path) -> BackupReport:
    """Copy the database ``source`` to ``target`` atomically. Blocking: run in a worker thread."""
    if not source.is_file():
        raise BackupError(f"no job store at {source}: check DATA_DIR (the bot creates it on first start)")
    if target.exists() and target.resolve() == source.resolve():
        raise BackupError(f"{target} is the live database itself; give another file name")
    if target.is_dir():
        raise BackupError(f"{target} is a directory; give a file name")
    if not target.parent.is_dir():
        raise BackupError(f"{target.parent} does not exist")
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        # A short busy timeout is enough: in WAL mode a reader only waits while a checkpoint resets the log.
        with contextlib.closing(sqlite3.connect(source, timeout=10.0)) as src:
            with contextlib.closing(sqlite3.connect(temporary)) as dst:
                src.backup(dst)  # pages=-1: the whole database in one step, one consistent snapshot
                (check,) = dst.execute("PRAGMA quick_check").fetchone()
                if check != "ok":
                    raise BackupError(f"the copy of {source} failed its integrity check ({check})")
                jobs = _count_jobs(dst)
                dst.commit()
        with open(temporary, "rb") as handle:  # the copy is on disk before it takes FILE's name
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    except sqlite3.Error as exc:
        raise BackupError(f"cannot back up {source}: {exc}") from None
    except OSError as exc:
        raise BackupError(f"cannot write {exc.filename or target}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
    return BackupReport(source, target, jobs, target.stat().st_size)


def _count_jobs(db: sqlite3.Connection) -> int:
    try:
        return int(db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
    except sqlite3.OperationalError:  # not a job store after all (no jobs table): a copy is still a copy
        return 0


async def run_backup(settings: Settings, target: Path) -> int:
    """Returns the exit status: 0, or 2 with one line on stderr."""
    if settings.database_url is not None:
        # The jobs live in PostgreSQL; a bot.sqlite3 left in DATA_DIR from before the switch is not the data.
        print(
            "error: backup: DATABASE_URL is set, so the jobs are in PostgreSQL: back it up with "
            "pg_dump --format=custom (see the README's PostgreSQL section)",
            file=sys.stderr,
        )
        return 2
    source = settings.data_dir / DATABASE_NAME
    try:
        report = await asyncio.to_thread(backup_sync, source, target)
    except BackupError as exc:
        print(f"error: backup: {exc}", file=sys.stderr)
        return 2
    jobs = "1 job" if report.jobs == 1 else f"{report.jobs} jobs"
    print(f"backed up {report.source} to {report.target} ({jobs}, {report.size // 1024} KiB)")
    return 0
