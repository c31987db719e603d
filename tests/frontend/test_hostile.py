"""Hostile conditions, end to end: the real bot against the fake Discord and a fake backend.

The project's promise: bad input gets a clear message and loses nothing -- a backend that hangs, errors,
rate-limits or sends bytes that are not an image; prompts full of markdown and mentions; Discord 429s and 5xx;
expired tokens; corrupt files on disk. Never a silent stop, never a traceback in front of a user, never the token
in a log. Each test here attacks one of those and checks what a user (or an operator) would see.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time

from aiohttp import web

from bot.engine.models import MAX_PROMPT_CHARS, JobState
from tests.fakes.discord import FakeDiscord
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import TOKEN, embed_author, image_attachments, is_done, running_bot
from tests.frontend.process import assert_clean, bot_process

MANAGE_GUILD = 1 << 5
EMBED_DESCRIPTION_MAX = 4096
EMBED_TOTAL_MAX = 6000


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def labels(message) -> list[str]:
    return [c.get("label") for row in message.components for c in row.get("components", [])]


def finished(message) -> bool:
    """The job's message reached a final state (its buttons are Reroll/Variations, not Cancel)."""
    return "Reroll" in labels(message)


def shown_text(message) -> str:
    """Everything a user can read on a message: content and every embed string."""
    return message.content + json.dumps(message.embeds, ensure_ascii=False)


def openai_error(status: int, message: str, code: str | None = None, headers: dict | None = None):
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return (status, body, headers) if headers else (status, body)


def assert_readable(message) -> None:
    """No Python internals in front of a user."""
    text = shown_text(message)
    for needle in ("Traceback", 'File "', "Exception", "Error(", "None"):
        assert needle not in text, f"{needle!r} shown to a user: {text}"


# -- the backend misbehaves ------------------------------------------------------------------------------------


async def test_a_hanging_backend_times_out_frees_the_slot_and_the_next_job_runs(
    fake_discord, fake_openai, tmp_path
) -> None:
    fake_openai.configure(delay=30)
    async with running_bot(
        fake_discord,
        tmp_path,
        backend_url=fake_openai.url,
        job_timeout_s=1,
        backend_concurrency=1,
        guild_concurrency=1,
    ) as h:
        alice, bob = fake_discord.add_member(h.guild.id), fake_discord.add_member(h.guild.id)
        stuck = await h.imagine(alice.id, "a backend that never answers")
        await wait_for(lambda: fake_openai.state.generations == 1)
        waiting = await h.imagine(bob.id, "next in line")
        await waiting.wait_until(lambda m: "Queued" in embed_author(m))
        fake_openai.configure(delay=0)
        message = await stuck.wait_until(finished, timeout=10)
        assert embed_author(message).startswith("Timed out"), embed_author(message)
        assert "1 s" in embed_author(message)
        assert not image_attachments(message)
        assert_readable(message)
        await waiting.wait_until(is_done, timeout=10)  # the slot was freed
        assert h.bot.manager.backend_in_flight == 0
        assert h.bot.manager.active_count(int(h.guild.id), int(alice.id)) == 0


async def test_a_backend_500_is_a_readable_failure(fake_discord, fake_openai, tmp_path) -> None:
    fake_openai.configure(
        fail_next=[openai_error(500, "The server had an error while processing your request.")]
    )
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "a 500")
        message = await inter.wait_until(finished, timeout=10)
        author = embed_author(message)
        assert author.startswith("The image service is unavailable"), author
        assert "HTTP 500" in author
        assert_readable(message)
        assert fake_openai.state.generations == 1  # work-creating POST is never sent twice


async def test_a_backend_traceback_never_reaches_the_user(fake_discord, fake_openai, tmp_path) -> None:
    """gpt4free and other Python servers answer a crash with the traceback as the error message."""
    traceback_text = (
        "Traceback (most recent call last):\n"
        '  File "/app/g4f/api/__init__.py", line 412, in generate_image\n'
        "    response = await provider.create_async(**kwargs)\n"
        '  File "/app/g4f/Provider/Example.py", line 88, in create_async\n'
        "    raise RuntimeError('provider exploded')\n"
        "RuntimeError: provider exploded"
    )
    fake_openai.configure(fail_next=[openai_error(500, traceback_text)])
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "crash the provider")
        message = await inter.wait_until(finished, timeout=10)
        author = embed_author(message)
        assert author.startswith("The image service is unavailable"), author
        assert "Traceback" not in shown_text(message)
        assert ".py" not in shown_text(message)
        assert "provider exploded" in author  # the useful last line is kept


async def test_a_503_then_success_is_retried_into_an_image(fake_discord, fake_openai, tmp_path) -> None:
    fake_openai.configure(fail_next=[openai_error(503, "overloaded", headers={"Retry-After": "0"})])
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "second time lucky")
        message = await inter.wait_until(is_done, timeout=10)
        assert fake_openai.state.generations == 2
        assert len(image_attachments(message)) == 1


async def test_a_backend_rate_limit_honours_retry_after_then_succeeds(
    fake_discord, fake_openai, tmp_path
) -> None:
    limited = openai_error(429, "Rate limit reached for images", "rate_limit_exceeded", {"Retry-After": "1"})
    fake_openai.configure(fail_next=[limited])
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        started = time.monotonic()
        inter = await h.imagine(user.id, "patience")
        await inter.wait_until(is_done, timeout=10)
        assert time.monotonic() - started >= 1.0  # Retry-After was honoured, not hammered
        assert fake_openai.state.generations == 2


async def test_a_backend_that_keeps_rate_limiting_says_it_is_busy(
    fake_discord, fake_openai, tmp_path
) -> None:
    limited = openai_error(429, "Rate limit reached for images", "rate_limit_exceeded", {"Retry-After": "0"})
    fake_openai.configure(fail_next=[limited] * 5)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "too popular")
        message = await inter.wait_until(finished, timeout=10)
        assert embed_author(message).startswith("The image service is busy"), embed_author(message)
        assert_readable(message)
        assert fake_openai.state.generations == 3  # bounded retries
        assert h.bot.manager.active_count(int(h.guild.id), int(user.id)) == 0


async def test_bytes_that_are_not_an_image_are_named_as_such(fake_discord, fake_openai, tmp_path) -> None:
    fake_openai.configure(return_garbage=True)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "html instead of png")
        message = await inter.wait_until(finished, timeout=10)
        assert "not an image" in embed_author(message), embed_author(message)
        assert not image_attachments(message)
        assert_readable(message)
        # Nothing broken was cached: the same prompt asks the backend again, and now succeeds.
        fake_openai.configure(return_garbage=False)
        again = await h.imagine(user.id, "html instead of png")
        await again.wait_until(is_done, timeout=10)
        assert fake_openai.state.generations == 2


class ShortChangingOpenAI(FakeOpenAI):
    """Answers a request for n images with n - 1 (as AI Horde does when it drops a censored one), and a
    request for the rest with a failure, so fewer images than asked come back."""

    async def generate(self, request: web.Request) -> web.Response:
        if self.state.generations >= 1:
            self.state.generations += 1
            return web.json_response({"error": {"message": "upstream failed"}}, status=500)
        response = await super().generate(request)
        body = json.loads(response.body)
        if len(body["data"]) > 1:
            body["data"] = body["data"][:-1]
        return web.json_response(body)


async def test_fewer_images_than_asked_are_posted_and_counted_honestly(fake_discord, tmp_path) -> None:
    async with (
        ShortChangingOpenAI() as backend,
        running_bot(fake_discord, tmp_path, backend_url=backend.url) as h,
    ):
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "four please", count=4)
        message = await inter.wait_until(is_done, timeout=10)
        assert len(image_attachments(message)) == 3
        assert embed_author(message).startswith("Done — 3 images"), embed_author(message)
        assert backend.state.generations == 2  # the missing one was asked for once more


# -- hostile prompts -----------------------------------------------------------------------------------------

HOSTILE_UNIT = (
    "@everyone @here <@&123456789012345678> <@123456789012345678> <#123456789012345678> "
    "**bold** __u__ ~~s~~ ||spoiler|| `code` ```block``` > quote\n# heading\n- list "
    "[link](https://evil.example) \\ \u200b\u200d\ufeff\u202e "
)


def hostile_prompt(length: int) -> str:
    text = (HOSTILE_UNIT * (length // len(HOSTILE_UNIT) + 1))[:length]
    return text if text.strip() else "x" * length


async def test_a_maximal_hostile_prompt_fits_discord_and_pings_nobody(
    fake_discord, fake_openai, tmp_path
) -> None:
    prompt = hostile_prompt(MAX_PROMPT_CHARS)
    negative = hostile_prompt(500)
    assert len(prompt) == MAX_PROMPT_CHARS
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, prompt, negative_prompt=negative)
        message = await inter.wait_until(is_done, timeout=10)
        assert fake_openai.state.last_payload["prompt"] == prompt  # the backend got it verbatim
        edits = fake_discord.requests_matching("PATCH", r"/webhooks/.*/messages/@original")
        assert edits and all(r.status == 200 for r in edits), [r.status for r in edits]
        for request in edits:
            assert (request.json or {}).get("allowed_mentions") == {"parse": []}
            for embed in (request.json or {}).get("embeds") or []:
                assert len(embed.get("description") or "") <= EMBED_DESCRIPTION_MAX
                assert len((embed.get("author") or {}).get("name") or "") <= 256
                for f in embed.get("fields") or []:
                    assert len(f["value"]) <= 1024
        embed = message.embeds[0]
        description = embed["description"]
        assert len(json.dumps(message.embeds)) < EMBED_TOTAL_MAX * 6  # sanity: the fake also checked 6000
        # Markdown is escaped and mentions are broken up.
        assert "\\*\\*bold\\*\\*" in description
        assert "\\`code\\`" in description
        for mention in ("@everyone", "@here", "<@&123456789012345678>", "<@123456789012345678>"):
            assert mention not in description, mention
        negative_field = next(f for f in embed["fields"] if f["name"] == "Negative")
        assert "@everyone" not in negative_field["value"]


async def test_a_prompt_over_the_limit_is_refused_by_the_command_itself(
    fake_discord, fake_openai, tmp_path
) -> None:
    """Discord's client enforces the option bounds the bot synced; the fake refuses at invoke time likewise."""
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        command = fake_discord.commands[None]["imagine"]
        prompt_option = next(o for o in command["options"] if o["name"] == "prompt")
        assert prompt_option["max_length"] == MAX_PROMPT_CHARS
        before = len(fake_discord.interactions)
        try:
            await h.imagine(user.id, "x" * (MAX_PROMPT_CHARS + 1))
        except ValueError as refused:
            assert "outside the command's bounds" in str(refused)
        else:
            raise AssertionError("a 1,501-character prompt was accepted by the synced command")
        assert len(fake_discord.interactions) == before  # never reached the bot
        # One character less is fine.
        ok = await h.imagine(user.id, "y" * MAX_PROMPT_CHARS)
        await ok.wait_until(is_done, timeout=10)


# -- Discord misbehaves --------------------------------------------------------------------------------------


async def test_a_429_on_the_interaction_callback_is_retried_within_the_deadline(
    fake_discord, fake_openai, tmp_path
) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        fake_discord.inject_429("POST", r"/interactions/.*/callback", count=1, retry_after=0.3, via=True)
        inter = await h.imagine(user.id, "limited ack")
        callback = await inter.wait_for_callback()
        assert callback.type == 5
        assert inter.ack_latency is not None and inter.ack_latency < 3.0
        await inter.wait_until(is_done, timeout=10)
        statuses = [r.status for r in fake_discord.requests_matching("POST", r"/interactions/.*/callback")]
        assert statuses[0] == 429 and len(statuses) == 2 and statuses[1] < 300, statuses


async def test_a_429_on_a_channel_post_is_retried(fake_discord, fake_openai, tmp_path) -> None:
    """The token died, so the result goes to the channel -- which is rate limited once."""
    fake_openai.configure(delay=0.5)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "limited post")
        await inter.wait_for_callback()
        fake_discord.expire_token(inter)
        fake_discord.inject_429("POST", r"/channels/\d+/messages", count=1, retry_after=0.3, via=True)
        posted = await inter.wait_until(
            lambda m: m is not inter.original and bool(image_attachments(m)), timeout=10
        )
        assert posted.content.startswith(f"<@{user.id}>")
        statuses = [r.status for r in fake_discord.requests_matching("POST", r"/channels/\d+/messages")]
        assert statuses == [429, 200], statuses


async def test_a_discord_500_on_the_result_edit_is_retried(fake_discord, fake_openai, tmp_path) -> None:
    fake_openai.configure(delay=0.5)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        inter = await h.imagine(user.id, "flaky discord")
        await inter.wait_until(lambda m: embed_author(m).startswith("Generating"))
        fake_discord.inject_error("PATCH", r"/webhooks/.*/messages/@original", 500, count=1)
        message = await inter.wait_until(is_done, timeout=15)
        assert image_attachments(message)
        assert fake_discord.pending_injections == 0
        statuses = [r.status for r in fake_discord.requests_matching("PATCH", r"@original")]
        assert 500 in statuses and statuses[-1] == 200, statuses


# -- corrupt data on disk ------------------------------------------------------------------------------------


async def test_a_corrupt_cache_blob_between_runs_regenerates(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        first = await h.imagine(user.id, "a cached castle")
        await first.wait_until(is_done, timeout=10)
    blobs = [
        p for p in (tmp_path / "cache").rglob("*") if p.is_file() and p.suffix in (".png", ".jpg", ".webp")
    ]
    assert len(blobs) == 1, list((tmp_path / "cache").rglob("*"))
    blobs[0].write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)  # same name, damaged content
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        again = await h.imagine(user.id, "a cached castle")
        message = await again.wait_until(is_done, timeout=10)
        assert "from cache" not in embed_author(message)
        assert fake_openai.state.generations == 2
        attachment = image_attachments(message)[0]
        assert attachment.data.startswith(b"\x89PNG") and len(attachment.data) > 58


async def test_garbage_guild_settings_fall_back_to_defaults(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        guild = h.guild
        admin = fake_discord.add_member(guild.id, permissions=MANAGE_GUILD)
        other = fake_discord.add_guild(name="other")
    with sqlite3.connect(tmp_path / "bot.sqlite3") as db:
        db.execute(
            "INSERT INTO guild_settings (guild_id, settings, updated_at) VALUES (?, ?, ?)",
            (int(guild.id), "{not json at all", time.time()),
        )
        db.execute(
            "INSERT INTO guild_settings (guild_id, settings, updated_at) VALUES (?, ?, ?)",
            (int(other.id), json.dumps({"concurrency": "lots", "nsfw": 7, "blocked_words": 5}), time.time()),
        )
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url, guild=guild) as h:
        shown = await fake_discord.invoke_command(
            guild.id, h.channel_id, admin.id, "settings", {}, subcommand="show"
        )
        callback = await shown.wait_for_callback()
        await wait_for(
            lambda: shown.original is not None and (shown.original.content or shown.original.embeds)
        )
        text = shown_text(shown.original) + json.dumps(callback.data)
        assert "Traceback" not in text and "not json" not in text
        user = fake_discord.add_member(guild.id)
        inter = await h.imagine(user.id, "defaults please")
        await inter.wait_until(is_done, timeout=10)
        stranger = fake_discord.add_member(other.id)
        elsewhere = await fake_discord.invoke_command(
            other.id, other.channels[0].id, stranger.id, "imagine", {"prompt": "typed garbage"}
        )
        await elsewhere.wait_until(is_done, timeout=10)


async def test_an_unreadable_job_row_does_not_stop_start_up(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        guild = h.guild
        user = fake_discord.add_member(guild.id)
    with sqlite3.connect(tmp_path / "bot.sqlite3") as db:
        db.execute(
            "INSERT INTO jobs (id, request, guild_id, channel_id, user_id, state, created_at, message_ref) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            ("0badc0ffee00", "{truncated", int(guild.id), 1, int(user.id), "queued", time.time(), "[oops"),
        )
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url, guild=guild) as h:
        inter = await h.imagine(user.id, "after the damage")
        await inter.wait_until(is_done, timeout=10)
        shown = await fake_discord.invoke_command(
            guild.id, h.channel_id, user.id, "show", {"job_id": "0badc0ffee00"}
        )
        callback = await shown.wait_for_callback()
        assert callback.ephemeral and "No job" in callback.data["content"], callback.data


# -- users misbehave -----------------------------------------------------------------------------------------


async def test_spamming_imagine_past_the_user_limit_admits_exactly_the_limit(
    fake_discord, fake_openai, tmp_path
) -> None:
    fake_openai.configure(delay=0.5)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url, user_max_jobs=2) as h:
        spammer = fake_discord.add_member(h.guild.id)
        burst = await asyncio.gather(*(h.imagine(spammer.id, f"spam {n}") for n in range(6)))
        await asyncio.gather(*(i.wait_for_callback() for i in burst))
        await wait_for(lambda: h.bot.manager.active_count(int(h.guild.id), int(spammer.id)) == 0, timeout=15)
        jobs = await h.bot.engine.store.list_jobs(guild_id=int(h.guild.id))
        assert len(jobs) == 2, jobs
        assert fake_openai.state.generations == 2
        accepted = {str(j.message_ref["interaction_id"]) for j in jobs}
        await asyncio.gather(*(i.wait_until(is_done, timeout=10) for i in burst if i.id in accepted))
        refused = [i for i in burst if i.id not in accepted]
        assert len(refused) == 4
        for inter in refused:
            # Told why, privately: a burst must not leave a public refusal per message in the channel.
            assert inter.callback.ephemeral, inter.callback
            assert "already have 2 image jobs" in inter.callback.data["content"]


async def test_cancel_pressed_twice_cancels_once_and_answers_both(
    fake_discord, fake_openai, tmp_path
) -> None:
    fake_openai.configure(delay=30)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        owner = fake_discord.add_member(h.guild.id)
        job = await h.imagine(owner.id, "cancel me twice")
        message = await job.wait_until(lambda m: "Cancel" in labels(m))
        cancel_id = fake_discord.find_component(message, label="Cancel")
        first, second = await asyncio.gather(
            fake_discord.click_button(message, cancel_id, owner.id),
            fake_discord.click_button(message, cancel_id, owner.id),
        )
        await asyncio.gather(first.wait_for_callback(), second.wait_for_callback())
        final = await job.wait_until(lambda m: "Cancelled by" in embed_author(m))
        assert not image_attachments(final)
        stored = await h.bot.engine.store.list_jobs(guild_id=int(h.guild.id))
        assert [j.state for j in stored] == [JobState.CANCELLED]
        assert h.bot.manager.active_count(int(h.guild.id), int(owner.id)) == 0
        # A Reroll after the cancel starts normally: the slot and the user's count were freed exactly once.
        fake_openai.configure(delay=0)
        reroll = await fake_discord.click_button(
            final, fake_discord.find_component(final, label="Reroll"), owner.id
        )
        await reroll.wait_until(is_done, timeout=10)


async def test_delete_pressed_twice_is_quiet_and_the_images_stay_deleted(
    fake_discord, fake_openai, tmp_path, caplog
) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        owner = fake_discord.add_member(h.guild.id)
        job = await h.imagine(owner.id, "delete me twice")
        message = await job.wait_until(is_done, timeout=10)
        delete_id = fake_discord.find_component(message, label="Delete")
        with caplog.at_level(logging.ERROR):
            first, second = await asyncio.gather(
                fake_discord.click_button(message, delete_id, owner.id),
                fake_discord.click_button(message, delete_id, owner.id),
            )
            await asyncio.gather(first.wait_for_callback(), second.wait_for_callback())
            await wait_for(lambda: message.deleted)
            await asyncio.sleep(0.3)
        crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not crashes, [r.getMessage() for r in crashes]
        # The job is still known, but what its owner deleted is gone: /show says so, privately.
        job_id = message.embeds[0]["footer"]["text"].removeprefix("Job ")
        shown = await fake_discord.invoke_command(
            h.guild.id, h.channel_id, owner.id, "show", {"job_id": job_id}
        )
        callback = await shown.wait_for_callback()
        assert callback.ephemeral
        assert callback.data["content"] == f"Job `{job_id}` was deleted; its prompt and images are gone."
        assert not [m for m in shown.messages() if image_attachments(m)]


async def test_the_token_never_reaches_the_log_even_when_discord_answers_401(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI(delay=0.5) as backend:
        guild = fake.add_guild(name="G")
        async with bot_process(
            fake, tmp_path, image_backend="openai", image_backend_url=backend.url, log_level="DEBUG"
        ) as bot:
            user = fake.add_member(guild.id)
            inter = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "token dies"}
            )
            await inter.wait_for_callback()
            fake.expire_token(inter)  # the next edit is answered 401 Invalid Webhook Token
            await inter.wait_until(
                lambda m: m is not inter.original and bool(image_attachments(m)), timeout=15
            )
            assert 401 in [r.status for r in fake.requests_matching("PATCH", r"@original")]
            assert await bot.terminate() == 0
        assert "DEBUG" in bot.text  # the log really was verbose
        assert TOKEN not in bot.text
        assert TOKEN.split("-")[-1] not in bot.text
        assert inter.token not in bot.text, "an interaction token (a 15-minute credential) was logged"
        assert_clean(bot.text)


async def test_a_burst_at_the_daily_quota_admits_exactly_the_quota(
    fake_discord, fake_openai, tmp_path
) -> None:
    fake_openai.configure(delay=0.5)
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url, user_max_jobs=10) as h:
        await h.bot.policy.update(int(h.guild.id), daily_images=2)
        spammer = fake_discord.add_member(h.guild.id)
        burst = await asyncio.gather(*(h.imagine(spammer.id, f"quota {n}") for n in range(5)))
        await asyncio.gather(*(i.wait_for_callback() for i in burst))
        refused = [i for i in burst if i.callback.ephemeral]
        accepted = [i for i in burst if not i.callback.ephemeral]
        assert len(accepted) == 2 and len(refused) == 3
        for inter in refused:  # privately, and saying why
            assert "images for today" in inter.callback.data["content"]
        await asyncio.gather(*(i.wait_until(is_done, timeout=10) for i in accepted))
        assert fake_openai.state.generations == 2
