"""A bot killed with SIGKILL mid-job: after a restart the running job is reported interrupted, queued ones resume."""

from __future__ import annotations

import asyncio

from bot.engine.models import ImageRequest, Job, JobState
from bot.engine.store import JobStore
from tests.fakes.discord import FakeDiscord
from tests.fakes.horde import FakeHorde
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import TOKEN, embed_author, image_attachments, is_done, running_bot
from tests.frontend.holding import FinalEditTrouble
from tests.frontend.process import assert_clean, bot_process


async def wait_for(predicate, timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def labels(message) -> list[str]:
    return [c.get("label") for row in message.components for c in row.get("components", [])]


async def test_sigkill_mid_job_then_restart(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI(delay=30) as backend:
        guild = fake.add_guild(name="G")
        settings = {"image_backend": "openai", "image_backend_url": backend.url, "backend_concurrency": 1}
        alice, bob = fake.add_member(guild.id), fake.add_member(guild.id)
        async with bot_process(fake, tmp_path, **settings) as doomed:
            running = await fake.invoke_command(
                guild.id, guild.channels[0].id, alice.id, "imagine", {"prompt": "running"}
            )
            await wait_for(lambda: backend.state.generations == 1)
            queued = await fake.invoke_command(
                guild.id, guild.channels[0].id, bob.id, "imagine", {"prompt": "queued"}
            )
            await queued.wait_until(lambda m: "Queued" in embed_author(m))
            doomed.kill()  # SIGKILL: no drain, no goodbye
            assert await doomed.wait(10) == -9

        backend.configure(delay=0)
        async with bot_process(fake, tmp_path, **settings) as restarted:
            interrupted = await running.wait_until(lambda m: "Interrupted" in embed_author(m))
            assert "Reroll" in labels(interrupted)
            resumed = await queued.wait_until(is_done)
            assert image_attachments(resumed)
            # The resumed job kept its id and message: one job in the store per interaction, no duplicates.
            assert await restarted.terminate() == 0
        assert_clean(restarted.text)
        assert backend.state.generations == 2  # the queued job ran once, in the new process


async def test_queued_job_past_its_token_is_reported_in_the_channel(
    fake_discord, fake_openai, tmp_path
) -> None:
    """What a dead process left in the store, found by a restart that came after the token died."""
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as first_run:
        guild = first_run.guild  # commands are synced; then this process goes away
    bob = fake_discord.add_member(guild.id)
    orphan = await fake_discord.invoke_command(
        guild.id, guild.channels[0].id, bob.id, "imagine", {"prompt": "late"}
    )
    store = JobStore(tmp_path / "bot.sqlite3")
    await store.open()
    await store.save_job(
        Job(
            id="0123456789ab",
            request=ImageRequest(prompt="late"),
            guild_id=int(guild.id),
            user_id=int(bob.id),
            channel_id=int(guild.channels[0].id),
            backend="openai",
            created_at=orphan.created_at,
            message_ref={
                "application_id": int(fake_discord.app_id),
                "interaction_id": int(orphan.id),
                "token": orphan.token,
                "created_at": orphan.created_at,
                "channel_id": int(guild.channels[0].id),
                "guild_id": int(guild.id),
                "upload_limit": 10 * 1024 * 1024,
                "can_post": True,
            },
        )
    )
    await store.close()

    late_clock = lambda: fake_discord.clock() + 16 * 60  # noqa: E731 - the restart came 16 minutes later
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url, clock=late_clock) as h:
        notice = await orphan.wait_until(lambda m: m.content.startswith(f"<@{bob.id}>"), timeout=15)
        assert "Interrupted" in embed_author(notice)
        assert [str(u) for u in notice.allowed_mentions["users"]] == [str(bob.id)]
        assert "Reroll" in labels(notice)
        job = await h.bot.engine.store.get_job("0123456789ab")
        assert job is not None and job.state is JobState.INTERRUPTED
    assert fake_openai.state.generations == 0  # nothing was resumed past its token


async def test_running_horde_job_is_followed_up_by_its_id_after_sigkill(tmp_path) -> None:
    """AI Horde keeps generating while the bot is dead: the new process polls the same request, never resubmits."""
    async with FakeDiscord(token=TOKEN) as fake, FakeHorde(checks_until_done=10_000) as horde:
        guild = fake.add_guild(name="G")
        settings = {"image_backend": "horde", "image_backend_url": horde.url}
        user = fake.add_member(guild.id)
        async with bot_process(fake, tmp_path, **settings) as doomed:
            inter = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "far away"}
            )
            await wait_for(
                lambda: horde.state.checks >= 1
            )  # submitted, and its id stored before polling began
            doomed.kill()
            await doomed.wait(10)
        assert horde.state.submits == 1
        horde.configure(checks_until_done=0)
        async with bot_process(fake, tmp_path, **settings) as restarted:
            message = await inter.wait_until(is_done, timeout=20)
            assert image_attachments(message)
            assert await restarted.terminate() == 0
        assert horde.state.submits == 1  # followed up, not submitted again
        assert horde.state.status_calls == 1
        assert_clean(restarted.text)


async def test_sigkill_while_the_result_is_posted_then_restart_posts_it(tmp_path) -> None:
    """Issue 8, defect 2: the job SUCCEEDED, its final edit is on the wire, the process dies. The restart posts
    the result from the cache (the images were pinned), records delivered_at, and generates nothing again."""
    async with (
        FinalEditTrouble(mode="hold", token=TOKEN) as fake,
        FakeOpenAI() as backend,
    ):
        guild = fake.add_guild(name="G")
        settings = {"image_backend": "openai", "image_backend_url": backend.url}
        user = fake.add_member(guild.id)
        try:
            async with bot_process(fake, tmp_path, **settings) as doomed:
                inter = await fake.invoke_command(
                    guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "posting when killed"}
                )
                async with asyncio.timeout(20):
                    await fake.troubled.wait()
                doomed.kill()
                assert await doomed.wait(10) == -9
            assert not is_done(inter.original)
            async with bot_process(fake, tmp_path, **settings) as restarted:
                message = await inter.wait_until(is_done, timeout=20)
                assert image_attachments(message)
                assert await restarted.terminate() == 0
        finally:
            fake.release.set()
        assert_clean(restarted.text)
        assert backend.state.generations == 1  # posted from the cache, not generated again
    store = JobStore(tmp_path / "bot.sqlite3")
    async with store:
        (job,) = await store.list_jobs()
        assert await store.undelivered_jobs() == []
    assert job.state is JobState.SUCCEEDED and job.delivered_at is not None


async def test_sigkill_while_posting_without_the_images_is_reported_interrupted(tmp_path) -> None:
    """The same crash with the cache off: nothing is left to show, so the job says so, with a Reroll button."""
    async with (
        FinalEditTrouble(mode="hold", token=TOKEN) as fake,
        FakeOpenAI() as backend,
    ):
        guild = fake.add_guild(name="G")
        settings = {"image_backend": "openai", "image_backend_url": backend.url, "cache_ttl_s": 0}
        user = fake.add_member(guild.id)
        try:
            async with bot_process(fake, tmp_path, **settings) as doomed:
                inter = await fake.invoke_command(
                    guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "gone with the process"}
                )
                async with asyncio.timeout(20):
                    await fake.troubled.wait()
                doomed.kill()
                await doomed.wait(10)
            async with bot_process(fake, tmp_path, **settings) as restarted:
                message = await inter.wait_until(lambda m: "Interrupted" in embed_author(m), timeout=20)
                assert "Reroll" in labels(message)
                assert await restarted.terminate() == 0
        finally:
            fake.release.set()
        assert_clean(restarted.text)
    store = JobStore(tmp_path / "bot.sqlite3")
    async with store:
        (job,) = await store.list_jobs()
    assert job.state is JobState.INTERRUPTED and job.delivered_at is not None
