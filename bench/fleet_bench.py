"""Fleet benchmark (issue 11): one burst of /imagine through three set-ups of the real bot.

    python -m bench.fleet_bench [--jobs 1000] [--guilds 100] [--backend-delay 0.1] [--backend-concurrency 16]
                                [--configs sqlite,pg,pg2] [--no-count] [--json FILE]

The set-ups, each a fresh run of ``python -m bot`` subprocesses against the in-process fake Discord and a fake
OpenAI images API (``--backend-delay`` seconds per image):

- ``sqlite``: one process, the SQLite store in a temporary ``DATA_DIR``;
- ``pg``: one process, ``DATABASE_URL`` to a database on a PostgreSQL cluster the benchmark starts with
  ``tests/pg.py`` (initdb + pg_ctl on 127.0.0.1, fsync off as in the tests) and tears down after;
- ``pg2``: two processes, ``SHARD_COUNT=2`` and ``SHARD_IDS`` 0 and 1, sharing one ``DATA_DIR`` and one
  database. Guild ids are chosen so that each shard owns half of them (``(guild_id >> 22) % 2``), and the fake
  Discord dispatches each guild's interactions to the process that runs its shard. Both processes have
  ``BACKEND_CONCURRENCY`` = ``--backend-concurrency``: the fleet's queue (bot/service/dispatch.py) holds it
  for the two together, so the backend sees the same number of slots in all three set-ups.

The same guilds (``--guilds``, half on each shard) and the same burst (``--jobs`` distinct prompts from distinct
members, round-robin over the guilds) in each. After the bot is connected, one warm-up job per process runs to
the end (first-call costs stay out of the figures); then the burst is dispatched at once, and the run ends when
every job's message shows its image (anything else, a missed 3 s acknowledgement included, exits 1) and the
store has recorded every delivery. Figures:

- **ack p50/p99**: real seconds from the fake sending INTERACTION_CREATE to the bot's callback reaching it
  (``FakeInteraction.ack_latency``).
- **CPU ms per job, per process**: the process's user + system time (``/proc/<pid>/stat``) from just before the
  burst until every delivery is recorded, divided by the jobs of the guilds it serves. Also reported: the
  PostgreSQL server's CPU (its postmaster and backends) and the counting proxy's, per job of the burst.
- **database round trips per job**: counted on the wire by ``bench/pg_proxy.py``, a proxy between each bot
  process and PostgreSQL (one port per process) that counts every client message after which the client waits
  for the server: Query, Sync, Flush (asyncpg's prepare) and the handshake's messages; each is attributed to its
  SQL, and the report names the store call behind each SQL. Counted over the same window as the CPU, so the
  fleet's heartbeats in that window are included. The proxy adds a loopback hop to every round trip (it runs
  as a process of its own; ``--no-count`` connects the bots straight to the server, to see what that hop
  costs); SQLite has no round trips (an in-process call on aiosqlite's thread).
- **grant latency**: the jobs table's ``started_at - created_at`` for each job of the burst, read from the
  store after the run (the bot's /metrics has no such figure): ``created_at`` is the manager's admission,
  ``started_at`` the moment the queue granted the job a slot (set before the RUNNING write). In a burst
  larger than the backend's slots that is mostly queueing, so a second figure isolates the grant itself:
  **free-slot grant**, the same latency for the first ``BACKEND_CONCURRENCY`` jobs to start in each process
  (fewer jobs than slots had started before them, so each found a slot free): the first store write, the
  job's task and the grant, while the process is still reading the rest of the burst.

The machine running it is shared (the fake Discord runs in this process, PostgreSQL and the proxy beside the
bots): compare the rows of one run, not runs on different machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp.web_app
import asyncpg

from bench.harness import (
    TOKEN,
    BenchError,
    CountingOpenAI,
    Process,
    bot_env,
    child,
    cpu_seconds,
    describe_unfinished,
    done_at,
    embed_author,
    has_image,
    job_state,
    percentile,
    tail,
)
from tests.fakes.discord import FakeDiscord, FakeGuild, FakeInteraction, FakeUser
from tests.fakes.discord.model import shard_of
from tests.pg import PASSWORD, SUPERUSER, ClusterError, PgCluster, start_cluster

SHARDS = 2
READY_SETTLE_S = 3.0
#: Targets from issue 11.
ACK_P99_RATIO_TARGET = 2.0
ROUND_TRIPS_TARGET = 10.0


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    processes: int
    postgres: bool


CONFIGS = {
    c.key: c
    for c in (
        Config("sqlite", "1 process, SQLite", 1, False),
        Config("pg", "1 process, PostgreSQL", 1, True),
        Config("pg2", "2 processes, PostgreSQL", 2, True),
    )
}


# ----------------------------------------------------------------------------------------------- the proxy


class WireProxy:
    """``bench/pg_proxy.py`` as a subprocess: one listening port (and one set of counters) per bot process."""

    def __init__(self, proc: asyncio.subprocess.Process, ports: dict[str, int]) -> None:
        self.proc = proc
        self.ports = ports

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, host: str, port: int, names: list[str]) -> AsyncIterator[WireProxy]:
        args = ["-m", "bench.pg_proxy", "--target", f"{host}:{port}"]
        for name in names:
            args += ["--listen", name]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
            if not line:
                raise BenchError(f"the round-trip proxy did not start (exit {await proc.wait()})")
            yield cls(proc, json.loads(line)["listen"])
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    async def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stats\n")
        await self.proc.stdin.drain()
        return json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 10))

    @property
    def pid(self) -> int:
        return self.proc.pid


def server_cpu_seconds(cluster: PgCluster) -> float:
    """CPU of the PostgreSQL server: the postmaster (with the backends it has reaped) and its live children."""
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    total = cpu_seconds(postmaster)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as stat:
                ppid = int(stat.read().rsplit(")", 1)[1].split()[1])
            if ppid == postmaster:
                total += cpu_seconds(int(entry))
        except (OSError, ValueError, IndexError):  # it exited meanwhile: its CPU is in the postmaster's
            continue
    return total


# ----------------------------------------------------------------------------------------------- the jobs table


@dataclass(frozen=True)
class Timing:
    guild_id: int
    created_at: float
    started_at: float | None


_TIMINGS = "SELECT guild_id, created_at, started_at FROM jobs WHERE created_at >= {}"
_UNDELIVERED = "SELECT count(*) FROM jobs WHERE message_ref IS NOT NULL AND delivered_at IS NULL AND delivery_error IS NULL"


class SqliteJobs:
    """The bot's own SQLite file, read-only beside it (WAL: readers never block the bot's writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with contextlib.closing(sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)) as db:
            return list(db.execute(sql, params))

    async def undelivered(self) -> int:
        return int((await asyncio.to_thread(self._fetch, _UNDELIVERED))[0][0])

    async def timings(self, since: float) -> list[Timing]:
        rows = await asyncio.to_thread(self._fetch, _TIMINGS.format("?"), (since,))
        return [Timing(int(g), c, s) for g, c, s in rows]


class PgJobs:
    """The same reads on PostgreSQL, straight to the server (not through the proxy: not counted)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def _fetch(self, sql: str, *params: Any) -> list[Any]:
        conn = await asyncpg.connect(self.url)
        try:
            return list(await conn.fetch(sql, *params))
        finally:
            await conn.close()

    async def undelivered(self) -> int:
        return int((await self._fetch(_UNDELIVERED))[0][0])

    async def timings(self, since: float) -> list[Timing]:
        rows = await self._fetch(_TIMINGS.format("$1"), since)
        return [Timing(int(g), c, s) for g, c, s in rows]


# ----------------------------------------------------------------------------------------------- figures


#: Which store call (bot/engine/store_pg.py) sends a statement: the first pattern found in its SQL names it.
STORE_CALLS: tuple[tuple[str, str], ...] = (
    ("SELECT pg_advisory_unlock_all()", "pool release: asyncpg's reset query, after every store call"),
    ("INSERT INTO jobs ", "save_job"),
    ("UPDATE jobs SET delivered_at", "mark_delivered"),
    ("UPDATE processes SET heartbeat_at", "heartbeat_process (fleet lease)"),
    ("FROM jobs WHERE id = $1", "get_job"),
    ("ORDER BY created_at DESC", "list_jobs"),
    ("delivered_at IS NULL", "undelivered_jobs"),
    ("WHERE state IN", "unfinished_jobs"),
    ("json_array_length", "count_images_since / count_images_by_user_since"),
    ("jsonb_array_elements_text", "referenced_image_refs (retention)"),
    ("DELETE FROM jobs", "prune_finished_before (retention)"),
    ("guild_settings", "guild settings"),
    (" meta ", "get_meta / set_meta"),
    # The result cache's index (bot/engine/cache_pg.py), before the patterns its statements also contain.
    ("INSERT INTO cache_fills", "cache lookup (and fill claim)"),
    ("FROM cache_entries WHERE key = $1", "cache lookup"),
    ("INSERT INTO cache_entries", "cache put"),
    ("INSERT INTO cache_pins", "cache pin"),
    ("DELETE FROM cache_pins", "cache unpin"),
    ("DELETE FROM cache_fills", "cache fill released"),
    ("UPDATE cache_entries SET last_used_at", "cache touch"),
    ("cache_", "cache eviction / other cache index work"),
    ("pg_advisory_xact_lock", "advisory_lock / register_process"),
    ("FROM processes", "live_processes / register_process"),
)


def store_call(sql: str) -> str:
    """The store call behind a statement as the proxy keyed it (its SQL, or a bracketed kind)."""
    if sql == "(connect)":
        return "new connection: SSLRequest, startup, SCRAM x2"
    if sql.startswith("(prepare) "):
        return f"prepare (first use on a connection): {store_call(sql.removeprefix('(prepare) '))}"
    if sql == "SELECT 1":
        return "ping (/healthz)"
    if sql.rstrip(";") in {"BEGIN", "COMMIT", "ROLLBACK"}:
        return f"transaction {sql.rstrip(';')}"
    for pattern, call in STORE_CALLS:
        if pattern in sql:
            return call
    return sql if len(sql) <= 80 else sql[:79] + "…"


@dataclass
class ProcessFigures:
    name: str
    jobs: int
    cpu_s: float
    round_trips: int | None = None
    connections: int | None = None
    by_sql: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    acks: list[float] = field(default_factory=list)  # of its own guilds' interactions

    @property
    def cpu_ms_per_job(self) -> float:
        return self.cpu_s * 1000 / max(1, self.jobs)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "jobs": self.jobs,
            "ack_ms": {
                "p50": round(percentile(self.acks, 50) * 1000, 2) if self.acks else None,
                "p99": round(percentile(self.acks, 99) * 1000, 2) if self.acks else None,
            },
            "cpu_ms_per_job": round(self.cpu_ms_per_job, 3),
            "round_trips": self.round_trips,
            "round_trips_per_job": None
            if self.round_trips is None
            else round(self.round_trips / self.jobs, 3),
            "connections_opened": self.connections,
            "warning_lines": len(self.warnings),
        }


@dataclass
class Figures:
    config: Config
    jobs: int
    acks: list[float]
    grants: list[float]
    free_slot_grants: list[float]
    wall_s: float
    dispatch_s: float
    rest_calls: int
    processes: list[ProcessFigures]
    server_cpu_s: float | None = None
    proxy_cpu_s: float | None = None
    bench_cpu_s: float = 0.0
    #: Per job whose message showed "Done" before its image: for how many seconds.
    done_before_image_s: list[float] = field(default_factory=list)
    #: How late this process's event loop (the fake Discord's) woke during the burst: when it is late, so is
    #: every timestamp the fake takes, acknowledgements included.
    fake_lag_s: list[float] = field(default_factory=list)

    @property
    def round_trips(self) -> int | None:
        counted = [p.round_trips for p in self.processes]
        return None if None in counted else sum(c for c in counted if c is not None)

    @property
    def round_trips_per_job(self) -> float | None:
        return None if self.round_trips is None else self.round_trips / self.jobs

    @property
    def cpu_ms_per_job(self) -> float:
        """The whole fleet's CPU per job (every process)."""
        return sum(p.cpu_s for p in self.processes) * 1000 / self.jobs

    def round_trips_by_call(self) -> list[tuple[str, float]]:
        """Round trips per job by the store call behind them, largest first."""
        calls: Counter[str] = Counter()
        for process in self.processes:
            for sql, count in process.by_sql.items():
                calls[store_call(sql)] += count
        return [(call, count / self.jobs) for call, count in calls.most_common()]

    def to_json(self) -> dict[str, Any]:
        def ms(values: list[float], q: float) -> float | None:
            return round(percentile(values, q) * 1000, 2) if values else None

        return {
            "label": self.config.label,
            "processes": self.config.processes,
            "jobs": self.jobs,
            "ack_ms": {"p50": ms(self.acks, 50), "p99": ms(self.acks, 99), "max": ms(self.acks, 100)},
            "cpu_ms_per_job": round(self.cpu_ms_per_job, 3),
            "per_process": [p.to_json() for p in self.processes],
            "round_trips_per_job": None
            if self.round_trips_per_job is None
            else round(self.round_trips_per_job, 3),
            "round_trips_by_store_call_per_job": {c: round(n, 3) for c, n in self.round_trips_by_call()},
            "grant_ms": {"p50": ms(self.grants, 50), "p99": ms(self.grants, 99), "max": ms(self.grants, 100)},
            "free_slot_grant_ms": {
                "jobs": len(self.free_slot_grants),
                "p50": ms(self.free_slot_grants, 50),
                "max": ms(self.free_slot_grants, 100),
            },
            "wall_s": round(self.wall_s, 2),
            "dispatch_s": round(self.dispatch_s, 3),
            "rest_calls_per_job": round(self.rest_calls / self.jobs, 2),
            "postgres_server_cpu_ms_per_job": None
            if self.server_cpu_s is None
            else round(self.server_cpu_s * 1000 / self.jobs, 3),
            "proxy_cpu_ms_per_job": None
            if self.proxy_cpu_s is None
            else round(self.proxy_cpu_s * 1000 / self.jobs, 3),
            "bench_cpu_ms_per_job": round(self.bench_cpu_s * 1000 / self.jobs, 3),
            "fake_loop_lag_ms": {"p99": ms(self.fake_lag_s, 99), "max": ms(self.fake_lag_s, 100)},
            "done_before_image": {
                "jobs": len(self.done_before_image_s),
                "max_s": round(max(self.done_before_image_s), 3) if self.done_before_image_s else None,
            },
        }


def grant_figures(
    timings: list[Timing], owner: Callable[[int], int], slots: int
) -> tuple[list[float], list[float]]:
    """(every job's grant latency, the free-slot ones): see the module docstring."""
    missing = [t for t in timings if t.started_at is None]
    if missing:
        raise BenchError(f"{len(missing)} jobs of the burst have no start time in the store")
    grants = [t.started_at - t.created_at for t in timings]  # type: ignore[operator]
    free: list[float] = []
    for process in {owner(t.guild_id) for t in timings}:
        mine = sorted((t for t in timings if owner(t.guild_id) == process), key=lambda t: t.started_at or 0.0)
        # The first `slots` to start found a slot free: fewer than `slots` jobs had started before them.
        free += [t.started_at - t.created_at for t in mine[:slots]]  # type: ignore[operator]
    return grants, free


# ----------------------------------------------------------------------------------------------- one run


@dataclass
class World:
    guilds: list[FakeGuild]
    burst: list[tuple[FakeGuild, FakeUser]]
    warmups: list[tuple[FakeGuild, FakeUser]]  # one per shard


def make_world(fake: FakeDiscord, jobs: int, guilds: int) -> World:
    """Guilds alternate between the two shards, so each process of ``pg2`` owns half of them and of the jobs."""
    all_guilds = [
        fake.add_guild(fake.guild_id_on_shard(g % SHARDS, SHARDS), name=f"fleet-{g}") for g in range(guilds)
    ]
    burst = [(g, fake.add_member(g.id)) for g in (all_guilds[i % guilds] for i in range(jobs))]
    warmups = [(all_guilds[s], fake.add_member(all_guilds[s].id)) for s in range(min(SHARDS, guilds))]
    return World(all_guilds, burst, warmups)


async def invoke(fake: FakeDiscord, who: tuple[FakeGuild, FakeUser], prompt: str) -> FakeInteraction:
    guild, user = who
    return await fake.invoke_command(guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": prompt})


async def wait_connected(fake: FakeDiscord, processes: list[Process], timeout: float = 60.0) -> None:
    """Every process has had READY and is connected, and /imagine is synced."""
    deadline = time.monotonic() + timeout
    want = len(processes)
    while not (
        fake.ready_count >= want
        and len(fake.connected_sessions) >= want
        and "imagine" in fake.commands.get(None, {})
    ):
        for process in processes:
            process.check_alive("starting")
        if time.monotonic() > deadline:
            logs = "\n".join(tail(p.log_path) for p in processes)
            raise BenchError(
                f"not connected after {timeout:.0f}s (ready={fake.ready_count}, "
                f"connected={fake.gateway.connected_shards}):\n{logs}"
            )
        await asyncio.sleep(0.05)


async def warm_up(fake: FakeDiscord, world: World, processes: list[Process], timeout: float) -> None:
    """One job per shard to the end: each process answers, and first-call costs stay out of the figures."""
    inters = [
        await invoke(fake, who, f"warm-up {i}: a lighthouse at dusk") for i, who in enumerate(world.warmups)
    ]
    try:
        await fake.wait_for_state(
            lambda: all(job_state(i) in {"done", "failed", "refused"} for i in inters), timeout, "warm-up"
        )
    except TimeoutError:
        for process in processes:
            process.check_alive("warm-up")
        raise BenchError(f"warm-up not finished: {describe_unfinished(inters)}") from None
    if any(job_state(i) != "done" for i in inters):
        raise BenchError(f"warm-up failed: {describe_unfinished(inters)}")


def burst_state(inter: FakeInteraction) -> str:
    """``job_state``, except that "Done" without the image yet is still pending: the bot can show a finished
    job's embed in a progress edit before the edit that uploads its image (see ``done_before_image``)."""
    state = job_state(inter)
    if state == "failed" and embed_author(inter.original).startswith("Done"):
        return "pending"
    return state


def done_before_image(inter: FakeInteraction) -> float | None:
    """Seconds the message showed "Done" without its image before the image came (None: it never did)."""
    first = None
    for revision in inter.original.history if inter.original else []:
        author = str((revision.embeds[0].get("author") or {}).get("name", "")) if revision.embeds else ""
        if not author.startswith("Done"):
            continue
        if has_image(revision.attachments):
            return None if first is None else revision.time - first
        if first is None:
            first = revision.time
    return None


async def wait_all_done(
    fake: FakeDiscord, inters: list[FakeInteraction], processes: list[Process], budget: float
) -> None:
    deadline = time.monotonic() + budget
    ack_deadline = (fake.ack_deadline_s or 3) + 2
    while True:
        now = time.monotonic()
        states = [burst_state(i) for i in inters]
        stuck = [
            i
            for i, s in zip(inters, states, strict=True)
            if s == "unacked" and now - i.dispatched_monotonic > ack_deadline
        ]
        if stuck or "refused" in states or "failed" in states:
            why = Counter(
                embed_author(i.original) or (i.callback.data.get("content") if i.callback else "") or s
                for i, s in zip(inters, states, strict=True)
                if s in {"failed", "refused"}
            )
            acks = [i.ack_latency for i in inters if i.ack_latency is not None]
            raise BenchError(
                f"burst failed: {describe_unfinished(inters)}\n  {len(stuck)} not acknowledged in time "
                f"(the {len(acks)} acknowledged so far: p50 {_ms(acks, 50)} ms, p99 {_ms(acks, 99)} ms); "
                f"failed or refused: {dict(why.most_common(5))}"
            )
        if all(s == "done" for s in states):
            return
        for process in processes:
            process.check_alive("burst")
        if now > deadline:
            raise BenchError(f"burst not finished after {budget:.0f}s: {describe_unfinished(inters)}")
        await asyncio.sleep(0.1)


async def wait_delivered(jobs: SqliteJobs | PgJobs, timeout: float = 30.0) -> None:
    """The store has recorded every delivery: the jobs' last writes are inside the measured window."""
    deadline = time.monotonic() + timeout
    while (left := await jobs.undelivered()) > 0:
        if time.monotonic() > deadline:
            raise BenchError(f"{left} finished jobs still have no delivery record after {timeout:.0f}s")
        await asyncio.sleep(0.2)


class LoopLag:
    """Samples how late this event loop wakes from a short sleep: the fake Discord's own backlog."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval)
            self.samples.append(max(0.0, time.monotonic() - before - self.interval))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="loop-lag")

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.samples


def with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    return f"postgresql://{SUPERUSER}:{PASSWORD}@{parts.hostname}:{port}{parts.path}"


async def run_config(config: Config, options: argparse.Namespace, cluster: PgCluster | None) -> Figures:
    names = [f"bot-{i}" for i in range(config.processes)]
    concurrency = options.backend_concurrency  # fleet-wide in pg2: the dispatcher shares it out
    budget = options.timeout
    owner: Callable[[int], int] = (
        (lambda guild_id: shard_of(guild_id, SHARDS)) if config.processes > 1 else (lambda guild_id: 0)
    )
    with tempfile.TemporaryDirectory(prefix=f"fleet-bench-{config.key}-") as tmp:
        data_dir = Path(tmp)
        async with contextlib.AsyncExitStack() as stack:
            fake = await stack.enter_async_context(FakeDiscord(token=TOKEN, recommended_shards=1))
            backend = await stack.enter_async_context(CountingOpenAI(delay=options.backend_delay))
            world = make_world(fake, options.jobs, options.guilds)
            common: dict[str, object] = {
                "image_backend": "openai",
                "image_backend_url": backend.url,
                "backend_concurrency": concurrency,
                "guild_concurrency": options.guild_concurrency,
                "guild_concurrency_max": max(8, options.guild_concurrency),
                "user_max_jobs": 5,
                "queue_timeout_s": 840,
                "shutdown_grace_s": 5,
            }
            proxy: WireProxy | None = None
            jobs_table: SqliteJobs | PgJobs
            urls: dict[str, str] = {}
            if cluster is not None:
                direct = await asyncio.to_thread(cluster.create_database, f"fleet_{config.key}")
                jobs_table = PgJobs(direct)
                if options.no_count:
                    urls = dict.fromkeys(names, direct)
                else:
                    proxy = await stack.enter_async_context(
                        WireProxy.running(cluster.host, cluster.port, names)
                    )
                    urls = {name: with_port(direct, proxy.ports[name]) for name in names}
            else:
                jobs_table = SqliteJobs(data_dir / "bot.sqlite3")
            processes: list[Process] = []
            for index, name in enumerate(names):
                settings = dict(common)
                if cluster is not None:
                    settings["database_url"] = urls[name]
                if config.processes > 1:
                    settings.update(shard_count=SHARDS, shard_ids=index)
                env = bot_env(fake, data_dir, **settings)
                processes.append(
                    await stack.enter_async_context(
                        child(["-m", "bot"], env, data_dir, log_name=f"{name}.log")
                    )
                )
            await wait_connected(fake, processes)
            # discord.py calls on_ready guild_ready_timeout (2 s) after the last GUILD_CREATE: the burst starts
            # once every process is past its start-up.
            await asyncio.sleep(READY_SETTLE_S)
            await warm_up(fake, world, processes, timeout=options.backend_delay + 30)
            await wait_delivered(jobs_table)
            await asyncio.sleep(0.5)  # the warm-up's last writes settle before the baselines

            tag = f"{os.getpid()}-{config.key}"
            stats0 = await proxy.stats() if proxy else None
            server0 = server_cpu_seconds(cluster) if cluster else None
            proxy0 = cpu_seconds(proxy.pid) if proxy else None
            cpu0 = [cpu_seconds(p.pid) for p in processes]
            bench0 = time.process_time()
            since, clock0, requests0 = time.time(), fake.clock(), len(fake.requests)
            started = time.monotonic()
            lag = LoopLag()
            lag.start()
            inters = [
                await invoke(fake, who, f"fleet {tag} job {i}: a fox") for i, who in enumerate(world.burst)
            ]
            dispatch_s = time.monotonic() - started
            try:
                await wait_all_done(fake, inters, processes, budget)
            finally:
                lag_samples = await lag.stop()
            await wait_delivered(jobs_table)
            cpu1 = [cpu_seconds(p.pid) for p in processes]
            bench1 = time.process_time()
            stats1 = await proxy.stats() if proxy else None
            server1 = server_cpu_seconds(cluster) if cluster else None
            proxy1 = cpu_seconds(proxy.pid) if proxy else None
            rest_calls = len(fake.requests) - requests0
            finished = [t for t in (done_at(i) for i in inters) if t is not None]
            acks = [i.ack_latency for i in inters if i.ack_latency is not None]
            early_done = [t for t in (done_before_image(i) for i in inters) if t is not None]

            timings = await jobs_table.timings(since)
            if len(timings) != options.jobs:
                raise BenchError(f"the store has {len(timings)} jobs of the burst, not {options.jobs}")
            grants, free = grant_figures(timings, owner, concurrency)
            jobs_of = Counter(owner(int(g.id)) for g, _ in world.burst)
            figures = []
            for index, (name, process) in enumerate(zip(names, processes, strict=True)):
                one = ProcessFigures(name, jobs_of[index], cpu1[index] - cpu0[index])
                one.acks = [
                    i.ack_latency
                    for i in inters
                    if i.ack_latency is not None and owner(int(i.guild_id or 0)) == index
                ]
                if stats0 is not None and stats1 is not None:
                    before, after = stats0[name], stats1[name]
                    if after["unparsed"]:
                        raise BenchError(f"{name}: {after['unparsed']} connections the proxy could not parse")
                    one.round_trips = after["round_trips"] - before["round_trips"]
                    one.connections = after["connections"] - before["connections"]
                    one.by_sql = {
                        sql: n - before["by_sql"].get(sql, 0)
                        for sql, n in after["by_sql"].items()
                        if n - before["by_sql"].get(sql, 0)
                    }
                figures.append(one)
                process.check_alive("after the burst")
        # Every process has stopped (SIGTERM, drained): their logs are complete.
        for one, process in zip(figures, processes, strict=True):
            output = process.log_path.read_text(errors="replace")
            if "Traceback" in output:
                raise BenchError(f"{one.name} logged a traceback:\n{tail(process.log_path, 60)}")
            one.warnings = [line for line in output.splitlines() if "WARNING" in line or "ERROR" in line]
    return Figures(
        config,
        options.jobs,
        acks=acks,
        grants=grants,
        free_slot_grants=free,
        wall_s=max(finished) - clock0,
        dispatch_s=dispatch_s,
        rest_calls=rest_calls,
        processes=figures,
        server_cpu_s=None if server0 is None or server1 is None else server1 - server0,
        proxy_cpu_s=None if proxy0 is None or proxy1 is None else proxy1 - proxy0,
        bench_cpu_s=bench1 - bench0,
        done_before_image_s=early_done,
        fake_lag_s=lag_samples,
    )


# ----------------------------------------------------------------------------------------------- report


def _ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:.0f}" if values else "-"


def verdicts(results: dict[str, Figures]) -> list[tuple[str, bool]]:
    """Issue 11's targets, each with whether it was met, for the set-ups that ran."""
    out: list[tuple[str, bool]] = []
    sqlite = results.get("sqlite")
    for key in ("pg", "pg2"):
        pg = results.get(key)
        if pg is None:
            continue
        if sqlite is not None:
            base, p99 = percentile(sqlite.acks, 99), percentile(pg.acks, 99)
            ratio = p99 / base
            out.append(
                (
                    f"ack p99, {pg.config.label}: {p99 * 1000:.0f} ms = {ratio:.2f}x SQLite's "
                    f"{base * 1000:.0f} ms (target <= {ACK_P99_RATIO_TARGET:g}x)",
                    ratio <= ACK_P99_RATIO_TARGET,
                )
            )
        per_job = pg.round_trips_per_job
        if per_job is not None:
            out.append(
                (
                    f"database round trips, {pg.config.label}: {per_job:.1f} per job "
                    f"(target <= {ROUND_TRIPS_TARGET:g})",
                    per_job <= ROUND_TRIPS_TARGET,
                )
            )
    return out


def report(options: argparse.Namespace, results: dict[str, Figures]) -> None:
    print(
        f"\n/imagine burst: {options.jobs} jobs over {options.guilds} guilds, backend {options.backend_delay:g} s "
        f"per image, {options.backend_concurrency} backend slots in all (fleet-wide in pg2), "
        f"GUILD_CONCURRENCY={options.guild_concurrency}"
    )
    header = (
        f"{'':26} {'ack p50':>8} {'ack p99':>8} {'CPU ms/job':>16} {'DB trips/job':>13} "
        f"{'grant p50':>10} {'grant p99':>10} {'free-slot':>10} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for figures in results.values():
        procs = figures.processes
        cpu = " / ".join(f"{p.cpu_ms_per_job:.1f}" for p in procs)
        trips = figures.round_trips_per_job
        trips_text = "-" if trips is None else f"{trips:.1f}"
        print(
            f"{figures.config.label:26} {_ms(figures.acks, 50):>8} {_ms(figures.acks, 99):>8} {cpu:>16} "
            f"{trips_text:>13} {_ms(figures.grants, 50):>10} {_ms(figures.grants, 99):>10} "
            f"{_ms(figures.free_slot_grants, 50):>10} {figures.wall_s:>7.1f}"
        )
    print(
        "(ms unless said; CPU per job of each process's own jobs; grant = admission -> start from the jobs "
        "table; free-slot = p50 of the grants that found a slot free)"
    )
    for figures in results.values():
        extra = [f"REST {figures.rest_calls / figures.jobs:.1f} calls/job"]
        if figures.server_cpu_s is not None:
            extra.append(f"PostgreSQL server {figures.server_cpu_s * 1000 / figures.jobs:.2f} CPU ms/job")
        if figures.proxy_cpu_s is not None:
            extra.append(f"proxy {figures.proxy_cpu_s * 1000 / figures.jobs:.2f} CPU ms/job")
        extra.append(
            f"fake Discord + driver {figures.bench_cpu_s * 1000 / figures.jobs:.2f} CPU ms/job, its loop late by "
            f"up to {_ms(figures.fake_lag_s, 100)} ms (p99 {_ms(figures.fake_lag_s, 99)})"
        )
        extra.append(f"burst dispatched in {figures.dispatch_s:.2f} s")
        if figures.done_before_image_s:
            extra.append(
                f"{len(figures.done_before_image_s)} messages showed Done before their image "
                f"(up to {max(figures.done_before_image_s):.1f} s)"
            )
        print(f"{figures.config.label}: " + "; ".join(extra))
        for process in figures.processes:
            trips = (
                ""
                if process.round_trips is None
                else f", {process.round_trips / max(1, process.jobs):.1f} round trips/job, "
                f"{process.connections} connections opened"
            )
            if len(figures.processes) > 1 or trips:
                print(
                    f"  {process.name}: {process.jobs} jobs, ack p50 {_ms(process.acks, 50)} ms, "
                    f"p99 {_ms(process.acks, 99)} ms{trips}"
                )
            if process.warnings:
                print(f"  {process.name} log: {len(process.warnings)} warning/error lines, e.g.")
                for line in list(dict.fromkeys(w.split(" ", 1)[-1][:160] for w in process.warnings))[:3]:
                    print(f"    {line}")
        if figures.round_trips is not None:
            print("  round trips per job by store call:")
            for call, per_job in figures.round_trips_by_call():
                if per_job >= 0.005:
                    print(f"    {per_job:6.2f}  {call}")
    checks = verdicts(results)
    if checks:
        print("\ntargets (issue 11):")
        for text, met in checks:
            print(f"  {'met   ' if met else 'MISSED'} {text}")


def write_json(path: str, options: argparse.Namespace, results: dict[str, Figures]) -> None:
    document = {
        "options": {
            key: getattr(options, key)
            for key in ("jobs", "guilds", "backend_delay", "backend_concurrency", "guild_concurrency")
        },
        "cpus": os.cpu_count(),
        "configs": {key: figures.to_json() for key, figures in results.items()},
        "targets": [{"target": text, "met": met} for text, met in verdicts(results)],
    }
    Path(path).write_text(json.dumps(document, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------- main


def forget_finished_fakes() -> None:
    """Let the previous set-up's fakes go before the next burst.

    aiohttp keeps the middleware chains it built in a module-level ``lru_cache`` (``web_app.
    _cached_build_middleware``, up to 1,024 entries), keyed by handler and application: it kept each finished
    set-up's fake Discord alive, every message and upload of its burst included, so a full run's last set-up
    ran beside three times the objects (and the garbage collector's work) of its first. Its acks were late for
    that, not for anything the bots did.
    """
    cached = getattr(aiohttp.web_app, "_cached_build_middleware", None)
    if cached is not None and hasattr(cached, "cache_clear"):
        cached.cache_clear()
    gc.collect()


async def main(options: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR)  # the fakes' INFO/WARNING chatter is not the result
    results: dict[str, Figures] = {}
    cluster: PgCluster | None = None
    try:
        if any(CONFIGS[key].postgres for key in options.configs):
            try:
                cluster = await asyncio.to_thread(start_cluster)
            except ClusterError as exc:
                raise BenchError(f"PostgreSQL: {exc}") from None
        for key in options.configs:
            config = CONFIGS[key]
            forget_finished_fakes()
            figures = await run_config(config, options, cluster if config.postgres else None)
            results[key] = figures
            trips = figures.round_trips_per_job
            print(
                f"{config.label}: ack p50 {_ms(figures.acks, 50)} ms, p99 {_ms(figures.acks, 99)} ms, "
                f"{figures.cpu_ms_per_job:.1f} CPU ms/job (fleet), "
                f"{'-' if trips is None else f'{trips:.1f}'} round trips/job, {figures.wall_s:.1f} s",
                flush=True,
            )
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    finally:
        if cluster is not None:
            await asyncio.to_thread(cluster.destroy)
    report(options, results)
    if options.json:
        write_json(options.json, options, results)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=1000, help="interactions in the burst (default 1000)")
    parser.add_argument("--guilds", type=int, default=100, help="guilds, half on each shard (default 100)")
    parser.add_argument(
        "--backend-delay", type=float, default=0.1, help="seconds per image at the fake backend (default 0.1)"
    )
    parser.add_argument(
        "--backend-concurrency",
        type=int,
        default=16,
        help="backend slots in all; each of N processes gets 1/N (default 16)",
    )
    parser.add_argument("--guild-concurrency", type=int, default=2, help="GUILD_CONCURRENCY (default 2)")
    parser.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated set-ups to run, in order (default {','.join(CONFIGS)})",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a burst may take (default 600)")
    parser.add_argument(
        "--no-count",
        action="store_true",
        help="connect the bots straight to PostgreSQL: no round-trip counts, no proxy hop in the figures",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    options = parser.parse_args(argv)
    options.configs = [key.strip() for key in options.configs.split(",") if key.strip()]
    unknown = [key for key in options.configs if key not in CONFIGS]
    if unknown or not options.configs:
        parser.error(f"--configs: choose from {', '.join(CONFIGS)}")
    if options.jobs < 1 or options.guilds < SHARDS or options.backend_concurrency < SHARDS:
        parser.error(f"--jobs must be >= 1, --guilds and --backend-concurrency >= {SHARDS}")
    if options.json:
        options.json = str(Path(options.json).resolve())
    return options


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
