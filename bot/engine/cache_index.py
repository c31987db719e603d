"""The result cache's index: what the cache holds, separate from the blob files themselves.

:class:`Index` is what :class:`bot.engine.cache.ResultCache` needs from an index; the invariants every
implementation keeps are in :mod:`bot.engine.cache`'s docstring. Two implementations:

- :class:`SqliteIndex` (here): ``DATA_DIR/cache/index.sqlite3``, used without ``DATABASE_URL``. Each call runs
  in a worker thread under a thread lock and ``flock`` on ``index.lock`` (processes sharing the directory).
  Its ``totals`` row (entries, bytes) is kept by triggers on ``entries`` and ``blobs`` in the transaction of
  every write, and recounted at open: no write counts the cache, so a write costs the same in a cache of a
  thousand entries as in one of a hundred thousand.
- :class:`bot.engine.cache_pg.PgIndex`: tables of the PostgreSQL job store's database, used with
  ``DATABASE_URL``.

An index never reads or writes blob files itself: the cache hands it blocking callbacks (write these files,
unlink those, is this file still bad?) which the index runs inside its critical section, off the event loop.
Every failure of the index is :class:`IndexUnavailable` (a miss for the cache); a callback's ``OSError`` is
passed through as it is.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from bot.engine.store import has_foreign_header_sync, is_corruption, move_aside_sync

log = logging.getLogger(__name__)

T = TypeVar("T")

#: 2: the ``totals`` row and its triggers (an index of version 1 is migrated in place at open).
INDEX_VERSION = 2
INDEX_NAME = "index.sqlite3"
LOCK_NAME = "index.lock"


class IndexUnavailable(Exception):
    """The index cannot answer now (a database away, a file error, a corrupt index): a miss, not an error.

    ``reported``: its cause has been logged already where it happened (the job store's one line for a
    database outage), so the cache does not warn about it again."""

    def __init__(self, message: str, *, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


@dataclass(frozen=True, slots=True)
class BlobRow:
    """One content-addressed image file: ``blobs/<ref[:2]>/<ref>.<ext>``."""

    ref: str
    ext: str
    format: str
    width: int
    height: int
    size: int


@dataclass(frozen=True, slots=True)
class EntryRow:
    """One cache entry; ``images`` is the cache's JSON (each image's ref, format, size and seed), opaque here."""

    key: str
    created_at: float
    backend: str
    model: str | None
    elapsed_s: float
    images: str
    total_bytes: int


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the index knows of a key: its entry, if any, and whether another process is filling it."""

    entry: EntryRow | None
    #: Another live process of the fleet claimed this key's fill (it is generating the result): rather than
    #: generate it again, wait for its put (:meth:`Index.load` with ``claim_after``).
    filling_elsewhere: bool = False
    #: This process holds the key's fill claim now (it claimed it, or held it already).
    claimed: bool = False


@dataclass(frozen=True, slots=True)
class Totals:
    entries: int = 0
    bytes: int = 0


#: Write the files of the entry being added; given the refs already indexed (their files are trusted if present).
WriteFiles = Callable[[set[str]], None]
#: Delete these blob files (ref, ext), which no entry or pin references any more.
UnlinkFiles = Callable[[list[tuple[str, str]]], None]
#: Is this blob's file still missing or damaged (read again inside the critical section)?
StillBad = Callable[[BlobRow], bool]


class Index(Protocol):
    """What the cache asks of its index. Methods that may unlink files take the lock that every writer of the
    index takes (see the cache's invariants); the others are plain reads, or the touch of one row."""

    #: Entries and the bytes of every indexed blob, as of this index's latest write (or :meth:`open`).
    totals: Totals

    async def open(self, unlink: UnlinkFiles) -> None:
        """Ready the index; raise ``OSError`` or :class:`IndexUnavailable` when the cache cannot be used.
        ``unlink``: for blobs found unreferenced on the way."""

    async def close(self) -> None: ...

    async def load(self, key: str, *, claim_after: float | None = None) -> Lookup:
        """The entry for ``key``. With ``claim_after`` (a fleet, where processes share the index): when there
        is no entry created after it, also claim the key's *fill* for this process, unless another live
        process holds that claim (``filling_elsewhere``). A claim ends with this process's :meth:`add` of the
        key, its :meth:`release_fill`, or its death. Indexes that serve one process ignore ``claim_after``."""

    async def release_fill(self, key: str) -> None:
        """This process will not add ``key`` after all (its generation failed or was stopped): processes waiting
        for the fill are told, and the next to look claims it."""

    async def touch(self, key: str, now: float) -> bool:
        """Mark the entry used; False when there is no such entry (any more)."""

    async def add(
        self, entry: EntryRow, blobs: Sequence[BlobRow], write: WriteFiles, unlink: UnlinkFiles
    ) -> float | None:
        """``write`` the entry's files, index the entry (replacing one with its key), ``unlink`` the files of the
        replaced entry's blobs nothing references any more, and end this process's claim of the key's fill.
        No file the entry uses is missing when this returns. Returns the creation time of the oldest entry when
        that is cheap to know (None: ask :meth:`expired`), so that a put checks for expired entries only when
        there may be some."""

    async def remove(
        self, keys: Sequence[str], refs: Collection[str], keep: Collection[str], unlink: UnlinkFiles
    ) -> tuple[list[str], int]:
        """Under the lock: drop the entries ``keys``, then ``unlink`` the blobs of theirs and of ``refs`` that
        no entry or pin references and ``keep`` does not list. Returns the keys dropped, and how many files."""

    async def expired(self, created_before: float) -> list[str]:
        """Keys of the entries created at or before ``created_before``."""

    async def oldest(self, limit: int) -> list[tuple[str, int]]:
        """The ``limit`` least recently used entries (key, total bytes), least recent first."""

    async def blobs(self, refs: Collection[str]) -> dict[str, BlobRow]: ...

    async def refs_of(self, keys: Collection[str]) -> set[str]: ...

    async def drop_blob(self, ref: str, still_bad: StillBad, unlink: UnlinkFiles) -> list[str] | None:
        """Under the lock: if ``ref`` is indexed and ``still_bad``, drop it (its row and file, pinned or not) and
        every entry using it (with their blobs nothing else references); returns those entries' keys. None:
        nothing to drop (not indexed any more, or good again: another process wrote it since)."""

    async def pin(self, job_id: str, refs: Sequence[str]) -> None: ...

    async def unpin(self, job_id: str, unlink: UnlinkFiles) -> None: ...

    async def pinned_jobs(self) -> set[str]: ...

    async def known_refs(self) -> set[str]:
        """Every indexed blob ref (for the orphan sweep)."""


# -- SQLite --------------------------------------------------------------------------------------------------

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS entries (
        key          TEXT PRIMARY KEY,
        created_at   REAL NOT NULL,
        last_used_at REAL NOT NULL,
        backend      TEXT NOT NULL,
        model        TEXT,
        elapsed_s    REAL NOT NULL,
        images       TEXT NOT NULL,
        total_bytes  INTEGER NOT NULL
    )
    """,
    "CREATE INDEX IF NOT EXISTS entries_last_used ON entries (last_used_at)",
    "CREATE INDEX IF NOT EXISTS entries_created ON entries (created_at)",
    # Which blobs each entry uses: a blob with no row here (and no pin) is unreferenced and can go.
    "CREATE TABLE IF NOT EXISTS entry_blobs (key TEXT NOT NULL, ref TEXT NOT NULL, PRIMARY KEY (key, ref))",
    "CREATE INDEX IF NOT EXISTS entry_blobs_ref ON entry_blobs (ref)",
    # Images of jobs whose result is not posted yet: kept on disk past TTL and size eviction until unpinned
    # (a restart re-posts them from here). Entries still expire; only the pinned blobs stay.
    "CREATE TABLE IF NOT EXISTS pins (job TEXT NOT NULL, ref TEXT NOT NULL, PRIMARY KEY (job, ref))",
    "CREATE INDEX IF NOT EXISTS pins_ref ON pins (ref)",
    """
    CREATE TABLE IF NOT EXISTS blobs (
        ref    TEXT PRIMARY KEY,
        ext    TEXT NOT NULL,
        format TEXT NOT NULL,
        width  INTEGER NOT NULL,
        height INTEGER NOT NULL,
        size   INTEGER NOT NULL
    )
    """,
    # Version 2. The cache's size, one row, kept by the triggers below in the transaction of every write that
    # adds or removes an entry or a blob (a replaced entry is an upsert, not a delete and an insert).
    """
    CREATE TABLE IF NOT EXISTS totals (
        id      INTEGER PRIMARY KEY CHECK (id = 0),
        entries INTEGER NOT NULL,
        bytes   INTEGER NOT NULL
    )
    """,
    "CREATE TRIGGER IF NOT EXISTS entry_added AFTER INSERT ON entries "
    "BEGIN UPDATE totals SET entries = entries + 1; END",
    "CREATE TRIGGER IF NOT EXISTS entry_removed AFTER DELETE ON entries "
    "BEGIN UPDATE totals SET entries = entries - 1; END",
    "CREATE TRIGGER IF NOT EXISTS blob_added AFTER INSERT ON blobs "
    "BEGIN UPDATE totals SET bytes = bytes + NEW.size; END",
    "CREATE TRIGGER IF NOT EXISTS blob_removed AFTER DELETE ON blobs "
    "BEGIN UPDATE totals SET bytes = bytes - OLD.size; END",
)

#: The totals by a count of the rows (at open: the triggers keep them from then on).
_RECOUNT = (
    "INSERT OR REPLACE INTO totals (id, entries, bytes) "
    "SELECT 0, (SELECT COUNT(*) FROM entries), (SELECT COALESCE(SUM(size), 0) FROM blobs)"
)


class _Unusable(Exception):
    """The index file is corrupt or from another version: move it aside and start empty."""


class SqliteIndex:
    """The index in ``directory/index.sqlite3``. Every call holds a thread lock and ``flock`` on
    ``directory/index.lock`` (exclusive): so do the other processes sharing the directory. Blob files are
    unlinked after the commit that dropped their rows, still under the lock. SQLite's locking needs a local
    filesystem (a Docker volume is; NFS is not)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / INDEX_NAME
        self.totals = Totals()
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    def __repr__(self) -> str:
        return f"SqliteIndex({str(self.path)!r})"

    # -- lifecycle ---------------------------------------------------------------------------------------------

    async def open(self, unlink: UnlinkFiles) -> None:
        try:
            await asyncio.to_thread(self._open_sync)
        except sqlite3.Error as exc:
            raise IndexUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await asyncio.to_thread(self._close_sync)

    def _open_sync(self) -> None:
        with self._lock:
            if self._db is not None:
                return
            self.directory.mkdir(parents=True, exist_ok=True)
            if self._lock_fd is None:
                self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                with self._shared_lock():
                    try:
                        self._connect_sync()
                    except _Unusable as exc:
                        self._close_db_sync()
                        moved = move_aside_sync(self.path)
                        log.warning(
                            "result cache index %s is unusable (%s); moved to %s", self.path, exc, moved
                        )
                        self._connect_sync()
                    self._read_totals_sync()
            except BaseException:
                self._close_db_sync()
                self._close_lock_sync()
                raise

    def _connect_sync(self) -> None:
        """Connect and create the schema; raise _Unusable when the file must be moved aside."""
        if has_foreign_header_sync(self.path):
            raise _Unusable("file is not a database")
        db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        self._db = db
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            check = db.execute("PRAGMA quick_check").fetchone()
            (version,) = db.execute("PRAGMA user_version").fetchone()
        except sqlite3.DatabaseError as exc:
            if is_corruption(exc):
                raise _Unusable(str(exc)) from exc
            raise
        if check is None or check[0] != "ok":
            raise _Unusable(f"quick_check: {check}")
        if version not in (0, 1, INDEX_VERSION):
            # A cache is disposable: an index from a version this code does not know is set aside, not migrated.
            raise _Unusable(f"index version {version}, this code uses {INDEX_VERSION}")
        with self._transaction():
            for statement in _SCHEMA:  # version 1 gains the totals and their triggers: its rows stay
                db.execute(statement)
            db.execute(_RECOUNT)
            db.execute(f"PRAGMA user_version = {INDEX_VERSION}")

    def _close_db_sync(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error as exc:
                log.debug("closing the cache index: %s", exc)

    def _close_lock_sync(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def _close_sync(self) -> None:
        with self._lock:
            self._close_db_sync()
            self._close_lock_sync()

    def _reset_sync(self) -> None:
        """Quarantine a corrupt index met at runtime and carry on with an empty one."""
        self._close_db_sync()
        try:
            moved = move_aside_sync(self.path)
            log.warning("moved the corrupt cache index to %s", moved)
            self._connect_sync()
            self._read_totals_sync()
        except (OSError, sqlite3.Error, _Unusable) as exc:
            log.warning("result cache index could not be recreated, cache off until restart: %s", exc)
            self._close_db_sync()

    # -- locking -----------------------------------------------------------------------------------------------

    @contextmanager
    def _shared_lock(self) -> Iterator[None]:
        """Exclusive among the processes sharing the directory (callers hold ``_lock`` already)."""
        fd = self._lock_fd
        if fd is None:
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock, self._shared_lock():
            if self._db is None:
                raise IndexUnavailable("the cache index is closed")
            try:
                return fn(*args)
            except sqlite3.Error as exc:
                if is_corruption(exc):
                    log.warning("result cache index %s is corrupt (%s); starting empty", self.path, exc)
                    self._reset_sync()
                raise IndexUnavailable(str(exc)) from exc

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(self._locked, fn, *args)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._require_db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _require_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.OperationalError("cache index is closed")
        return self._db

    def _read_totals_sync(self) -> None:
        """The totals as of the last write, by any process on the directory (one row: no count)."""
        entries, size = self._require_db().execute("SELECT entries, bytes FROM totals").fetchone()
        self.totals = Totals(int(entries), int(size))

    # -- the protocol ------------------------------------------------------------------------------------------

    async def load(self, key: str, *, claim_after: float | None = None) -> Lookup:
        # One process (or several on one directory, each generating its own): no fills to claim.
        return Lookup(await self._call(self._load_sync, key))

    async def release_fill(self, key: str) -> None:
        """Nothing was claimed."""

    async def touch(self, key: str, now: float) -> bool:
        return await self._call(self._touch_sync, key, now)

    async def add(
        self, entry: EntryRow, blobs: Sequence[BlobRow], write: WriteFiles, unlink: UnlinkFiles
    ) -> float | None:
        await self._call(self._add_sync, entry, list(blobs), write, unlink)
        return None  # asking a local file what expired is cheap

    async def remove(
        self, keys: Sequence[str], refs: Collection[str], keep: Collection[str], unlink: UnlinkFiles
    ) -> tuple[list[str], int]:
        return await self._call(self._remove_sync, list(keys), set(refs), set(keep), unlink)

    async def expired(self, created_before: float) -> list[str]:
        return await self._call(self._expired_sync, created_before)

    async def oldest(self, limit: int) -> list[tuple[str, int]]:
        return await self._call(self._oldest_sync, limit)

    async def blobs(self, refs: Collection[str]) -> dict[str, BlobRow]:
        return await self._call(self._blobs_sync, set(refs))

    async def refs_of(self, keys: Collection[str]) -> set[str]:
        return await self._call(self._refs_of_sync, list(keys))

    async def drop_blob(self, ref: str, still_bad: StillBad, unlink: UnlinkFiles) -> list[str] | None:
        return await self._call(self._drop_blob_sync, ref, still_bad, unlink)

    async def pin(self, job_id: str, refs: Sequence[str]) -> None:
        await self._call(self._pin_sync, job_id, list(refs))

    async def unpin(self, job_id: str, unlink: UnlinkFiles) -> None:
        await self._call(self._unpin_sync, job_id, unlink)

    async def pinned_jobs(self) -> set[str]:
        return await self._call(
            lambda: {row[0] for row in self._require_db().execute("SELECT DISTINCT job FROM pins")}
        )

    async def known_refs(self) -> set[str]:
        return await self._call(
            lambda: {row[0] for row in self._require_db().execute("SELECT ref FROM blobs")}
        )

    # -- worker-thread bodies (under the locks) -------------------------------------------------------------------

    def _load_sync(self, key: str) -> EntryRow | None:
        row = (
            self._require_db()
            .execute(
                "SELECT created_at, backend, model, elapsed_s, images, total_bytes FROM entries WHERE key = ?",
                (key,),
            )
            .fetchone()
        )
        return None if row is None else EntryRow(key, *row)

    def _touch_sync(self, key: str, now: float) -> bool:
        cursor = self._require_db().execute("UPDATE entries SET last_used_at = ? WHERE key = ?", (now, key))
        return cursor.rowcount > 0

    def _add_sync(
        self, entry: EntryRow, blobs: list[BlobRow], write: WriteFiles, unlink: UnlinkFiles
    ) -> None:
        indexed = {ref for ref in {b.ref for b in blobs} if self._blob_sync(ref) is not None}
        write(indexed)
        with self._transaction() as tx:
            old = [row[0] for row in tx.execute("SELECT ref FROM entry_blobs WHERE key = ?", (entry.key,))]
            tx.execute("DELETE FROM entry_blobs WHERE key = ?", (entry.key,))
            # An upsert: replacing the key's entry is neither an entry added nor one removed (the totals' triggers).
            tx.execute(
                "INSERT INTO entries "
                "(key, created_at, last_used_at, backend, model, elapsed_s, images, total_bytes) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
                "created_at = excluded.created_at, last_used_at = excluded.last_used_at, "
                "backend = excluded.backend, model = excluded.model, elapsed_s = excluded.elapsed_s, "
                "images = excluded.images, total_bytes = excluded.total_bytes",
                (
                    entry.key,
                    entry.created_at,
                    entry.created_at,
                    entry.backend,
                    entry.model,
                    entry.elapsed_s,
                    entry.images,
                    entry.total_bytes,
                ),
            )
            for blob in blobs:
                tx.execute(
                    "INSERT OR IGNORE INTO blobs (ref, ext, format, width, height, size) VALUES (?, ?, ?, ?, ?, ?)",
                    (blob.ref, blob.ext, blob.format, blob.width, blob.height, blob.size),
                )
                tx.execute(
                    "INSERT OR IGNORE INTO entry_blobs (key, ref) VALUES (?, ?)", (entry.key, blob.ref)
                )
            unreferenced = self._unreferenced_sync(old)
            tx.executemany("DELETE FROM blobs WHERE ref = ?", [(ref,) for ref, _ in unreferenced])
        unlink(unreferenced)
        self._read_totals_sync()

    def _remove_sync(
        self, keys: list[str], refs: set[str], keep: set[str], unlink: UnlinkFiles
    ) -> tuple[list[str], int]:
        """Entries first, then unreferenced blobs (index before files: a crash leaves orphans, not holes)."""
        removed: list[str] = []
        with self._transaction() as db:
            for key in keys:
                refs.update(row[0] for row in db.execute("SELECT ref FROM entry_blobs WHERE key = ?", (key,)))
                db.execute("DELETE FROM entry_blobs WHERE key = ?", (key,))
                if db.execute("DELETE FROM entries WHERE key = ?", (key,)).rowcount:
                    removed.append(key)
            # A blob a remaining job lists keeps its row (so /show still finds it) and its file.
            unreferenced = [(ref, ext) for ref, ext in self._unreferenced_sync(refs) if ref not in keep]
            db.executemany("DELETE FROM blobs WHERE ref = ?", [(ref,) for ref, _ in unreferenced])
        unlink(unreferenced)
        self._read_totals_sync()
        return removed, len(unreferenced)

    def _expired_sync(self, created_before: float) -> list[str]:
        db = self._require_db()
        return [
            row[0] for row in db.execute("SELECT key FROM entries WHERE created_at <= ?", (created_before,))
        ]

    def _oldest_sync(self, limit: int) -> list[tuple[str, int]]:
        db = self._require_db()
        query = "SELECT key, total_bytes FROM entries ORDER BY last_used_at, rowid LIMIT ?"
        return [(row[0], int(row[1])) for row in db.execute(query, (limit,))]

    def _blob_sync(self, ref: str) -> BlobRow | None:
        row = (
            self._require_db()
            .execute("SELECT ext, format, width, height, size FROM blobs WHERE ref = ?", (ref,))
            .fetchone()
        )
        return None if row is None else BlobRow(ref, *row)

    def _blobs_sync(self, refs: set[str]) -> dict[str, BlobRow]:
        return {ref: row for ref in refs if (row := self._blob_sync(ref)) is not None}

    def _refs_of_sync(self, keys: list[str]) -> set[str]:
        db = self._require_db()
        refs: set[str] = set()
        for key in keys:
            refs.update(row[0] for row in db.execute("SELECT ref FROM entry_blobs WHERE key = ?", (key,)))
        return refs

    def _drop_blob_sync(self, ref: str, still_bad: StillBad, unlink: UnlinkFiles) -> list[str] | None:
        row = self._blob_sync(ref)
        if row is None or not still_bad(row):
            return None
        db = self._require_db()
        keys = [r[0] for r in db.execute("SELECT key FROM entry_blobs WHERE ref = ?", (ref,))]
        self._remove_sync(keys, set(), set(), unlink)
        # If nothing else referenced it the row is gone already; a pinned one goes too (its bytes are bad).
        with self._transaction() as tx:
            tx.execute("DELETE FROM blobs WHERE ref = ?", (ref,))
        unlink([(ref, row.ext)])
        self._read_totals_sync()
        return keys

    def _pin_sync(self, job_id: str, refs: list[str]) -> None:
        with self._transaction() as db:
            db.executemany("INSERT OR IGNORE INTO pins (job, ref) VALUES (?, ?)", [(job_id, r) for r in refs])

    def _unpin_sync(self, job_id: str, unlink: UnlinkFiles) -> None:
        with self._transaction() as db:
            refs = [row[0] for row in db.execute("SELECT ref FROM pins WHERE job = ?", (job_id,))]
            db.execute("DELETE FROM pins WHERE job = ?", (job_id,))
            unreferenced = self._unreferenced_sync(refs)
            db.executemany("DELETE FROM blobs WHERE ref = ?", [(ref,) for ref, _ in unreferenced])
        unlink(unreferenced)
        self._read_totals_sync()

    def _unreferenced_sync(self, refs: Collection[str]) -> list[tuple[str, str]]:
        """Those of ``refs`` no entry uses and no job pins any more, with their extensions."""
        db = self._require_db()
        result = []
        for ref in sorted(set(refs)):
            used = db.execute(
                "SELECT 1 FROM entry_blobs WHERE ref = ? UNION ALL SELECT 1 FROM pins WHERE ref = ? LIMIT 1",
                (ref, ref),
            ).fetchone()
            if used is None:
                row = db.execute("SELECT ext FROM blobs WHERE ref = ?", (ref,)).fetchone()
                if row is not None:
                    result.append((ref, row[0]))
        return result
