"""Gateway sharding end to end: the real bot (in-process, and as processes) against the sharded fake Discord.

Each guild's events reach only the shard ``(guild_id >> 22) % count``; the fake routes them that way, so a
guild is answered only if the process running its shard connected it. These tests show the bot connects the
shards it should (given, or as GET /gateway/bot recommends, through DISCORD_GATEWAY_URL either way), answers
in guilds of every shard, splits across processes, and that /healthz counts every shard.

IDENTIFY pacing: the fake enforces Discord's session start limit here (op 9 for an IDENTIFY sooner than 5 s
after its rate-limit key's last), and the in-process tests give the bot an IdentifyGate on the fake's own
clock, whose sleeps move that clock instead of waiting: what waited, and when each IDENTIFY arrived, is read
from the recorded sleeps and the fake's record, never from the wall clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.frontend.identify import IDENTIFY_INTERVAL_S, IdentifyGate
from tests.conftest import TOKEN
from tests.fakes.discord import FakeClock, FakeDiscord, FakeGuild, FakeInteraction
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import is_done, running_bot
from tests.frontend.process import assert_clean, bot_process, spawn_bot

#: With max_concurrency 1 (the fake's answer for one recommended shard) two shards IDENTIFY 5.5 s apart.
READY_TIMEOUT = 30.0
#: A fixed base for the fake's clock in the paced tests: it moves only by the gate's sleeps.
T0 = 1_750_000_000.0


class PacedTime:
    """The bot's IdentifyGate on the fake's clock: a sleep is recorded and moves the clock, taking no time."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sleeps: list[float] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.clock.advance(seconds)
        await asyncio.sleep(0)

    def gate(self) -> IdentifyGate:
        return IdentifyGate(clock=self.clock, sleep=self.sleep)


def identify_record(fake: FakeDiscord) -> list[tuple[int, float, bool]]:
    """(shard id, seconds after T0, accepted) of every IDENTIFY the fake saw, in order."""
    return [(a.shard[0] if a.shard else 0, a.at - T0, a.accepted) for a in fake.gateway.identifies]


def assert_spaced_per_key(fake: FakeDiscord) -> None:
    """No two accepted IDENTIFYs of one rate-limit key closer than Discord's 5 s."""
    by_key: dict[int, list[float]] = {}
    for attempt in fake.gateway.identifies:
        if attempt.accepted:
            by_key.setdefault(attempt.key, []).append(attempt.at)
    for key, times in by_key.items():
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        assert all(gap >= fake.identify_interval_s for gap in gaps), (key, gaps)


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
    fake_discord.enforce_identify_limit = True  # max_concurrency 1: the real gate, on real time, must comply
    guilds = guilds_on_shards(fake_discord, 2)
    async with running_bot(
        fake_discord, tmp_path, backend_url=fake_openai.url, shard_count=2, ready_timeout=READY_TIMEOUT
    ) as h:
        assert sorted(fake_discord.gateway.identified_shards) == [(0, 2), (1, 2)]
        assert fake_discord.gateway.rate_limited_identifies == []
        assert fake_discord.gateway.connected_shards == [(0, 2), (1, 2)]
        # Given a count, the bot asks GET /gateway/bot only for max_concurrency, and keeps its count.
        assert len(fake_discord.requests_matching("GET", r"/gateway/bot$")) == 1
        assert h.bot.identify_gate.max_concurrency == 1
        assert h.bot.shard_count == 2 and sorted(h.bot.shards) == [0, 1]
        for shard, (guild,) in guilds.items():
            assert h.bot.get_guild(int(guild.id)).shard_id == shard  # type: ignore[union-attr]
            inter = await imagine(fake_discord, guild, f"a painting for shard {shard}")
            await inter.wait_until(is_done, timeout=15)
            assert len(inter.callbacks) == 1
    (line,) = [r for r in caplog.records if r.getMessage() == "gateway shards"]
    assert (line.shards, line.shard_count, line.source) == ("0,1", 2, "SHARD_COUNT")  # type: ignore[attr-defined]
    assert line.max_concurrency == 1  # type: ignore[attr-defined]


async def test_four_shards_in_four_rate_limit_keys_identify_at_once_without_a_single_wait(
    fake_openai, tmp_path
) -> None:
    clock = FakeClock(base=lambda: T0)
    paced = PacedTime(clock)
    async with FakeDiscord(
        token=TOKEN, recommended_shards=4, enforce_identify_limit=True, clock=clock
    ) as fake:
        guilds_on_shards(fake, 4)
        async with running_bot(
            fake,
            tmp_path,
            backend_url=fake_openai.url,
            identify_gate=paced.gate(),
            ready_timeout=READY_TIMEOUT,
        ) as h:
            assert fake.gateway.connected_shards == [(shard, 4) for shard in range(4)]
            assert h.bot.identify_gate.max_concurrency == 4  # from the GET /gateway/bot that gave the count
            assert len(fake.requests_matching("GET", r"/gateway/bot$")) == 1
            # No shard waited (discord.py's hook would have slept 5 s before each of shards 1 to 3) ...
            assert paced.sleeps == []
            # ... every one went through the gate, each in its own key ...
            assert dict(h.bot.identify_gate.last_identify) == {0: T0, 1: T0, 2: T0, 3: T0}
            # ... and the fake saw all four at the same instant, and accepted them.
            assert identify_record(fake) == [(0, 0.0, True), (1, 0.0, True), (2, 0.0, True), (3, 0.0, True)]


async def test_four_shards_in_two_keys_identify_two_at_a_time_and_only_a_shared_key_waits(
    fake_openai, tmp_path
) -> None:
    clock = FakeClock(base=lambda: T0)
    paced = PacedTime(clock)
    async with FakeDiscord(token=TOKEN, max_concurrency=2, enforce_identify_limit=True, clock=clock) as fake:
        guilds = guilds_on_shards(fake, 4)
        async with running_bot(
            fake,
            tmp_path,
            backend_url=fake_openai.url,
            shard_count=4,
            identify_gate=paced.gate(),
            ready_timeout=READY_TIMEOUT,
        ) as h:
            assert fake.gateway.connected_shards == [(shard, 4) for shard in range(4)]
            assert h.bot.identify_gate.max_concurrency == 2  # asked once, SHARD_COUNT giving the count
            # Keys 0 and 1 at once; shard 2 (key 0, like shard 0) waits out the interval, after which key 1's
            # window is over too and shard 3 goes straight after it.
            assert paced.sleeps == [IDENTIFY_INTERVAL_S]
            w = IDENTIFY_INTERVAL_S
            assert identify_record(fake) == [(0, 0.0, True), (1, 0.0, True), (2, w, True), (3, w, True)]
            assert_spaced_per_key(fake)
            inter = await imagine(fake, guilds[3][0], "from the last shard to identify")
            await inter.wait_until(is_done, timeout=15)


async def test_when_get_gateway_bot_fails_shards_fall_back_to_discord_pys_5_s_and_say_so(
    fake_openai, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="bot.frontend.client")
    clock = FakeClock(base=lambda: T0)
    paced = PacedTime(clock)
    async with FakeDiscord(token=TOKEN, max_concurrency=2, enforce_identify_limit=True, clock=clock) as fake:
        guilds_on_shards(fake, 2)
        fake.inject_error("GET", r"/gateway/bot$", 403, {"message": "Missing Access", "code": 50001})
        async with running_bot(
            fake,
            tmp_path,
            backend_url=fake_openai.url,
            shard_count=2,
            identify_gate=paced.gate(),
            ready_timeout=READY_TIMEOUT,
        ) as h:
            assert fake.gateway.connected_shards == [(0, 2), (1, 2)]
            assert h.bot.identify_gate.max_concurrency is None
            assert paced.sleeps == [5.0]  # discord.py's rule: 5 s before every IDENTIFY but the first
    (warning,) = [
        r for r in caplog.records if r.levelno == logging.WARNING and "gateway/bot" in r.getMessage()
    ]
    assert warning.getMessage() == "GET /gateway/bot failed; shards identify 5 s apart"
    (line,) = [r for r in caplog.records if r.getMessage() == "gateway shards"]
    assert line.max_concurrency == "unknown"  # type: ignore[attr-defined]


async def test_an_identify_that_breaks_max_concurrency_gets_op_9_and_the_shard_identifies_again_later(
    fake_openai, tmp_path
) -> None:
    """The fake's enforcement at work: a gate told max_concurrency 4 while Discord allows 2 lets shards 2 and
    3 go too soon; the fake invalidates them, discord.py identifies them again through the gate, which then
    keeps their keys' interval, and every shard ends up connected."""
    clock = FakeClock(base=lambda: T0)
    paced = PacedTime(clock)
    wrong = paced.gate()
    wrong.configure(4)  # already configured: the bot does not ask GET /gateway/bot
    async with FakeDiscord(token=TOKEN, max_concurrency=2, enforce_identify_limit=True, clock=clock) as fake:
        guilds_on_shards(fake, 4)
        async with running_bot(
            fake, tmp_path, backend_url=fake_openai.url, shard_count=4, identify_gate=wrong,
            ready_timeout=READY_TIMEOUT,
        ) as h:  # fmt: skip
            assert fake.gateway.connected_shards == [(shard, 4) for shard in range(4)]
            assert fake.requests_matching("GET", r"/gateway/bot$") == []
            assert [a.shard for a in fake.gateway.rate_limited_identifies] == [(2, 4), (3, 4)]
            assert sorted(fake.gateway.identified_shards) == [(shard, 4) for shard in range(4)]
            assert_spaced_per_key(fake)
            assert paced.sleeps == [
                IDENTIFY_INTERVAL_S
            ]  # the first retry waited; the second had waited enough
            assert h.bot.is_ready()


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
    # max_concurrency 2: shards 0 and 1 are in different keys, so the two processes identify at once.
    async with (
        FakeDiscord(token=TOKEN, max_concurrency=2, enforce_identify_limit=True) as fake,
        FakeOpenAI() as backend,
    ):
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
            assert fake.gateway.rate_limited_identifies == []
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


async def test_two_processes_whose_shards_share_a_key_collide_once_and_the_second_identifies_again(
    tmp_path,
) -> None:
    """max_concurrency 1 (most bots): processes started together identify shards 0 and 1 in one key, and
    neither knows of the other's IDENTIFY. Discord invalidates the later one; its gate then keeps the interval
    from its own refused attempt, so the retry arrives after the other's window and both shards connect."""
    async with (
        FakeDiscord(token=TOKEN, max_concurrency=1, enforce_identify_limit=True) as fake,
        FakeOpenAI() as backend,
    ):
        # An hour-long window until the collision is seen: it happens however slowly the second one starts.
        fake.identify_interval_s = 3600.0
        common: dict[str, Any] = {
            "image_backend": "openai",
            "image_backend_url": backend.url,
            "shard_count": 2,
        }
        dirs = [tmp_path / f"shard{shard}" for shard in (0, 1)]
        for directory in dirs:
            directory.mkdir()
        async with bot_process(fake, dirs[0], shard_ids=0, **common) as zero:
            one = await spawn_bot(fake, dirs[1], shard_ids=1, **common)
            try:
                await fake.wait_for_state(lambda: fake.gateway.rate_limited_identifies, 30, "the collision")
                fake.identify_interval_s = 5.0  # Discord's window again, for the retry
                await fake.wait_for_state(
                    lambda: fake.gateway.connected_shards == [(0, 2), (1, 2)], 30, "both shards connected"
                )
                assert [a.shard for a in fake.gateway.rate_limited_identifies] == [(1, 2)]
                assert fake.gateway.identified_shards == [(0, 2), (1, 2)]
                assert_spaced_per_key(fake)
                assert await one.terminate() == 0
            finally:
                one.kill()
                with contextlib.suppress(TimeoutError, ProcessLookupError):
                    await one.wait(10)
            assert await zero.terminate() == 0
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
