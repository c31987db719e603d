"""Processes of one fleet on one PostgreSQL (bot/service/fleet.py): the ``processes`` rows that replace
``DATA_DIR/bot.lock``, their heartbeat and lease, command sync once for the fleet, and /healthz while the
database is away.

Real ``python -m bot`` subprocesses against the fake Discord and a fake backend, one real PostgreSQL database
per test (tests/pg.py), ``LEASE_TTL_S=3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from bot.engine.store_pg import PgJobStore
from bot.service.fleet import ProcessLease, this_process
from bot.service.web import Health, WebServer
from bot.settings import load_settings
from tests.fakes.discord import FakeDiscord, FakeGuild, FakeInteraction
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import embed_author, is_done
from tests.frontend.process import BotProcess, assert_clean, bot_process, spawn_bot
from tests.pg import PgCluster, free_port
from tests.service.conftest import TTL, two_shard_fleet


@pytest.fixture
async def backend() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as backend:
        yield backend


def fleet_settings(backend: FakeOpenAI, pg_url: str, **more: Any) -> dict[str, Any]:
    return two_shard_fleet("openai", backend.url, pg_url, **more)


async def process_rows(pg_url: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(pg_url)
    try:
        rows = await conn.fetch(
            "SELECT id, host, pid, shard_count, shard_ids, now() - heartbeat_at AS age FROM processes ORDER BY pid"
        )
    finally:
        await conn.close()
    return [dict(row) for row in rows]


async def imagine(fake: FakeDiscord, guild: FakeGuild, prompt: str) -> FakeInteraction:
    user = fake.add_member(guild.id)
    return await fake.invoke_command(guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": prompt})


async def wait_exit(bot: BotProcess, timeout: float = 30) -> int:
    status = await bot.wait(timeout)
    return status


async def test_a_process_registers_heartbeats_serves_healthz_and_deletes_its_row_on_a_clean_exit(
    fake, backend, data_dir, pg_url
) -> None:
    port = free_port()
    async with bot_process(
        fake, data_dir, **fleet_settings(backend, pg_url, shard_ids=1, http_port=port)
    ) as bot:
        (row,) = await process_rows(pg_url)
        assert (row["pid"], row["shard_count"], row["shard_ids"]) == (bot.proc.pid, 2, [1])
        first_age = row["age"]
        # The heartbeat renews it (every TTL/3 = 1 s): wait for a fresher beat than the one seen.
        async with asyncio.timeout(15):
            while (await process_rows(pg_url))[0]["age"] >= first_age:
                await asyncio.sleep(0.2)
        async with aiohttp.ClientSession() as http, asyncio.timeout(20):
            while True:  # 503 "starting" until the bot is READY
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    body = await response.json()
                if response.status == 200:
                    break
                await asyncio.sleep(0.2)
        assert body["checks"]["heartbeat"] == "ok"
        assert not (data_dir / "bot.lock").exists()  # the row replaces it
        # Every session of the process is named after its row (the fleet ends a lost host's by that name):
        # the lease's pool, the job store's, the fleet's own connection (its LISTEN and the dispatcher lock).
        conn = await asyncpg.connect(pg_url)
        try:
            names = [
                r[0]
                for r in await conn.fetch(
                    "SELECT application_name FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ]
        finally:
            await conn.close()
        assert len(names) >= 3 and set(names) == {f"imagine-bot:{row['id']}"}, names
        assert await bot.terminate() == 0
    assert await process_rows(pg_url) == []
    assert_clean(bot.text)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("second_shards", ["1", None], ids=["shard-1", "every-shard"])
async def test_a_second_process_whose_shards_overlap_a_live_one_exits_2_naming_it(
    fake, backend, data_dir, pg_url, second_shards
) -> None:
    async with bot_process(fake, data_dir, **fleet_settings(backend, pg_url, shard_ids="0,1")) as first:
        extra = {} if second_shards is None else {"shard_ids": second_shards}
        second = await spawn_bot(fake, data_dir, **fleet_settings(backend, pg_url, **extra))
        assert await wait_exit(second) == 2
        (line,) = error_lines(second.text)
        assert "another bot process runs overlapping shards" in line
        assert f"pid {first.proc.pid}, shards 0,1 of 2" in line and "host " in line
        assert "Traceback" not in second.text
        assert len(await process_rows(pg_url)) == 1  # the first's only
        assert len(fake.requests_matching("GET", r"/users/@me$")) == 1  # the second never logged in
        assert await first.terminate() == 0


def queued_guilds(text: str) -> set[str]:
    return set(re.findall(r"job queued .*?guild=(\d+)", text))


async def test_shards_0_and_1_share_one_data_dir_and_each_answers_in_its_own_guilds(
    fake, backend, data_dir, pg_url
) -> None:
    guilds = {
        shard: [fake.add_guild(fake.guild_id_on_shard(shard, 2), name=f"s{shard}-{i}") for i in range(2)]
        for shard in (0, 1)
    }
    common = fleet_settings(backend, pg_url)
    async with (
        bot_process(fake, data_dir, shard_ids=0, **common) as zero,
        bot_process(fake, data_dir, shard_ids=1, **common) as one,
    ):
        await fake.wait_for_state(
            lambda: fake.gateway.connected_shards == [(0, 2), (1, 2)], 20, "both shards connected"
        )
        assert sorted(row["shard_ids"][0] for row in await process_rows(pg_url)) == [0, 1]
        interactions = [
            await imagine(fake, guild, f"{guild.name} picture") for shard in (0, 1) for guild in guilds[shard]
        ]
        for inter in interactions:
            await inter.wait_until(is_done, timeout=20)
            assert len(inter.callbacks) == 1
        assert await zero.terminate() == 0
        assert await one.terminate() == 0
    assert queued_guilds(zero.text) == {guild.id for guild in guilds[0]}
    assert queued_guilds(one.text) == {guild.id for guild in guilds[1]}
    assert len(list((data_dir / "cache" / "blobs").glob("*/*"))) == 4  # one shared cache, every image in it
    assert_clean(zero.text)
    assert_clean(one.text)


async def test_a_sigkilled_processs_row_stops_counting_after_the_lease_and_its_shards_start_again(
    fake, backend, data_dir, pg_url
) -> None:
    common = fleet_settings(backend, pg_url, shard_ids=0)
    async with bot_process(fake, data_dir, **common) as dead:
        dead.kill()  # SIGKILL: no goodbye, the row stays
        await dead.wait()
    (row,) = await process_rows(pg_url)
    assert row["pid"] == dead.proc.pid
    async with PgJobStore(pg_url) as store:
        async with asyncio.timeout(TTL + 10):  # judged by PostgreSQL's now(), not by this host's clock
            while await store.live_processes(ttl_s=TTL):
                await asyncio.sleep(0.2)
    async with bot_process(fake, data_dir, **common) as successor:
        rows = await process_rows(pg_url)
        assert [row["pid"] for row in rows] == [successor.proc.pid]  # the dead one's row was cleaned
        assert "removed the row of a dead process" in successor.text
        assert await successor.terminate() == 0


async def test_two_processes_starting_at_once_sync_the_commands_once(fake, backend, data_dir, pg_url) -> None:
    async def hold() -> None:
        # Answer the first sync only once both processes have logged in, and a little later: without a
        # fleet-wide lock the second would find no signature stored yet and sync too.
        await fake.wait_for_state(
            lambda: len(fake.requests_matching("GET", r"/oauth2/applications/@me$")) >= 2,
            30,
            "both logged in",
        )
        await asyncio.sleep(2)

    fake.hold_command_sync = hold
    common = fleet_settings(backend, pg_url)
    bots = [await spawn_bot(fake, data_dir, shard_ids=shard, **common) for shard in (0, 1)]
    try:
        await fake.wait_for_state(
            lambda: sorted(fake.gateway.connected_shards) == [(0, 2), (1, 2)], 40, "both shards connected"
        )
        assert len(fake.requests_matching("GET", r"/oauth2/applications/@me$")) == 2
        assert fake.sync_count == 1
        assert len(fake.requests_matching("PUT", r"/commands$")) == 1
        texts = [bot.text for bot in bots]
        assert sum("commands unchanged; not syncing" in text for text in texts) == 1
        for bot in bots:
            assert await bot.terminate() == 0
    finally:
        for bot in bots:
            bot.kill()
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await bot.wait(10)


async def test_healthz_is_503_while_the_heartbeat_cannot_be_written_and_200_once_postgresql_is_back(
    pg_cluster: PgCluster, pg_url: str, tmp_path: Path
) -> None:
    settings = load_settings(env_file=None, database_url=pg_url, lease_ttl_s=TTL, data_dir=tmp_path)
    store = PgJobStore(pg_url, max_size=2, connect_timeout_s=2)
    await store.open()
    lease = ProcessLease(store, this_process(settings), ttl_s=TTL)
    await lease.start()
    health = Health(store, heartbeat=lease, heartbeat_grace_s=1.5)  # the rule under test, not its 30 s
    health.mark_ready()
    web = WebServer(health, port=0)
    await web.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def healthz_until(status: int) -> dict[str, Any]:
                async with asyncio.timeout(40):
                    while True:
                        async with http.get(f"{web.url}/healthz") as response:
                            body = await response.json()
                            if response.status == status:
                                return body
                        await asyncio.sleep(0.2)

            body = await healthz_until(200)
            assert body["checks"]["heartbeat"] == "ok"
            await asyncio.to_thread(pg_cluster.stop)
            try:
                body = await healthz_until(503)
                assert body["status"] == "unhealthy"
                assert body["checks"]["heartbeat"].startswith("heartbeat failing for ")
                assert "PostgreSQL" in body["checks"]["heartbeat"]
            finally:
                await asyncio.to_thread(pg_cluster.start)
            beats = lease.beats
            body = await healthz_until(200)
            assert body["checks"]["heartbeat"] == "ok" and lease.beats > beats
            (row,) = await process_rows(pg_url)  # the row outlived the outage (nobody took its shards)
            assert row["id"] == lease.me.id
    finally:
        await web.stop()
        await lease.close()
        await store.close()
    assert await process_rows(pg_url) == []


async def test_a_process_whose_row_was_taken_over_during_an_outage_gives_way(
    pg_url: str, tmp_path: Path
) -> None:
    """Its heartbeat finds the row gone and a live process on its shards: it calls on_lost and is unhealthy."""
    settings = load_settings(env_file=None, database_url=pg_url, lease_ttl_s=TTL, data_dir=tmp_path)
    async with PgJobStore(pg_url) as store:
        me = ProcessLease(store, this_process(settings), ttl_s=TTL)
        await me.start()
        lost: list[bool] = []
        me.on_lost = lambda: lost.append(True)
        # As if our heartbeat had been silent past the lease and a successor had cleaned our row.
        await store.deregister_process(me.me.id)
        successor = ProcessLease(store, this_process(settings), ttl_s=TTL)
        await successor.start()
        await me.beat()
        assert lost == [True]
        problem = me.problem(30)
        assert problem is not None and f"pid {successor.me.pid}" in problem
        await me.close()
        assert [p.id for p in await store.live_processes(ttl_s=TTL)] == [successor.me.id]
        await successor.close()


async def test_a_process_starting_beside_a_live_one_leaves_the_other_shards_jobs_alone(
    fake, backend, data_dir, pg_url
) -> None:
    # One database, two processes: a job process 0 is running is not "left by a dead process" for process 1,
    # which must neither mark it interrupted nor run it again.
    guild = fake.add_guild(fake.guild_id_on_shard(0, 2), name="s0")
    fake.add_guild(fake.guild_id_on_shard(1, 2), name="s1")
    backend.configure(delay=3.0)
    common = fleet_settings(backend, pg_url)
    async with bot_process(fake, data_dir, shard_ids=0, **common) as zero:
        inter = await imagine(fake, guild, "a slow lighthouse")
        await inter.wait_until(lambda m: embed_author(m).startswith("Generating"), timeout=20)
        async with bot_process(fake, data_dir, shard_ids=1, **common) as one:
            await inter.wait_until(is_done, timeout=30)
            assert await one.terminate() == 0
        assert await zero.terminate() == 0
    assert backend.state.generations == 1  # generated once, by process 0
    assert (
        "interrupted" not in one.text
        and "resumed" not in one.text
        and "posting a finished job" not in one.text
    )
    assert_clean(zero.text)
    assert_clean(one.text)


async def test_a_heartbeat_that_crashes_keeps_beating_and_says_so_on_healthz() -> None:
    # A bug in the heartbeat (not a database answer) must not stop it silently: a process whose row is no
    # longer renewed would look healthy here while another process takes its shards.
    class Flaky:
        def __init__(self) -> None:
            self.calls = 0

        async def heartbeat_process(self, process_id: str) -> bool:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("a bug")
            return True

    now = [0.0]
    me = this_process(load_settings(env_file=None))
    lease = ProcessLease(Flaky(), me, ttl_s=TTL, clock=lambda: now[0])  # type: ignore[arg-type]
    await lease.beat()
    now[0] = 40.0
    assert lease.problem(grace_s=30) == "heartbeat failing for 40s: the heartbeat crashed (RuntimeError)"
    await lease.beat()
    assert lease.problem(grace_s=30) is None and lease.beats == 1
