"""/jobs and /settings end to end: the real bot against the fake Discord, with permissions as Discord sends them."""

from __future__ import annotations

import asyncio

from bot.engine.models import JobState
from tests.fakes.discord import DEFAULT_MEMBER_PERMISSIONS, FakeDiscord, FakeInteraction
from tests.frontend.conftest import embed_author, is_done, running_bot

MANAGE_GUILD = 1 << 5


async def answer(inter: FakeInteraction, timeout: float = 10.0) -> tuple[bool, str]:
    """(ephemeral, text) of the bot's reply, whether it answered at once or deferred and followed up."""
    callback = await inter.wait_for_callback(timeout)
    if callback.type == 4:
        return callback.ephemeral, callback.data.get("content", "")
    message = await inter.wait_until(lambda m: m.content and not m.loading, timeout)
    return message.ephemeral, message.content


async def command(fake: FakeDiscord, guild, who, name: str, sub: str | None = None, /, **options):
    """Invoke ``/name sub`` as ``who`` in the guild's first channel; keyword arguments are the options."""
    return await fake.invoke_command(guild.id, guild.channels[0].id, who.id, name, options, subcommand=sub)


async def test_members_without_manage_server_are_refused_even_when_discord_lets_them_in(
    fake_discord, fake_openai, tmp_path
) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        synced = fake_discord.commands[None]
        for name in ("jobs", "settings"):
            assert int(synced[name]["default_member_permissions"]) == MANAGE_GUILD
        member = fake_discord.add_member(h.guild.id, permissions=DEFAULT_MEMBER_PERMISSIONS)
        victim = fake_discord.add_member(h.guild.id)
        fake_openai.configure(delay=1.0)
        job = await h.imagine(victim.id, "a slow painting")
        await job.wait_for_callback()
        attempts = [
            ("jobs", "list", {}),
            ("jobs", "cancel-all", {}),
            ("settings", "show", {}),
            ("settings", "set", {"daily_images": 1}),
            ("settings", "channels clear", {}),
            ("settings", "blocked-words add", {"words": "fox"}),
        ]
        for name, sub, options in attempts:
            ephemeral, text = await answer(await command(fake_discord, h.guild, member, name, sub, **options))
            assert ephemeral and "Manage Server" in text, (name, sub, text)
        assert h.bot.policy.settings_for(int(h.guild.id)).daily_images == 0
        assert h.bot.policy.settings_for(int(h.guild.id)).blocked_words == ()
        assert [j.user_id for j in h.bot.manager.active_jobs()] == [int(victim.id)]  # nothing cancelled
        # The same commands work for a member with Manage Server.
        admin = fake_discord.add_member(h.guild.id, permissions=DEFAULT_MEMBER_PERMISSIONS | MANAGE_GUILD)
        ephemeral, text = await answer(await command(fake_discord, h.guild, admin, "jobs", "list"))
        assert ephemeral and f"<@{victim.id}>" in text and "slow painting" in text


async def test_an_admin_acts_only_inside_their_own_guild(fake_openai, tmp_path) -> None:
    async with FakeDiscord(token="test-token-abcdef123456") as fake:
        guild_a, guild_b = fake.add_guild(name="A"), fake.add_guild(name="B")
        async with running_bot(fake, tmp_path, backend_url=fake_openai.url, guild=guild_a) as h:
            fake_openai.configure(delay=1.5)
            member_b = fake.add_member(guild_b.id)
            job_b = await fake.invoke_command(
                guild_b.id, guild_b.channels[0].id, member_b.id, "imagine", {"prompt": "guild b secret"}
            )
            await job_b.wait_for_callback()
            (b_job,) = h.bot.manager.active_jobs(guild_id=int(guild_b.id))
            admin_a = fake.add_member(guild_a.id, permissions=MANAGE_GUILD)

            _, listed = await answer(await command(fake, guild_a, admin_a, "jobs", "list"))
            assert "guild b secret" not in listed and b_job.id not in listed
            _, listed = await answer(await command(fake, guild_a, admin_a, "jobs", "list", state="recent"))
            assert b_job.id not in listed
            ephemeral, text = await answer(
                await command(fake, guild_a, admin_a, "jobs", "cancel", job_id=b_job.id)
            )
            assert ephemeral and "No job" in text
            _, text = await answer(await command(fake, guild_a, admin_a, "jobs", "cancel-all"))
            assert "No queued or running jobs" in text
            assert h.bot.manager.get(b_job.id).is_active

            # The application owner may act everywhere.
            h.bot.owner_id = int(admin_a.id)
            _, text = await answer(await command(fake, guild_a, admin_a, "jobs", "cancel", job_id=b_job.id))
            assert "Cancelled job" in text
            message = await job_b.wait_until(lambda m: "Cancelled by" in embed_author(m), timeout=10)
            assert embed_author(message) == f"Cancelled by {fake.users[admin_a.id].username}."


async def test_cancel_all_for_a_member_stops_queued_and_running_jobs_and_frees_the_slot(
    fake_discord, fake_a1111, tmp_path
) -> None:
    async with running_bot(
        fake_discord, tmp_path, backend="a1111", backend_url=fake_a1111.url, guild_concurrency=1
    ) as h:
        fake_a1111.configure(delay=30)
        spammer, other = fake_discord.add_member(h.guild.id), fake_discord.add_member(h.guild.id)
        admin = fake_discord.add_member(h.guild.id, permissions=MANAGE_GUILD, username="Mod")
        first = await h.imagine(spammer.id, "one")
        await first.wait_for_callback()
        await fake_discord.wait_for_state(
            lambda: fake_a1111.state.txt2img_calls == 1, 5, "generation started"
        )
        second = await h.imagine(spammer.id, "two")
        third = await h.imagine(other.id, "three")
        await asyncio.gather(second.wait_for_callback(), third.wait_for_callback())
        states = {j.request.prompt: j.state for j in h.bot.manager.active_jobs()}
        assert states == {"one": JobState.RUNNING, "two": JobState.QUEUED, "three": JobState.QUEUED}

        ephemeral, text = await answer(
            await command(fake_discord, h.guild, admin, "jobs", "cancel-all", user=spammer.id), timeout=15
        )
        assert ephemeral and "Cancelled 2 jobs" in text
        assert fake_a1111.state.interrupts >= 1  # the running generation was stopped at the backend
        for inter in (first, second):
            message = await inter.wait_until(lambda m: "Cancelled" in embed_author(m), timeout=10)
            assert embed_author(message) == "Cancelled by Mod."
        assert [j.request.prompt for j in h.bot.manager.active_jobs()] == ["three"]
        # The slot is free: the other member's job runs now.
        await fake_discord.wait_for_state(lambda: fake_a1111.state.txt2img_calls == 2, 5, "next job started")
        fake_a1111.configure(delay=0)
        await third.wait_until(is_done, timeout=10)


async def test_settings_persist_across_a_restart_and_clamp_to_the_operator_ceiling(
    fake_discord, fake_openai, tmp_path
) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url, guild_concurrency_max=4) as h:
        guild_id = int(h.guild.id)
        admin = fake_discord.add_member(h.guild.id, permissions=MANAGE_GUILD)
        ephemeral, text = await answer(
            await command(
                fake_discord,
                h.guild,
                admin,
                "settings",
                "set",
                concurrency=50,
                max_jobs_per_user=2,
                daily_images=7,
                nsfw="never",
                default_size="1536x1024",
            )
        )
        assert ephemeral and "set to 4" in text and "GUILD_CONCURRENCY_MAX" in text
        assert h.bot.manager.guild_limit(guild_id) == 4  # applied at once
        assert h.bot.manager.user_limit(guild_id) == 2
        _, text = await answer(
            await command(fake_discord, h.guild, admin, "settings", "blocked-words add", words="gore, blood*")
        )
        assert "2 blocked words" in text
        _, text = await answer(
            await command(fake_discord, h.guild, admin, "settings", "channels add", channel=h.channel_id)
        )
        assert f"<#{h.channel_id}>" in text

    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url, guild_concurrency_max=4) as h:
        assert h.bot.manager.guild_limit(guild_id) == 4
        assert h.bot.manager.user_limit(guild_id) == 2
        settings = h.bot.policy.settings_for(guild_id)
        assert (settings.daily_images, settings.nsfw, settings.default_size) == (7, "never", "1536x1024")
        assert settings.blocked_words == ("gore", "blood*")
        assert settings.channels == (int(h.channel_id),)
        _, shown = await answer(await command(fake_discord, h.guild, admin, "settings", "show"))
        assert "Concurrency: 4" in shown and "Daily images per user: 7" in shown

    # The operator lowers the ceiling: the stored value is clamped again at start-up.
    async with running_bot(
        fake_discord, tmp_path, backend_url=fake_openai.url, guild_concurrency=1, guild_concurrency_max=2
    ) as h:
        assert h.bot.manager.guild_limit(guild_id) == 2
        _, text = await answer(
            await command(fake_discord, h.guild, admin, "settings", "reset", setting="all")
        )
        assert (
            h.bot.manager.guild_limit(guild_id) == 1 and h.bot.policy.settings_for(guild_id).daily_images == 0
        )


async def test_refusals_are_ephemeral_clear_and_apply_to_reroll_and_variations(
    fake_discord, fake_openai, tmp_path
) -> None:
    async with FakeDiscord(token="test-token-abcdef123456") as fake:
        guild = fake.add_guild(name="G", channels=["general", "art"])
        general, art = guild.channels
        async with running_bot(fake, tmp_path, backend_url=fake_openai.url, guild=guild) as h:
            user = fake.add_member(guild.id)
            admin = fake.add_member(guild.id, permissions=MANAGE_GUILD)
            first = await h.imagine(user.id, "a red fox in snow")
            done = await first.wait_until(is_done, timeout=10)
            reroll, variations = (fake.find_component(done, label=x) for x in ("Reroll", "Variations"))

            async def press(custom_id: str) -> tuple[bool, str]:
                return await answer(await fake.click_button(done, custom_id, user.id))

            # Blocked words: in the prompt or the negative prompt, by /imagine or a button; never echoed.
            await answer(
                await command(fake, guild, admin, "settings", "blocked-words add", words="f*x, gore")
            )
            for ephemeral, text in (
                await press(reroll),
                await press(variations),
                await answer(await h.imagine(user.id, "a calm lake", negative_prompt="GORE")),
            ):
                assert ephemeral and "does not allow" in text
                assert "f*x" not in text and "fox" not in text.lower() and "gore" not in text.lower()
            await answer(await command(fake, guild, admin, "settings", "blocked-words clear"))

            # Channels: only #art now.
            await answer(await command(fake, guild, admin, "settings", "channels add", channel=art.id))
            for ephemeral, text in (await press(reroll), await press(variations)):
                assert ephemeral and "this channel" in text and f"<#{art.id}>" in text
            await answer(await command(fake, guild, admin, "settings", "channels clear"))

            # Quota: one image a day, already used by the first job.
            await answer(await command(fake, guild, admin, "settings", "set", daily_images=1))
            for ephemeral, text in (await press(reroll), await press(variations)):
                assert ephemeral and "used your 1 images for today" in text and "00:00 UTC" in text
            assert fake_openai.state.generations == 1
            # Raising it lets the button through again.
            await answer(await command(fake, guild, admin, "settings", "set", daily_images=2))
            again = await fake.click_button(done, reroll, user.id)
            callback = await again.wait_for_callback()
            assert callback.type == 5 and not callback.ephemeral  # admitted: deferred publicly
            await again.wait_until(is_done, timeout=10)
            assert fake_openai.state.generations == 2 and general.id == h.channel_id


async def test_nsfw_policy_never_overrides_an_age_restricted_channel(fake_openai, tmp_path) -> None:
    async with FakeDiscord(token="test-token-abcdef123456") as fake:
        guild = fake.add_guild(name="G", channels=[{"name": "adults", "nsfw": True}])
        async with running_bot(fake, tmp_path, backend_url=fake_openai.url, guild=guild) as h:
            user = fake.add_member(guild.id)
            admin = fake.add_member(guild.id, permissions=MANAGE_GUILD)
            await (await h.imagine(user.id, "before")).wait_until(is_done, timeout=10)
            await answer(await command(fake, guild, admin, "settings", "set", nsfw="never"))
            await (await h.imagine(user.id, "after")).wait_until(is_done, timeout=10)
            jobs = {j.request.prompt: j for j in await h.bot.engine.store.list_jobs(guild_id=int(guild.id))}
            assert jobs["before"].request.nsfw_allowed is True
            assert jobs["after"].request.nsfw_allowed is False


async def test_a_failing_admin_command_answers_with_a_sentence_not_endless_thinking(
    fake_discord, fake_openai, tmp_path, monkeypatch
) -> None:
    from bot.engine.store import StoreError

    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        admin = fake_discord.add_member(h.guild.id, permissions=MANAGE_GUILD)

        async def broken(**_: object) -> list:
            raise StoreError("The job store is not open.")

        monkeypatch.setattr(h.bot.engine.store, "list_jobs", broken)
        ephemeral, text = await answer(
            await command(fake_discord, h.guild, admin, "jobs", "list", state="recent")
        )
        assert ephemeral and text == "Something went wrong on the bot's side; try again in a moment."


async def test_cancel_of_a_job_another_process_runs_says_so_instead_of_already_finished(
    fake_discord, fake_openai, tmp_path
) -> None:
    """A job taken over by another process of the fleet is queued or running in the store but not here: the
    Cancel pressed in this process cannot reach it, and must not claim the job is over."""
    from bot.engine.models import ImageRequest, Job

    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        admin = fake_discord.add_member(h.guild.id, permissions=MANAGE_GUILD)
        elsewhere = Job(
            id="0123456789ab",
            request=ImageRequest(prompt="made in the other process"),
            guild_id=int(h.guild.id),
            user_id=int(admin.id),
            state=JobState.RUNNING,
        )
        await h.bot.engine.store.save_job(elsewhere)
        ephemeral, text = await answer(
            await command(fake_discord, h.guild, admin, "jobs", "cancel", job_id=elsewhere.id)
        )
        assert ephemeral and "another of the bot's processes" in text and "already finished" not in text
        stored = await h.bot.engine.store.get_job(elsewhere.id)
        assert stored is not None and stored.state is JobState.RUNNING  # nothing written over it
