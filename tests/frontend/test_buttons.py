"""Buttons on a job's message: Cancel, Reroll, Variations, Delete — ownership and admission included."""

from __future__ import annotations

import asyncio
import json

from bot.engine.models import Job, JobState
from tests.conftest import TOKEN
from tests.fakes.discord import ADMINISTRATOR, DEFAULT_MEMBER_PERMISSIONS, FakeDiscord
from tests.frontend.conftest import embed_author, image_attachments, is_done, running_bot

MANAGE_GUILD = 1 << 5


def labels(message) -> list[str]:
    return [c.get("label") for row in message.components for c in row.get("components", [])]


def is_running(message) -> bool:
    return "Cancel" in labels(message)


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_owner_cancel_stops_the_backend_and_frees_the_slot(fake_discord, fake_a1111, tmp_path) -> None:
    fake_a1111.configure(delay=30)
    async with running_bot(fake_discord, tmp_path, backend="a1111", backend_url=fake_a1111.url) as h:
        owner, other = fake_discord.add_member(h.guild.id), fake_discord.add_member(h.guild.id)
        first = await h.imagine(owner.id, "long job")
        await wait_for(lambda: fake_a1111.state.txt2img_calls == 1)
        message = await first.wait_until(is_running)
        second = await h.imagine(other.id, "next in line")  # BACKEND_CONCURRENCY=1 for a1111: it waits
        await second.wait_for_callback()
        await asyncio.sleep(0.3)
        assert fake_a1111.state.txt2img_calls == 1

        press = await fake_discord.click_button(
            message, fake_discord.find_component(message, label="Cancel"), owner.id
        )
        callback = await press.wait_for_callback()
        assert callback.type == 6  # deferred update: no new message
        cancelled = await first.wait_until(lambda m: "Cancelled by" in embed_author(m))
        assert not image_attachments(cancelled)
        assert "Reroll" in labels(cancelled)
        await wait_for(lambda: fake_a1111.state.interrupts == 1)
        fake_a1111.configure(delay=0)
        await second.wait_until(is_done, timeout=15)  # the freed slot went to the next job
        assert fake_a1111.state.txt2img_calls == 2


async def test_a_stranger_cannot_cancel_but_a_manager_can(fake_discord, fake_openai, tmp_path) -> None:
    fake_openai.configure(delay=3)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        owner = fake_discord.add_member(h.guild.id)
        stranger = fake_discord.add_member(h.guild.id, permissions=DEFAULT_MEMBER_PERMISSIONS)
        moderator = fake_discord.add_member(h.guild.id, permissions=DEFAULT_MEMBER_PERMISSIONS | MANAGE_GUILD)
        job = await h.imagine(owner.id, "mine")
        message = await job.wait_until(is_running)
        cancel_id = fake_discord.find_component(message, label="Cancel")

        refused = await fake_discord.click_button(message, cancel_id, stranger.id)
        callback = await refused.wait_for_callback()
        assert callback.ephemeral and "not yours" in callback.data["content"]
        await asyncio.sleep(0.2)
        assert "Cancelled" not in embed_author(job.original)

        allowed = await fake_discord.click_button(message, cancel_id, moderator.id)
        await allowed.wait_for_callback()
        await job.wait_until(lambda m: "Cancelled by" in embed_author(m))
        assert fake_openai.state.generations == 1


async def test_reroll_and_variations_make_new_jobs(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        owner, presser = fake_discord.add_member(h.guild.id), fake_discord.add_member(h.guild.id)
        first = await h.imagine(owner.id, "a boat", seed=42)
        message = await first.wait_until(is_done)

        reroll = await fake_discord.click_button(
            message, fake_discord.find_component(message, label="Reroll"), presser.id
        )
        assert (await reroll.wait_for_callback()).type == 5  # a new public message for the new job
        rerolled = await reroll.wait_until(is_done)
        assert fake_openai.state.generations == 2  # not served from the cache
        fields = {f["name"]: f["value"] for f in rerolled.embeds[0]["fields"]}
        assert fields.get("Seed") != "42"
        jobs = await h.bot.engine.store.list_jobs(guild_id=int(h.guild.id))
        assert {j.user_id for j in jobs} == {int(owner.id), int(presser.id)}  # the presser owns the reroll

        variations = await fake_discord.click_button(
            message, fake_discord.find_component(message, label="Variations"), presser.id
        )
        varied = await variations.wait_until(is_done)
        assert len(image_attachments(varied)) == 4
        assert fake_openai.state.last_payload["n"] == 4
        assert fake_openai.state.last_payload["prompt"] == "a boat"


async def test_buttons_go_through_admission(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url, user_max_jobs=1) as h:
        owner = fake_discord.add_member(h.guild.id)
        first = await h.imagine(owner.id, "a tree")
        message = await first.wait_until(is_done)
        fake_openai.configure(delay=3)
        busy = await h.imagine(owner.id, "another tree")
        await busy.wait_until(is_running)
        await wait_for(lambda: fake_openai.state.generations == 2)
        before = fake_openai.state.generations
        for label in ("Reroll", "Variations"):
            press = await fake_discord.click_button(
                message, fake_discord.find_component(message, label=label), owner.id
            )
            callback = await press.wait_for_callback()
            assert callback.ephemeral, label
            assert "already have 1 image job" in callback.data["content"]
        assert fake_openai.state.generations == before


async def test_delete_by_owner_or_manager_only(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        owner = fake_discord.add_member(h.guild.id)
        stranger = fake_discord.add_member(h.guild.id, permissions=DEFAULT_MEMBER_PERMISSIONS)
        job = await h.imagine(owner.id, "delete me")
        message = await job.wait_until(is_done)
        delete_id = fake_discord.find_component(message, label="Delete")
        refused = await fake_discord.click_button(message, delete_id, stranger.id)
        assert (await refused.wait_for_callback()).ephemeral
        assert not message.deleted
        press = await fake_discord.click_button(
            message, delete_id, owner.id, permissions=DEFAULT_MEMBER_PERMISSIONS
        )
        await press.wait_for_callback()
        await wait_for(lambda: message.deleted)


async def test_admin_flag_alone_counts_as_manager(fake_discord, fake_openai, tmp_path) -> None:
    """Discord reports ADMINISTRATOR members as having every permission; the bot must honour that."""
    fake_openai.configure(delay=3)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        owner = fake_discord.add_member(h.guild.id)
        admin = fake_discord.add_member(h.guild.id, permissions=ADMINISTRATOR)
        job = await h.imagine(owner.id, "admin cancels")
        message = await job.wait_until(is_running)
        press = await fake_discord.click_button(
            message, fake_discord.find_component(message, label="Cancel"), admin.id
        )
        await press.wait_for_callback()
        final = await job.wait_until(lambda m: "Cancelled by" in embed_author(m))
        assert "Cancelled by" in json.dumps(final.embeds)


async def test_the_application_owner_may_cancel_anywhere(fake_discord, fake_openai, tmp_path) -> None:
    fake_openai.configure(delay=3)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        member = fake_discord.add_member(h.guild.id)
        operator = fake_discord.add_member(h.guild.id, permissions=DEFAULT_MEMBER_PERMISSIONS)
        h.bot.owner_id = int(operator.id)  # the bot's operator, not a manager of this server
        job = await h.imagine(member.id, "operator stops it")
        message = await job.wait_until(is_running)
        press = await fake_discord.click_button(
            message, fake_discord.find_component(message, label="Cancel"), operator.id
        )
        await press.wait_for_callback()
        await job.wait_until(lambda m: "Cancelled by" in embed_author(m))


def test_a_late_press_says_what_became_of_the_job() -> None:
    from bot.engine.models import ImageRequest, Job, JobState
    from bot.frontend.cogs.imagine import _already_over

    job = Job(id="0123456789ab", request=ImageRequest(prompt="x"), guild_id=1, user_id=2)
    job.state = JobState.CANCELLED
    assert _already_over(job) == "That job was already cancelled."
    job.state = JobState.SUCCEEDED
    assert _already_over(job) == "That job has already finished."


async def test_delete_means_gone_even_from_the_cache(fake_openai, tmp_path) -> None:
    """Issue 8 defect 10: a deleted result was served "from cache" to the same prompt in another server."""
    async with FakeDiscord(token=TOKEN) as fake:
        guild_a, guild_b, guild_c = (
            fake.add_guild(name="A"),
            fake.add_guild(name="B"),
            fake.add_guild(name="C"),
        )
        async with running_bot(fake, tmp_path, backend_url=fake_openai.url, guild=guild_a) as h:
            store = h.bot.engine.store
            owner = fake.add_member(guild_a.id)
            member_b, member_c = fake.add_member(guild_b.id), fake.add_member(guild_c.id)
            message = await (await h.imagine(owner.id, "a secret garden")).wait_until(is_done)
            # C asks the same before the delete: served from the cache, one generation so far.
            await (await h.imagine(member_c.id, "a secret garden", guild=guild_c)).wait_until(is_done)
            assert fake_openai.state.generations == 1
            (deleted,) = await store.list_jobs(guild_id=int(guild_a.id))
            (kept,) = await store.list_jobs(guild_id=int(guild_c.id))
            assert kept.from_cache and kept.image_refs == deleted.image_refs
            files = [p for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()]
            assert len(files) == 1

            press = await fake.click_button(message, fake.find_component(message, label="Delete"), owner.id)
            await press.wait_for_callback()
            await wait_for(lambda: message.deleted)

            async def scrubbed() -> Job | None:
                job = await store.get_job(deleted.id)
                return job if job is not None and not job.request.prompt else None

            async with asyncio.timeout(10):
                while (row := await scrubbed()) is None:
                    await asyncio.sleep(0.02)
            # The row keeps only what today's quota reads; the prompt, ids and image refs are gone.
            assert (row.guild_id, row.user_id, row.state, row.seeds, row.from_cache) == (
                deleted.guild_id,
                deleted.user_id,
                JobState.SUCCEEDED,
                deleted.seeds,
                False,
            )
            assert (row.image_refs, row.cache_key, row.message_ref, row.channel_id) == ([], None, None, None)
            # C's job still lists the image, so the file stays for C's /show.
            assert [p for p in files if p.exists()] == files

            # The same prompt from another server is generated afresh, not served the deleted image.
            await (await h.imagine(member_b.id, "a secret garden", guild=guild_b)).wait_until(is_done)
            assert fake_openai.state.generations == 2
            (fresh,) = await store.list_jobs(guild_id=int(guild_b.id))
            assert not fresh.from_cache


async def test_deleting_the_only_job_with_an_image_unlinks_its_file(
    fake_discord, fake_openai, tmp_path
) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        owner = fake_discord.add_member(h.guild.id)
        message = await (await h.imagine(owner.id, "only mine")).wait_until(is_done)
        blobs = tmp_path / "cache" / "blobs"
        assert [p for p in blobs.rglob("*") if p.is_file()]
        press = await fake_discord.click_button(
            message, fake_discord.find_component(message, label="Delete"), owner.id
        )
        await press.wait_for_callback()
        await wait_for(lambda: not [p for p in blobs.rglob("*") if p.is_file()])
        assert h.bot.engine.cache.stats()["entries"] == 0
