"""The job store on PostgreSQL (``DATABASE_URL``): the same interface and behaviour as the SQLite ``JobStore``.

What is the same: every public method, its arguments, its ordering (oldest/newest first, ties in insertion
order) and its errors (``StoreError`` with one readable line). Jobs are encoded by the SQLite store's own
row helpers, so a job reads back identically from either store.

What PostgreSQL adds:

- **A pool** (asyncpg). Every write commits before it returns (one statement, autocommit). A connection the
  server dropped is replaced on the next acquire, so after an outage the store works again by itself.
- **A database that goes away** (restart, failover, network): each operation raises ``StoreError`` saying the
  database is unreachable, never an asyncpg traceback. A statement that failed because its connection died
  is retried once on a fresh connection: every operation here is idempotent (upserts, reads, set-to-value
  updates), and that retry makes the first call after a server restart succeed instead of failing.
  When the retry fails too, the store knows the database is *away* (:attr:`PgJobStore.outage`)::

      answering --(a call fails twice: connection refused, dropped, timed out)--> away
          one WARNING line; every pooled connection is expired (replaced on its next acquire)
      away: every call fails at once with the same StoreError (no socket opened, no pile-up on a dead host)
            one reconnect task tries ``SELECT 1`` after 0.5 s, 1 s, 2 s, 4 s, then every 5 s
      away --(a try answers)--> answering: one INFO line with how long it was away

  So an outage costs one connection attempt per try, however many callers there are, and no busy loop; the
  store heals by itself within ``reconnect_max_s`` of the server being back, without being reopened.
- **Migrations** (``MIGRATIONS``, versions kept in ``schema_version``) run in one transaction under
  ``pg_advisory_xact_lock``, so processes starting together migrate exactly once; the others wait for the
  lock, see the new version and go on. DDL is transactional here: a failing migration leaves nothing behind.
- **The fleet's processes** (``processes``): each running bot keeps a row it heartbeats; PostgreSQL's ``now()``
  judges which are alive, so clocks of the bot hosts never matter. Registration checks for a live process
  running the same shards and inserts in one transaction under an advisory lock, so of two processes starting
  together with the same shards exactly one gets in. :meth:`PgJobStore.advisory_lock` serialises other
  once-for-the-fleet work (command sync).
- **Who answers for a job** (``jobs.owner``, a ``processes`` id): the process that created or claimed it. Once
  :meth:`PgJobStore.join_fleet` named this process, ``save_job`` writes a job only while the row's owner is this
  process (else :class:`~bot.engine.store.JobTaken`: a process whose lease lapsed cannot overwrite its
  successor's record), and the claims take jobs whose owner is not alive: ``claim_jobs`` at start-up (this
  process's guilds, unowned jobs included), ``take_over_jobs`` while running (any guild, jobs of dead processes).
  A claim is one ``UPDATE`` under ``CLAIM_LOCK_KEY``, so of two claimers exactly one gets each job.
- **The fleet's one queue** (``fleet_demand``, ``fleet_slots``; bot/service/dispatch.py runs it): each process
  publishes what waits (one statement that also gives back finished slots and wakes the dispatcher); the
  dispatcher, on a :class:`FleetConnection` holding ``DISPATCH_LOCK_KEY``, reads the rows in one statement and
  writes its grants in another (``NOTIFY bot_grant`` with the owner's id); each process takes up its grants
  and renews its slots in one statement (``poll_fleet``). A slot's expiry is the server's ``now()``; a slot
  whose holder stopped renewing, or whose process is not alive, is deleted by the next dispatcher round.
- **A lost host's sessions.** A process whose host is lost (powered off, cut off the network) sends no FIN: its
  sessions stay open in PostgreSQL, with their locks, until the server's TCP keepalive gives up (two hours by
  default). So every connection of a fleet process is named after it (``application_name``
  ``imagine-bot:<process id>``, :func:`session_name`), and the fleet ends the sessions of a process whose
  lease has lapsed: each takeover round does, before it claims (:meth:`PgJobStore.end_dead_sessions`; the
  dispatcher's lock goes with a lost dispatcher's session), and so does every statement that deletes a dead
  process's row (:meth:`PgJobStore.forget_dead_processes`, registration), since without its row nothing
  could tell its sessions from a live process's any more. Ending a session needs the same role, which
  every process of one ``DATABASE_URL`` has.
- **Cancel from anywhere**: :meth:`PgJobStore.request_cancel` marks the job's row and sends ``NOTIFY
  bot_cancel`` (its id); the owner's poll reads the marked rows it runs.
- **The result cache's index** (``cache_*`` tables, schema v7): bot/engine/cache_pg.py uses this store's pool
  through :meth:`PgJobStore.run`, so a database that is away is the same outage, seen and healed once. Its
  fills are claimed for this store's fleet process and announced on ``bot_fill`` (the key).
- **No password anywhere**: the store names its database by ``safe_dsn`` (no password), and any text from
  the driver is scrubbed of the password before it becomes part of an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg

from bot.engine.models import Job, JobState
from bot.engine.store import (
    _DELIVERY_COLUMNS,
    _JOB_COLUMNS,
    _UNFINISHED,
    _UNSETTLED,
    JobTaken,
    ShardFilter,
    StoreError,
    _job_from_row,
    _job_params,
    guild_settings_document,
)
from bot.logs import redact

log = logging.getLogger(__name__)

#: Forward migrations, numbered like the SQLite store's (v1 tables, v2 backend_ref, v3 delivery) so up to v3 one
#: schema version means the same job columns in both; v4 (the fleet's ``processes``), v5 (``jobs.owner``), v6
#: (the fleet's queue, cross-process cancel), v7 (the result cache's index) and v8 (its totals' version) exist here
#: only. ``seq`` stands in for SQLite's rowid: insertion
#: order, the tie-break of every "oldest/newest first". Never edit a shipped entry: add a new one.
MIGRATIONS: list[Sequence[str]] = [
    (
        """
        CREATE TABLE jobs (
            seq           BIGINT GENERATED ALWAYS AS IDENTITY,
            id            TEXT PRIMARY KEY,
            request       TEXT NOT NULL,
            guild_id      BIGINT NOT NULL,
            channel_id    BIGINT,
            user_id       BIGINT NOT NULL,
            state         TEXT NOT NULL,
            created_at    DOUBLE PRECISION NOT NULL,
            started_at    DOUBLE PRECISION,
            finished_at   DOUBLE PRECISION,
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
        "CREATE INDEX jobs_created_at ON jobs (created_at, seq)",
        """
        CREATE TABLE guild_settings (
            guild_id   BIGINT PRIMARY KEY,
            settings   TEXT NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL
        )
        """,
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    ),
    ("ALTER TABLE jobs ADD COLUMN backend_ref TEXT",),
    (
        "ALTER TABLE jobs ADD COLUMN delivered_at DOUBLE PRECISION",
        "ALTER TABLE jobs ADD COLUMN delivery_error TEXT",
        "UPDATE jobs SET delivered_at = COALESCE(finished_at, created_at) WHERE state NOT IN ('queued', 'running')",
        "CREATE INDEX jobs_undelivered ON jobs (state) WHERE delivered_at IS NULL AND delivery_error IS NULL",
    ),
    (
        # One row per running bot process (not in the SQLite store: there DATA_DIR/bot.lock does this).
        # shard_ids NULL: every shard. Times are the server's, so liveness never depends on a host's clock.
        """
        CREATE TABLE processes (
            id           TEXT PRIMARY KEY,
            host         TEXT NOT NULL,
            pid          INTEGER NOT NULL,
            shard_count  INTEGER,
            shard_ids    INTEGER[],
            started_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
            heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )
        """,
    ),
    (
        # The process (a ``processes`` id) that answers for the job; NULL: written before there was a fleet.
        "ALTER TABLE jobs ADD COLUMN owner TEXT",
    ),
    (
        # The fleet's one fair queue (bot/service/dispatch.py). What each process has waiting, per guild and
        # per set of backends that may serve it ("*": any); ``first_at`` orders never-served guilds.
        """
        CREATE TABLE fleet_demand (
            process_id  TEXT NOT NULL,
            guild_id    BIGINT NOT NULL,
            eligible    TEXT NOT NULL,
            waiting     INTEGER NOT NULL,
            guild_limit INTEGER NOT NULL,
            first_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
            updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
            PRIMARY KEY (process_id, guild_id, eligible)
        )
        """,
        # A slot on a backend granted by the dispatcher to one process for one guild. ``epoch`` fences every
        # write of its holder; ``expires_at`` (server time) is renewed by the holder's heartbeat.
        """
        CREATE TABLE fleet_slots (
            epoch      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            owner      TEXT NOT NULL,
            guild_id   BIGINT NOT NULL,
            backend    TEXT NOT NULL,
            eligible   TEXT NOT NULL,
            state      TEXT NOT NULL,
            granted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
            claimed_at TIMESTAMPTZ,
            expires_at TIMESTAMPTZ NOT NULL
        )
        """,
        "CREATE INDEX fleet_slots_owner ON fleet_slots (owner, state)",
        # A cancel pressed in one process for a job another runs: the row says so, a NOTIFY wakes the owner.
        "ALTER TABLE jobs ADD COLUMN cancel_requested_by TEXT",
        "ALTER TABLE jobs ADD COLUMN cancel_requested_at TIMESTAMPTZ",
        "CREATE INDEX jobs_cancel_requested ON jobs (owner) WHERE cancel_requested_at IS NOT NULL",
    ),
    (
        # The result cache's index (bot/engine/cache_pg.py; its invariants: bot/engine/cache.py), shared by the
        # fleet's processes; the blob files stay on the shared DATA_DIR. Times are the cache's clock (TTL and
        # LRU), as in the SQLite index. ``seq``: insertion order, the tie-break of "least recently used".
        """
        CREATE TABLE cache_entries (
            seq          BIGINT GENERATED ALWAYS AS IDENTITY,
            key          TEXT PRIMARY KEY,
            created_at   DOUBLE PRECISION NOT NULL,
            last_used_at DOUBLE PRECISION NOT NULL,
            backend      TEXT NOT NULL,
            model        TEXT,
            elapsed_s    DOUBLE PRECISION NOT NULL,
            images       TEXT NOT NULL,
            total_bytes  BIGINT NOT NULL
        )
        """,
        "CREATE INDEX cache_entries_last_used ON cache_entries (last_used_at, seq)",
        "CREATE INDEX cache_entries_created ON cache_entries (created_at)",
        """
        CREATE TABLE cache_blobs (
            ref    TEXT PRIMARY KEY,
            ext    TEXT NOT NULL,
            format TEXT NOT NULL,
            width  INTEGER NOT NULL,
            height INTEGER NOT NULL,
            size   BIGINT NOT NULL
        )
        """,
        # Which blobs each entry uses; every one has a cache_blobs row (a blob an entry uses cannot be dropped).
        """
        CREATE TABLE cache_entry_blobs (
            key TEXT NOT NULL REFERENCES cache_entries (key) ON DELETE CASCADE,
            ref TEXT NOT NULL REFERENCES cache_blobs (ref),
            PRIMARY KEY (key, ref)
        )
        """,
        "CREATE INDEX cache_entry_blobs_ref ON cache_entry_blobs (ref)",
        # Images of jobs whose result is not posted yet: kept past TTL and size eviction until unpinned.
        "CREATE TABLE cache_pins (job TEXT NOT NULL, ref TEXT NOT NULL, PRIMARY KEY (job, ref))",
        "CREATE INDEX cache_pins_ref ON cache_pins (ref)",
        # The index's size, kept by every write in the statement that changes it: reading it costs nothing
        # however many entries there are.
        """
        CREATE TABLE cache_totals (
            one     BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
            entries BIGINT NOT NULL,
            bytes   BIGINT NOT NULL
        )
        """,
        "INSERT INTO cache_totals (entries, bytes) VALUES (0, 0)",
        # Who is generating a key right now (a ``processes`` id): identical requests in other processes wait for
        # its put instead of generating it again. ``waiters``: someone waits, so the put or release NOTIFYs.
        """
        CREATE TABLE cache_fills (
            key     TEXT PRIMARY KEY,
            owner   TEXT NOT NULL,
            since   TIMESTAMPTZ NOT NULL DEFAULT now(),
            waiters BOOLEAN NOT NULL DEFAULT false
        )
        """,
    ),
    # v8: every write of the totals counts up ``version``, so a process whose writes return out of order (several
    # at once on its pool) keeps the newest totals, not the last to arrive.
    ("ALTER TABLE cache_totals ADD COLUMN version BIGINT NOT NULL DEFAULT 0",),
]

#: While the database is away: the first wait before a reconnection try, doubled after each failed one up to
#: the second (so a long outage costs one connection attempt every 5 s, and a short one heals quickly).
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 5.0

#: The advisory lock every migrating process takes (one bigint; any constant unique to this application).
MIGRATION_LOCK_KEY = 0x696D6167696E65  # "imagine"

#: Held (per transaction) while a process registers: the overlap check and the insert are one step.
PROCESS_LOCK_KEY = MIGRATION_LOCK_KEY + 1

#: Held (per transaction) while a process claims jobs: each claim sees every claim committed before it.
CLAIM_LOCK_KEY = MIGRATION_LOCK_KEY + 2

#: Held (per session, on the dispatcher's own connection) by the one process that runs the fleet's queue.
DISPATCH_LOCK_KEY = MIGRATION_LOCK_KEY + 3

#: Held (per transaction) by every writer of the result cache's index: the only ones that may unlink a blob.
CACHE_LOCK_KEY = MIGRATION_LOCK_KEY + 4

#: The channels of the fleet's wake-ups (payloads are ids only).
DISPATCH_CHANNEL = "bot_dispatch"  # what waits, or what is held, changed: the dispatcher plans again
GRANT_CHANNEL = "bot_grant"  # payload: the process granted slots
CANCEL_CHANNEL = "bot_cancel"  # payload: the job to cancel
FILL_CHANNEL = "bot_fill"  # payload: a cache key another process put or gave up (bot/engine/cache_pg.py)

#: How long a silent process counts as alive when this store was not told the fleet's LEASE_TTL_S.
DEFAULT_LEASE_TTL_S = 30.0

#: ``application_name`` of the bot's sessions; a fleet process's are ``imagine-bot:<its processes id>``.
SESSION_NAME = "imagine-bot"


def session_name(process_id: str | None = None) -> str:
    """What ``pg_stat_activity`` shows for this process's sessions (the fleet ends a dead process's by it)."""
    return SESSION_NAME if process_id is None else f"{SESSION_NAME}:{process_id}"


#: SQL, a CTE: end the sessions named after the processes in the CTE ``dead`` (rows of ``processes``) but this
#: one; a lost host's sessions would otherwise keep their locks and transactions for hours. Only those this
#: session may end (a role its own; a superuser any): another role's are left alone rather than failing.
_END_SESSIONS_OF_DEAD = f"""
ended AS MATERIALIZED (
    SELECT pg_terminate_backend(a.pid) AS ended
    FROM pg_stat_activity a JOIN dead d ON a.application_name = '{SESSION_NAME}:' || d.id
    WHERE a.pid <> pg_backend_pid() AND a.datname = current_database()
      AND (a.usename = current_user OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user))
)"""

T = TypeVar("T")


async def _undo_interrupted_transaction(conn: asyncpg.Connection) -> None:
    """What a connection needs before it goes back to the pool. The store keeps no session state (its advisory
    locks are transaction-scoped; it opens no cursors outside transactions, LISTENs and SETs nothing), so
    asyncpg's default reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``) is one round
    trip per store call for nothing: only a transaction a cancel interrupted is rolled back."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


def advisory_key(name: str) -> int:
    """A stable signed 64-bit advisory-lock key for ``name`` (the same in every process)."""
    digest = hashlib.sha256(f"imagine-bot:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@dataclass(frozen=True)
class FleetProcess:
    """A bot process as the ``processes`` table knows it. ``shard_ids`` None: it runs every shard."""

    id: str
    host: str
    pid: int
    shard_count: int | None
    shard_ids: tuple[int, ...] | None

    def overlaps(self, other: FleetProcess) -> bool:
        """Whether the two could both hear from one guild. Shard numbers mean different guilds under
        different counts, so two counts overlap unless told otherwise."""
        if self.shard_ids is None or other.shard_ids is None or self.shard_count != other.shard_count:
            return True
        return bool(set(self.shard_ids) & set(other.shard_ids))

    def describe(self) -> str:
        if self.shard_ids is None:
            shards = "every shard"
        else:
            shards = f"shards {','.join(map(str, self.shard_ids))} of {self.shard_count}"
        return f"host {self.host}, pid {self.pid}, {shards}"


_PROCESS_COLUMNS = "id, host, pid, shard_count, shard_ids"


def _process(row: Any) -> FleetProcess:
    ids = row["shard_ids"]
    return FleetProcess(
        str(row["id"]),
        str(row["host"]),
        int(row["pid"]),
        None if row["shard_count"] is None else int(row["shard_count"]),
        None if ids is None else tuple(sorted(int(i) for i in ids)),
    )


_SELECT_JOBS = f"SELECT {', '.join(_JOB_COLUMNS + _DELIVERY_COLUMNS)} FROM jobs"
_WRITTEN_COLUMNS = (*_JOB_COLUMNS, "owner")
#: ``owner`` is written by an insert only: an update keeps it, and happens only while it is the writer's
#: (``IS NOT DISTINCT FROM``: NULL for a store outside a fleet). A refused update reports ``INSERT 0 0``.
_UPSERT_JOB = (
    f"INSERT INTO jobs ({', '.join(_WRITTEN_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i}' for i in range(1, len(_WRITTEN_COLUMNS) + 1))}) "
    f"ON CONFLICT (id) DO UPDATE SET {', '.join(f'{c} = EXCLUDED.{c}' for c in _JOB_COLUMNS[1:])}"
)
_UPSERT_OWNED_JOB = f"{_UPSERT_JOB} WHERE jobs.owner IS NOT DISTINCT FROM EXCLUDED.owner"
#: The claims: jobs to answer for whose owner has no live row (NULL included), made ours in one statement.
#: ``$1`` this process, ``$2`` the lease in seconds; ``{which}`` narrows them further.
_CLAIM_JOBS = (
    "WITH claimed AS (SELECT id, owner AS previous FROM jobs "
    f"WHERE {_UNSETTLED} AND NOT EXISTS (SELECT 1 FROM processes "
    "WHERE processes.id = jobs.owner AND heartbeat_at >= now() - make_interval(secs => $2)) AND {which} "
    "FOR UPDATE) "
    "UPDATE jobs SET owner = $1 FROM claimed WHERE jobs.id = claimed.id "
    f"RETURNING claimed.previous, jobs.seq, {', '.join(f'jobs.{c}' for c in _JOB_COLUMNS + _DELIVERY_COLUMNS)}"
)

#: A process's demand: its rows for the guilds ``$2`` become ``$3..$6`` (guild, eligible, waiting, limit); slots
#: ``$7`` are given back; the dispatcher is woken. One statement: one round trip.
_PUBLISH_FLEET = f"""
WITH new AS (
    SELECT * FROM unnest($3::bigint[], $4::text[], $5::int[], $6::int[]) AS t(guild_id, eligible, waiting, guild_limit)
), up AS (
    INSERT INTO fleet_demand (process_id, guild_id, eligible, waiting, guild_limit)
    SELECT $1, guild_id, eligible, waiting, guild_limit FROM new
    ON CONFLICT (process_id, guild_id, eligible) DO UPDATE
        SET waiting = EXCLUDED.waiting, guild_limit = EXCLUDED.guild_limit, updated_at = now()
), gone AS (
    DELETE FROM fleet_demand d WHERE d.process_id = $1 AND d.guild_id = ANY($2::bigint[])
        AND NOT EXISTS (SELECT 1 FROM new WHERE new.guild_id = d.guild_id AND new.eligible = d.eligible)
), freed AS (
    DELETE FROM fleet_slots WHERE owner = $1 AND epoch = ANY($7::bigint[])
)
SELECT pg_notify('{DISPATCH_CHANNEL}', '')
"""
#: A process's poll: take up the slots granted to it, renew the ones it holds, read cancels for its jobs.
_POLL_FLEET = """
WITH taken AS (
    UPDATE fleet_slots SET state = 'claimed', claimed_at = now(), expires_at = now() + make_interval(secs => $2)
    WHERE owner = $1 AND state = 'granted' RETURNING epoch, guild_id, backend
), renewed AS (
    UPDATE fleet_slots SET expires_at = now() + make_interval(secs => $2)
    WHERE owner = $1 AND state = 'claimed' RETURNING epoch
)
SELECT 'granted' AS kind, epoch, guild_id, backend, NULL AS job_id, NULL AS cancel_by FROM taken
UNION ALL SELECT 'held', epoch, NULL, NULL, NULL, NULL FROM renewed
UNION ALL SELECT 'cancel', NULL, NULL, NULL, id, cancel_requested_by FROM jobs
    WHERE owner = $1 AND cancel_requested_at IS NOT NULL AND state IN ('queued', 'running')
"""
#: The dispatcher's view: the slots held and the demand of live processes (``$1`` the lease in seconds); the
#: slots of processes not alive, and expired ones, are deleted on the way. ``pending``: granted, or taken up
#: after its owner last published that guild's demand (so that demand still counts it).
_FLEET_ROWS = """
WITH live AS (
    SELECT id FROM processes WHERE heartbeat_at >= now() - make_interval(secs => $1)
), dropped AS (
    DELETE FROM fleet_slots WHERE expires_at < now() OR owner NOT IN (SELECT id FROM live)
), stale AS (
    DELETE FROM fleet_demand WHERE process_id NOT IN (SELECT id FROM live)
)
SELECT 'slot' AS kind, s.epoch, s.owner, s.guild_id, s.backend, s.eligible,
       (s.state = 'granted' OR s.claimed_at >= COALESCE(
           (SELECT max(d.updated_at) FROM fleet_demand d WHERE d.process_id = s.owner AND d.guild_id = s.guild_id),
           '-infinity')) AS pending,
       NULL::int AS waiting, NULL::int AS guild_limit, NULL::float8 AS first_seen
FROM fleet_slots s WHERE s.expires_at >= now() AND s.owner IN (SELECT id FROM live)
UNION ALL
SELECT 'demand', NULL, d.process_id, d.guild_id, NULL, d.eligible, NULL, d.waiting, d.guild_limit,
       extract(epoch FROM d.first_at)::float8
FROM fleet_demand d WHERE d.process_id IN (SELECT id FROM live) AND d.waiting > 0
"""
#: The dispatcher's grants (owner, guild, backend, eligible), each owner woken once.
_GRANT_SLOTS = f"""
WITH granted AS (
    INSERT INTO fleet_slots (owner, guild_id, backend, eligible, state, expires_at)
    SELECT o, g, b, e, 'granted', now() + make_interval(secs => $5)
    FROM unnest($1::text[], $2::bigint[], $3::text[], $4::text[]) AS t(o, g, b, e)
    RETURNING owner
)
SELECT pg_notify('{GRANT_CHANNEL}', owner) FROM (SELECT DISTINCT owner FROM granted) AS owners
"""


@dataclass(frozen=True)
class FleetPoll:
    """What one poll of the fleet's rows found for this process."""

    #: Slots just granted to it: (epoch, guild, backend).
    granted: list[tuple[int, int, str]]
    #: Every slot it holds now (the granted ones included): a slot it believed held and not here is lost.
    held: set[int]
    #: Cancels pressed elsewhere for jobs it runs: (job id, who).
    cancels: list[tuple[str, str | None]]


@dataclass(frozen=True)
class FleetRows:
    """The dispatcher's read: slots held (epoch, owner, guild, backend, eligible, pending) and demand
    (owner, guild, eligible, waiting, limit, first_seen)."""

    slots: list[tuple[int, str, int, str, str, bool]]
    demand: list[tuple[str, int, str, int, int, float]]


class FleetConnection:
    """One dedicated, unpooled connection: the fleet's ``LISTEN`` channels, and for the dispatcher its
    session-level advisory lock and its reads and writes. The lock lives exactly as long as this connection,
    so a dispatcher that lost it can write no grant (its writes go over the same connection)."""

    def __init__(self, store: PgJobStore) -> None:
        self.store = store
        self._conn: asyncpg.Connection | None = None
        self.holds_lock = False

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def connect(self, listeners: dict[str, Callable[[str], None]]) -> None:
        """Open the connection and LISTEN: ``listeners`` maps a channel to a callback given the payload."""
        await self.close()
        store = self.store
        try:
            conn = await asyncpg.connect(
                store._dsn,
                timeout=store.connect_timeout_s,
                command_timeout=store.command_timeout_s,
                server_settings={"application_name": store.session_name},
            )
        except Exception as exc:
            raise store._translate(exc, "listen on") from None
        try:
            for channel, callback in listeners.items():
                await conn.add_listener(channel, _payload_only(callback))
        except Exception as exc:
            conn.terminate()
            raise store._translate(exc, "listen on") from None
        self._conn = conn
        self.holds_lock = False

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self.holds_lock = False
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=2.0)
            except Exception:  # closing a connection to a database that is gone
                conn.terminate()

    async def _call(self, action: str, work: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        conn = self._conn
        if conn is None or conn.is_closed():
            self.holds_lock = False
            raise self.store._cannot(action, "the fleet's connection is closed")
        try:
            return await work(conn)
        except Exception as exc:
            if is_connection_error(exc):
                self.holds_lock = False
                conn.terminate()
                self._conn = None
            raise self.store._translate(exc, action) from None

    async def try_lock(self) -> bool:
        """Take the dispatcher's lock if free (kept while this connection lives)."""
        if self.holds_lock:
            return True

        async def lock(conn: asyncpg.Connection) -> bool:
            return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", DISPATCH_LOCK_KEY))

        self.holds_lock = await self._call("take the dispatcher's lock on", lock)
        return self.holds_lock

    async def read_rows(self, *, ttl_s: float) -> FleetRows:
        async def read(conn: asyncpg.Connection) -> list[Any]:
            return list(await conn.fetch(_FLEET_ROWS, float(ttl_s)))

        slots, demand = [], []
        for row in await self._call("read the fleet's queue from", read):
            if row["kind"] == "slot":
                slots.append(
                    (
                        int(row["epoch"]),
                        row["owner"],
                        int(row["guild_id"]),
                        row["backend"],
                        row["eligible"],
                        bool(row["pending"]),
                    )
                )
            else:
                demand.append(
                    (
                        row["owner"],
                        int(row["guild_id"]),
                        row["eligible"],
                        int(row["waiting"]),
                        int(row["guild_limit"]),
                        float(row["first_seen"]),
                    )
                )
        return FleetRows(slots, demand)

    async def grant(self, grants: Sequence[tuple[str, int, str, str]], *, ttl_s: float) -> None:
        """Write slots (owner, guild, backend, eligible) and wake their owners: one statement."""
        if not grants:
            return
        owners, guilds, backends, eligible = (list(column) for column in zip(*grants, strict=True))

        async def write(conn: asyncpg.Connection) -> None:
            await conn.execute(_GRANT_SLOTS, owners, guilds, backends, eligible, float(ttl_s))

        await self._call("grant slots in", write)


def _payload_only(callback: Callable[[str], None]) -> Callable[..., None]:
    def on_notify(_conn: object, _pid: int, _channel: str, payload: str) -> None:
        callback(payload)

    return on_notify


#: Errors that mean "the connection or the server is gone", not "this statement is wrong".
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,  # "connection is closed", "pool is closing"
    asyncpg.CannotConnectNowError,  # "the database system is starting up / shutting down"
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # Raised by a pooled connection the server dropped in the middle of a statement ("another operation is
    # in progress"): seen when PostgreSQL stops under load.
    asyncpg.InternalClientError,
)


#: Errors that mean "this address, user or password is wrong": retrying will not help.
_LOGIN_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InvalidCatalogNameError,
)


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` says the connection or server is gone (worth one retry on a fresh connection)."""
    # DataError (a value of the wrong type) subclasses InterfaceError but is the caller's mistake.
    return isinstance(exc, _CONNECTION_ERRORS) and not isinstance(exc, asyncpg.DataError)


def safe_dsn(dsn: str) -> str:
    """``dsn`` without its password (and query string), fit for logs and error messages."""
    try:
        parts = urlsplit(dsn)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "postgresql://(unparseable DATABASE_URL)"
    user = f"{unquote(parts.username)}@" if parts.username else ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme}://{user}{host}{port}{parts.path}"


def dsn_secrets(dsn: str) -> list[str]:
    """The password as written in the URL and decoded: both must be scrubbed wherever text is logged."""
    try:
        raw = urlsplit(dsn).password
    except ValueError:
        return []
    if not raw:
        return []
    return sorted({raw, unquote(raw)}, key=len, reverse=True)


@dataclass
class Outage:
    """The database stopped answering (``PgJobStore.outage``; None while it answers)."""

    #: When the store noticed (its own clock, monotonic seconds).
    since: float
    #: The latest failure, one line without the password.
    error: str
    #: Reconnection tries so far (each one connection attempt).
    tries: int = 0


def _describe(exc: BaseException) -> str:
    """One line about ``exc``: its first line of text, or what it is when it has none."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class PgJobStore:
    """Jobs, per-guild settings and small key/value metadata in a PostgreSQL database (``DATABASE_URL``)."""

    #: ``min_size`` 0: connections open on demand and stay for asyncpg's idle lifetime (300 s), so a busy bot
    #: keeps them warm, while an outage does not start asyncpg's "restore the floor" loop, which logs a
    #: traceback per attempt.
    #: ``report_outages`` False: an outage is logged at DEBUG only (a second pool on the same database, the
    #: fleet lease's, need not say again what the job store says). ``clock`` and ``sleep`` pace reconnection
    #: tries; tests inject them.
    def __init__(
        self,
        dsn: str,
        *,
        min_size: int = 0,
        max_size: int = 10,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
        reconnect_first_s: float = RECONNECT_FIRST_S,
        reconnect_max_s: float = RECONNECT_MAX_S,
        report_outages: bool = True,
        session_name: str = SESSION_NAME,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._dsn = dsn
        #: Every connection's ``application_name``: a fleet process's own (:func:`session_name`).
        self.session_name = session_name
        self.name = safe_dsn(dsn)
        self._secrets = dsn_secrets(dsn)
        self.min_size = min_size
        self.max_size = max_size
        self.connect_timeout_s = connect_timeout_s
        self.command_timeout_s = command_timeout_s
        self.reconnect_first_s = reconnect_first_s
        self.reconnect_max_s = max(reconnect_first_s, reconnect_max_s)
        self.report_outages = report_outages
        self.clock = clock
        self.sleep = sleep
        self._pool: asyncpg.Pool | None = None
        #: This process's ``processes`` id once it joined a fleet (:meth:`join_fleet`), and the lease.
        self.owner: str | None = None
        self.lease_ttl_s = DEFAULT_LEASE_TTL_S
        #: Set while the database is away (see the module docstring); the reconnect task clears it.
        self.outage: Outage | None = None
        self._reconnect_task: asyncio.Task[None] | None = None

    @property
    def reachable(self) -> bool:
        """Open, and not known to be away: what admission asks before taking a job it could not record."""
        return self._pool is not None and self.outage is None

    def __repr__(self) -> str:
        return f"PgJobStore({self.name!r})"

    # -- lifecycle -----------------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and migrate; raise a one-line StoreError if the database cannot be used."""
        if self._pool is not None:
            return
        self._check_url()
        try:
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self.min_size,
                max_size=self.max_size,
                timeout=self.connect_timeout_s,
                command_timeout=self.command_timeout_s,
                reset=_undo_interrupted_transaction,
                server_settings={"application_name": self.session_name},
            )
        except Exception as exc:
            raise self._unreachable(exc, "connect to") from None
        try:
            version = await self._migrate(pool)
        except BaseException as exc:
            pool.terminate()
            if isinstance(exc, StoreError):
                raise
            if is_connection_error(exc):
                # The pool connects lazily (min_size 0): the migration is where a bad address shows.
                raise self._unreachable(exc, "connect to") from None
            if isinstance(exc, Exception):
                raise self._translate(exc, "migrate") from None
            raise
        self._pool = pool
        log.info("job store open at %s (schema v%d)", self.name, version)

    def _check_url(self) -> None:
        try:
            _ = urlsplit(self._dsn).port  # parses host and port, raising ValueError for a bad one
        except ValueError as exc:
            raise StoreError(
                f"DATABASE_URL is not a valid URL ({self._scrub(_describe(exc))}); "
                "expected postgresql://user:pass@host:5432/db."
            ) from None

    async def probe(self) -> str:
        """For ``python -m bot check``: connect once, change nothing, and describe the server and the schema;
        StoreError (the same sentences as ``open``) when the database cannot be used."""
        self._check_url()
        try:
            conn = await asyncpg.connect(
                self._dsn,
                timeout=self.connect_timeout_s,
                server_settings={"application_name": self.session_name},
            )
        except Exception as exc:
            raise self._unreachable(exc, "connect to") from None
        try:
            server = conn.get_server_version()
            if await conn.fetchval("SELECT to_regclass('schema_version') IS NULL"):
                version = 0
            else:
                version = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
        except Exception as exc:
            raise self._translate(exc, "read the schema version") from None
        finally:
            await conn.close(timeout=self.connect_timeout_s)
        target = len(MIGRATIONS)
        if version > target:
            raise StoreError(
                f"The database {self.name} has schema version {version}, newer than this bot "
                f"understands ({target}); run a newer version of the bot or point DATABASE_URL elsewhere."
            )
        if version == 0:
            schema = "empty: the bot creates its tables on the first start"
        elif version < target:
            schema = f"schema v{version}, upgraded to v{target} on the next start"
        else:
            schema = f"schema v{version}"
        return f"{self.name}, PostgreSQL {server.major}.{server.minor}, {schema}"

    async def _migrate(self, pool: asyncpg.Pool) -> int:
        target = len(MIGRATIONS)
        async with pool.acquire() as conn, conn.transaction():
            # Held to the end of this transaction: a second process starting now waits here, then finds
            # the schema current. The version table is created under the lock too (IF NOT EXISTS races).
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            version = int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version"))
            if version > target:
                raise StoreError(
                    f"The database {self.name} has schema version {version}, newer than this bot "
                    f"understands ({target}); run a newer version of the bot or point DATABASE_URL elsewhere."
                )
            for number in range(version, target):
                for statement in MIGRATIONS[number]:
                    await conn.execute(statement)
                await conn.execute("INSERT INTO schema_version (version) VALUES ($1)", number + 1)
                log.info("migrated %s to schema v%d", self.name, number + 1)
        return target

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        task, self._reconnect_task = self._reconnect_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.outage = None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), self.command_timeout_s)
        except Exception as exc:  # a server that is gone cannot say goodbye: drop the sockets
            log.debug("closing the PostgreSQL pool: %s", self._scrub(_describe(exc)))
            pool.terminate()

    async def __aenter__(self) -> PgJobStore:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- errors ---------------------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return redact(text, self._secrets)

    def _unreachable(self, exc: BaseException, action: str) -> StoreError:
        if isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):  # wrong user or password
            return StoreError(
                f"PostgreSQL refused the login to {self.name}: {self._scrub(_describe(exc))}; "
                "check the user and password in DATABASE_URL."
            )
        if isinstance(exc, asyncpg.InvalidCatalogNameError):
            return StoreError(
                f"The PostgreSQL database {self.name} does not exist: {self._scrub(_describe(exc))}; "
                "create it (createdb) or fix DATABASE_URL."
            )
        return self._cannot(action, self._scrub(_describe(exc)))

    def _cannot(self, action: str, detail: str) -> StoreError:
        return StoreError(
            f"Cannot {action} the PostgreSQL database {self.name} ({detail}); "
            "check DATABASE_URL and that the server is running."
        )

    def _translate(self, exc: BaseException, action: str) -> StoreError:
        if isinstance(exc, _LOGIN_ERRORS):
            return self._unreachable(exc, "connect to")
        if is_connection_error(exc):
            return self._unreachable(exc, "reach")
        return StoreError(f"Job store failed to {action} ({self.name}): {self._scrub(_describe(exc))}")

    def _require(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError(f"The job store {self.name} is not open.")
        return self._pool

    def _refuse_while_away(self) -> None:
        """While the database is away a call fails at once: only the reconnect task opens sockets."""
        outage = self.outage
        if outage is not None:
            raise self._cannot("reach", outage.error)

    async def _on_connection(
        self, work: Callable[[asyncpg.Connection], Awaitable[T]], action: str = "run a query"
    ) -> T:
        """``work`` on a pooled connection, retried once if the connection turned out to be dead (``work``
        must be idempotent: one statement, or one transaction); every failure becomes StoreError. A retry
        that fails too means the database is away (see the module docstring)."""
        pool = self._require()
        for attempt in (1, 2):
            self._refuse_while_away()  # also between the two: another call may just have found it away
            try:
                async with pool.acquire(timeout=self.connect_timeout_s) as conn:
                    return await work(conn)
            except StoreError:
                raise
            except Exception as exc:  # anything from the driver: a caller sees StoreError, never asyncpg's
                if self._pool is not pool or not is_connection_error(exc):
                    raise self._translate(exc, action) from None
                if attempt == 2:
                    self._went_away(pool, exc)
                    raise self._translate(exc, action) from None
                log.debug("PostgreSQL connection lost (%s); retrying once", self._scrub(_describe(exc)))
        raise AssertionError("unreachable")

    # -- outages --------------------------------------------------------------------------------------------

    def _went_away(self, pool: asyncpg.Pool, exc: BaseException) -> None:
        """A call failed on two connections: the database is away until the reconnect task reaches it."""
        detail = self._scrub(_describe(exc))
        if self.outage is not None:
            self.outage.error = detail
            return
        self.outage = Outage(self.clock(), detail)
        log.log(
            logging.WARNING if self.report_outages else logging.DEBUG,
            "PostgreSQL unreachable; calls fail at once until it answers again (retrying every %g s at most)",
            self.reconnect_max_s,
            extra={"database": self.name, "error": detail},
        )
        self._reconnect_task = asyncio.create_task(self._reconnect(pool), name="pg-reconnect")
        self._reconnect_task.add_done_callback(_log_if_crashed)

    async def _reconnect(self, pool: asyncpg.Pool) -> None:
        """Try one ``SELECT 1`` after each wait (doubling up to ``reconnect_max_s``) until one answers."""
        # No connection from before the outage is trusted again: each is replaced on its next acquire.
        await pool.expire_connections()
        delay = self.reconnect_first_s
        while (outage := self.outage) is not None and self._pool is pool:
            await self.sleep(delay)
            outage.tries += 1
            try:
                async with pool.acquire(timeout=self.connect_timeout_s) as conn:
                    await conn.fetchval("SELECT 1", timeout=self.connect_timeout_s)
            except Exception as exc:  # whatever it is, the database does not answer yet
                outage.error = self._scrub(_describe(exc))
                delay = min(delay * 2, self.reconnect_max_s)
                continue
            self.outage = None
            log.log(
                logging.INFO if self.report_outages else logging.DEBUG,
                "PostgreSQL reachable again",
                extra={
                    "database": self.name,
                    "away_s": round(self.clock() - outage.since, 1),
                    "tries": outage.tries,
                },
            )

    async def run(self, work: Callable[[asyncpg.Connection], Awaitable[T]], *, action: str) -> T:
        """``work`` on a pooled connection with this store's rules: retried once on a fresh connection when its
        connection died (so ``work`` must be idempotent: one statement, or one transaction), refused at once
        while the database is away, and every failure a :class:`StoreError` (``action`` names it). For the
        result cache's index (bot/engine/cache_pg.py), which keeps its own tables in this database."""
        return await self._on_connection(work, action)

    async def _run(self, sql: str, params: Sequence[Any], *, rows: bool) -> list[Any]:
        """One statement on a pooled connection (its rows when ``rows``)."""

        async def statement(conn: asyncpg.Connection) -> list[Any]:
            if rows:
                return list(await conn.fetch(sql, *params))
            await conn.execute(sql, *params)
            return []

        return await self._on_connection(statement)

    async def _query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one statement (committed on return)."""
        return await self._run(sql, params, rows=True)

    async def _execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """One statement whose rows nobody reads (committed on return)."""
        await self._run(sql, params, rows=False)

    async def _status(self, sql: str, params: Sequence[Any]) -> str:
        """One statement; its command tag (``INSERT 0 1``), committed on return."""

        async def statement(conn: asyncpg.Connection) -> str:
            return str(await conn.execute(sql, *params))

        return await self._on_connection(statement)

    # -- health ---------------------------------------------------------------------------------------------

    async def ping(self, timeout_s: float = 1.0) -> bool:
        """For /healthz: True when a trivial query answers quickly (False at once while the database is
        away: the reconnect task, not every probe, finds out when it is back)."""
        if not self.reachable:
            return False

        async def select_one(conn: asyncpg.Connection) -> object:
            return await conn.fetchval("SELECT 1")

        try:
            async with asyncio.timeout(timeout_s):
                return await self._on_connection(select_one, "answer a ping") == 1
        except Exception:
            return False

    @contextlib.asynccontextmanager
    async def advisory_lock(self, name: str, *, wait_s: float = 300.0) -> AsyncIterator[None]:
        """Hold the fleet-wide lock ``name`` for the block: a second process waits here (up to ``wait_s``)
        until the first has left it. A transaction-level lock on one connection: released at the block's end
        however it ends, and by the server if this process dies."""
        pool = self._require()
        self._refuse_while_away()
        key = advisory_key(name)
        try:
            conn = await pool.acquire(timeout=self.connect_timeout_s)
        except Exception as exc:
            raise self._translate(exc, f"take the lock {name!r}") from None
        try:
            transaction = conn.transaction()
            try:
                await transaction.start()
                await conn.execute("SELECT pg_advisory_xact_lock($1)", key, timeout=wait_s)
            except Exception as exc:
                raise self._translate(exc, f"take the lock {name!r}") from None
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # a dead connection released the lock with itself
                    await transaction.rollback()  # nothing was written on it: rollback only ends the lock
        finally:
            await pool.release(conn)

    # -- the fleet's processes ------------------------------------------------------------------------------

    async def register_process(self, me: FleetProcess, *, ttl_s: float) -> FleetProcess | None:
        """Add (or refresh) ``me`` unless a live process overlaps its shards; return that process then.

        Rows whose heartbeat is older than ``ttl_s`` (by the server's clock) are dead: deleted here, and never
        in the way. Check and insert are one transaction under ``PROCESS_LOCK_KEY``.
        """

        async def register(conn: asyncpg.Connection) -> FleetProcess | None:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", PROCESS_LOCK_KEY)
                dead = await conn.fetch(
                    f"WITH dead AS (DELETE FROM processes WHERE heartbeat_at < now() - make_interval(secs => $1) "
                    f"AND id <> $2 RETURNING {_PROCESS_COLUMNS}), {_END_SESSIONS_OF_DEAD} "
                    f"SELECT dead.*, (SELECT count(ended) FROM ended) AS sessions_ended FROM dead",
                    float(ttl_s),
                    me.id,
                )
                for row in dead:
                    log.info("removed the row of a dead process (%s)", _process(row).describe())
                live = await conn.fetch(f"SELECT {_PROCESS_COLUMNS} FROM processes WHERE id <> $1", me.id)
                for row in live:
                    other = _process(row)
                    if me.overlaps(other):
                        return other
                await conn.execute(
                    "INSERT INTO processes (id, host, pid, shard_count, shard_ids) VALUES ($1, $2, $3, $4, $5) "
                    "ON CONFLICT (id) DO UPDATE SET heartbeat_at = now()",
                    me.id,
                    me.host,
                    me.pid,
                    me.shard_count,
                    None if me.shard_ids is None else list(me.shard_ids),
                )
                return None

        return await self._on_connection(register, "register this process")

    async def heartbeat_process(self, process_id: str) -> bool:
        """Renew the process's row; False when it is gone (deemed dead and removed by another process)."""
        rows = await self._query(
            "UPDATE processes SET heartbeat_at = now() WHERE id = $1 RETURNING id", (process_id,)
        )
        return bool(rows)

    async def deregister_process(self, process_id: str) -> None:
        await self._execute("DELETE FROM processes WHERE id = $1", (process_id,))

    async def live_processes(self, *, ttl_s: float) -> list[FleetProcess]:
        """Processes whose heartbeat is younger than ``ttl_s``, oldest start first."""
        rows = await self._query(
            f"SELECT {_PROCESS_COLUMNS} FROM processes WHERE heartbeat_at >= now() - make_interval(secs => $1) "
            "ORDER BY started_at, id",
            (float(ttl_s),),
        )
        return [_process(row) for row in rows]

    def join_fleet(self, process_id: str, *, ttl_s: float) -> None:
        """From now on this store writes and claims jobs as the process ``process_id`` (a ``processes`` row),
        and a process silent for ``ttl_s`` is dead."""
        self.owner = process_id
        self.lease_ttl_s = float(ttl_s)

    async def end_dead_sessions(self) -> int:
        """End the database sessions of processes whose rows are dead (silent past the lease): a lost host's stay
        open in PostgreSQL, and would keep whatever lock their transaction holds (the claim lock, the cache's)
        for hours. Takes no lock itself, so a lock a lost host holds cannot stop it. A process still starting
        (no row yet) is never touched. Returns how many sessions it ended."""
        rows = await self._query(
            "WITH dead AS (SELECT id FROM processes WHERE heartbeat_at < now() - make_interval(secs => $1)), "
            f"{_END_SESSIONS_OF_DEAD} SELECT count(ended) AS ended FROM ended",
            (self.lease_ttl_s,),
        )
        return int(rows[0]["ended"])

    async def forget_dead_processes(self, process_ids: Iterable[str]) -> list[FleetProcess]:
        """Delete the rows of these processes that are still dead (a late heartbeat keeps its row), and end
        their sessions (a lost host's would keep their locks)."""
        rows = await self._query(
            f"WITH dead AS (DELETE FROM processes WHERE id = ANY($1::text[]) "
            f"AND heartbeat_at < now() - make_interval(secs => $2) RETURNING {_PROCESS_COLUMNS}), "
            f"{_END_SESSIONS_OF_DEAD} "
            f"SELECT dead.*, (SELECT count(ended) FROM ended) AS sessions_ended FROM dead",
            (sorted(set(process_ids)), self.lease_ttl_s),
        )
        return [_process(row) for row in rows]

    # -- jobs -----------------------------------------------------------------------------------------------

    async def save_job(self, job: Job, *, any_owner: bool = False) -> None:
        """Insert or update every persisted field; durable when this returns.

        A job another process has claimed since is not written: :class:`JobTaken` (retrying cannot help).
        ``any_owner``: write it whoever owns it (a member deleting a finished job, on whatever process).
        """
        params = (*_job_params(job), self.owner)
        if any_owner:
            await self._execute(_UPSERT_JOB, params)
        elif await self._status(_UPSERT_OWNED_JOB, params) == "INSERT 0 0":
            raise JobTaken(job.id)

    async def claim_jobs(self, *, shards: ShardFilter | None = None) -> list[Job]:
        """At start-up: the jobs nobody alive answers for (queued, running, or finished and never posted;
        unowned ones included) in ``shards``' guilds (None: every guild), made ours; oldest first."""
        params: list[Any] = [self.owner, self.lease_ttl_s]

        def bind(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        which = "TRUE" if shards is None else shards.sql(bind)
        return [job for _, job in await self._claim(which, params)]

    async def take_over_jobs(self) -> dict[str, list[Job]]:
        """While running: the jobs of processes that died (their rows silent past the lease, or gone), in any
        guild (a dead process's guilds have no live owner), made ours; by dead process, oldest first.
        Unowned jobs are left alone: they may belong to a live process that predates owners."""
        taken: dict[str, list[Job]] = {}
        # Never our own (were our lease lapsing, they are still running here).
        which = "owner IS NOT NULL AND owner IS DISTINCT FROM $1"
        for previous, job in await self._claim(which, [self.owner, self.lease_ttl_s]):
            taken.setdefault(previous or "", []).append(job)
        return taken

    async def _claim(self, which: str, params: Sequence[Any]) -> list[tuple[str | None, Job]]:
        sql = _CLAIM_JOBS.format(which=which)

        async def claim(conn: asyncpg.Connection) -> list[Any]:
            async with conn.transaction():
                # Serialised, and the UPDATE's snapshot is taken after the lock: it sees every claim (and every
                # registration) committed before it, so no job is claimed by two processes.
                await conn.execute("SELECT pg_advisory_xact_lock($1)", CLAIM_LOCK_KEY)
                return list(await conn.fetch(sql, *params))

        rows = await self._on_connection(claim, "claim jobs")
        rows.sort(key=lambda row: (row["created_at"], row["seq"]))
        claimed = []
        for row in rows:
            job = _job_from_row(tuple(row)[2:])
            if job is not None:
                claimed.append((row["previous"], job))
        return claimed

    # -- the fleet's queue ------------------------------------------------------------------------------------

    async def publish_fleet(
        self,
        guilds: Sequence[int],
        demand: Sequence[tuple[int, str, int, int]],
        freed: Sequence[int],
    ) -> None:
        """This process's demand for ``guilds`` is now ``demand`` (guild, eligible, waiting, limit; a guild
        not in it waits for nothing), slots ``freed`` are given back, and the dispatcher is woken."""
        columns = [list(c) for c in zip(*demand, strict=True)] if demand else [[], [], [], []]
        await self._execute(_PUBLISH_FLEET, (self.owner, list(guilds), *columns, list(freed)))

    async def poll_fleet(self) -> FleetPoll:
        """Take up the slots granted to this process, renew those it holds, and read cancels for its jobs."""
        granted, held, cancels = [], set(), []
        for row in await self._query(_POLL_FLEET, (self.owner, self.lease_ttl_s)):
            if row["kind"] == "granted":
                granted.append((int(row["epoch"]), int(row["guild_id"]), str(row["backend"])))
                held.add(int(row["epoch"]))
            elif row["kind"] == "held":
                held.add(int(row["epoch"]))
            else:
                cancels.append((str(row["job_id"]), row["cancel_by"]))
        return FleetPoll(granted, held, cancels)

    async def leave_fleet_queue(self) -> None:
        """A clean exit: this process's demand and slots go, and the dispatcher is woken to reuse them."""
        await self._execute(
            "WITH d AS (DELETE FROM fleet_demand WHERE process_id = $1), "
            "s AS (DELETE FROM fleet_slots WHERE owner = $1) "
            f"SELECT pg_notify('{DISPATCH_CHANNEL}', '')",
            (self.owner,),
        )

    async def request_cancel(self, job_id: str, *, by: str | None) -> str | None:
        """Ask whichever process runs ``job_id`` to cancel it (the row, and ``NOTIFY bot_cancel``); returns that
        process's id, or None when the job is not queued or running any more."""
        rows = await self._query(
            "WITH marked AS (UPDATE jobs SET cancel_requested_by = $2, cancel_requested_at = now() "
            "WHERE id = $1 AND state IN ('queued', 'running') RETURNING owner) "
            f"SELECT owner, pg_notify('{CANCEL_CHANNEL}', $1) FROM marked",
            (job_id, by),
        )
        return (rows[0]["owner"] or "") if rows else None

    async def get_job(self, job_id: str) -> Job | None:
        rows = await self._query(f"{_SELECT_JOBS} WHERE id = $1", (job_id,))
        return _job_from_row(tuple(rows[0])) if rows else None

    async def unfinished_jobs(self) -> list[Job]:
        """Jobs still queued or running, oldest first: after a restart these were left by a dead process."""
        rows = await self._query(
            f"{_SELECT_JOBS} WHERE state IN ($1, $2) ORDER BY created_at, seq", _UNFINISHED
        )
        return _jobs(rows)

    async def undelivered_jobs(self) -> list[Job]:
        """Finished jobs with a Discord message whose outcome was never posted, oldest first."""
        rows = await self._query(
            f"{_SELECT_JOBS} WHERE state NOT IN ($1, $2) AND delivered_at IS NULL AND delivery_error IS NULL "
            "AND message_ref IS NOT NULL ORDER BY created_at, seq",
            _UNFINISHED,
        )
        return _jobs(rows)

    async def mark_delivered(self, job_id: str, *, at: float, error: str | None = None) -> None:
        """Record that a finished job's outcome was posted (``error`` None) or could not be (``error`` says why)."""
        await self._execute(
            "UPDATE jobs SET delivered_at = $1, delivery_error = $2 WHERE id = $3",
            (None if error else float(at), error, job_id),
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

        def bind(value: Any) -> str:
            params.append(value)
            return f"${len(params)}"

        if guild_id is not None:
            clauses.append(f"guild_id = {bind(guild_id)}")
        if user_id is not None:
            clauses.append(f"user_id = {bind(user_id)}")
        if states is not None:
            wanted = [JobState(s).value for s in states]
            if not wanted:
                return []
            clauses.append(f"state = ANY({bind(wanted)}::text[])")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        limit_param = bind(max(0, int(limit)))
        rows = await self._query(
            f"{_SELECT_JOBS}{where} ORDER BY created_at DESC, seq DESC LIMIT {limit_param}", params
        )
        return _jobs(rows)

    async def count_images_since(self, *, guild_id: int, user_id: int, since: float) -> int:
        """Images a user really generated (not served from cache) since ``since``: the daily-quota count."""
        rows = await self._query(
            "SELECT COALESCE(SUM(json_array_length(seeds::json)), 0) FROM jobs "
            "WHERE guild_id = $1 AND user_id = $2 AND state = $3 AND from_cache = 0 AND finished_at >= $4",
            (guild_id, user_id, JobState.SUCCEEDED.value, float(since)),
        )
        return int(rows[0][0])

    async def count_images_by_user_since(self, since: float) -> dict[tuple[int, int], int]:
        """``count_images_since`` for every (guild, user) at once: loads today's quotas at start-up."""
        rows = await self._query(
            "SELECT guild_id, user_id, COALESCE(SUM(json_array_length(seeds::json)), 0) FROM jobs "
            "WHERE state = $1 AND from_cache = 0 AND finished_at >= $2 GROUP BY guild_id, user_id",
            (JobState.SUCCEEDED.value, float(since)),
        )
        return {(int(g), int(u)): int(n) for g, u, n in rows if n}

    # -- guild settings and meta ------------------------------------------------------------------------------

    # -- retention ------------------------------------------------------------------------------------------

    async def referenced_image_refs(self, refs: Iterable[str]) -> set[str]:
        """Those of ``refs`` (image content hashes) that some job in the store still lists."""
        wanted = sorted(set(refs))
        if not wanted:
            return set()
        rows = await self._query(
            "SELECT DISTINCT ref FROM jobs, jsonb_array_elements_text(jobs.image_refs::jsonb) AS ref "
            "WHERE jobs.image_refs <> '[]' AND ref = ANY($1::text[])",
            (wanted,),
        )
        return {str(row[0]) for row in rows}

    async def prune_finished_before(self, before: float, *, limit: int = 500) -> list[Job]:
        """Delete up to ``limit`` finished jobs whose ``finished_at`` is before ``before``; return them.

        Oldest first, through the ``finished_at`` index; one statement, so a crash deletes all or none.
        Queued and running jobs are never pruned.
        """
        terminal = [state.value for state in JobState if state.is_terminal]
        columns = ", ".join(_JOB_COLUMNS + _DELIVERY_COLUMNS)
        rows = await self._query(
            f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished_at < $1 "
            f"AND state = ANY($2::text[]) ORDER BY finished_at LIMIT $3) RETURNING {columns}",
            (float(before), terminal, max(1, int(limit))),
        )
        jobs = _jobs(rows)
        return sorted(jobs, key=lambda job: job.finished_at or 0.0)

    async def all_guild_settings(self) -> dict[int, dict[str, Any]]:
        """Every guild's settings document (unreadable ones skipped with a warning): loaded at start-up."""
        rows = await self._query("SELECT guild_id, settings FROM guild_settings")
        documents = ((int(guild_id), guild_settings_document(guild_id, text)) for guild_id, text in rows)
        return {guild_id: value for guild_id, value in documents if value is not None}

    async def get_guild_settings(self, guild_id: int) -> dict[str, Any]:
        rows = await self._query("SELECT settings FROM guild_settings WHERE guild_id = $1", (guild_id,))
        return (guild_settings_document(guild_id, rows[0][0]) if rows else None) or {}

    async def set_guild_settings(self, guild_id: int, values: dict[str, Any]) -> None:
        """Replace the guild's whole settings document."""
        document = json.dumps(values, separators=(",", ":"), sort_keys=True)
        await self._execute(
            "INSERT INTO guild_settings (guild_id, settings, updated_at) VALUES ($1, $2, $3) "
            "ON CONFLICT (guild_id) DO UPDATE SET settings = EXCLUDED.settings, updated_at = EXCLUDED.updated_at",
            (guild_id, document, time.time()),
        )

    async def get_meta(self, key: str) -> str | None:
        rows = await self._query("SELECT value FROM meta WHERE key = $1", (key,))
        return rows[0][0] if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (key, value),
        )


def _log_if_crashed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("PostgreSQL reconnection stopped", exc_info=task.exception())


def _jobs(rows: Iterable[Any]) -> list[Job]:
    return [job for row in rows if (job := _job_from_row(tuple(row))) is not None]
