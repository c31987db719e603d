"""The queue model end to end through the fake Discord: defects 1 and 4 as a member would meet them."""

from __future__ import annotations

import asyncio

from bot.engine.models import JobState
from tests.frontend.conftest import is_done, running_bot


def labels(message) -> list[str]:
    return [c.get("label") for row in message.components for c in row.get("components", [])]


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_defect1_cancelling_a_queued_job_while_two_run_and_everything_still_completes(
    fake_discord, fake_openai, tmp_path
) -> None:
    fake_openai.configure(delay=1.0)
    async with running_bot(
        fake_discord, tmp_path, backend_url=fake_openai.url, guild_concurrency=2, backend_concurrency=4
    ) as h:
        members = [fake_discord.add_member(h.guild.id) for _ in range(3)]
        running = [await h.imagine(m.id, f"running {i}") for i, m in enumerate(members[:2])]
        await wait_for(lambda: fake_openai.state.generations == 2)
        queued = await h.imagine(members[2].id, "waiting")
        message = await queued.wait_until(lambda m: "Queued" in m.content or "Cancel" in labels(m))
        await wait_for(lambda: h.bot.manager.guild_waiting(int(h.guild.id)) == 1)
        press = await fake_discord.click_button(
            message, fake_discord.find_component(message, label="Cancel"), members[2].id
        )
        await press.wait_for_callback()
        await wait_for(lambda: h.bot.manager.guild_waiting(int(h.guild.id)) == 0)
        h.bot.manager.check_invariants()
        # Another server's submit and the freed slots must dispatch without a crash or a leaked slot.
        other_guild = fake_discord.add_guild(name="Other")
        stranger = fake_discord.add_member(other_guild.id)
        other = await h.imagine(stranger.id, "elsewhere", guild=other_guild)
        for inter in [*running, other]:
            await inter.wait_until(is_done, timeout=15)
        fake_openai.configure(delay=0)
        later = await h.imagine(members[2].id, "after the cancel")
        await later.wait_until(is_done, timeout=15)
        assert fake_openai.state.generations == 4  # the cancelled job never reached the backend
        completed = h.bot.manager.completed
        assert (completed[JobState.SUCCEEDED], completed[JobState.CANCELLED], completed[JobState.FAILED]) == (
            4,
            1,
            0,
        )
        await wait_for(lambda: h.bot.manager.backend_in_flight == 0)
        h.bot.manager.check_invariants()


async def test_defect4_same_prompt_in_an_idle_server_does_not_wait_behind_another_servers_backlog(
    fake_discord, fake_openai, tmp_path
) -> None:
    fake_openai.configure(delay=1.5)
    async with running_bot(
        fake_discord, tmp_path, backend_url=fake_openai.url, guild_concurrency=1, backend_concurrency=4
    ) as h:
        busy = [fake_discord.add_member(h.guild.id) for _ in range(2)]
        await h.imagine(busy[0].id, "the backlog")
        await wait_for(lambda: fake_openai.state.generations == 1)
        await h.imagine(busy[1].id, "a shared prompt")  # waits: the busy server is at its limit
        await wait_for(lambda: h.bot.manager.guild_waiting(int(h.guild.id)) == 1)
        idle_guild = fake_discord.add_guild(name="Idle")
        member = fake_discord.add_member(idle_guild.id)
        idle = await h.imagine(member.id, "a shared prompt", guild=idle_guild)
        # It starts at once, in the idle server's own slot, although the busy server's copy is still queued.
        await wait_for(lambda: fake_openai.state.generations == 2, timeout=1.0)
        assert h.bot.manager.guild_in_flight(int(idle_guild.id)) == 1
        assert h.bot.manager.guild_in_flight(int(h.guild.id)) == 1
        await idle.wait_until(is_done, timeout=15)
        assert fake_openai.state.generations == 2  # one generation for both servers' identical prompt
        h.bot.manager.check_invariants()
