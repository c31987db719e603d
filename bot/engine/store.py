"""The durable job store: one embedded SQLite file, so a restart knows what a dead process left behind.

Every write commits before it returns (autocommit, WAL). A damaged file is moved aside, never deleted, so an
operator can still look at it; the bot then starts with an empty store instead of crash-looping.

A job's state and its delivery are separate facts: ``save_job`` writes the state (the manager's), and
``mark_delivered`` records that the outcome reached the requester (the frontend's). A finished job with a
message and neither ``delivered_at`` nor ``delivery_error`` was never posted: ``undelivered_jobs`` finds it.

Which process answers for a job is the PostgreSQL store's business (a fleet shares one database there); one
process owns an SQLite file (``DATA_DIR/bot.lock``), so here every job is this process's: ``claim_jobs`` hands
back what a dead predecessor left, ``take_over_jobs`` finds nothing, and ``save_job`` is never refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import aiosqlite

from bot.engine.models import ImageRequest, Job, JobState

log = logging.getLogger(__name__)

#: Forward migrations; ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``.
#: Never edit a shipped entry: add a new one (new columns come with a new migration).
MIGRATIONS: list[Sequence[str]] = [
    (
        """
        CREATE TABLE jobs (
            id            TEXT PRIMARY KEY,
            request       TEXT NOT NULL,
            guild_id      INTEGER NOT NULL,
            channel_id    INTEGER,
            user_id       INTEGER NOT NULL,
            state         TEXT NOT NULL,
            created_at    REAL NOT NULL,
            started_at    REAL,
            finished_at   REAL,
            backend       TEXT,
            message_ref   TEXT,
            cache_key     TEXT,
            image_refs    TEXT NOT NULL DEFAULT '[]',
            seeds         TEXT NOT NULL DEFAULT '[]',
            from_cache    INTEGER NOT NULL DEFAULT 0,
            error_reason  TEXT,
            error_message TEXT,
            cancelled_by  TEXT
        )
        """,
        "CREATE INDEX jobs_guild_user_state ON jobs (guild_id, user_id, state)",
        "CREATE INDEX jobs_state ON jobs (state)",
        "CREATE INDEX jobs_finished_at ON jobs (finished_at)",
        """
        CREATE TABLE guild_settings (
            guild_id   INTEGER PRIMARY KEY,
            settings   TEXT NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    # v2: the backend's own id for a submitted generation (AI Horde), so a restart can follow it up.
    ("ALTER TABLE jobs ADD COLUMN backend_ref TEXT",),
    # v3: delivery is recorded beside the state. Jobs already finished before the upgrade count as delivered
    # (the old process posted them or never will), so a restart does not post years of history again.
    (
        "ALTER TABLE jobs ADD COLUMN delivered_at REAL",
        "ALTER TABLE jobs ADD COLUMN delivery_error TEXT",
        "UPDATE jobs SET delivered_at = COALESCE(finished_at, created_at) WHERE state NOT IN ('queued', 'running')",
        "CREATE INDEX jobs_undelivered ON jobs (state) WHERE delivered_at IS NULL AND delivery_error IS NULL",
    ),
]

_JOB_COLUMNS = (
    "id",
    "request",
    "guild_id",
    "channel_id",
    "user_id",
    "state",
    "created_at",
    "started_at",
    "finished_at",
    "backend",
    "message_ref",
    "cache_key",
    "image_refs",
    "seeds",
    "from_cache",
    "error_reason",
    "error_message",
    "cancelled_by",
    "backend_ref",
)
#: Read with the rest, written only by ``mark_delivered``: ``save_job`` never touches them.
_DELIVERY_COLUMNS = ("delivered_at", "delivery_error")
_SELECT_JOBS = f"SELECT {', '.join(_JOB_COLUMNS + _DELIVERY_COLUMNS)} FROM jobs"
# One statement, the same text every time: sqlite3's statement cache prepares it once per connection.
_UPSERT_JOB = (
    f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) VALUES ({', '.join('?' * len(_JOB_COLUMNS))}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _JOB_COLUMNS[1:])}"
)
_UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value)
#: Jobs somebody still has to answer for: queued or running, or finished with a message and never posted.
_UNSETTLED = (
    "delivered_at IS NULL AND delivery_error IS NULL "
    "AND (state IN ('queued', 'running') OR message_ref IS NOT NULL)"
)

# SQLite primary result codes (exceptions carry the extended code; the low byte is the primary one).
_SQLITE_PERM = 3
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_READONLY = 8
_SQLITE_CORRUPT = 11
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


class StoreError(Exception):
    """The store cannot do what was asked; ``message`` is one line an operator can act on."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobTaken(Exception):
    """``save_job`` refused: another process has claimed the job since this one last wrote it (its lease had
    lapsed). Not a StoreError: retrying cannot help, the job is no longer this process's to write or post."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} belongs to another process now")
        self.job_id = job_id


class ShardFilter(NamedTuple):
    """The guilds a process serves: those whose gateway shard ``(guild_id >> 22) % count`` is in ``ids``."""

    count: int
    ids: tuple[int, ...]

    def owns(self, guild_id: int) -> bool:
        return (guild_id >> 22) % self.count in self.ids

    def sql(self, bind: Callable[[Any], str]) -> str:
        """The same test as a condition on ``jobs.guild_id`` (``bind`` adds a parameter, returns its mark)."""
        return f"((guild_id >> 22) % {bind(self.count)}) IN ({', '.join(bind(i) for i in self.ids)})"


class StoreCorrupt(StoreError):
    """The database file was damaged and has been moved aside (kept, never deleted)."""

    def __init__(self, message: str, *, path: Path, moved_to: Path) -> None:
        super().__init__(message)
        self.path = path
        self.moved_to = moved_to


class StoreLocked(StoreError):
    """Another process holds the database's lock (most likely a second copy of the bot)."""


def sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of ``exc``, or None when it carries none."""
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def is_corruption(exc: BaseException) -> bool:
    """True for "not a database" / "malformed" errors: the file itself is bad, retrying will not help."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    if sqlite_code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    text = str(exc).lower()
    return "not a database" in text or "malformed" in text


def is_locked(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    return sqlite_code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED) or "locked" in str(exc).lower()


def move_aside_sync(path: Path) -> Path:
    """Rename ``path`` (and its ``-wal``/``-shm`` companions) to ``<name>.corrupt-<UTC timestamp>``.

    The companions keep their suffix after the new name, so SQLite still pairs them if someone opens the
    moved file to investigate. Blocking: call through :func:`asyncio.to_thread`.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
        counter += 1
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            os.replace(companion, target.with_name(target.name + suffix))
    return target


SQLITE_HEADER = b"SQLite format 3\x00"


def has_foreign_header_sync(path: Path) -> bool:
    """True when ``path`` exists, is not empty and is not an SQLite file.

    SQLite would silently overwrite a short garbage file as if it were a new database; checking the magic
    header first means such a file is moved aside instead. (An empty file is a valid, new database.)
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
    except FileNotFoundError:
        return False
    return bool(head) and head != SQLITE_HEADER


def _prepare_sync(path: Path) -> bool:
    """Create the directory and check it is writable; return True when ``path`` is not an SQLite file."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, "not writable")
    return has_foreign_header_sync(path)


def _job_params(job: Job) -> tuple[Any, ...]:
    return (
        job.id,
        json.dumps(job.request.to_dict(), separators=(",", ":")),
        job.guild_id,
        job.channel_id,
        job.user_id,
        job.state.value,
        job.created_at,
        job.started_at,
        job.finished_at,
        job.backend,
        None if job.message_ref is None else json.dumps(job.message_ref, separators=(",", ":")),
        job.cache_key,
        json.dumps(job.image_refs),
        json.dumps(job.seeds),
        int(job.from_cache),
        job.error_reason,
        job.error_message,
        job.cancelled_by,
        job.backend_ref,
    )


def _job_from_row(row: Sequence[Any]) -> Job | None:
    """Rebuild a Job; a row this code cannot read is logged and skipped rather than failing the whole query."""
    values = dict(zip(_JOB_COLUMNS + _DELIVERY_COLUMNS, row, strict=True))
    try:
        return Job(
            id=values["id"],
            request=ImageRequest.from_dict(json.loads(values["request"])),
            guild_id=values["guild_id"],
            channel_id=values["channel_id"],
            user_id=values["user_id"],
            state=JobState(values["state"]),
            created_at=values["created_at"],
            started_at=values["started_at"],
            finished_at=values["finished_at"],
            backend=values["backend"],
            message_ref=None if values["message_ref"] is None else json.loads(values["message_ref"]),
            cache_key=values["cache_key"],
            image_refs=list(json.loads(values["image_refs"])),
            seeds=list(json.loads(values["seeds"])),
            from_cache=bool(values["from_cache"]),
            error_reason=values["error_reason"],
            error_message=values["error_message"],
            cancelled_by=values["cancelled_by"],
            backend_ref=values["backend_ref"],
            delivered_at=values["delivered_at"],
            delivery_error=values["delivery_error"],
        )
    except (ValueError, TypeError, KeyError) as exc:
        log.warning("skipping unreadable job row %r: %s", values.get("id"), exc)
        return None


class JobStore:
    """Jobs, per-guild settings and small key/value metadata in ``<DATA_DIR>/bot.sqlite3``."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._db: aiosqlite.Connection | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the file is healthy and migrate it; raise a one-line StoreError if it cannot be used."""
        if self._db is not None:
            return
        directory = self.path.parent
        try:
            foreign = await asyncio.to_thread(_prepare_sync, self.path)
        except OSError as exc:
            raise StoreError(
                f"Cannot use the data directory {directory}: {exc.strerror or exc}; "
                "check DATA_DIR and its permissions."
            ) from None
        if foreign:
            raise await self._quarantine("file is not a database")
        try:
            self._db = await aiosqlite.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._translate(exc, "open") from None
        try:
            await self._setup()
        except BaseException as exc:
            await self._close_quietly()
            if isinstance(exc, sqlite3.Error) and is_corruption(exc):
                raise await self._quarantine(str(exc)) from None
            if isinstance(exc, sqlite3.Error):
                raise self._translate(exc, "open") from None
            raise
        log.info("job store open at %s (schema v%d)", self.path, len(MIGRATIONS))

    async def _setup(self) -> None:
        db = self._require()
        await db.execute_fetchall(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
        # Check before changing anything (journal mode), so a damaged file is moved aside as it was found.
        rows = list(await db.execute_fetchall("PRAGMA quick_check"))
        if not rows or rows[0][0] != "ok":
            detail = "; ".join(str(r[0]) for r in rows[:3]) or "no answer"
            raise sqlite3.DatabaseError(f"database disk image is malformed (quick_check: {detail})")
        await db.execute_fetchall("PRAGMA journal_mode = WAL")
        await db.execute_fetchall("PRAGMA synchronous = NORMAL")
        await db.execute_fetchall("PRAGMA foreign_keys = ON")
        await self._migrate()

    async def _migrate(self) -> None:
        db = self._require()
        (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
        target = len(MIGRATIONS)
        if version > target:
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this bot understands ({target}); "
                "run a newer version of the bot or point DATA_DIR elsewhere."
            )
        if version == target:
            return
        # BEGIN IMMEDIATE: take the write lock up front so two starting processes cannot both migrate.
        await db.execute_fetchall("BEGIN IMMEDIATE")
        try:
            (version,) = next(iter(await db.execute_fetchall("PRAGMA user_version")))
            for number in range(version, target):
                for statement in MIGRATIONS[number]:
                    await db.execute_fetchall(statement)
                log.info("migrated %s to schema v%d", self.path, number + 1)
            await db.execute_fetchall(f"PRAGMA user_version = {target}")
            await db.execute_fetchall("COMMIT")
        except BaseException:
            await db.execute_fetchall("ROLLBACK")
            raise

    async def _quarantine(self, detail: str) -> StoreError:
        """Move the damaged file aside and build the error to raise (StoreCorrupt unless the move failed)."""
        try:
            moved_to = await asyncio.to_thread(move_aside_sync, self.path)
        except OSError as exc:
            return StoreError(
                f"The database {self.path} is corrupt ({detail}) and could not be moved aside: "
                f"{exc.strerror or exc}."
            )
        message = (
            f"The database {self.path} is corrupt ({detail}); it was moved to {moved_to} and a new one "
            "will be created on the next start."
        )
        # Not logged here: the caller reports it, once, as the one line start-up stops with.
        return StoreCorrupt(message, path=self.path, moved_to=moved_to)

    def _translate(self, exc: sqlite3.Error, action: str) -> StoreError:
        if is_locked(exc):
            return StoreLocked(
                f"The database {self.path} is locked by another process; "
                "is another copy of the bot running with the same DATA_DIR?"
            )
        code = sqlite_code(exc)
        if code in (_SQLITE_CANTOPEN, _SQLITE_READONLY, _SQLITE_PERM):
            return StoreError(
                f"Cannot write the database {self.path} in {self.path.parent} ({exc}); "
                "check DATA_DIR and its permissions."
            )
        return StoreError(f"Job store failed to {action} ({self.path}): {exc}")

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        try:
            # Cheap housekeeping the SQLite docs recommend before closing a long-lived connection.
            await db.execute_fetchall("PRAGMA optimize")
        except sqlite3.Error as exc:
            log.debug("PRAGMA optimize failed: %s", exc)
        await db.close()

    async def _close_quietly(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                await db.close()
            except Exception as exc:
                log.debug("closing the job store after a failed open: %s", exc)

    async def __aenter__(self) -> JobStore:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _require(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError(f"The job store {self.path} is not open.")
        return self._db

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run one statement (committed on return: autocommit); SQLite errors become StoreError."""
        db = self._require()
        try:
            return list(await db.execute_fetchall(sql, params))
        except sqlite3.Error as exc:
            raise self._translate(exc, "run a query") from None
        except ValueError as exc:  # aiosqlite: "Connection closed"
            raise StoreError(f"The job store {self.path} is closed: {exc}") from None

    @contextlib.asynccontextmanager
    async def advisory_lock(self, name: str) -> AsyncIterator[None]:
        """Work only one process may do at a time (PostgreSQL takes a lock). Nothing to take here: one process
        owns an SQLite store (it holds ``DATA_DIR/bot.lock``)."""
        yield

    # -- health ---------------------------------------------------------------------------------------------

    async def ping(self, timeout_s: float = 1.0) -> bool:
        """For /healthz: True when a trivial query answers quickly."""
        if self._db is None:
            return False
        try:
            rows = await asyncio.wait_for(self._db.execute_fetchall("SELECT 1"), timeout_s)
        except Exception:
            return False
        return list(rows) == [(1,)]

    # -- jobs -----------------------------------------------------------------------------------------------

    async def save_job(self, job: Job, *, any_owner: bool = False) -> None:
        """Insert or update every persisted field; durable when this returns. (Never :class:`JobTaken` here:
        one process owns the file. ``any_owner`` matters to the PostgreSQL store only.)"""
        await self._query(_UPSERT_JOB, _job_params(job))

    async def claim_jobs(self, *, shards: ShardFilter | None = None) -> list[Job]:
        """At start-up: the jobs a dead process left to answer for (queued, running, or finished and never
        posted), in ``shards``' guilds (None: every guild), oldest first. Here all of them are ours."""
        params: list[Any] = []

        def bind(value: Any) -> str:
            params.append(value)
            return "?"

        guilds = "" if shards is None else f" AND {shards.sql(bind)}"
        rows = await self._query(
            f"{_SELECT_JOBS} WHERE {_UNSETTLED}{guilds} ORDER BY created_at, rowid", params
        )
        return [job for row in rows if (job := _job_from_row(row)) is not None]

    async def take_over_jobs(self) -> dict[str, list[Job]]:
        """The jobs of processes that died while another lives on (by dead process): none, with one process."""
        return {}

    async def get_job(self, job_id: str) -> Job | None:
        rows = await self._query(f"{_SELECT_JOBS} WHERE id = ?", (job_id,))
        return _job_from_row(rows[0]) if rows else None

    async def unfinished_jobs(self) -> list[Job]:
        """Jobs still queued or running, oldest first: after a restart these were left by a dead process."""
        rows = await self._query(
            f"{_SELECT_JOBS} WHERE state IN (?, ?) ORDER BY created_at, rowid",
            _UNFINISHED,
        )
        return [job for row in rows if (job := _job_from_row(row)) is not None]

    async def undelivered_jobs(self) -> list[Job]:
        """Finished jobs with a Discord message whose outcome was never posted (the process died while posting
        or before), oldest first: after a restart these are posted again."""
        rows = await self._query(
            f"{_SELECT_JOBS} WHERE state NOT IN (?, ?) AND delivered_at IS NULL AND delivery_error IS NULL "
            "AND message_ref IS NOT NULL ORDER BY created_at, rowid",
            _UNFINISHED,
        )
        return [job for row in rows if (job := _job_from_row(row)) is not None]

    async def mark_delivered(self, job_id: str, *, at: float, error: str | None = None) -> None:
        """Record that a finished job's outcome was posted (``error`` None) or could not be (``error`` says why).

        Either way the job is settled for delivery: a restart does not post it again.
        """
        await self._query(
            "UPDATE jobs SET delivered_at = ?, delivery_error = ? WHERE id = ?",
            (None if error else at, error, job_id),
        )

    async def list_jobs(
        self,
        *,
        guild_id: int | None = None,
        user_id: int | None = None,
        states: Iterable[JobState] | None = None,
        limit: int = 25,
    ) -> list[Job]:
        """Newest first, optionally filtered by guild, user and state."""
        clauses: list[str] = []
        params: list[Any] = []
        if guild_id is not None:
            clauses.append("guild_id = ?")
            params.append(guild_id)
        if user_id is not None:
            clauses.append("user_id = ?")
            params.append(user_id)
        if states is not None:
            wanted = [JobState(s).value for s in states]
            if not wanted:
                return []
            clauses.append(f"state IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        params.append(max(0, int(limit)))
        rows = await self._query(
            f"{_SELECT_JOBS}{where} ORDER BY created_at DESC, rowid DESC LIMIT ?", params
        )
        return [job for row in rows if (job := _job_from_row(row)) is not None]

    async def count_images_since(self, *, guild_id: int, user_id: int, since: float) -> int:
        """Images a user really generated (not served from cache) since ``since``: the daily-quota count."""
        rows = await self._query(
            "SELECT COALESCE(SUM(json_array_length(seeds)), 0) FROM jobs "
            "WHERE guild_id = ? AND user_id = ? AND state = ? AND from_cache = 0 AND finished_at >= ?",
            (guild_id, user_id, JobState.SUCCEEDED.value, since),
        )
        return int(rows[0][0])

    async def count_images_by_user_since(self, since: float) -> dict[tuple[int, int], int]:
        """``count_images_since`` for every (guild, user) at once: loads today's quotas at start-up."""
        rows = await self._query(
            "SELECT guild_id, user_id, COALESCE(SUM(json_array_length(seeds)), 0) FROM jobs "
            "WHERE state = ? AND from_cache = 0 AND finished_at >= ? GROUP BY guild_id, user_id",
            (JobState.SUCCEEDED.value, since),
        )
        return {(int(g), int(u)): int(n) for g, u, n in rows if n}

    # -- retention ------------------------------------------------------------------------------------------

    async def referenced_image_refs(self, refs: Iterable[str]) -> set[str]:
        """Those of ``refs`` (image content hashes) that some job in the store still lists.

        One pass over the table with SQLite's JSON functions (no extra index, no schema change): this runs
        once per Delete or prune batch, on the store's worker thread.
        """
        wanted = sorted(set(refs))
        found: set[str] = set()
        if not wanted:
            return found
        if len(wanted) <= 8:
            # A Delete (a few images): a substring test per row is cheap and lets json_each parse only rows
            # that mention one of them.
            mentions = " OR ".join("instr(jobs.image_refs, ?) > 0" for _ in wanted)
            rows = await self._query(
                "SELECT DISTINCT refs.value FROM jobs, json_each(jobs.image_refs) AS refs "
                f"WHERE ({mentions}) AND refs.value IN ({', '.join('?' * len(wanted))})",
                (*wanted, *wanted),
            )
            return {str(row[0]) for row in rows}
        for start in range(0, len(wanted), 500):  # a prune batch: stay well under SQLite's parameter limit
            chunk = wanted[start : start + 500]
            rows = await self._query(
                "SELECT DISTINCT refs.value FROM jobs, json_each(jobs.image_refs) AS refs "
                f"WHERE jobs.image_refs != '[]' AND refs.value IN ({', '.join('?' * len(chunk))})",
                chunk,
            )
            found.update(str(row[0]) for row in rows)
        return found

    async def prune_finished_before(self, before: float, *, limit: int = 500) -> list[Job]:
        """Delete up to ``limit`` finished jobs whose ``finished_at`` is before ``before``; return them.

        Oldest first, through the ``finished_at`` index. Queued and running jobs are never pruned.
        """
        terminal = [state.value for state in JobState if state.is_terminal]
        rows = await self._query(
            f"{_SELECT_JOBS} WHERE finished_at < ? AND state IN ({', '.join('?' * len(terminal))}) "
            "ORDER BY finished_at LIMIT ?",
            (before, *terminal, max(1, int(limit))),
        )
        if not rows:
            return []
        ids = [row[0] for row in rows]
        await self._query(f"DELETE FROM jobs WHERE id IN ({', '.join('?' * len(ids))})", ids)
        return [job for row in rows if (job := _job_from_row(row)) is not None]

    # -- guild settings and meta ------------------------------------------------------------------------------

    async def all_guild_settings(self) -> dict[int, dict[str, Any]]:
        """Every guild's settings document (unreadable ones skipped with a warning): loaded at start-up."""
        rows = await self._query("SELECT guild_id, settings FROM guild_settings")
        documents = ((int(guild_id), guild_settings_document(guild_id, text)) for guild_id, text in rows)
        return {guild_id: value for guild_id, value in documents if value is not None}

    async def get_guild_settings(self, guild_id: int) -> dict[str, Any]:
        rows = await self._query("SELECT settings FROM guild_settings WHERE guild_id = ?", (guild_id,))
        return (guild_settings_document(guild_id, rows[0][0]) if rows else None) or {}

    async def set_guild_settings(self, guild_id: int, values: dict[str, Any]) -> None:
        """Replace the guild's whole settings document."""
        document = json.dumps(values, separators=(",", ":"), sort_keys=True)
        await self._query(
            "INSERT INTO guild_settings (guild_id, settings, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (guild_id) DO UPDATE SET settings = excluded.settings, updated_at = excluded.updated_at",
            (guild_id, document, time.time()),
        )

    async def get_meta(self, key: str) -> str | None:
        rows = await self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._query(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )


def guild_settings_document(guild_id: object, text: str) -> dict[str, Any] | None:
    """A stored settings document, or None (with a warning) when it cannot be read: defaults apply then."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        log.warning("guild %s settings are unreadable, using defaults: %s", guild_id, exc)
        return None
    return value if isinstance(value, dict) else None
