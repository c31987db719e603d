"""/quota, /history and /show end to end: the real bot against the fake Discord and a fake backend."""

from __future__ import annotations

import asyncio

from bot.engine.models import ImageRequest, Job, JobState
from tests.fakes.discord import FakeDiscord
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import image_attachments, is_done, running_bot
from tests.frontend.test_admin import MANAGE_GUILD, answer

TOKEN = "test-token-abcdef123456"


async def test_quota_shows_what_is_left_and_cache_hits_are_free(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        admin = fake_discord.add_member(h.guild.id, permissions=MANAGE_GUILD)

        async def quota() -> str:
            inter = await fake_discord.invoke_command(h.guild.id, h.channel_id, user.id, "quota")
            ephemeral, text = await answer(inter)
            assert ephemeral
            return text

        assert "no daily image limit" in await quota()
        await fake_discord.invoke_command(
            h.guild.id, h.channel_id, admin.id, "settings", {"daily_images": 3}, subcommand="set"
        )
        await fake_discord.wait_for_state(
            lambda: h.bot.policy.settings_for(int(h.guild.id)).daily_images == 3
        )
        assert "**3 of 3**" in await quota()
        await (await h.imagine(user.id, "a fox")).wait_until(is_done, timeout=10)
        text = await quota()
        assert "**2 of 3**" in text and "00:00 UTC" in text and "<t:" in text
        # The same request again is served from the cache: it costs nothing.
        await (await h.imagine(user.id, "a fox")).wait_until(is_done, timeout=10)
        assert fake_openai.state.generations == 1
        assert "**2 of 3**" in await quota()
        # A request for more than is left is refused, ephemerally, saying what is left.
        ephemeral, text = await answer(await h.imagine(user.id, "three owls", count=3))
        assert ephemeral and "2 of your 3 daily images left" in text
        await (await h.imagine(user.id, "two owls", count=2)).wait_until(is_done, timeout=10)
        assert "**0 of 3**" in await quota()


async def test_quota_counts_images_still_in_progress(fake_discord, tmp_path) -> None:
    async with (
        FakeOpenAI(delay=1.0) as backend,
        running_bot(fake_discord, tmp_path, backend_url=backend.url) as h,
    ):
        user = fake_discord.add_member(h.guild.id)
        await h.bot.policy.update(int(h.guild.id), daily_images=2)
        first = await h.imagine(user.id, "queued pair", count=2)
        assert not (await first.wait_for_callback()).ephemeral
        ephemeral, text = await answer(await h.imagine(user.id, "one more"))
        assert ephemeral and "used your 2 images" in text and "in progress" in text
        assert backend.state.generations <= 1


async def test_history_lists_my_jobs_in_this_guild_with_ids(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        me, other = fake_discord.add_member(h.guild.id), fake_discord.add_member(h.guild.id)
        for inter in [await h.imagine(me.id, "first"), await h.imagine(me.id, "second")]:
            await inter.wait_until(is_done, timeout=10)
        await (await h.imagine(other.id, "not mine")).wait_until(is_done, timeout=10)
        jobs = await h.bot.engine.store.list_jobs(guild_id=int(h.guild.id))
        ids = {j.request.prompt: j.id for j in jobs}
        ephemeral, text = await answer(
            await fake_discord.invoke_command(h.guild.id, h.channel_id, me.id, "history")
        )
        assert ephemeral
        assert ids["first"] in text and ids["second"] in text and "succeeded" in text
        assert ids["not mine"] not in text
        assert text.index(ids["second"]) < text.index(ids["first"])  # newest first


async def test_show_reposts_from_the_cache_within_its_guild_only(fake_openai, tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake:
        guild_a = fake.add_guild(name="A", channels=["general", {"name": "adults", "nsfw": True}])
        guild_b = fake.add_guild(name="B")
        general, adults = guild_a.channels
        async with running_bot(fake, tmp_path, backend_url=fake_openai.url, guild=guild_a) as h:
            user = fake.add_member(guild_a.id)
            fake.add_member(guild_b.id, user.id)

            async def show(guild, channel, job_id: str):
                return await fake.invoke_command(guild.id, channel.id, user.id, "show", {"job_id": job_id})

            made = await h.imagine(user.id, "a lighthouse")
            original = await made.wait_until(is_done, timeout=10)
            (job,) = await h.bot.engine.store.list_jobs(guild_id=int(guild_a.id))
            assert not job.request.nsfw_allowed

            # Another guild cannot see it.
            ephemeral, text = await answer(await show(guild_b, guild_b.channels[0], job.id))
            assert ephemeral and "No job" in text
            # Here it is posted again, from the cache (the job is no longer in memory: it leaves once its
            # delivery is recorded, a moment after "Done" shows).
            async with asyncio.timeout(5):
                while h.bot.manager.get(job.id) is not None:
                    await asyncio.sleep(0.01)
            again = await show(guild_a, general, job.id)
            callback = await again.wait_for_callback()
            assert not callback.ephemeral
            message = await again.wait_until(is_done, timeout=10)
            assert image_attachments(message)[0].data == image_attachments(original)[0].data
            assert fake_openai.state.generations == 1

            # An NSFW-allowed result never goes into a channel that is not age-restricted.
            nsfw = await fake.invoke_command(guild_a.id, adults.id, user.id, "imagine", {"prompt": "spicy"})
            await nsfw.wait_until(is_done, timeout=10)
            nsfw_job = next(
                j
                for j in await h.bot.engine.store.list_jobs(guild_id=int(guild_a.id))
                if j.request.prompt == "spicy"
            )
            assert nsfw_job.request.nsfw_allowed
            ephemeral, text = await answer(await show(guild_a, general, nsfw_job.id))
            assert ephemeral and "age-restricted" in text
            shown = await show(guild_a, adults, nsfw_job.id)
            await shown.wait_until(is_done, timeout=10)

            # A result whose images left the cache says so.
            gone = Job(
                id="0123456789ab",
                request=ImageRequest("old"),
                guild_id=int(guild_a.id),
                user_id=int(user.id),
                state=JobState.SUCCEEDED,
                image_refs=["f" * 64],
            )
            await h.bot.engine.store.save_job(gone)
            ephemeral, text = await answer(await show(guild_a, general, gone.id))
            assert ephemeral and "expired" in text
            ephemeral, text = await answer(await show(guild_a, general, "not-an-id"))
            assert ephemeral and "No job" in text


async def test_the_queue_takes_turns_between_members(fake_discord, tmp_path) -> None:
    """One member queues three jobs, another one: the second member's job is not last (round robin)."""
    async with (
        FakeOpenAI(delay=0.3) as backend,
        running_bot(
            fake_discord, tmp_path, backend_url=backend.url, guild_concurrency=1, backend_concurrency=1
        ) as h,
    ):
        busy, polite = fake_discord.add_member(h.guild.id), fake_discord.add_member(h.guild.id)
        started: list[str] = []
        h.bot.manager.add_listener(
            lambda job, event: started.append(job.request.prompt) if event.value == "started" else None
        )
        inters = [await h.imagine(busy.id, f"busy {n}") for n in range(3)]
        await asyncio.gather(*(i.wait_for_callback() for i in inters))
        inters.append(await h.imagine(polite.id, "polite"))
        await asyncio.gather(*(i.wait_until(is_done, timeout=15) for i in inters))
        assert started.index("polite") <= 1, started


async def test_a_failing_command_answers_with_a_sentence_not_endless_thinking(
    fake_discord, fake_openai, tmp_path, monkeypatch
) -> None:
    from bot.engine.store import StoreError

    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        me = fake_discord.add_member(h.guild.id)

        async def broken(**_: object) -> list[Job]:
            raise StoreError("The job store is not open.")

        monkeypatch.setattr(h.bot.engine.store, "list_jobs", broken)
        inter = await fake_discord.invoke_command(h.guild.id, h.channel_id, me.id, "history")
        ephemeral, text = await answer(inter, timeout=5)
        assert ephemeral and text == "Something went wrong on the bot's side; try again in a moment."
        assert "Traceback" not in text and "store" not in text


async def test_history_says_how_long_jobs_are_kept_and_which_were_deleted(
    fake_discord, fake_openai, tmp_path
) -> None:
    async with running_bot(
        fake_discord, tmp_path, backend_url=fake_openai.url, history_retention_days=30
    ) as h:
        me = fake_discord.add_member(h.guild.id)

        async def history() -> str:
            inter = await fake_discord.invoke_command(h.guild.id, h.channel_id, me.id, "history")
            ephemeral, text = await answer(inter)
            assert ephemeral
            return text

        assert "Jobs are kept for 30 days" in await history()  # said even before there is any
        message = await (await h.imagine(me.id, "a private sketch")).wait_until(is_done, timeout=10)
        (job,) = await h.bot.engine.store.list_jobs(guild_id=int(h.guild.id))
        text = await history()
        assert "a private sketch" in text and text.splitlines()[-1].startswith("Jobs are kept for 30 days")
        press = await fake_discord.click_button(
            message, fake_discord.find_component(message, label="Delete"), me.id
        )
        await press.wait_for_callback()
        async with asyncio.timeout(10):
            while "*deleted*" not in (text := await history()):
                await asyncio.sleep(0.05)
        assert job.id in text and "a private sketch" not in text
        inter = await fake_discord.invoke_command(h.guild.id, h.channel_id, me.id, "show", {"job_id": job.id})
        ephemeral, text = await answer(inter)
        assert ephemeral and text == f"Job `{job.id}` was deleted; its prompt and images are gone."
