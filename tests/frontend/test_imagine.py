"""/imagine end to end: the real bot against the fake Discord and fake backends, over real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import time

from PIL import Image

from bot.engine.models import JobState
from tests.fakes.discord import FakeDiscord
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import embed_author, image_attachments, is_done, running_bot

EPHEMERAL = 1 << 6


async def test_imagine_acknowledges_in_time_and_ends_with_an_image(
    fake_discord, fake_openai, tmp_path
) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "a red fox, **bold** @everyone <@123>")
        callback = await inter.wait_for_callback()
        assert inter.ack_latency is not None and inter.ack_latency < 3.0
        assert callback.type == 5 and not callback.ephemeral  # deferred, public
        message = await inter.wait_until(is_done, timeout=10)
        attachment = image_attachments(message)[0]
        with Image.open(io.BytesIO(attachment.data)) as image:
            image.load()
            assert image.size == (64, 64)
        embed = message.embeds[0]
        # The prompt is shown escaped, and nobody is pinged.
        assert "\\*\\*bold\\*\\*" in embed["description"]
        assert "@everyone" not in embed["description"].replace("@\u200beveryone", "")
        for request in fake_discord.requests_matching("PATCH", r"/webhooks/.*/messages/@original"):
            allowed = (request.json or {}).get("allowed_mentions")
            assert allowed == {"parse": []}, allowed
        fields = {f["name"]: f["value"] for f in embed["fields"]}
        assert fields["Backend"] == "openai"
        assert "Time" in fields
        # A job message moved through queued/generating states before done.
        states = [json.dumps(rev.embeds) for rev in message.history]
        assert any("Queued" in s or "Generating" in s for s in states[:-1])


async def test_repeated_prompt_comes_from_the_cache(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        first = await h.imagine(user.id, "a lighthouse at dusk")
        first_message = await first.wait_until(is_done, timeout=10)
        second = await h.imagine(user.id, "a   lighthouse at dusk")
        second_message = await second.wait_until(is_done, timeout=10)
        assert fake_openai.state.generations == 1
        assert "from cache" in embed_author(second_message)
        assert image_attachments(second_message)[0].data == image_attachments(first_message)[0].data


async def test_invalid_options_are_refused_ephemerally(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url, user_max_jobs=1) as h:
        user = fake_discord.add_member(h.guild.id)
        fake_openai.configure(delay=1.0)
        busy = await h.imagine(user.id, "first")
        await busy.wait_for_callback()
        refused = await h.imagine(user.id, "second")
        callback = await refused.wait_for_callback()
        assert callback.ephemeral
        assert "already have 1 image job" in callback.data["content"]
        assert fake_openai.state.generations <= 1


async def test_backend_failure_is_explained(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        fake_openai.configure(
            fail_next=[
                (
                    400,
                    {
                        "error": {
                            "message": "Your request was rejected by our safety system.",
                            "type": "invalid_request_error",
                            "param": None,
                            "code": "content_policy_violation",
                        }
                    },
                )
            ]
        )
        inter = await h.imagine(user.id, "something refused")
        message = await inter.wait_until(lambda m: "refused" in embed_author(m), timeout=10)
        assert not image_attachments(message)
        assert "Traceback" not in json.dumps(message.embeds)
        labels = [c.get("label") for row in message.components for c in row.get("components", [])]
        assert "Reroll" in labels


class GuildCountingOpenAI(FakeOpenAI):
    """The OpenAI fake, also measuring how many generations run at once per guild (from the prompt prefix)."""

    def __init__(self, **knobs) -> None:
        super().__init__(**knobs)
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}

    async def generate(self, request):
        payload = await request.json()
        guild = payload["prompt"].split(":", 1)[0]
        self.active[guild] = self.active.get(guild, 0) + 1
        self.peak[guild] = max(self.peak.get(guild, 0), self.active[guild])
        self.peak["all"] = max(self.peak.get("all", 0), sum(self.active.values()))
        try:
            return await super().generate(request)
        finally:
            self.active[guild] -= 1


async def test_per_guild_limits_hold_and_are_reached_across_guilds(tmp_path) -> None:
    """Three guilds, four members each: 2 per guild at once, 6 in all, and never more."""
    async with (
        FakeDiscord(token="test-token-abcdef123456") as fake,
        GuildCountingOpenAI(delay=0.6) as backend,
    ):
        guilds = [fake.add_guild(name=f"G{i}") for i in range(3)]
        async with running_bot(
            fake,
            tmp_path,
            backend_url=backend.url,
            guild=guilds[0],
            guild_concurrency=2,
            backend_concurrency=6,
        ):
            interactions = []
            for guild in guilds:
                for n in range(4):
                    member = fake.add_member(guild.id)
                    interactions.append(
                        await fake.invoke_command(
                            guild.id,
                            guild.channels[0].id,
                            member.id,
                            "imagine",
                            {"prompt": f"{guild.id}:p{n}"},
                        )
                    )
            await asyncio.gather(*(i.wait_until(is_done, timeout=20) for i in interactions))
        assert backend.state.generations == 12
        for guild in guilds:
            assert backend.peak[guild.id] == 2, backend.peak
        assert backend.peak["all"] == 6, backend.peak


async def test_job_state_is_stored(fake_discord: FakeDiscord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "stored")
        await inter.wait_until(is_done, timeout=10)
        jobs = await h.bot.engine.store.list_jobs(guild_id=int(h.guild.id))
        assert [j.state for j in jobs] == [JobState.SUCCEEDED]
        assert jobs[0].message_ref is not None and jobs[0].message_ref["interaction_id"] == int(inter.id)


async def test_progress_and_a_live_preview_are_shown_while_generating(
    fake_discord, fake_a1111, tmp_path
) -> None:
    fake_a1111.configure(delay=2.5)
    async with running_bot(fake_discord, tmp_path, backend="a1111", backend_url=fake_a1111.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "a slow painting")
        await inter.wait_until(is_done, timeout=15)
        revisions = inter.original.history
        generating = [r for r in revisions if json.dumps(r.embeds).count("Generating")]
        assert any("%" in json.dumps(r.embeds) for r in generating)  # a progress figure was shown
        assert any(a["filename"] == "preview.png" for r in generating for a in r.attachments)
        assert [a["filename"] for a in revisions[-1].attachments if a["filename"] == "preview.png"] == []


async def test_model_autocomplete_offers_the_operators_models(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(
        fake_discord, tmp_path, backend_url=fake_openai.url, image_models=["flux-dev", "flux-schnell", "sdxl"]
    ) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await fake_discord.autocomplete(
            h.guild.id, h.channel_id, user.id, "imagine", {"prompt": "x", "model": "FLUX"}, "model"
        )
        callback = await inter.wait_for_callback()
        assert callback.type == 8
        assert [c["value"] for c in callback.data["choices"]] == ["flux-dev", "flux-schnell"]
        refused = await h.imagine(user.id, "x", model="midjourney")
        answer = await refused.wait_for_callback()
        assert answer.ephemeral and "midjourney" in answer.data["content"]


async def test_a_store_failure_at_submit_is_told_not_left_thinking(
    fake_discord, fake_openai, tmp_path
) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)

        async def broken_save(job) -> None:
            raise OSError("disk full")

        original = h.bot.engine.store.save_job
        h.bot.engine.store.save_job = broken_save  # type: ignore[method-assign]
        try:
            inter = await h.imagine(user.id, "nowhere to write")
            message = await inter.wait_until(lambda m: "nothing was started" in m.content)
        finally:
            h.bot.engine.store.save_job = original  # type: ignore[method-assign]
        assert not message.loading
        assert fake_openai.state.generations == 0
        assert h.bot.manager.active_count(int(h.guild.id), int(user.id)) == 0  # the slot was given back


async def test_imagine_is_acknowledged_before_any_database_round_trip(
    fake_discord, fake_openai, tmp_path
) -> None:
    """The defer goes out before the store is touched, so a slow or distant database (PostgreSQL across a
    network) never costs the 3-second acknowledgement: every store statement of the job comes after it."""
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        store = h.bot.manager.store
        real_query = store._query
        statements: list[float] = []
        database_slow = asyncio.Event()

        async def slow_query(sql, params=()):  # type: ignore[no-untyped-def]
            statements.append(time.monotonic())
            await asyncio.sleep(0.5 if database_slow.is_set() else 0)
            return await real_query(sql, params)

        store._query = slow_query
        database_slow.set()
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "a slow database")
        callback = await inter.wait_for_callback()
        assert callback.type == 5  # deferred
        message = await inter.wait_until(is_done, timeout=15)
        assert image_attachments(message)
        assert statements, "the job was never written"
        assert inter.dispatched_monotonic is not None
        # Every statement since the interaction was dispatched (each one 0.5 s) began after the acknowledgement.
        assert all(at > callback.monotonic for at in statements if at > inter.dispatched_monotonic)
