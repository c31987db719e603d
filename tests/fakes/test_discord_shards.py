"""The fake Discord's sharding, driven over a real websocket by a raw gateway client (no discord.py).

Why: the bot's sharded tests trust that the fake routes like Discord — READY and GUILD_CREATE carry only a
shard's own guilds, a guild's events reach only the shard that owns it, guild-less ones reach shard 0 —
and that sessions without ``shard`` still get everything (every older test relies on that).

"Not received" is shown without waiting: after the event under test, a marker is sent that the same
session must receive; events on one socket arrive in order, so anything missing before the marker was
never sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.fakes.discord import FakeClock, FakeDiscord
from tests.fakes.discord.model import shard_of

TOKEN = "test-token"
#: A fixed base for clocks that move only when a test advances them.
T0 = 1_750_000_000.0
REPO = Path(__file__).resolve().parents[2]


class RawSession:
    """One gateway connection: HELLO, IDENTIFY (optionally sharded), then every dispatch in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ready: dict[str, Any] = {}

    @classmethod
    async def open(
        cls, http: aiohttp.ClientSession, fake: FakeDiscord, shard: list[int] | None
    ) -> RawSession:
        ws = await http.ws_connect(f"{fake.gateway_url}?v=10&encoding=json")
        hello = await ws.receive_json(timeout=5)
        assert hello["op"] == 10
        identify: dict[str, Any] = {"token": fake.token, "intents": 1, "properties": {}}
        if shard is not None:
            identify["shard"] = shard
        await ws.send_json({"op": 2, "d": identify})
        session = cls(ws)
        event, session.ready = await session.next()
        assert event == "READY"
        return session

    async def next(self) -> tuple[str, Any]:
        """The next dispatch (heartbeat ACKs and other ops are skipped)."""
        while True:
            frame = await self.ws.receive_json(timeout=5)
            if frame["op"] == 0:
                return frame["t"], frame["d"]

    async def until(self, event: str, marker: str) -> list[tuple[str, Any]]:
        """Every dispatch up to the one of type ``event`` whose payload holds ``marker`` (excluded)."""
        seen: list[tuple[str, Any]] = []
        while True:
            item = await self.next()
            if item[0] == event and marker in json.dumps(item[1]):
                return seen
            seen.append(item)


async def identify(http: aiohttp.ClientSession, fake: FakeDiscord, shard: list[int]) -> dict[str, Any]:
    """Connect and IDENTIFY as ``shard``; the fake's first answer to it (READY's dispatch, or op 9)."""
    ws = await http.ws_connect(f"{fake.gateway_url}?v=10&encoding=json")
    assert (await ws.receive_json(timeout=5))["op"] == 10
    await ws.send_json({"op": 2, "d": {"token": fake.token, "intents": 1, "properties": {}, "shard": shard}})
    while True:
        frame = await ws.receive_json(timeout=5)
        if frame["op"] != 11:
            return frame


def guild_ids(events: list[tuple[str, Any]], event: str = "GUILD_CREATE") -> list[str]:
    return [d["id"] if event.startswith("GUILD_") else d["guild_id"] for t, d in events if t == event]


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(token=TOKEN, recommended_shards=2) as f:
        yield f


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def sync_imagine(http: aiohttp.ClientSession, fake: FakeDiscord) -> None:
    """Register /imagine globally over REST, as the bot does, so invoke_command can dispatch it."""
    command = {"name": "imagine", "description": "Make a picture", "options": [
        {"name": "prompt", "description": "what", "type": 3, "required": True}
    ]}  # fmt: skip
    async with http.put(
        f"{fake.api_base}/applications/{fake.app_id}/commands",
        json=[command],
        headers={"Authorization": f"Bot {fake.token}"},
    ) as response:
        assert response.status == 200


async def test_guild_ids_on_shard_are_owned_by_that_shard(fake: FakeDiscord) -> None:
    for count in (1, 2, 3, 7):
        for shard in range(count):
            gid = fake.guild_id_on_shard(shard, count)
            assert shard_of(gid, count) == shard == (int(gid) >> 22) % count
    ids = [fake.guild_id_on_shard(1, 2) for _ in range(50)]
    assert len(set(ids)) == 50


async def test_ready_and_guild_create_carry_only_the_shards_own_guilds(fake: FakeDiscord, http) -> None:
    zero = [fake.add_guild(fake.guild_id_on_shard(0, 2), name=f"zero{i}").id for i in range(2)]
    one = [fake.add_guild(fake.guild_id_on_shard(1, 2), name=f"one{i}").id for i in range(3)]

    shard0 = await RawSession.open(http, fake, [0, 2])
    shard1 = await RawSession.open(http, fake, [1, 2])
    assert shard0.ready["shard"] == [0, 2] and shard1.ready["shard"] == [1, 2]
    assert [g["id"] for g in shard0.ready["guilds"]] == zero
    assert [g["id"] for g in shard1.ready["guilds"]] == one
    assert [(await shard0.next())[1]["id"] for _ in zero] == zero
    assert [(await shard1.next())[1]["id"] for _ in one] == one
    assert fake.gateway.identified_shards == [(0, 2), (1, 2)]
    assert fake.gateway.connected_shards == [(0, 2), (1, 2)]

    # Joining a guild later: only its shard hears of it.
    late = fake.add_guild(fake.guild_id_on_shard(1, 2), name="late").id
    marker = fake.add_guild(fake.guild_id_on_shard(0, 2), name="marker0").id
    assert await shard0.until("GUILD_CREATE", marker) == []
    assert guild_ids(await shard1.until("GUILD_CREATE", late)) == []


async def test_a_guilds_interactions_reach_only_its_shard_and_dms_reach_shard_0(
    fake: FakeDiscord, http
) -> None:
    await sync_imagine(http, fake)
    guilds = {shard: fake.add_guild(fake.guild_id_on_shard(shard, 2), name=f"g{shard}") for shard in (0, 1)}
    user = fake.add_user(username="alice")
    for guild in guilds.values():
        fake.add_member(guild.id, user.id)
    shard0 = await RawSession.open(http, fake, [0, 2])
    shard1 = await RawSession.open(http, fake, [1, 2])
    assert guild_ids([await shard0.next()]) == [guilds[0].id]
    assert guild_ids([await shard1.next()]) == [guilds[1].id]

    async def invoke(shard: int) -> str:
        guild = guilds[shard]
        inter = await fake.invoke_command(guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "p"})
        return inter.id

    on_one = await invoke(1)
    on_zero = await invoke(0)
    # Shard 0's stream: its own interaction, with shard 1's never before it.
    assert await shard0.until("INTERACTION_CREATE", on_zero) == []
    # A guild-less event (a DM interaction has no guild_id) goes to shard 0 only.
    await fake.dispatch("INTERACTION_CREATE", {"id": "dm-1", "user": user.payload()})
    assert await shard0.until("INTERACTION_CREATE", "dm-1") == []
    # Shard 1 got its interaction and then nothing else up to its next one: not shard 0's, not the DM.
    assert await shard1.until("INTERACTION_CREATE", on_one) == []
    on_one_again = await invoke(1)
    assert await shard1.until("INTERACTION_CREATE", on_one_again) == []


async def test_unsharded_sessions_still_receive_everything(fake: FakeDiscord, http) -> None:
    guilds = [fake.add_guild(fake.guild_id_on_shard(shard, 2)).id for shard in (0, 1)]
    plain = await RawSession.open(http, fake, None)
    shard1 = await RawSession.open(http, fake, [1, 2])
    assert "shard" not in plain.ready
    assert [g["id"] for g in plain.ready["guilds"]] == guilds
    assert guild_ids([await plain.next(), await plain.next()]) == guilds
    await shard1.next()  # its own GUILD_CREATE

    await fake.dispatch("GUILD_UPDATE", {"id": guilds[1], "name": "renamed"})
    await fake.dispatch("TYPING_START", {"guild_id": guilds[0], "channel_id": "1", "marker": "t0"})
    got = await plain.until("TYPING_START", "t0")
    assert [t for t, _ in got] == ["GUILD_UPDATE"]
    await fake.dispatch("TYPING_START", {"guild_id": guilds[1], "channel_id": "1", "marker": "t1"})
    assert [t for t, _ in await shard1.until("TYPING_START", "t1")] == ["GUILD_UPDATE"]
    assert fake.gateway.connected_shards == [None, (1, 2)]


async def test_one_shard_can_be_dropped_and_resumes_its_missed_events(fake: FakeDiscord, http) -> None:
    guilds = {shard: fake.add_guild(fake.guild_id_on_shard(shard, 2)).id for shard in (0, 1)}
    shard0 = await RawSession.open(http, fake, [0, 2])
    shard1 = await RawSession.open(http, fake, [1, 2])
    await shard0.next(), await shard1.next()

    await fake.disconnect_gateway(shard=1)
    assert (await shard1.ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await fake.wait_for_state(lambda: fake.gateway.connected_shards == [(0, 2)], what="shard 1 down")
    assert fake.gateway.last_close_code == 4000
    # Buffered for shard 1's session (not given to shard 0), replayed on RESUME.
    await fake.dispatch("TYPING_START", {"guild_id": guilds[1], "channel_id": "1", "marker": "missed"})
    await fake.dispatch("TYPING_START", {"guild_id": guilds[0], "channel_id": "1", "marker": "zero"})
    assert await shard0.until("TYPING_START", "zero") == []

    ws = await http.ws_connect(f"{fake.gateway_url}?v=10&encoding=json")
    await ws.receive_json(timeout=5)
    session_id = shard1.ready["session_id"]
    await ws.send_json({"op": 6, "d": {"token": fake.token, "session_id": session_id, "seq": 2}})
    resumed = RawSession(ws)
    assert [t for t, _ in await resumed.until("RESUMED", "")] == ["TYPING_START"]
    assert fake.resume_count == 1 and fake.gateway.connected_shards == [(0, 2), (1, 2)]


async def test_a_malformed_shard_is_refused_with_4010(fake: FakeDiscord, http) -> None:
    ws = await http.ws_connect(f"{fake.gateway_url}?v=10&encoding=json")
    await ws.receive_json(timeout=5)
    await ws.send_json({"op": 2, "d": {"token": fake.token, "intents": 1, "properties": {}, "shard": [2, 2]}})
    assert (await ws.receive(timeout=5)).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await fake.wait_for_state(lambda: fake.close_codes, what="the close")
    assert fake.close_codes == [4010] and fake.identify_count == 0


async def test_gateway_bot_recommends_shards_and_lets_them_identify_at_once(fake: FakeDiscord, http) -> None:
    headers = {"Authorization": f"Bot {fake.token}"}
    async with http.get(f"{fake.api_base}/gateway/bot", headers=headers) as response:
        body = await response.json()
    assert body["shards"] == 2 and body["url"] == fake.gateway_url
    assert body["session_start_limit"]["max_concurrency"] >= 2
    fake.recommended_shards = 5
    fake.gateway_bot_url = "ws://192.0.2.1:9/nowhere"
    async with http.get(f"{fake.api_base}/gateway/bot", headers=headers) as response:
        body = await response.json()
    assert body["shards"] == 5 and body["session_start_limit"]["max_concurrency"] >= 5
    assert body["url"] == "ws://192.0.2.1:9/nowhere"
    fake.max_concurrency = 2  # fewer than the shards: they must then IDENTIFY in turns
    async with http.get(f"{fake.api_base}/gateway/bot", headers=headers) as response:
        body = await response.json()
    assert body["shards"] == 5 and body["session_start_limit"]["max_concurrency"] == 2


async def test_an_identify_sooner_than_5_s_after_its_keys_last_gets_op_9_while_other_keys_go_at_once(
    http,
) -> None:
    clock = FakeClock(base=lambda: T0)  # moves only when the test says
    async with FakeDiscord(
        token=TOKEN, recommended_shards=4, max_concurrency=2, enforce_identify_limit=True, clock=clock
    ) as fake:
        # Keys are shard_id % 2: shards 0 and 2 share key 0, shards 1 and 3 key 1.
        assert (await identify(http, fake, [0, 4]))["t"] == "READY"
        assert (await identify(http, fake, [1, 4]))["t"] == "READY"  # another key: at the same instant
        assert await identify(http, fake, [2, 4]) == {"op": 9, "d": False}
        clock.advance(4.9)
        assert await identify(http, fake, [3, 4]) == {"op": 9, "d": False}
        clock.advance(0.1)  # 5 s after key 0's and key 1's accepted IDENTIFYs
        assert (await identify(http, fake, [2, 4]))["t"] == "READY"
        assert (await identify(http, fake, [3, 4]))["t"] == "READY"
        assert await identify(http, fake, [0, 4]) == {"op": 9, "d": False}  # key 0 went just now (shard 2)

        assert fake.gateway.identified_shards == [(0, 4), (1, 4), (2, 4), (3, 4)]
        seen = [
            (a.shard[0] if a.shard else None, a.key, a.at - T0, a.accepted) for a in fake.gateway.identifies
        ]
        assert seen == [
            (0, 0, 0.0, True),
            (1, 1, 0.0, True),
            (2, 0, 0.0, False),
            (3, 1, pytest.approx(4.9), False),
            (2, 0, pytest.approx(5.0), True),
            (3, 1, pytest.approx(5.0), True),
            (0, 0, pytest.approx(5.0), False),
        ]
        assert [a.shard for a in fake.gateway.rate_limited_identifies] == [(2, 4), (3, 4), (0, 4)]
        assert fake.state()["rate_limited_identifies"] == 3


async def test_without_enforcement_every_identify_is_accepted_but_still_recorded(http) -> None:
    clock = FakeClock(base=lambda: T0)
    async with FakeDiscord(token=TOKEN, recommended_shards=2, max_concurrency=1, clock=clock) as fake:
        for shard in ([0, 2], [1, 2]):
            assert (await identify(http, fake, shard))["t"] == "READY"
        assert [(a.key, a.accepted) for a in fake.gateway.identifies] == [(0, True), (0, True)]
        assert fake.gateway.rate_limited_identifies == []


async def test_standalone_fake_takes_a_shard_count(http) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.discord",
        "--port",
        "0",
        "--shards",
        "3",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        info = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert info["recommended_shards"] == 3
        headers = {"Authorization": f"Bot {info['token']}"}
        async with http.get(f"{info['api_base']}/gateway/bot", headers=headers) as response:
            body = await response.json()
        assert body["shards"] == 3 and body["session_start_limit"]["max_concurrency"] >= 3
        async with http.post(f"{info['url']}/_fake/gateway", json={"recommended_shards": 4}) as response:
            assert response.status == 200
        async with http.get(f"{info['api_base']}/gateway/bot", headers=headers) as response:
            assert (await response.json())["shards"] == 4
        control = {"max_concurrency": 1, "enforce_identify_limit": True}
        async with http.post(f"{info['url']}/_fake/gateway", json=control) as response:
            state = await response.json()
        assert (state["max_concurrency"], state["enforce_identify_limit"]) == (1, True)
        async with http.get(f"{info['api_base']}/gateway/bot", headers=headers) as response:
            assert (await response.json())["session_start_limit"]["max_concurrency"] == 1
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
