"""The fleet's one fair queue on a real PostgreSQL (bot/service/dispatch.py), with two fleet members in this
process: each its own store, lease and manager, as two bot processes have; one backend object stands for the
image server they share, so its concurrency is the fleet's.

End to end with real bot processes: tests/service/test_fleet_queue_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from bot.engine.cache import ResultCache
from bot.engine.cache_pg import PgIndex
from bot.engine.manager import JobManager
from bot.engine.models import JobState
from bot.engine.recovery import RecoveryReport
from bot.engine.store_pg import DISPATCH_LOCK_KEY, FleetProcess, PgJobStore, session_name
from bot.service.dispatch import FleetQueue
from bot.service.fleet import ProcessLease, Takeover
from tests.fakes.tcp_proxy import TcpProxy
from tests.helpers import ControlledBackend, make_manager, req, until
from tests.pg import PgCluster

TTL = 3.0
CAPACITY = 2


@dataclass
class Member:
    """One fleet member: what a bot process would have."""

    name: str
    store: PgJobStore
    lease: ProcessLease
    manager: JobManager
    queue: FleetQueue


@contextlib.asynccontextmanager
async def member(
    pg_url: str,
    name: str,
    shard: int,
    backend: ControlledBackend,
    *,
    cache_dir: Path | None = None,
    **kw: object,
) -> AsyncIterator[Member]:
    """A fleet member; with ``cache_dir`` (one directory for every member: the shared volume) a result cache
    indexed in the database, as the bot's processes have."""
    me = FleetProcess(f"{name}-{uuid.uuid4().hex[:8]}", "host", shard, 2, (shard,))
    # Short timeouts: a member whose host is "lost" (a frozen proxy) finds out, and leaves, in seconds.
    store = PgJobStore(pg_url, max_size=4, session_name=session_name(me.id), command_timeout_s=3)
    await store.open()
    lease = ProcessLease(store, me, ttl_s=TTL)
    await lease.start()
    store.join_fleet(lease.me.id, ttl_s=TTL)
    options: dict[str, object] = {"backend_concurrency": CAPACITY, "guild_concurrency": 1}
    options.update(kw)
    cache = None
    if cache_dir is not None:
        cache = ResultCache(cache_dir, ttl_s=3600, max_bytes=10**8, index=PgIndex(store))
        await cache.open()
        options["cache"] = cache
    manager = make_manager(backend, store=store, **options)
    queue = FleetQueue(store, manager, ttl_s=TTL).install()
    await queue.start()
    try:
        yield Member(name, store, lease, manager, queue)
    finally:
        await manager.shutdown(0)
        await queue.close()
        if cache is not None:
            await cache.close()
        await lease.close()
        await store.close()


async def submit_burst(members: dict[int, Member], guilds: range, per_guild: int) -> list:
    jobs = []
    for round_ in range(per_guild):  # arrivals interleaved across guilds, as a burst over many servers gives
        for guild in guilds:
            owner = members[guild % 2]
            jobs.append(
                await owner.manager.submit(req(f"g{guild}:job {round_}"), guild_id=guild, user_id=round_ % 3)
            )
    return jobs


def window_shares(order: list[int], guilds: range) -> list[Counter[int]]:
    return [Counter(order[i : i + 20]) for i in range(max(1, len(order) - 19))]


async def one_process_order(guilds: range, per_guild: int) -> list[int]:
    """The start order one process gives the same burst (no fleet, the same capacity and limits)."""
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=CAPACITY, guild_concurrency=1)
    jobs = []
    for round_ in range(per_guild):
        for guild in guilds:
            jobs.append(
                await manager.submit(req(f"g{guild}:job {round_}"), guild_id=guild, user_id=round_ % 3)
            )
    done = 0
    while done < len(jobs):
        await until(lambda n=done: len(backend.calls) > n)
        backend.calls[done].release.set()
        done += 1
    for job in jobs:
        await manager.wait(job.id)
    await manager.shutdown(0)
    return [int(c.request.prompt.split(":")[0][1:]) for c in backend.calls]


async def test_two_processes_hold_the_backend_capacity_fleet_wide_and_take_turns_between_guilds(
    pg_url,
) -> None:
    guilds, per_guild = range(1, 11), 6
    backend = ControlledBackend()
    async with member(pg_url, "a", 0, backend) as a, member(pg_url, "b", 1, backend) as b:
        members = {0: a, 1: b}
        jobs = await submit_burst(members, guilds, per_guild)
        # The first slots are taken while the burst arrives; from there each start waits for an end, in order.
        released = 0
        while released < len(jobs):
            await until(lambda n=released: len(backend.calls) > n, timeout=10)
            await asyncio.sleep(0.02)  # room for a wrong extra start to show up in max_in_flight
            backend.calls[released].release.set()
            released += 1
        for job in jobs:
            owner = members[job.guild_id % 2]
            await owner.manager.wait(job.id)
            assert job.state is JobState.SUCCEEDED
        assert backend.max_in_flight <= CAPACITY  # fleet-wide: each process alone would allow CAPACITY
        assert backend.max_per_guild and max(backend.max_per_guild.values()) <= 1  # GUILD_CONCURRENCY=1
        assert a.queue.dispatching != b.queue.dispatching  # exactly one dispatcher
    fleet = [int(c.request.prompt.split(":")[0][1:]) for c in backend.calls]
    single = await one_process_order(guilds, per_guild)
    assert Counter(fleet) == Counter(single)
    for ours, theirs in zip(window_shares(fleet, guilds), window_shares(single, guilds), strict=True):
        for guild in guilds:
            assert abs(ours[guild] - theirs[guild]) <= 1, (fleet, single)


async def test_when_the_dispatcher_leaves_the_other_process_takes_over_and_the_queue_goes_on(pg_url) -> None:
    backend = ControlledBackend(auto_release=True, delay=0.05)
    async with member(pg_url, "a", 0, backend) as a:
        async with member(pg_url, "b", 1, backend) as b:
            await until(lambda: a.queue.dispatching or b.queue.dispatching)
            first = a if a.queue.dispatching else b
            second = b if first is a else a
            await first.queue.close()  # its connection goes, and the lock with it
            jobs = [
                await second.manager.submit(req(f"g{i}:after"), guild_id=i * 2 + (second is b), user_id=1)
                for i in range(4)
            ]
            await until(lambda: second.queue.dispatching, timeout=8)
            for job in jobs:
                await second.manager.wait(job.id)
                assert job.state is JobState.SUCCEEDED
    assert backend.max_in_flight <= CAPACITY


async def sessions(pg_url: str, query: str, *args: object) -> list[str]:
    """``application_name`` of the sessions ``query`` finds."""
    conn = await asyncpg.connect(pg_url)
    try:
        return [row[0] for row in await conn.fetch(query, *args)]
    finally:
        await conn.close()


NAMED = "SELECT application_name FROM pg_stat_activity WHERE application_name = $1"
HOLDING_THE_DISPATCH_LOCK = (
    "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.objid::bigint = ($1::bigint & 4294967295)"
)


async def test_when_the_dispatchers_host_is_lost_its_session_is_ended_and_another_process_dispatches(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    """A lost host sends no FIN: PostgreSQL keeps its sessions, the dispatcher's lock with them, until TCP
    keepalive gives up (hours). Once its lease lapsed, the survivor's takeover round (as a bot process runs
    it) ends the dead process's sessions, and the survivor takes the lock."""
    backend = ControlledBackend(auto_release=True, delay=0.05)
    async with TcpProxy(pg_cluster.host, pg_cluster.port) as lost_link:
        async with member(lost_link.url(pg_url), "a", 0, backend) as a:
            await until(lambda: a.queue.dispatching, timeout=8)
            async with member(pg_url, "b", 1, backend) as b:
                assert await sessions(pg_url, NAMED, session_name(a.lease.me.id))  # named after A
                assert await sessions(pg_url, HOLDING_THE_DISPATCH_LOCK, DISPATCH_LOCK_KEY) == [
                    session_name(a.lease.me.id)
                ]
                assert not b.queue.dispatching
                takeover = Takeover(b.store, b.lease)
                takeover.start(nothing_to_recover)
                lost_link.freeze()  # A's host is gone: nothing more from it, and no close either
                jobs = [
                    await b.manager.submit(req(f"g{i}:after the loss"), guild_id=i * 2 + 1, user_id=1)
                    for i in range(3)
                ]
                await until(lambda: b.queue.dispatching, timeout=TTL + 10)
                for job in jobs:
                    await asyncio.wait_for(b.manager.wait(job.id), timeout=10)
                    assert job.state is JobState.SUCCEEDED
                assert await sessions(pg_url, HOLDING_THE_DISPATCH_LOCK, DISPATCH_LOCK_KEY) == [
                    session_name(b.lease.me.id)
                ]
                await takeover.close()
                lost_link.cut()  # the test's own teardown of A: fail fast rather than hang
    assert backend.max_in_flight <= CAPACITY


async def nothing_to_recover(jobs: list) -> RecoveryReport:
    raise AssertionError(f"A had no jobs to take over: {jobs}")


async def test_a_slot_the_fleet_took_back_stops_its_generation_and_the_job_runs_later_once(pg_url) -> None:
    backend = ControlledBackend()
    async with member(pg_url, "a", 0, backend) as a:
        job = await a.manager.submit(req("g2:heron"), guild_id=2, user_id=1)
        await backend.wait_calls(1, timeout=8)
        conn = await asyncpg.connect(pg_url)
        try:  # as a dispatcher does with a slot whose lease lapsed
            await conn.execute("DELETE FROM fleet_slots WHERE owner = $1", a.lease.me.id)
        finally:
            await conn.close()
        await until(lambda: backend.calls[0].cancelled, timeout=8)
        await until(lambda: len(backend.calls) == 2, timeout=8)  # granted again, started again
        assert backend.in_flight == 1  # never two generations for one job at once
        backend.release_all()
        await a.manager.wait(job.id)
        assert job.state is JobState.SUCCEEDED and a.queue.lost == 1


async def test_a_cancel_pressed_in_one_process_stops_a_job_running_in_the_other(pg_url) -> None:
    backend = ControlledBackend()
    async with member(pg_url, "a", 0, backend) as a, member(pg_url, "b", 1, backend) as b:
        job = await a.manager.submit(req("g2:owl"), guild_id=2, user_id=1)
        await backend.wait_calls(1, timeout=8)
        assert await b.store.request_cancel(job.id, by="a moderator") == a.lease.me.id
        await a.manager.wait(job.id)
        assert job.state is JobState.CANCELLED and backend.calls[0].cancelled
        assert job.error_message == "Cancelled by a moderator."
        assert await b.store.request_cancel(job.id, by="again") is None  # finished: nothing to cancel


# -- identical requests in two processes: one generation ----------------------------------------------------------


@contextlib.asynccontextmanager
async def sharing_a_cache(
    pg_url: str, directory: Path, backend: ControlledBackend, **b_options: object
) -> AsyncIterator[tuple[Member, Member]]:
    """Two members on shards 0 and 1 with one cache directory (the shared volume) indexed in the database."""
    async with (
        member(pg_url, "a", 0, backend, cache_dir=directory) as a,
        member(pg_url, "b", 1, backend, cache_dir=directory, **b_options) as b,
    ):
        yield a, b


async def test_an_identical_request_in_the_other_process_waits_for_the_generation_and_shares_it(
    pg_url: str, tmp_path: Path
) -> None:
    backend = ControlledBackend()
    async with sharing_a_cache(pg_url, tmp_path / "cache", backend) as (a, b):
        first = await a.manager.submit(req("g2:a lighthouse at dusk"), guild_id=2, user_id=1)
        await backend.wait_calls(1, timeout=8)
        second = await b.manager.submit(
            req("g2:a lighthouse  at dusk"), guild_id=3, user_id=7
        )  # same, normalised
        await asyncio.sleep(1.0)  # time enough for B to have asked for a slot and started, were it generating
        assert len(backend.calls) == 1 and second.state is JobState.QUEUED
        backend.release_all()
        await a.manager.wait(first.id)
        await b.manager.wait(second.id)
        assert (first.state, second.state) == (JobState.SUCCEEDED, JobState.SUCCEEDED)
        assert first.result is not None and second.result is not None
        assert second.result.images[0].data == first.result.images[0].data and second.from_cache
        assert second.image_refs == first.image_refs
        assert len(backend.calls) == 1  # the backend was paid once for both


async def test_when_the_generation_elsewhere_is_cancelled_the_waiting_job_generates_it_itself(
    pg_url: str, tmp_path: Path
) -> None:
    backend = ControlledBackend()
    async with sharing_a_cache(pg_url, tmp_path / "cache", backend) as (a, b):
        first = await a.manager.submit(req("g2:an owl in snow"), guild_id=2, user_id=1)
        await backend.wait_calls(1, timeout=8)
        second = await b.manager.submit(req("g2:an owl in snow"), guild_id=3, user_id=7)
        await asyncio.sleep(0.5)
        assert len(backend.calls) == 1
        await a.manager.cancel(first.id, by="its author")
        assert first.state is JobState.CANCELLED
        await backend.wait_calls(2, timeout=8)  # B no longer waits for a put that will not come: it generates
        backend.release_all()
        await b.manager.wait(second.id)
        assert second.state is JobState.SUCCEEDED and not second.from_cache


async def test_waiting_for_a_generation_elsewhere_ends_at_the_queue_timeout(
    pg_url: str, tmp_path: Path
) -> None:
    backend = ControlledBackend()  # A's generation never ends while the test runs
    async with sharing_a_cache(pg_url, tmp_path / "cache", backend, queue_timeout_s=1.5) as (a, b):
        first = await a.manager.submit(req("g2:a stuck kite"), guild_id=2, user_id=1)
        await backend.wait_calls(1, timeout=8)
        second = await b.manager.submit(req("g2:a stuck kite"), guild_id=3, user_id=7)
        await b.manager.wait(second.id)
        assert second.state is JobState.TIMED_OUT and "in the queue" in (second.error_message or "")
        assert len(backend.calls) == 1 and first.state is JobState.RUNNING
        backend.release_all()
        await a.manager.wait(first.id)
