"""The real bot with DATABASE_URL: jobs recorded in PostgreSQL, and /healthz following the database through an
outage (real PostgreSQL from tests/pg.py, the fake Discord and a fake OpenAI backend over real HTTP)."""

from __future__ import annotations

import asyncio

import aiohttp

from bot.engine.models import JobState
from bot.engine.store_pg import PgJobStore
from tests.frontend.conftest import is_done, running_bot
from tests.pg import PgCluster
from tests.service.test_web import get_health, poll_health


async def test_the_bot_on_postgresql_records_jobs_and_its_health_follows_the_database(
    fake_discord, fake_openai, tmp_path, pg_cluster: PgCluster, pg_url: str
) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url, database_url=pg_url) as h:
            assert isinstance(h.bot.engine.store, PgJobStore)
            user = fake_discord.add_member(h.guild.id)
            inter = await h.imagine(user.id, "a harbour at night")
            await inter.wait_until(is_done, timeout=10)
            assert (await get_health(http, h.service.web))[0] == 200

            h.bot.health.store_timeout_s = 1.0
            await asyncio.to_thread(pg_cluster.stop)
            try:
                status, body = await get_health(http, h.service.web)
                assert status == 503 and body["checks"]["store"] == "failed", body
            finally:
                await asyncio.to_thread(pg_cluster.start)
            body = await poll_health(http, h.service.web, 200, timeout=10)
            assert body["checks"]["store"] == "ok"
            after = await h.imagine(user.id, "the harbour at dawn")  # the same store, not reopened
            await after.wait_until(is_done, timeout=10)
    assert not (tmp_path / "bot.sqlite3").exists()
    async with PgJobStore(pg_url) as store:
        jobs = await store.list_jobs()
    assert [(job.request.prompt, job.state, job.user_id) for job in jobs] == [
        ("the harbour at dawn", JobState.SUCCEEDED, int(user.id)),
        ("a harbour at night", JobState.SUCCEEDED, int(user.id)),
    ]
