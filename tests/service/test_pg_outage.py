"""PostgreSQL stopped and started again under load (issue 11): the real bot, in this process, with its fleet
lease, against the fake Discord, a fake OpenAI backend that holds generations until told, and a real
PostgreSQL cluster the test stops (``pg_ctl stop -m fast|immediate``) and starts again mid-burst.

What must hold: while the database is away a new /imagine gets a sentence (no stack trace, no operator
advice), the operator's log says so once per outage (no password), /healthz turns 503 once the heartbeat has
failed past its grace and 200 again after, a process that cannot renew its lease starts no new generation
(running ones finish, queued ones wait), and once the database is back every admitted job has ended exactly
once, its message is final, and its row says what the member saw.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.engine.models import JobState
from bot.engine.store_pg import PgJobStore
from bot.frontend.client import point_discord_at
from bot.service.app import build_service
from bot.service.fleet import process_lease
from bot.service.runtime import open_engine
from tests.fakes.discord import FakeDiscord, FakeInteraction
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import Harness, bot_settings, embed_author, image_attachments, is_done, serving
from tests.pg import PASSWORD, PgCluster
from tests.service.test_web import poll_health

#: The lease (heartbeat every second) and /healthz's grace, short so an outage of a few seconds shows.
TTL = 3
GRACE_S = 1.5
#: What the fleet tells a member whose /imagine arrives while the database is away.
OUTAGE_SENTENCE = "The bot cannot take new image requests right now; try again in a few minutes."
#: The job store's one line per outage.
OUTAGE_LINE = "PostgreSQL unreachable; calls fail at once until it answers again (retrying every 5 s at most)"


class HeldOpenAI(FakeOpenAI):
    """Generations wait at the door until the test opens it; ``arrived`` counts every one that came."""

    def __init__(self) -> None:
        super().__init__()
        self.door = asyncio.Event()
        self.arrived = 0

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.arrived += 1
        await self.door.wait()
        return await super().generate(request)


@pytest.fixture
async def held_backend() -> AsyncIterator[HeldOpenAI]:
    async with HeldOpenAI() as backend:
        yield backend


@contextlib.asynccontextmanager
async def fleet_bot(
    fake: FakeDiscord, data_dir: Path, backend: FakeOpenAI, pg_url: str, **overrides: Any
) -> AsyncIterator[Harness]:
    """The bot as ``python -m bot`` wires it with DATABASE_URL (lease, engine, service), in this process."""
    settings = bot_settings(
        fake, data_dir, "openai", backend.url, database_url=pg_url, lease_ttl_s=TTL, **overrides
    )
    point_discord_at(settings.discord_api_base, settings.discord_gateway_url)
    guild = fake.add_guild(name="Outage Guild")
    async with process_lease(settings) as lease, open_engine(settings) as engine:
        service = build_service(
            engine,
            lease=lease,
            heartbeat_grace_s=GRACE_S,
            clock=fake.clock,
            progress_interval=0.2,
            guild_ready_timeout=0.05,
        )
        async with serving(service, fake, guild, data_dir) as harness:
            yield harness


def final_text(inter: FakeInteraction) -> str:
    """What the member reads as the interaction's last word: the ephemeral reply or the message."""
    messages = inter.messages()
    if messages:
        message = messages[-1]
        parts = [message.content or "", embed_author(message)]
        parts += [str(embed.get("description") or "") for embed in message.embeds]
        return " ".join(p for p in parts if p)
    assert inter.callback is not None
    return str(inter.callback.data.get("content") or "")


def assert_member_safe(text: str) -> None:
    for needle in ("Traceback", "DATABASE_URL", "PostgreSQL", "asyncpg", PASSWORD, "check "):
        assert needle not in text, f"{needle!r} shown to a member: {text!r}"


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_postgresql_stopped_and_started_again_under_load(
    fake_discord: FakeDiscord,
    held_backend: HeldOpenAI,
    tmp_path: Path,
    pg_cluster: PgCluster,
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    caplog.set_level(logging.INFO)
    fake, backend = fake_discord, held_backend
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    async with (
        http,
        fleet_bot(fake, tmp_path, backend, pg_url, guild_concurrency=2, backend_concurrency=2) as h,
    ):
        manager = h.bot.engine.manager
        guild_id = int(h.guild.id)
        await poll_health(http, h.service.web, 200)

        # A burst: two generations held at the backend, four jobs queued behind them.
        burst = [await h.imagine(fake.add_member(h.guild.id).id, f"burst {i}") for i in range(6)]
        await fake.wait_for_state(
            lambda: backend.arrived == 2 and manager.guild_waiting(guild_id) == 4, 10, "2 running, 4 queued"
        )
        admitted = [job.id for job in manager.active_jobs()]
        assert len(admitted) == 6

        await asyncio.to_thread(pg_cluster.stop, mode)
        try:
            # /healthz: 503 once the heartbeat has failed for longer than the grace.
            body = await poll_health(http, h.service.web, 503, timeout=20)
            assert body["checks"]["heartbeat"].startswith("heartbeat failing for ")
            assert PASSWORD not in str(body)

            # A new /imagine now: a sentence for the member, and nothing admitted.
            late = [await h.imagine(fake.add_member(h.guild.id).id, f"during {i}") for i in range(3)]
            for inter in late:
                await inter.wait_for_callback(timeout=10)
                assert final_text(inter) == OUTAGE_SENTENCE
                assert inter.ephemeral
            assert len(manager.active_jobs()) == 6

            # The lease cannot be renewed: the two running generations may finish, the queued ones wait.
            backend.door.set()
            for inter in burst[:2]:
                await inter.wait_until(is_done, timeout=20)
            assert manager.backend_in_flight == 0
            assert manager.guild_waiting(guild_id) == 4
            assert backend.arrived == 2
        finally:
            await asyncio.to_thread(pg_cluster.start)

        await poll_health(http, h.service.web, 200, timeout=20)
        for inter in burst:
            await inter.wait_until(is_done, timeout=30)
        await fake.wait_for_state(lambda: not manager.active_jobs(), 20, "every job ended")
        await fake.wait_for_state(lambda: not manager.unsaved_jobs(), 40, "every job record written")
        messenger = h.bot.messenger
        await fake.wait_for_state(
            lambda: not messenger.unrecorded_deliveries(), 40, "every delivery record written"
        )
        after = await h.imagine(fake.add_member(h.guild.id).id, "after the outage")
        await after.wait_until(is_done, timeout=20)

        # Nothing admitted is lost, nothing ran twice; each member saw one final message.
        assert backend.arrived == 7
        for inter in [*burst, after]:
            assert len(inter.callbacks) == 1
            assert len(image_attachments(inter.messages()[-1])) == 1
        for inter in late:  # refused before any defer: one ephemeral answer, nothing else
            assert len(inter.callbacks) == 1 and not inter.followups

    async with PgJobStore(pg_url) as store:
        rows = {job.id: job for job in await store.list_jobs(limit=100)}
        unfinished = await store.unfinished_jobs()
        undelivered = await store.undelivered_jobs()
    assert set(admitted) <= set(rows) and len(rows) == 7
    assert unfinished == [] and undelivered == []
    assert all(rows[job_id].state is JobState.SUCCEEDED for job_id in admitted)
    assert all(job.delivered_at is not None for job in rows.values())

    # The operator's log: one WARNING when the database went away, one line when it came back, no password.
    assert PASSWORD not in caplog.text
    store_lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "bot.engine.store_pg"]
    assert [m for level, m in store_lines if level >= logging.WARNING] == [OUTAGE_LINE]
    assert [m for _, m in store_lines if "reachable again" in m] == ["PostgreSQL reachable again"]
    fleet_lines = [r.getMessage() for r in caplog.records if r.name == "bot.service.fleet"]
    assert sum(m.startswith("process heartbeat failed") for m in fleet_lines) == 1
    assert sum(m == "process heartbeat restored" for m in fleet_lines) == 1
    # Nobody else warns about it, but the manager: it still logs each failed job write with a traceback
    # (bot/engine/manager.py _persist; the change it needs is test_manager_store_outage.py's xfail).
    warned = {r.name for r in caplog.records if r.levelno >= logging.WARNING}
    assert warned <= {"bot.engine.store_pg", "bot.engine.manager"}, warned
    for inter in [*burst, *late, after]:
        assert_member_safe(final_text(inter))
