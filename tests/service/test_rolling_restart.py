"""Issue 11: rolling restarts lose nothing. SIGTERM to one process of the fleet: its running jobs finish and
post within the grace, its queued jobs are handed back (not cancelled) and the other process runs them; then
the same for the other one. Running jobs whose generation the other process can follow up by its id (AI Horde)
are handed over instead, without cancelling the generation. Two real ``python -m bot`` processes (A runs shard
0, B shard 1) on one real PostgreSQL, the fake Discord and a fake backend (OpenAI-compatible, 1 s per image,
one at a time per process; or a fake AI Horde).
"""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.fakes.discord import FakeInteraction
from tests.fakes.horde import FakeHorde
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import embed_author, image_attachments, is_done
from tests.frontend.process import assert_clean, bot_process
from tests.service.conftest import TTL, two_shard_fleet

JOBS_PER_GUILD = 4


async def test_restarting_both_processes_one_by_one_during_a_burst_completes_every_job(
    fake, data_dir, pg_url
) -> None:
    a_guild = fake.add_guild(fake.guild_id_on_shard(0, 2), name="a")
    b_guild = fake.add_guild(fake.guild_id_on_shard(1, 2), name="b")
    async with FakeOpenAI(delay=1.0) as backend:
        common = two_shard_fleet(
            "openai",
            backend.url,
            pg_url,
            guild_concurrency=1,
            backend_concurrency=1,
            shutdown_grace_s=2,  # one image of 1 s fits; without the hand-back the queued ones would be cut
        )

        async def burst(guild) -> list[FakeInteraction]:  # type: ignore[no-untyped-def]
            sent = []
            for i in range(JOBS_PER_GUILD):
                user = fake.add_member(guild.id)
                prompt = f"{guild.name} picture {i}"
                sent.append(
                    await fake.invoke_command(
                        guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": prompt}
                    )
                )
            return sent

        def queued(inter: FakeInteraction) -> bool:
            return bool(inter.original) and "Queued" in embed_author(inter.original)

        async with bot_process(fake, data_dir, shard_ids=1, **common) as b:
            async with bot_process(fake, data_dir, shard_ids=0, **common) as a:
                a_jobs = await burst(a_guild)
                b_jobs = await burst(b_guild)
                await fake.wait_for_state(lambda: all(queued(i) for i in a_jobs[1:]), 20, "A's jobs queued")
                # SIGTERM to A with one job generating and three queued: exit 0 after the drain.
                assert await a.terminate() == 0
            assert "handing_back=True" in a.text, a.text
            # Restart A (a new incarnation), then SIGTERM to B in the middle of its own (and A's) jobs.
            async with bot_process(fake, data_dir, shard_ids=0, **common) as a2:
                await fake.wait_for_state(
                    lambda: sum(is_done(i.original) for i in a_jobs + b_jobs if i.original) >= 3,
                    60,
                    "progress",
                )
                assert await b.terminate() == 0
                assert "handing_back=True" in b.text, b.text
                finals = []
                for inter in a_jobs + b_jobs:
                    await fake.wait_for_state(
                        lambda i=inter: i.original and is_done(i.original), 90, "an image"
                    )
                    finals.append(inter.original)
                assert await a2.terminate() == 0
    # Every job of the burst ended with its image, none cancelled, none generated twice.
    assert all(image_attachments(message) for message in finals)
    assert not any("Stopped by a restart" in str(message.embeds) for message in finals)
    prompts = [f"{g} picture {i}" for g in ("a", "b") for i in range(JOBS_PER_GUILD)]
    assert Counter(payload["prompt"] for payload in backend.state.payloads) == Counter(prompts)
    for process in (a, b, a2):
        assert_clean(process.text)


async def test_a_running_horde_generation_is_handed_over_and_followed_up_not_cancelled(
    fake, data_dir, pg_url
) -> None:
    a_guild = fake.add_guild(fake.guild_id_on_shard(0, 2), name="a")
    fake.add_guild(fake.guild_id_on_shard(1, 2), name="b")
    grace = 20
    async with FakeHorde(checks_until_done=10_000) as horde:  # slow: still generating when A is stopped
        common = two_shard_fleet(
            "horde",
            horde.url,
            pg_url,
            shutdown_grace_s=grace,
        )
        async with bot_process(fake, data_dir, shard_ids=1, **common) as b:
            async with bot_process(fake, data_dir, shard_ids=0, **common) as a:
                user = fake.add_member(a_guild.id)
                inter = await fake.invoke_command(
                    a_guild.id, a_guild.channels[0].id, user.id, "imagine", {"prompt": "a slow castle"}
                )
                # Submitted, its Horde id stored (the first status poll comes after on_submitted).
                await fake.wait_for_state(
                    lambda: any(r.checks >= 1 for r in horde.requests.values()),
                    20,
                    "the generation under way",
                )
                stopped_at = asyncio.get_running_loop().time()
                assert await a.terminate() == 0
                # Nothing else kept A: it left at once, not after the grace.
                assert asyncio.get_running_loop().time() - stopped_at < grace / 2, a.text
            assert "running generation handed over" in a.text, a.text
            assert horde.state.deletes == 0  # the generation was left running at the Horde
            assert not (inter.original and is_done(inter.original))
            horde.configure(checks_until_done=0)  # the Horde finishes it; B follows it up by its id
            await fake.wait_for_state(lambda: inter.original and is_done(inter.original), 40, "the image")
            final = inter.original
            assert image_attachments(final)
            assert "Stopped by a restart" not in str(final.embeds)
            took_over = [
                line for line in b.text.splitlines() if "took over the jobs of a dead process" in line
            ]
            assert len(took_over) == 1 and "resumed=1" in took_over[0], b.text
            assert await b.terminate() == 0
    # One submit for the prompt (a follow-up by id submits nothing), and no cancel at the Horde.
    prompts = Counter(req.payload["prompt"].split("###")[0].strip() for req in horde.requests.values())
    assert prompts == Counter({"a slow castle": 1}) and horde.state.submits == 1
    assert horde.state.deletes == 0 and horde.state.deleted_ids == []
    for process in (a, b):
        assert_clean(process.text)


async def test_a_cancel_pressed_in_one_process_stops_a_job_running_in_the_other(
    fake, data_dir, pg_url
) -> None:
    """A handed a running Horde generation over at its restart; B follows it up. The member presses Cancel on
    its message, in A's guild, so the restarted A receives the press: the cancel reaches B (a row + NOTIFY),
    B stops its backend call (a DELETE at the Horde) and the message says who cancelled it."""
    a_guild = fake.add_guild(fake.guild_id_on_shard(0, 2), name="a")
    fake.add_guild(fake.guild_id_on_shard(1, 2), name="b")
    async with FakeHorde(checks_until_done=10_000) as horde:  # never done by itself
        common = two_shard_fleet("horde", horde.url, pg_url)
        async with bot_process(fake, data_dir, shard_ids=1, **common) as b:
            user = fake.add_member(a_guild.id)
            async with bot_process(fake, data_dir, shard_ids=0, **common) as a:
                inter = await fake.invoke_command(
                    a_guild.id, a_guild.channels[0].id, user.id, "imagine", {"prompt": "a stubborn castle"}
                )
                await fake.wait_for_state(
                    lambda: any(r.checks >= 1 for r in horde.requests.values()),
                    20,
                    "the generation under way",
                )
                assert await a.terminate() == 0
            await fake.wait_for_state(lambda: "resumed=1" in b.text, 20, "B following the generation up")
            async with bot_process(fake, data_dir, shard_ids=0, **common) as restarted:
                message = inter.original
                assert message is not None and not is_done(message)
                press = await fake.click_button(
                    message, fake.find_component(message, label="Cancel"), user.id
                )
                await press.wait_for_callback()
                await fake.wait_for_state(
                    lambda: inter.original and "Cancelled" in str(inter.original.embeds),
                    20,
                    "the cancel shown",
                )
                assert horde.state.deletes == 1  # B stopped the generation it was following
                assert "a stubborn castle" not in restarted.text  # the press was answered, not run here
                assert await restarted.terminate() == 0
            assert await b.terminate() == 0
    assert horde.state.submits == 1
    for process in (a, b, restarted):
        assert_clean(process.text)


async def test_the_same_request_waiting_elsewhere_is_answered_by_the_handed_over_generation(
    fake, data_dir, pg_url
) -> None:
    """B has the same prompt waiting for A's Horde generation when A restarts: the generation is handed over
    with its claim, B follows it up, and B's own request is answered from its result, not generated again."""
    a_guild = fake.add_guild(fake.guild_id_on_shard(0, 2), name="a")
    b_guild = fake.add_guild(fake.guild_id_on_shard(1, 2), name="b")
    async with FakeHorde(checks_until_done=10_000) as horde:
        common = two_shard_fleet(
            "horde",
            horde.url,
            pg_url,
            shutdown_grace_s=20,
        )
        ask = {"prompt": "a slow lighthouse"}
        async with bot_process(fake, data_dir, shard_ids=1, **common) as b:
            async with bot_process(fake, data_dir, shard_ids=0, **common) as a:
                first = await fake.invoke_command(
                    a_guild.id, a_guild.channels[0].id, fake.add_member(a_guild.id).id, "imagine", ask
                )
                await fake.wait_for_state(
                    lambda: any(r.checks >= 1 for r in horde.requests.values()),
                    20,
                    "A's generation under way",
                )
                second = await fake.invoke_command(
                    b_guild.id, b_guild.channels[0].id, fake.add_member(b_guild.id).id, "imagine", ask
                )
                await fake.wait_for_state(
                    lambda: second.original and "Queued" in embed_author(second.original), 20, "B waiting"
                )
                assert await a.terminate() == 0
            assert "running generation handed over" in a.text, a.text
            await asyncio.sleep(3 * TTL)  # A's row is gone and B has taken its job over: B still waits
            assert horde.state.submits == 1, b.text
            assert not is_done(second.original)
            horde.configure(checks_until_done=0)
            for inter in (first, second):
                await fake.wait_for_state(lambda i=inter: i.original and is_done(i.original), 40, "the image")
                assert image_attachments(inter.original)
            assert await b.terminate() == 0
    assert horde.state.submits == 1 and horde.state.deletes == 0  # generated once, for both servers
    for process in (a, b):
        assert_clean(process.text)
