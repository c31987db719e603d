"""The result cache's index in PostgreSQL (with ``DATABASE_URL``): the ``cache_*`` tables of schema v7.

The processes of a fleet share one index here and one ``DATA_DIR`` volume for the blob files; the invariants
are in :mod:`bot.engine.cache`'s docstring. How this index keeps them:

- **One writer at a time, fleet-wide.** Every call that may unlink a file, or that makes a blob referenced
  (adding an entry, pinning), is one transaction that first takes ``pg_advisory_xact_lock(CACHE_LOCK_KEY)``
  (``SET LOCAL lock_timeout`` bounds the wait: a lock held too long is a miss, not a stuck caller). Inside it,
  PostgreSQL decides what is unreferenced (``DELETE ... WHERE NOT EXISTS`` an entry or a pin ``RETURNING``
  the blobs), and the files of exactly those rows are unlinked before the commit, while no other writer can
  run. Within a process, writers queue on an ``asyncio.Lock`` first, so at most one pooled connection per
  process waits for the advisory lock.
- **Reads and touches take no lock** (MVCC reads; a touch is one ``UPDATE`` of one row).
- **The pool is the job store's** (:meth:`bot.engine.store_pg.PgJobStore.run`): a dead connection is retried
  once (each call is one statement or one transaction, and its file callbacks are idempotent: atomic writes,
  ``unlink(missing_ok)``), and a database that is away fails at once as the store's one outage. Every
  :class:`~bot.engine.store.StoreError` becomes :class:`~bot.engine.cache_index.IndexUnavailable` (a miss);
  an ``OSError`` of a file callback is passed on as itself, never mistaken for a lost connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import asyncpg

from bot.engine.cache_index import (
    BlobRow,
    EntryRow,
    IndexUnavailable,
    StillBad,
    Totals,
    UnlinkFiles,
    WriteFiles,
)
from bot.engine.store import StoreError
from bot.engine.store_pg import CACHE_LOCK_KEY, PgJobStore

T = TypeVar("T")

#: How long a writer waits for another process's write to the index before giving up (a miss).
LOCK_TIMEOUT_S = 5.0

#: Files run a blocking file callback in a worker thread, inside the writer's transaction.
Files = Callable[..., Awaitable[Any]]

_UNREFERENCED = """
DELETE FROM cache_blobs b
WHERE b.ref = ANY($1::text[]) AND NOT b.ref = ANY($2::text[])
  AND NOT EXISTS (SELECT 1 FROM cache_entry_blobs e WHERE e.ref = b.ref)
  AND NOT EXISTS (SELECT 1 FROM cache_pins p WHERE p.ref = b.ref)
RETURNING b.ref, b.ext
"""
_TOTALS = "SELECT (SELECT count(*) FROM cache_entries), (SELECT COALESCE(sum(size), 0) FROM cache_blobs)"
_BLOB_COLUMNS = "ref, ext, format, width, height, size"


class _FileFailed(Exception):
    """A file callback raised OSError inside a transaction (kept apart from the driver's connection errors)."""


def _blob(row: Any) -> BlobRow:
    return BlobRow(
        str(row["ref"]),
        str(row["ext"]),
        str(row["format"]),
        int(row["width"]),
        int(row["height"]),
        int(row["size"]),
    )


class PgIndex:
    """The cache's index in the job store's PostgreSQL database."""

    def __init__(self, store: PgJobStore, *, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.store = store
        self.lock_timeout_s = lock_timeout_s
        self.totals = Totals()
        self._writer = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PgIndex({self.store.name!r})"

    async def open(self) -> None:
        # The tables are the store's migration v7. A database away right now is not a reason to run without a
        # cache: the calls are misses until it is back.
        with contextlib.suppress(IndexUnavailable):
            row = await self._fetchrow(_TOTALS)
            self.totals = Totals(int(row[0]), int(row[1]))

    async def close(self) -> None:
        """Nothing to close: the pool is the store's."""

    # -- plumbing ----------------------------------------------------------------------------------------------

    async def _read(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        try:
            return await self.store.run(work, action="read the result cache's index in")
        except StoreError as exc:
            raise IndexUnavailable(exc.message) from None

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self._read(lambda conn: conn.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._read(lambda conn: conn.fetchrow(sql, *args))

    async def _write(self, body: Callable[[asyncpg.Connection, Files], Awaitable[T]]) -> T:
        """``body`` in one transaction holding the fleet's cache lock; the totals are read at its end."""
        failures: list[OSError] = []

        async def files(fn: Callable[..., Any], *args: Any) -> Any:
            try:
                return await asyncio.to_thread(fn, *args)
            except OSError as exc:
                failures.append(exc)
                raise _FileFailed(str(exc)) from None

        async def work(conn: asyncpg.Connection) -> tuple[T, Any]:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{int(self.lock_timeout_s * 1000)}ms'")
                await conn.execute("SELECT pg_advisory_xact_lock($1)", CACHE_LOCK_KEY)
                value = await body(conn, files)
                return value, await conn.fetchrow(_TOTALS)

        async with self._writer:
            try:
                value, totals = await self.store.run(work, action="update the result cache's index in")
            except StoreError as exc:
                if failures:
                    raise failures[-1] from None
                raise IndexUnavailable(exc.message) from None
        self.totals = Totals(int(totals[0]), int(totals[1]))
        return value

    @staticmethod
    async def _drop_unreferenced(
        conn: asyncpg.Connection, refs: Collection[str], keep: Collection[str] = ()
    ) -> list[tuple[str, str]]:
        """Delete the rows of those ``refs`` nothing references and ``keep`` does not list; (ref, ext) of each."""
        if not refs:
            return []
        rows = await conn.fetch(_UNREFERENCED, sorted(set(refs)), sorted(set(keep)))
        return [(str(row["ref"]), str(row["ext"])) for row in rows]

    # -- reads -------------------------------------------------------------------------------------------------

    async def load(self, key: str) -> EntryRow | None:
        row = await self._fetchrow(
            "SELECT created_at, backend, model, elapsed_s, images, total_bytes FROM cache_entries WHERE key = $1",
            key,
        )
        if row is None:
            return None
        return EntryRow(
            key,
            float(row["created_at"]),
            str(row["backend"]),
            row["model"],
            float(row["elapsed_s"]),
            str(row["images"]),
            int(row["total_bytes"]),
        )

    async def touch(self, key: str, now: float) -> bool:
        status = await self._read(
            lambda conn: conn.execute("UPDATE cache_entries SET last_used_at = $2 WHERE key = $1", key, now)
        )
        return str(status) != "UPDATE 0"

    async def expired(self, created_before: float) -> list[str]:
        rows = await self._fetch("SELECT key FROM cache_entries WHERE created_at <= $1", created_before)
        return [str(row[0]) for row in rows]

    async def oldest(self, limit: int) -> list[tuple[str, int]]:
        rows = await self._fetch(
            "SELECT key, total_bytes FROM cache_entries ORDER BY last_used_at, seq LIMIT $1", int(limit)
        )
        return [(str(row[0]), int(row[1])) for row in rows]

    async def blobs(self, refs: Collection[str]) -> dict[str, BlobRow]:
        rows = await self._fetch(
            f"SELECT {_BLOB_COLUMNS} FROM cache_blobs WHERE ref = ANY($1::text[])", sorted(set(refs))
        )
        return {str(row["ref"]): _blob(row) for row in rows}

    async def refs_of(self, keys: Collection[str]) -> set[str]:
        rows = await self._fetch(
            "SELECT DISTINCT ref FROM cache_entry_blobs WHERE key = ANY($1::text[])", sorted(set(keys))
        )
        return {str(row[0]) for row in rows}

    async def pinned_jobs(self) -> set[str]:
        return {str(row[0]) for row in await self._fetch("SELECT DISTINCT job FROM cache_pins")}

    async def known_refs(self) -> set[str]:
        return {str(row[0]) for row in await self._fetch("SELECT ref FROM cache_blobs")}

    # -- writes (under the fleet's cache lock) ------------------------------------------------------------------

    async def add(
        self, entry: EntryRow, blobs: Sequence[BlobRow], write: WriteFiles, unlink: UnlinkFiles
    ) -> None:
        refs = [blob.ref for blob in blobs]

        async def body(conn: asyncpg.Connection, files: Files) -> None:
            rows = await conn.fetch("SELECT ref FROM cache_blobs WHERE ref = ANY($1::text[])", refs)
            # The files first, then the rows that reference them: never a row for a file not written yet.
            await files(write, {str(row[0]) for row in rows})
            old = await conn.fetch("DELETE FROM cache_entry_blobs WHERE key = $1 RETURNING ref", entry.key)
            await conn.execute("DELETE FROM cache_entries WHERE key = $1", entry.key)
            await conn.execute(
                "INSERT INTO cache_entries "
                "(key, created_at, last_used_at, backend, model, elapsed_s, images, total_bytes) "
                "VALUES ($1, $2, $2, $3, $4, $5, $6, $7)",
                entry.key,
                entry.created_at,
                entry.backend,
                entry.model,
                entry.elapsed_s,
                entry.images,
                entry.total_bytes,
            )
            await conn.execute(
                f"INSERT INTO cache_blobs ({_BLOB_COLUMNS}) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int[], $5::int[], $6::bigint[]) "
                "ON CONFLICT (ref) DO NOTHING",
                refs,
                [blob.ext for blob in blobs],
                [blob.format for blob in blobs],
                [blob.width for blob in blobs],
                [blob.height for blob in blobs],
                [blob.size for blob in blobs],
            )
            await conn.execute(
                "INSERT INTO cache_entry_blobs (key, ref) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                entry.key,
                refs,
            )
            gone = await self._drop_unreferenced(conn, [str(row[0]) for row in old])
            await files(unlink, gone)

        await self._write(body)

    async def remove(
        self, keys: Sequence[str], refs: Collection[str], keep: Collection[str], unlink: UnlinkFiles
    ) -> tuple[list[str], int]:
        keys = sorted(set(keys))

        async def body(conn: asyncpg.Connection, files: Files) -> tuple[list[str], int]:
            candidates = set(refs)
            removed: list[str] = []
            if keys:
                used = await conn.fetch("SELECT ref FROM cache_entry_blobs WHERE key = ANY($1::text[])", keys)
                candidates.update(str(row[0]) for row in used)
                # entry_blobs rows go with their entries (ON DELETE CASCADE).
                rows = await conn.fetch(
                    "DELETE FROM cache_entries WHERE key = ANY($1::text[]) RETURNING key", keys
                )
                removed = [str(row[0]) for row in rows]
            gone = await self._drop_unreferenced(conn, candidates, keep)
            await files(unlink, gone)
            return removed, len(gone)

        if not keys and not refs:
            return [], 0
        return await self._write(body)

    async def drop_blob(self, ref: str, still_bad: StillBad, unlink: UnlinkFiles) -> list[str] | None:
        async def body(conn: asyncpg.Connection, files: Files) -> list[str] | None:
            row = await conn.fetchrow(f"SELECT {_BLOB_COLUMNS} FROM cache_blobs WHERE ref = $1", ref)
            if row is None:
                return None  # gone already (another process evicted it, with its entries)
            blob = _blob(row)
            if not await files(still_bad, blob):
                return None  # written again since (by another process's put)
            users = await conn.fetch("SELECT DISTINCT key FROM cache_entry_blobs WHERE ref = $1", ref)
            keys = [str(r[0]) for r in users]
            others = await conn.fetch("SELECT ref FROM cache_entry_blobs WHERE key = ANY($1::text[])", keys)
            await conn.execute("DELETE FROM cache_entries WHERE key = ANY($1::text[])", keys)
            # Pinned or not: its bytes are bad. The pins stay (unpinning them finds nothing to delete).
            await conn.execute("DELETE FROM cache_blobs WHERE ref = $1", ref)
            gone = await self._drop_unreferenced(conn, {str(r[0]) for r in others} - {ref})
            await files(unlink, [(ref, blob.ext), *gone])
            return keys

        return await self._write(body)

    async def pin(self, job_id: str, refs: Sequence[str]) -> None:
        async def body(conn: asyncpg.Connection, files: Files) -> None:
            await conn.execute(
                "INSERT INTO cache_pins (job, ref) SELECT $1, unnest($2::text[]) ON CONFLICT DO NOTHING",
                job_id,
                sorted(set(refs)),
            )

        await self._write(body)

    async def unpin(self, job_id: str, unlink: UnlinkFiles) -> None:
        async def body(conn: asyncpg.Connection, files: Files) -> None:
            rows = await conn.fetch("DELETE FROM cache_pins WHERE job = $1 RETURNING ref", job_id)
            gone = await self._drop_unreferenced(conn, [str(row[0]) for row in rows])
            await files(unlink, gone)

        await self._write(body)
