"""Who answers for a job in a fleet (``jobs.owner`` on PostgreSQL): claims are exclusive, and a process whose
job was claimed by another cannot overwrite it (bot/engine/store_pg.py). Real PostgreSQL, one database per test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from bot.engine.models import ImageRequest, Job, JobState
from bot.engine.store import JobTaken, ShardFilter
from bot.engine.store_pg import FleetProcess, PgJobStore, session_name

TTL = 3.0

Member = Callable[..., Awaitable[PgJobStore]]


@pytest.fixture
async def member(pg_url: str) -> AsyncIterator[Member]:
    """Factory: a store that registered as a fleet process (shards given, or every shard) and writes as it."""
    opened: list[PgJobStore] = []

    async def factory(name: str, shards: tuple[int, ...] | None = None) -> PgJobStore:
        store = PgJobStore(pg_url, max_size=4)
        await store.open()
        opened.append(store)
        # Its row as register_process writes it (without the shard check: the claims do not look at shards).
        await sql(
            pg_url,
            "INSERT INTO processes (id, host, pid, shard_count, shard_ids) VALUES ($1, 'host', 1, $2, $3)",
            name,
            None if shards is None else 2,
            None if shards is None else list(shards),
        )
        store.join_fleet(name, ttl_s=TTL)
        return store

    yield factory
    for store in opened:
        await store.close()


async def sql(pg_url: str, statement: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(pg_url)
    try:
        return list(await conn.fetch(statement, *args))
    finally:
        await conn.close()


async def die(pg_url: str, process_id: str) -> None:
    """As if its heartbeat had stopped a minute ago (PostgreSQL's now() is the judge)."""
    await sql(
        pg_url, "UPDATE processes SET heartbeat_at = now() - interval '1 minute' WHERE id = $1", process_id
    )


async def owners(pg_url: str) -> dict[str, str | None]:
    return {row["id"]: row["owner"] for row in await sql(pg_url, "SELECT id, owner FROM jobs")}


def job(job_id: str, guild_id: int = 0, **fields: object) -> Job:
    return Job(id=job_id, request=ImageRequest("a red fox"), guild_id=guild_id, user_id=10, **fields)  # type: ignore[arg-type]


async def test_a_dead_processs_jobs_go_to_exactly_one_of_several_claimers_at_once(pg_url, member) -> None:
    """Two survivors watching and the dead one's restarted incarnation claim at the same moment, five times
    over: every job left to answer for is claimed once, by one of them, and the row names that one."""
    survivors = [await member("b", (1,)), await member("c", (1,))]
    restarted = await member("a-again", (0,))
    for round_ in range(5):
        dead = await member(f"a-{round_}", (0,))
        ids = [f"{round_}-{i}" for i in range(30)]
        for i, job_id in enumerate(ids):
            state = (JobState.QUEUED, JobState.RUNNING)[i % 2]
            await dead.save_job(job(job_id, state=state, created_at=float(i)))
        await die(pg_url, dead.owner or "")
        results = await asyncio.gather(
            *(store.take_over_jobs() for store in survivors),
            restarted.claim_jobs(shards=ShardFilter(2, (0,))),
        )
        by_claimer = {
            "b": [j.id for jobs in results[0].values() for j in jobs],
            "c": [j.id for jobs in results[1].values() for j in jobs],
            "a-again": [j.id for j in results[2]],
        }
        claimed = [job_id for got in by_claimer.values() for job_id in got]
        assert sorted(claimed) == sorted(ids), by_claimer  # each once: none lost, none twice
        stored = await owners(pg_url)
        for claimer, got in by_claimer.items():
            assert all(stored[job_id] == claimer for job_id in got)
        for taken in results[:2]:
            assert set(taken) <= {dead.owner}  # by the dead process they came from


async def test_only_jobs_without_a_live_owner_are_claimed(pg_url, member) -> None:
    alive = await member("alive", (0,))
    dead = await member("dead", (1,))
    survivor = await member("survivor", (0,))
    message = {"token": "t"}
    await alive.save_job(job("alive-running", state=JobState.RUNNING))
    await dead.save_job(job("dead-queued", guild_id=1 << 22))
    await dead.save_job(job("dead-unposted", guild_id=1 << 22, state=JobState.FAILED, message_ref=message))
    await dead.save_job(job("dead-posted", guild_id=1 << 22, state=JobState.SUCCEEDED, message_ref=message))
    await dead.mark_delivered("dead-posted", at=1.0)
    await sql(
        pg_url,
        "INSERT INTO jobs (id, request, guild_id, user_id, state, created_at) "
        "SELECT 'unowned', request, guild_id, user_id, state, created_at FROM jobs WHERE id = 'alive-running'",
    )
    assert await survivor.take_over_jobs() == {}  # nobody is dead yet
    await die(pg_url, "dead")
    taken = await survivor.take_over_jobs()
    assert {owner: [j.id for j in jobs] for owner, jobs in taken.items()} == {
        "dead": ["dead-queued", "dead-unposted"]
    }
    assert await survivor.take_over_jobs() == {}  # ours now, and we live
    assert (await owners(pg_url))["unowned"] is None  # maybe a live process's from before owners: left
    # The dead row goes once its jobs are handed over; a row that heartbeats again stays.
    assert [p.id for p in await survivor.forget_dead_processes(["dead", "alive"])] == ["dead"]
    assert [p.id for p in await survivor.live_processes(ttl_s=TTL)] == ["alive", "survivor"]


async def test_a_dead_process_whose_row_is_gone_still_has_its_jobs_taken(pg_url, member) -> None:
    """Another process registering deletes dead rows: their jobs are found by their owner having no live row."""
    dead = await member("dead")
    await dead.save_job(job("left-behind"))
    await dead.deregister_process("dead")
    survivor = await member("survivor")
    taken = await survivor.take_over_jobs()
    assert [j.id for j in taken["dead"]] == ["left-behind"]


async def test_a_write_for_a_job_claimed_by_another_process_is_refused_and_says_so(pg_url, member) -> None:
    lapsed = await member("lapsed")
    survivor = await member("survivor")
    mine = job("mine", state=JobState.RUNNING, backend_ref="horde-1")
    await lapsed.save_job(mine)
    await die(pg_url, "lapsed")
    (theirs,) = (await survivor.take_over_jobs())["lapsed"]
    theirs.state = JobState.SUCCEEDED
    await survivor.save_job(theirs)

    mine.state = JobState.FAILED  # the lapsed process's late word on it
    mine.error_message = "stale"
    with pytest.raises(JobTaken) as refused:
        await lapsed.save_job(mine)
    assert refused.value.job_id == "mine"
    stored = await survivor.get_job("mine")
    assert stored is not None and stored.state is JobState.SUCCEEDED and stored.error_message is None
    assert (await owners(pg_url))["mine"] == "survivor"
    # The new owner goes on writing; a member's Delete (any process) writes whoever owns it.
    theirs.error_message = "second word"
    await survivor.save_job(theirs)
    theirs.image_refs = []  # as retention's delete_job scrubs it
    theirs.error_message = "deleted"
    await lapsed.save_job(theirs, any_owner=True)
    stored = await survivor.get_job("mine")
    assert stored is not None and stored.error_message == "deleted"
    assert (await owners(pg_url))["mine"] == "survivor"
    # A new job is anyone's to insert: it is the inserter's.
    await lapsed.save_job(job("new"))
    assert (await owners(pg_url))["new"] == "lapsed"


@pytest.mark.parametrize("by", ["forgetting it", "a process registering"])
async def test_a_dead_processs_sessions_are_ended_and_what_they_locked_is_free_again(
    pg_url: str, member: Member, by: str
) -> None:
    """A lost host never closes its connections: PostgreSQL keeps its sessions, in the middle of a transaction
    with its locks, until TCP keepalive gives up (hours). The fleet ends the sessions named after a process
    once that process is dead; another's sessions are left alone."""
    survivor = await member("survivor", (0,))
    await survivor.save_job(job("locked"))
    await sql(pg_url, "INSERT INTO processes (id, host, pid) VALUES ('lost', 'gone', 1)")
    lost = await asyncpg.connect(pg_url, server_settings={"application_name": session_name("lost")})
    bystander = await asyncpg.connect(pg_url, server_settings={"application_name": "psql"})
    try:
        await lost.execute("BEGIN")
        await lost.execute("SELECT * FROM jobs WHERE id = 'locked' FOR UPDATE")  # and then its host is lost
        await die(pg_url, "lost")
        if by == "forgetting it":
            assert [p.id for p in await survivor.forget_dead_processes(["lost"])] == ["lost"]
        else:
            newcomer = PgJobStore(pg_url, session_name=session_name("newcomer"))
            await newcomer.open()
            try:
                assert (
                    await newcomer.register_process(FleetProcess("newcomer", "h", 2, 2, (1,)), ttl_s=TTL)
                    is None
                )
            finally:
                await newcomer.close()
        # The row lock went with the session: writing the job does not wait for a client that never returns.
        await asyncio.wait_for(sql(pg_url, "UPDATE jobs SET state = state WHERE id = 'locked'"), timeout=5)
        assert (
            await sql(
                pg_url, "SELECT 1 FROM pg_stat_activity WHERE application_name = $1", session_name("lost")
            )
            == []
        )
        assert await bystander.fetchval("SELECT 1") == 1  # not the fleet's: untouched
        assert await survivor.get_job("locked") is not None  # nor the survivor's own sessions
    finally:
        lost.terminate()
        await bystander.close()
