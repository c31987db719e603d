"""Gateway sharding end to end: the real bot (in-process, and as processes) against the sharded fake Discord.

Each guild's events reach only the shard ``(guild_id >> 22) % count``; the fake routes them that way, so a
guild is answered only if the process running its shard connected it. These tests show the bot connects the
shards it should (given, or as GET /gateway/bot recommends, through DISCORD_GATEWAY_URL either way), answers
in guilds of every shard, splits across processes, and that /healthz counts every shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import TOKEN
from tests.fakes.discord import FakeDiscord, FakeGuild, FakeInteraction
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import is_done, running_bot
from tests.frontend.process import assert_clean, bot_process

#: discord.py 2.7 waits 5 s before every IDENTIFY but its first: two shards take that long to be ready.
READY_TIMEOUT = 30.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def guilds_on_shards(fake: FakeDiscord, count: int, per_shard: int = 1) -> dict[int, list[FakeGuild]]:
    return {
        shard: [
            fake.add_guild(fake.guild_id_on_shard(shard, count), name=f"shard{shard}-{i}")
            for i in range(per_shard)
        ]
        for shard in range(count)
    }


async def imagine(fake: FakeDiscord, guild: FakeGuild, prompt: str) -> FakeInteraction:
    user = fake.add_member(guild.id)
    return await fake.invoke_command(guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": prompt})


async def test_one_process_with_shard_count_2_runs_both_shards_and_answers_in_each(
    fake_discord, fake_openai, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="bot.frontend.client")
    guilds = guilds_on_shards(fake_discord, 2)
    async with running_bot(
        fake_discord, tmp_path, backend_url=fake_openai.url, shard_count=2, ready_timeout=READY_TIMEOUT
    ) as h:
        assert sorted(fake_discord.gateway.identified_shards) == [(0, 2), (1, 2)]
        assert fake_discord.gateway.connected_shards == [(0, 2), (1, 2)]
        # Given a count, discord.py does not ask for one.
        assert fake_discord.requests_matching("GET", r"/gateway/bot$") == []
        assert h.bot.shard_count == 2 and sorted(h.bot.shards) == [0, 1]
        for shard, (guild,) in guilds.items():
            assert h.bot.get_guild(int(guild.id)).shard_id == shard  # type: ignore[union-attr]
            inter = await imagine(fake_discord, guild, f"a painting for shard {shard}")
            await inter.wait_until(is_done, timeout=15)
            assert len(inter.callbacks) == 1
    (line,) = [r for r in caplog.records if r.getMessage() == "gateway shards"]
    assert (line.shards, line.shard_count, line.source) == ("0,1", 2, "SHARD_COUNT")  # type: ignore[attr-defined]


async def test_without_shard_count_it_runs_the_recommended_shards_through_the_gateway_override(
    fake_openai, tmp_path
) -> None:
    async with FakeDiscord(token=TOKEN, recommended_shards=2) as fake:
        # Followed, this URL would never connect (port 9, nothing listens): the bot must use DISCORD_GATEWAY_URL.
        fake.gateway_bot_url = "ws://127.0.0.1:9/bogus"
        guilds = guilds_on_shards(fake, 2)
        async with running_bot(fake, tmp_path, backend_url=fake_openai.url, ready_timeout=READY_TIMEOUT) as h:
            assert len(fake.requests_matching("GET", r"/gateway/bot$")) == 1
            assert sorted(fake.gateway.identified_shards) == [(0, 2), (1, 2)]
            assert h.bot.shard_count == 2
            for _shard, (guild,) in guilds.items():
                inter = await imagine(fake, guild, "recommended")
                await inter.wait_until(is_done, timeout=15)
        assert fake.refused_connections == 0


def stored_guilds(data_dir: Path) -> set[str]:
    """The guilds this process admitted jobs for (its own SQLite store in its own DATA_DIR)."""
    path = data_dir / "bot.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
        return {str(row[0]) for row in db.execute("SELECT guild_id FROM jobs")}


async def test_two_processes_split_the_shards_and_each_guild_is_answered_by_its_own(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        guilds = guilds_on_shards(fake, 2, per_shard=2)
        dirs = {shard: tmp_path / f"shard{shard}" for shard in (0, 1)}
        for directory in dirs.values():
            directory.mkdir()
        common: dict[str, Any] = {
            "image_backend": "openai",
            "image_backend_url": backend.url,
            "shard_count": 2,
        }
        async with (
            bot_process(fake, dirs[0], shard_ids=0, **common) as zero,
            bot_process(fake, dirs[1], shard_ids=1, **common) as one,
        ):
            await fake.wait_for_state(
                lambda: fake.gateway.connected_shards == [(0, 2), (1, 2)], 20, "both shards connected"
            )
            assert sorted(fake.gateway.identified_shards) == [(0, 2), (1, 2)]  # one IDENTIFY each
            interactions = [
                await imagine(fake, guild, f"{guild.name} picture")
                for shard in (0, 1)
                for guild in guilds[shard]
            ]
            for inter in interactions:
                await inter.wait_until(is_done, timeout=20)
                assert len(inter.callbacks) == 1
            assert await zero.terminate() == 0
            assert await one.terminate() == 0
        for shard in (0, 1):
            assert stored_guilds(dirs[shard]) == {guild.id for guild in guilds[shard]}
        assert "shards=0 shard_count=2" in zero.text and "shards=1 shard_count=2" in one.text
        assert_clean(zero.text)
        assert_clean(one.text)


async def get_health(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{url}/healthz") as response:
        return response.status, await response.json()


async def poll_health(
    http: aiohttp.ClientSession, url: str, status: int, timeout: float = 20
) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        while True:
            got, body = await get_health(http, url)
            if got == status:
                return body
            await asyncio.sleep(0.05)


async def test_healthz_is_503_while_one_of_two_shards_is_down_and_200_once_it_resumes(
    fake_discord, fake_openai, tmp_path, http
) -> None:
    guilds = guilds_on_shards(fake_discord, 2)
    async with running_bot(
        fake_discord, tmp_path, backend_url=fake_openai.url, shard_count=2, ready_timeout=READY_TIMEOUT
    ) as h:
        assert h.service.web is not None
        url = h.service.web.url
        body = await poll_health(http, url, 200)
        assert body["checks"]["shards"] == {"0": "connected", "1": "connected"}
        h.bot.health.gateway_grace_s = 0  # any outage counts at once: the rule under test is "every shard"

        # A short drop: shard 1 RESUMEs, and that alone brings it back (on_shard_resumed).
        await fake_discord.disconnect_gateway(shard=1)
        await fake_discord.wait_for_state(lambda: fake_discord.resume_count == 1, 15, "shard 1 resumed")
        body = await poll_health(http, url, 200)
        assert body["checks"]["shards"] == {"0": "connected", "1": "connected"}
        assert h.bot.health.disconnects == 1

        fake_discord.set_gateway_available(False)  # shard 1 cannot come back until this ends
        await fake_discord.disconnect_gateway(shard=1)
        body = await poll_health(http, url, 503)
        assert body["status"] == "unhealthy"
        assert body["checks"]["shards"] == {"0": "connected", "1": "down"}
        assert fake_discord.gateway.connected_shards == [(0, 2)]  # shard 0 never dropped
        # Shard 0's guilds are still served meanwhile.
        inter = await imagine(fake_discord, guilds[0][0], "still here")
        await inter.wait_until(is_done, timeout=15)

        fake_discord.set_gateway_available(True)
        body = await poll_health(http, url, 200)
        assert body["checks"]["shards"] == {"0": "connected", "1": "connected"}
        assert fake_discord.refused_connections >= 1
        # Its resume refused, discord.py IDENTIFYs shard 1 afresh; shard 0 was never identified again.
        assert fake_discord.gateway.identified_shards.count((0, 2)) == 1
        inter = await imagine(fake_discord, guilds[1][0], "back again")
        await inter.wait_until(is_done, timeout=15)
