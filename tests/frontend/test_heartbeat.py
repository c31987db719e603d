"""A run against the fake Discord is quiet: heartbeats are acknowledged the way Discord does.

discord.py 2.7 measures gateway latency from HEARTBEAT to HEARTBEAT_ACK and warns "Can't keep up, shard ID
None websocket is 41.3s behind" above 10 s. It stamps a heartbeat's send time in its keep-alive thread only
after the send completes, so an ACK that comes back at once from another process on the same machine is
measured against the previous heartbeat: every local run logged that warning. Discord's ACK takes a network
round trip; so does the fake's now.
"""

from __future__ import annotations

import asyncio

from tests.fakes.discord import FakeDiscord
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import TOKEN
from tests.frontend.process import assert_clean, bot_process

BEHIND = "Can't keep up"


async def test_a_bot_run_logs_no_cant_keep_up_warning(tmp_path) -> None:
    # discord.py warns only above 10 s, so the interval must exceed that for a stale measurement to show.
    async with (
        FakeDiscord(token=TOKEN, heartbeat_interval_ms=10_500) as fake,
        FakeOpenAI() as backend,
        bot_process(
            fake, tmp_path, dev_mode=False, image_backend="openai", image_backend_url=backend.url
        ) as bot,
    ):
        # Heartbeats are counted once the session exists: the first is the first periodic one.
        await fake.wait_for_state(lambda: fake.heartbeats, 20, "a periodic heartbeat")
        await fake.wait_for_state(lambda: not fake.gateway.acks_pending, 2, "its ACK")
        await asyncio.sleep(0.5)  # the bot reads the ACK (and would warn) before it is told to stop
        assert await bot.terminate() == 0
    assert BEHIND not in bot.text, bot.text
    assert_clean(bot.text)
