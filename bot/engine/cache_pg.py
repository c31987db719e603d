"""The result cache's index in PostgreSQL (with ``DATABASE_URL``): the ``cache_*`` tables of schema v7 (and v8).

The processes of a fleet share one index here and one ``DATA_DIR`` volume for the blob files; the invariants
are in :mod:`bot.engine.cache`'s docstring. How this index keeps them, at one round trip for each operation a
job makes (a lookup, a put, a pin, an unpin):

- **Only removers unlink, one at a time, fleet-wide.** Removing entries (eviction, delete, retention),
  dropping a damaged blob and letting go of blobs nothing references is one transaction that first takes
  ``pg_advisory_xact_lock(CACHE_LOCK_KEY)`` (exclusive; ``lock_timeout`` bounds the wait: a miss, not a stuck
  caller). Inside it PostgreSQL decides what is unreferenced (``DELETE ... WHERE NOT EXISTS`` an entry or a
  pin ``RETURNING`` the blobs), and the files of exactly those rows are unlinked before the commit.
- **What makes a blob referenced takes the same lock, shared.** A put and a pin are each one statement whose
  inserts read from ``pg_advisory_xact_lock_shared(CACHE_LOCK_KEY)``, so they wait while a remover works and
  never overlap one. A put writes its missing files before its statement and looks again after it: a file a
  remover unlinked while the put waited (the same image, evicted from another entry at that moment) is
  written again, and from then on the entry references it, so no remover can take it.
- **Reads and touches take no lock** (MVCC reads; a touch is one ``UPDATE`` of one row). An unpin deletes its
  pins without the lock; only when that left a blob unreferenced does a remover run for it.
- **Totals** are a row (``cache_totals``) every write updates in its own statement: reading the size of the
  cache costs the same for ten entries or a million. Each update counts up the row's ``version``; of the
  totals its writes return (concurrent writes may return in another order than they updated the row) a
  process keeps those of the highest version. It is recounted under the lock at open.
- **Fills** (``cache_fills``): a process that looks a key up to generate it claims the key's fill in the same
  statement, unless another live process (a fresh ``processes`` heartbeat) holds it; then the lookup says so,
  the claim is marked as waited for, and the put (or the release) that ends it sends ``NOTIFY bot_fill`` with
  the key. A dead holder's claim is taken over by the next lookup, unless the key's generation lives on at its
  backend: a ``running`` job of that key with a backend id (AI Horde, ComfyUI) is followed up by whichever
  process takes it over or was handed it at a rolling restart, and that process's put ends the claim. (Running
  jobs are few, and ``jobs_state`` finds them.)
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
    Lookup,
    StillBad,
    Totals,
    UnlinkFiles,
    WriteFiles,
)
from bot.engine.store import StoreError
from bot.engine.store_pg import CACHE_LOCK_KEY, FILL_CHANNEL, PgJobStore

T = TypeVar("T")

#: How long a writer waits for another process's write to the index before giving up (a miss).
LOCK_TIMEOUT_S = 5.0

#: Files run a blocking file callback in a worker thread, inside the remover's transaction.
Files = Callable[..., Awaitable[Any]]

_ENTRY_COLUMNS = "created_at, backend, model, elapsed_s, images, total_bytes"
_BLOB_COLUMNS = "ref, ext, format, width, height, size"


def _alive(owner: str) -> str:
    """SQL: the process ``owner`` names has a fresh heartbeat ($4: the lease in seconds)."""
    return (
        f"EXISTS (SELECT 1 FROM processes p WHERE p.id = {owner} "
        "AND p.heartbeat_at >= now() - make_interval(secs => $4))"
    )


_LOAD = f"SELECT {_ENTRY_COLUMNS}, NULL AS fill_owner FROM cache_entries WHERE key = $1"

#: SQL: the generation of key $1 lives on at a backend that lets another process follow it up by its id.
_FOLLOWED = "EXISTS (SELECT 1 FROM jobs j WHERE j.state = 'running' AND j.cache_key = $1 AND j.backend_ref IS NOT NULL)"

#: $1 key, $2 an entry created after this is a hit (no claim), $3 this process, $4 the lease.
#: The claim stays with a live other holder, or a dead one whose generation is being followed up (and is then
#: marked as waited for); otherwise it is ours.
_HELD_ELSEWHERE = f"(f.owner <> $3 AND ({_alive('f.owner')} OR {_FOLLOWED}))"
_LOAD_OR_CLAIM = f"""
WITH entry AS (SELECT {_ENTRY_COLUMNS} FROM cache_entries WHERE key = $1),
fill AS (
    INSERT INTO cache_fills AS f (key, owner) SELECT $1, $3
    WHERE NOT EXISTS (SELECT 1 FROM entry WHERE created_at > $2)
    ON CONFLICT (key) DO UPDATE SET
        owner = CASE WHEN {_HELD_ELSEWHERE} THEN f.owner ELSE EXCLUDED.owner END,
        since = CASE WHEN {_HELD_ELSEWHERE} THEN f.since ELSE now() END,
        waiters = f.waiters OR {_HELD_ELSEWHERE}
    RETURNING owner
)
SELECT e.*, (SELECT owner FROM fill) AS fill_owner FROM (SELECT 1) AS one LEFT JOIN entry AS e ON true
"""


def _shared_lock(timeout: str, key: str) -> str:
    """SQL: the CTE ``lock``; inserts that read from it run only once the shared lock is held (no remover at
    work). ``timeout`` and ``key`` name the statement's parameters."""
    return (
        f"lock AS MATERIALIZED (SELECT set_config('lock_timeout', {timeout}, true), "
        f"pg_advisory_xact_lock_shared({key}))"
    )


#: $1..$7 the entry, $8..$13 its blobs (arrays), $14 the lock timeout, $15 the lock key. Adds nothing when
#: the key has an entry already (``added`` 0: the caller replaces it under the exclusive lock).
_PUT = f"""
WITH {_shared_lock("$14", "$15")},
new_blobs AS (
    INSERT INTO cache_blobs ({_BLOB_COLUMNS})
    SELECT b.ref, b.ext, b.format, b.width, b.height, b.size
    FROM lock, unnest($8::text[], $9::text[], $10::text[], $11::int[], $12::int[], $13::bigint[])
        AS b(ref, ext, format, width, height, size)
    ON CONFLICT (ref) DO NOTHING
    RETURNING size
),
entry AS (
    INSERT INTO cache_entries (key, created_at, last_used_at, backend, model, elapsed_s, images, total_bytes)
    SELECT $1, $2, $2, $3, $4, $5, $6, $7 FROM lock
    ON CONFLICT (key) DO NOTHING
    RETURNING key
),
links AS (
    INSERT INTO cache_entry_blobs (key, ref) SELECT DISTINCT entry.key, r FROM entry, unnest($8::text[]) AS r
    RETURNING ref
),
fill AS (DELETE FROM cache_fills WHERE key = $1 AND EXISTS (SELECT 1 FROM entry) RETURNING waiters),
notified AS MATERIALIZED (SELECT pg_notify('{FILL_CHANNEL}', $1) AS sent FROM fill WHERE fill.waiters),
totals AS (
    UPDATE cache_totals SET
        entries = entries + (SELECT count(*) FROM entry),
        bytes = bytes + (SELECT COALESCE(sum(size), 0) FROM new_blobs),
        version = version + 1
    RETURNING entries, bytes, version
)
SELECT (SELECT count(*) FROM entry) AS added, (SELECT count(*) FROM links) AS linked,
    (SELECT count(*) FROM notified) AS notified, totals.entries, totals.bytes, totals.version,
    (SELECT min(created_at) FROM cache_entries) AS oldest
FROM totals
"""

#: $1 job, $2 refs, $3 the lock timeout, $4 the lock key.
_PIN = f"""
WITH {_shared_lock("$3", "$4")}
INSERT INTO cache_pins (job, ref) SELECT DISTINCT $1, r FROM lock, unnest($2::text[]) AS r
ON CONFLICT DO NOTHING
"""

#: Without the lock: the job's pins go; the refs they leave unreferenced (as far as this statement sees) are
#: returned for a remover to check again under the lock.
_UNPIN = """
WITH gone AS (DELETE FROM cache_pins WHERE job = $1 RETURNING ref)
SELECT DISTINCT g.ref FROM gone AS g
WHERE NOT EXISTS (SELECT 1 FROM cache_entry_blobs e WHERE e.ref = g.ref)
  AND NOT EXISTS (SELECT 1 FROM cache_pins p WHERE p.ref = g.ref AND p.job <> $1)
"""

_RELEASE_FILL = f"""
WITH gone AS (DELETE FROM cache_fills WHERE key = $1 AND owner = $2 RETURNING waiters)
SELECT pg_notify('{FILL_CHANNEL}', $1) FROM gone WHERE gone.waiters
"""

#: Under the exclusive lock: drop the entries $1 (their links go with them); the refs they used.
_DROP_ENTRIES = """
WITH used AS (SELECT DISTINCT ref FROM cache_entry_blobs WHERE key = ANY($1::text[])),
removed AS (DELETE FROM cache_entries WHERE key = ANY($1::text[]) RETURNING key)
SELECT ARRAY(SELECT key FROM removed) AS removed, ARRAY(SELECT ref FROM used) AS used
"""

#: Under the exclusive lock: delete the rows of the blobs $1 nothing references, $2 excepted; adjust the totals
#: by them and by $3 entries removed. ``$4``: drop ``$1`` even if referenced or pinned (damaged bytes).
_DROP_BLOBS = """
WITH gone AS (
    DELETE FROM cache_blobs b
    WHERE b.ref = ANY($1::text[]) AND NOT b.ref = ANY($2::text[])
      AND ($4 OR (NOT EXISTS (SELECT 1 FROM cache_entry_blobs e WHERE e.ref = b.ref)
                  AND NOT EXISTS (SELECT 1 FROM cache_pins p WHERE p.ref = b.ref)))
    RETURNING ref, ext, size
),
totals AS (
    UPDATE cache_totals SET entries = entries - $3, bytes = bytes - (SELECT COALESCE(sum(size), 0) FROM gone),
        version = version + 1
    RETURNING entries, bytes, version
)
SELECT ARRAY(SELECT ref FROM gone) AS refs, ARRAY(SELECT ext FROM gone) AS exts, totals.entries, totals.bytes,
    totals.version
FROM totals
"""

#: At open, under the exclusive lock: blob rows nothing references (left by an unpin that raced an eviction),
#: and the totals counted afresh.
_SWEEP = """
WITH gone AS (
    DELETE FROM cache_blobs b
    WHERE NOT EXISTS (SELECT 1 FROM cache_entry_blobs e WHERE e.ref = b.ref)
      AND NOT EXISTS (SELECT 1 FROM cache_pins p WHERE p.ref = b.ref)
    RETURNING ref, ext
)
SELECT ARRAY(SELECT ref FROM gone) AS refs, ARRAY(SELECT ext FROM gone) AS exts
"""
_RECOUNT = """
UPDATE cache_totals SET entries = (SELECT count(*) FROM cache_entries),
    bytes = (SELECT COALESCE(sum(size), 0) FROM cache_blobs), version = version + 1
RETURNING entries, bytes, version
"""


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


def _entry(key: str, row: Any) -> EntryRow | None:
    if row is None or row["created_at"] is None:
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


class PgIndex:
    """The cache's index in the job store's PostgreSQL database.

    Fills are claimed for the store's fleet process (:meth:`PgJobStore.join_fleet`); before it joined a fleet
    (the command line) nothing is claimed.
    """

    def __init__(self, store: PgJobStore, *, lock_timeout_s: float = LOCK_TIMEOUT_S) -> None:
        self.store = store
        self.lock_timeout_s = lock_timeout_s
        self.totals = Totals()
        self._totals_version = -1

    def _saw_totals(self, row: Any) -> None:
        """Totals a write returned; older ones than already seen (a concurrent write overtook it) are ignored."""
        version = int(row["version"])
        if version > self._totals_version:
            self._totals_version = version
            self.totals = Totals(int(row["entries"]), int(row["bytes"]))

    def __repr__(self) -> str:
        return f"PgIndex({self.store.name!r})"

    @property
    def _lock_timeout(self) -> str:
        return f"{int(self.lock_timeout_s * 1000)}ms"

    async def open(self, unlink: UnlinkFiles) -> None:
        # The tables are the store's migration v7. A database away right now is not a reason to run without a
        # cache: the calls are misses until it is back.
        with contextlib.suppress(IndexUnavailable):
            await self._sweep(unlink)

    async def close(self) -> None:
        """Nothing to close: the pool is the store's."""

    # -- plumbing ----------------------------------------------------------------------------------------------

    async def _read(self, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        try:
            return await self.store.run(work, action="use the result cache's index in")
        except StoreError as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: StoreError) -> IndexUnavailable:
        # The store logs an outage once (and its end); the cache need not say it again.
        return IndexUnavailable(
            exc.message, reported=self.store.outage is not None and self.store.report_outages
        )

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        return await self._read(lambda conn: conn.fetch(sql, *args))

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        return await self._read(lambda conn: conn.fetchrow(sql, *args))

    async def _exclusive(self, body: Callable[[asyncpg.Connection, Files], Awaitable[T]]) -> T:
        """``body`` in one transaction holding the fleet's cache lock exclusively (the removers' way)."""
        failures: list[OSError] = []

        async def files(fn: Callable[..., Any], *args: Any) -> Any:
            try:
                return await asyncio.to_thread(fn, *args)
            except OSError as exc:
                failures.append(exc)
                raise _FileFailed(str(exc)) from None

        async def work(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                await conn.execute(
                    "SELECT set_config('lock_timeout', $1, true), pg_advisory_xact_lock($2)",
                    self._lock_timeout,
                    CACHE_LOCK_KEY,
                )
                return await body(conn, files)

        try:
            return await self.store.run(work, action="update the result cache's index in")
        except StoreError as exc:
            if failures:
                raise failures[-1] from None
            raise self._unavailable(exc) from None

    async def _drop_blobs(
        self,
        conn: asyncpg.Connection,
        files: Files,
        unlink: UnlinkFiles,
        refs: Collection[str],
        *,
        keep: Collection[str] = (),
        entries_removed: int = 0,
        damaged: bool = False,
    ) -> int:
        """Inside :meth:`_exclusive`: the rows, then the files, of ``refs`` nothing references (all of them if
        ``damaged``); the totals follow. Returns how many files went."""
        row = await conn.fetchrow(_DROP_BLOBS, sorted(set(refs)), sorted(set(keep)), entries_removed, damaged)
        self._saw_totals(row)
        gone = list(zip(row["refs"], row["exts"], strict=True))
        if gone:
            await files(unlink, gone)
        return len(gone)

    async def _sweep(self, unlink: UnlinkFiles) -> None:
        async def body(conn: asyncpg.Connection, files: Files) -> None:
            row = await conn.fetchrow(_SWEEP)
            gone = list(zip(row["refs"], row["exts"], strict=True))
            if gone:
                await files(unlink, gone)
            self._saw_totals(await conn.fetchrow(_RECOUNT))

        await self._exclusive(body)

    # -- reads -------------------------------------------------------------------------------------------------

    async def load(self, key: str, *, claim_after: float | None = None) -> Lookup:
        me = self.store.owner
        if claim_after is None or me is None:
            return Lookup(_entry(key, await self._fetchrow(_LOAD, key)))
        row = await self._fetchrow(_LOAD_OR_CLAIM, key, claim_after, me, self.store.lease_ttl_s)
        owner = row["fill_owner"]
        return Lookup(
            _entry(key, row), filling_elsewhere=owner is not None and owner != me, claimed=owner == me
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

    # -- what makes blobs referenced (the shared lock, one statement) --------------------------------------------

    async def add(
        self, entry: EntryRow, blobs: Sequence[BlobRow], write: WriteFiles, unlink: UnlinkFiles
    ) -> float | None:
        refs = [blob.ref for blob in blobs]
        params = (
            entry.key,
            entry.created_at,
            entry.backend,
            entry.model,
            entry.elapsed_s,
            entry.images,
            entry.total_bytes,
            refs,
            [blob.ext for blob in blobs],
            [blob.format for blob in blobs],
            [blob.width for blob in blobs],
            [blob.height for blob in blobs],
            [blob.size for blob in blobs],
            self._lock_timeout,
            CACHE_LOCK_KEY,
        )
        if (
            self.store.outage is not None
        ):  # known away: no files to leave as orphans for a put that cannot land
            raise IndexUnavailable(f"the database is away: {self.store.outage.error}", reported=True)
        present = set(refs)  # write() skips a ref in this set whose file exists: it writes the missing ones
        await asyncio.to_thread(write, present)
        row = await self._fetchrow(_PUT, *params)
        if not row["added"]:
            row = await self._replace(entry.key, refs, params, unlink)
        self._saw_totals(row)
        # A remover may have unlinked one of these files while the statement waited for it (the same image, in
        # an entry evicted at that moment): the entry references them now, so writing it again is final.
        await asyncio.to_thread(write, present)
        oldest = row["oldest"]
        return None if oldest is None else float(oldest)

    async def _replace(self, key: str, refs: list[str], params: tuple[Any, ...], unlink: UnlinkFiles) -> Any:
        """The key had an entry: drop it (keeping the new entry's blobs) and add the new one, exclusively."""

        async def body(conn: asyncpg.Connection, files: Files) -> Any:
            dropped = await conn.fetchrow(_DROP_ENTRIES, [key])
            await self._drop_blobs(
                conn, files, unlink, dropped["used"], keep=refs, entries_removed=len(dropped["removed"])
            )
            return await conn.fetchrow(_PUT, *params)  # the shared lock: this transaction holds it already

        return await self._exclusive(body)

    async def pin(self, job_id: str, refs: Sequence[str]) -> None:
        await self._read(
            lambda conn: conn.execute(_PIN, job_id, sorted(set(refs)), self._lock_timeout, CACHE_LOCK_KEY)
        )

    async def release_fill(self, key: str) -> None:
        me = self.store.owner
        if me is not None:
            await self._fetch(_RELEASE_FILL, key, me)

    # -- removers (the exclusive lock, one transaction) ------------------------------------------------------------

    async def unpin(self, job_id: str, unlink: UnlinkFiles) -> None:
        rows = await self._fetch(_UNPIN, job_id)
        if rows:  # blobs only this job kept: let them go, if they still are unreferenced under the lock
            await self.remove([], {str(row[0]) for row in rows}, (), unlink)

    async def remove(
        self, keys: Sequence[str], refs: Collection[str], keep: Collection[str], unlink: UnlinkFiles
    ) -> tuple[list[str], int]:
        keys = sorted(set(keys))
        if not keys and not refs:
            return [], 0

        async def body(conn: asyncpg.Connection, files: Files) -> tuple[list[str], int]:
            candidates = set(refs)
            removed: list[str] = []
            if keys:
                dropped = await conn.fetchrow(_DROP_ENTRIES, keys)
                removed = list(dropped["removed"])
                candidates.update(dropped["used"])
            went = await self._drop_blobs(
                conn, files, unlink, candidates, keep=keep, entries_removed=len(removed)
            )
            return removed, went

        return await self._exclusive(body)

    async def drop_blob(self, ref: str, still_bad: StillBad, unlink: UnlinkFiles) -> list[str] | None:

        async def body(conn: asyncpg.Connection, files: Files) -> list[str] | None:
            row = await conn.fetchrow(f"SELECT {_BLOB_COLUMNS} FROM cache_blobs WHERE ref = $1", ref)
            if row is None:
                return None  # gone already (another process evicted it, with its entries)
            if not await files(still_bad, _blob(row)):
                return None  # written again since (by another process's put)
            users = await conn.fetch("SELECT DISTINCT key FROM cache_entry_blobs WHERE ref = $1", ref)
            dropped = await conn.fetchrow(_DROP_ENTRIES, [str(r[0]) for r in users])
            removed = list(dropped["removed"])
            # Its bytes are bad, pinned or not: its row and file go (the pins stay, finding nothing to keep).
            await self._drop_blobs(conn, files, unlink, [ref], entries_removed=len(removed), damaged=True)
            await self._drop_blobs(conn, files, unlink, set(dropped["used"]) - {ref})
            return removed

        return await self._exclusive(body)
