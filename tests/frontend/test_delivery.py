"""Posting results: upload limits (byte-for-byte or shrunk to fit), 413 retries, dead interaction tokens."""

from __future__ import annotations

import asyncio
import base64
import gc
import io
import os
import time

from aiohttp import web
from PIL import Image

from bot.engine.models import Job
from tests.fakes.discord import DEFAULT_BOT_PERMISSIONS, FakeDiscord
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import embed_author, image_attachments, is_done, running_bot

ATTACH_FILES = 1 << 15


def noisy_png(size: int = 384) -> bytes:
    """Noise does not compress: a realistic worst case for upload size."""
    image = Image.frombytes("RGB", (size, size), os.urandom(size * size * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class BigImageOpenAI(FakeOpenAI):
    """Answers every generation with one fixed, large PNG (b64_json), as a real model's output would be."""

    def __init__(self, image: bytes, **knobs) -> None:
        super().__init__(**knobs)
        self.image = image

    async def generate(self, request: web.Request) -> web.Response:
        self.state.generations += 1
        await request.json()
        if self.state.delay:
            await asyncio.sleep(self.state.delay)
        return web.json_response(
            {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(self.image).decode()}]}
        )


async def test_small_image_is_posted_byte_for_byte(tmp_path) -> None:
    image = noisy_png(128)
    async with FakeDiscord(token="test-token-abcdef123456") as fake, BigImageOpenAI(image) as backend:
        async with running_bot(fake, tmp_path, backend_url=backend.url) as h:
            user = fake.add_member(h.guild.id)
            inter = await h.imagine(user.id, "small")
            message = await inter.wait_until(is_done)
            attachment = image_attachments(message)[0]
            assert attachment.data == image
            assert attachment.filename.endswith(".png")


async def test_oversized_image_is_shrunk_to_fit_the_interaction_limit(tmp_path) -> None:
    image = noisy_png(384)  # ~440 KB
    limit = 60_000
    async with FakeDiscord(token="test-token-abcdef123456") as fake, BigImageOpenAI(image) as backend:
        async with running_bot(fake, tmp_path, backend_url=backend.url) as h:
            user = fake.add_member(h.guild.id)
            inter = await fake.invoke_command(
                h.guild.id, h.channel_id, user.id, "imagine", {"prompt": "big"}, attachment_size_limit=limit
            )
            message = await inter.wait_until(is_done)
            attachment = image_attachments(message)[0]
            assert len(image) > limit
            assert attachment.size <= limit
            with Image.open(io.BytesIO(attachment.data)) as shrunk:
                shrunk.load()
                assert shrunk.format == "JPEG"
            # No upload was refused: the bot sized it before sending.
            assert not [r for r in fake.requests_matching("PATCH", r"@original") if r.status == 413]


async def test_a_413_from_discord_triggers_one_more_shrink(tmp_path) -> None:
    image = noisy_png(256)
    async with FakeDiscord(token="test-token-abcdef123456") as fake, BigImageOpenAI(image) as backend:
        backend.configure(delay=1.0)
        async with running_bot(fake, tmp_path, backend_url=backend.url, cache_ttl_s=0) as h:
            user = fake.add_member(h.guild.id)
            inter = await h.imagine(user.id, "refused once")
            # Let the progress edits land first, so the injected 413 meets the upload of the result.
            await inter.wait_until(lambda m: embed_author(m).startswith("Generating"))
            fake.inject_error(
                "PATCH",
                r"/webhooks/.*/messages/@original",
                413,
                {"message": "Request entity too large", "code": 40005},
                count=1,
            )
            message = await inter.wait_until(is_done)
            attachment = image_attachments(message)[0]
            assert attachment.data != image and attachment.filename.endswith(".jpg")
            assert [r.status for r in fake.requests_matching("PATCH", r"@original") if r.status == 413] == [
                413
            ]


async def test_expired_token_falls_back_to_the_channel(fake_discord, fake_openai, tmp_path) -> None:
    """The bot's own clock says the 15-minute token is (nearly) dead: it posts in the channel instead."""
    skew = {"s": 0.0}
    fake_openai.configure(delay=0.5)
    async with running_bot(
        fake_discord, tmp_path, backend_url=fake_openai.url, clock=lambda: fake_discord.clock() + skew["s"]
    ) as h:
        user = fake_discord.add_member(h.guild.id)
        bystander = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "late result")
        await inter.wait_for_callback()
        skew["s"] = 14 * 60 + 5
        posted = await inter.wait_until(
            lambda m: m is not inter.original and bool(image_attachments(m)), timeout=10
        )
        assert posted.content.startswith(f"<@{user.id}>")
        # Only the requester is pinged: no roles, no @everyone.
        assert [str(u) for u in posted.allowed_mentions["users"]] == [str(user.id)]
        assert posted.allowed_mentions.get("parse") == []
        assert str(bystander.id) not in posted.content
        assert not is_done(inter.original)  # the dead token was not used
        assert not fake_discord.requests_matching("PATCH", r"@original") or all(
            r.time < inter.created_at + 14 * 60 for r in fake_discord.requests_matching("PATCH", r"@original")
        )


async def test_token_rejected_by_discord_falls_back_to_the_channel(
    fake_discord, fake_openai, tmp_path
) -> None:
    fake_openai.configure(delay=0.5)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "token dies")
        await inter.wait_for_callback()
        fake_discord.expire_token(inter)
        posted = await inter.wait_until(
            lambda m: m is not inter.original and bool(image_attachments(m)), timeout=10
        )
        assert posted.content.startswith(f"<@{user.id}>")
        assert [r.status for r in fake_discord.requests_matching("PATCH", r"@original")][-1] == 401


async def test_without_permission_to_post_the_result_is_kept_not_lost(tmp_path) -> None:
    async with FakeDiscord(token="test-token-abcdef123456") as fake, FakeOpenAI(delay=0.5) as backend:
        guild = fake.add_guild(name="strict", bot_permissions=DEFAULT_BOT_PERMISSIONS & ~ATTACH_FILES)
        skew = {"s": 0.0}
        async with running_bot(
            fake, tmp_path, backend_url=backend.url, guild=guild, clock=lambda: fake.clock() + skew["s"]
        ) as h:
            user = fake.add_member(guild.id)
            inter = await h.imagine(user.id, "kept")
            await inter.wait_for_callback()
            skew["s"] = 15 * 60
            jobs = []
            for _ in range(100):
                jobs = await h.bot.engine.store.list_jobs(guild_id=int(guild.id))
                if jobs and jobs[0].state.value == "succeeded":
                    break
                await asyncio.sleep(0.05)
            assert jobs[0].state.value == "succeeded" and jobs[0].image_refs
            assert await h.bot.engine.cache.get_images(jobs[0].image_refs)
            assert not [m for m in fake.channel_messages(guild.channels[0].id) if image_attachments(m)]
            assert "Done" not in embed_author(inter.original)


def per_job_state(h, guild_ids: set[int]) -> dict[str, int]:
    """Every container the Discord side could keep per job in: all must return to their size at rest.

    Jobs are counted for this test's guilds only: other tests of the same process may leave Job objects of
    their own behind (a module-level fixture, a cycle not collected yet)."""
    views = h.bot._connection._view_store
    return {
        "views": len(views._views) + len(views._synced_message_views),
        "job messages": len(h.bot.messenger._messages),
        "messenger tasks": len(h.bot.messenger._tasks),
        "metrics started": len(h.service.metrics._started),
        "member records": len(h.bot.manager.queue.members),
        "ended jobs remembered": len(h.bot.manager.queue.ended),
        "manager tracked": len(h.bot.manager.active_jobs()),
        "jobs alive": sum(1 for o in gc.get_objects() if isinstance(o, Job) and o.guild_id in guild_ids),
    }


async def test_per_job_state_is_released_when_each_message_is_final(tmp_path) -> None:
    """Issue 8, defect 11: after many jobs (successes, failures, cancels, over several servers) nothing the bot
    keeps grows with the number of jobs: each job's state goes when its message is final."""
    async with FakeDiscord(token="test-token-abcdef123456") as fake, FakeOpenAI(delay=0.05) as backend:
        guilds = [fake.add_guild(name=f"G{n}") for n in range(4)]
        async with running_bot(fake, tmp_path, backend_url=backend.url, guild=guilds[0]) as h:
            members = {g.id: fake.add_member(g.id) for g in guilds}

            async def round_of_jobs(tag: str) -> None:
                inters = []
                for n in range(12):
                    guild = guilds[n % len(guilds)]
                    if n % 4 == 1:
                        backend.configure(fail_next=[(500, {"error": {"message": "boom"}})])
                    inter = await fake.invoke_command(
                        guild.id,
                        guild.channels[0].id,
                        members[guild.id].id,
                        "imagine",
                        {"prompt": f"{tag} {n}"},
                    )
                    if n % 4 == 2:
                        queued = await inter.wait_until(lambda m: m.components)
                        cancel = fake.find_component(queued, label="Cancel")
                        await fake.click_button(queued, cancel, members[guild.id].id)
                    inters.append(inter)
                for inter in inters:
                    await inter.wait_until(
                        lambda m: m.embeds and not embed_author(m).startswith(("Queued", "Generating")),
                        timeout=20,
                    )
                await asyncio.sleep(0.3)  # the last listeners and pumps settle
                gc.collect()

            await round_of_jobs("warm-up")
            baseline = per_job_state(h, {g.id for g in guilds})
            await round_of_jobs("measured")
            await round_of_jobs("measured again")
            assert per_job_state(h, {g.id for g in guilds}) == baseline
            assert baseline["jobs alive"] == 0 and baseline["views"] == 0
