"""The bot as a real process: SIGTERM drains before logging out, buttons outlive a restart, 429s are survived."""

from __future__ import annotations

import asyncio
import socket
import sys
import time

from bot.engine.models import JobState
from bot.engine.store import JobStore
from tests.fakes.discord import FakeDiscord
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import TOKEN, embed_author, image_attachments, is_done
from tests.frontend.holding import FinalEditTrouble
from tests.frontend.process import assert_clean, bot_env, bot_process


def gateway_closed_at(fake: FakeDiscord) -> float:
    """The fake-clock time the (last) gateway session disconnected."""
    moments = [s.disconnected_at for s in fake.sessions.values() if s.disconnected_at is not None]
    assert moments, "the gateway never closed"
    return fake.clock() - (time.monotonic() - max(moments))


async def wait_for(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_sigterm_posts_running_results_before_logging_out(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI(delay=1.5) as backend:
        guild = fake.add_guild(name="G")
        async with bot_process(
            fake, tmp_path, image_backend="openai", image_backend_url=backend.url, shutdown_grace_s=15
        ) as bot:
            users = [fake.add_member(guild.id) for _ in range(2)]
            interactions = [
                await fake.invoke_command(
                    guild.id, guild.channels[0].id, u.id, "imagine", {"prompt": f"job {n}"}
                )
                for n, u in enumerate(users)
            ]
            await wait_for(lambda: backend.state.generations == 2)
            status = await bot.terminate(timeout=30)
        assert status == 0, bot.text
        closed = gateway_closed_at(fake)
        for interaction in interactions:
            final = interaction.original
            assert final is not None and is_done(final), bot.text
            assert final.history[-1].time <= closed
        assert_clean(bot.text)


async def test_job_longer_than_grace_is_cancelled_and_told(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI(delay=60) as backend:
        guild = fake.add_guild(name="G")
        async with bot_process(
            fake, tmp_path, image_backend="openai", image_backend_url=backend.url, shutdown_grace_s=1
        ) as bot:
            user = fake.add_member(guild.id)
            interaction = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "slow"}
            )
            await wait_for(lambda: backend.state.generations == 1)
            started = time.monotonic()
            status = await bot.terminate(timeout=30)
            took = time.monotonic() - started
        assert status == 0, bot.text
        assert took < 10, took
        final = interaction.original
        assert final is not None
        assert "Stopped by a restart" in embed_author(final), final.embeds
        assert final.history[-1].time <= gateway_closed_at(fake)
        assert_clean(bot.text)


async def test_new_work_is_refused_while_draining(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI(delay=3) as backend:
        guild = fake.add_guild(name="G")
        async with bot_process(
            fake, tmp_path, image_backend="openai", image_backend_url=backend.url, shutdown_grace_s=10
        ) as bot:
            user = fake.add_member(guild.id)
            first = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "a"}
            )
            await wait_for(lambda: backend.state.generations == 1)
            bot.proc.send_signal(15)
            await asyncio.sleep(0.5)
            late = await fake.invoke_command(
                guild.id, guild.channels[0].id, fake.add_member(guild.id).id, "imagine", {"prompt": "b"}
            )
            callback = await late.wait_for_callback()
            assert callback.ephemeral
            assert "restarting" in callback.data["content"]
            assert await bot.wait(30) == 0
        assert first.original is not None and is_done(first.original)
        assert backend.state.generations == 1
        assert_clean(bot.text)


async def test_buttons_work_in_a_new_process(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        guild = fake.add_guild(name="G")
        user = fake.add_member(guild.id)
        settings = {"image_backend": "openai", "image_backend_url": backend.url}
        async with bot_process(fake, tmp_path, **settings) as first_run:
            inter = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "castle"}
            )
            message = await inter.wait_until(is_done, timeout=15)
            assert await first_run.terminate() == 0
        syncs_before = fake.sync_count
        async with bot_process(fake, tmp_path, **settings) as second_run:
            assert fake.sync_count == syncs_before  # unchanged commands are not synced again
            reroll = await fake.click_button(message, fake.find_component(message, label="Reroll"), user.id)
            rerolled = await reroll.wait_until(is_done, timeout=15)
            assert backend.state.generations == 2  # a reroll bypasses the cache
            assert image_attachments(rerolled)
            assert await second_run.terminate() == 0
        assert_clean(first_run.text + second_run.text)


async def test_429_on_an_edit_is_survived(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI(delay=0.3) as backend:
        guild = fake.add_guild(name="G")
        async with bot_process(fake, tmp_path, image_backend="openai", image_backend_url=backend.url) as bot:
            fake.inject_429("PATCH", r"/webhooks/.*/messages/@original", count=2, retry_after=0.4, via=True)
            user = fake.add_member(guild.id)
            inter = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "rate limited"}
            )
            await inter.wait_until(is_done, timeout=20)
            assert fake.pending_injections == 0
            limited = [r for r in fake.requests_matching("PATCH", r"@original") if r.status == 429]
            assert len(limited) == 2
            assert await bot.terminate() == 0
        assert_clean(bot.text)


async def test_gateway_down_at_start_up_is_retried(tmp_path) -> None:
    """discord.py alone dies if the very first gateway connection fails; the bot keeps trying instead."""
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        guild = fake.add_guild(name="G")
        fake.set_gateway_available(False)

        async def outage_ends() -> None:
            await wait_for(lambda: fake.refused_connections >= 1, timeout=20)
            fake.set_gateway_available(True)

        ending = asyncio.create_task(outage_ends())
        async with bot_process(fake, tmp_path, image_backend="openai", image_backend_url=backend.url) as bot:
            await ending
            user = fake.add_member(guild.id)
            inter = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "late start"}
            )
            await inter.wait_until(is_done, timeout=15)
            assert await bot.terminate() == 0
        assert "gateway unreachable at start-up; retrying" in bot.text
        assert fake.refused_connections >= 1
        # One line per attempt, not discord.py's own retry (a traceback every 5 s).
        assert "Failed to connect for shard_id" not in bot.text and "Traceback" not in bot.text


async def test_a_second_bot_on_the_same_data_dir_is_refused(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        fake.add_guild(name="G")
        settings = {"image_backend": "openai", "image_backend_url": backend.url}
        async with bot_process(fake, tmp_path, **settings) as first:
            second = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot",
                cwd=str(tmp_path),
                env=bot_env(fake, tmp_path, **settings),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            async with asyncio.timeout(30):
                out, _ = await second.communicate()
            assert second.returncode == 2
            lines = out.decode().strip().splitlines()
            assert lines == [
                f"error: DATA_DIR: {tmp_path} is in use by another running copy of the bot; give each bot its own"
            ]
            assert await first.terminate() == 0
        assert fake.ready_count == 1  # the second never connected


async def test_an_unwritable_data_dir_stops_start_up_with_one_line(tmp_path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where DATA_DIR's parent should be")
    data_dir = blocker / "data"
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            cwd=str(tmp_path),
            env=bot_env(fake, data_dir, image_backend="openai", image_backend_url=backend.url),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
    assert proc.returncode == 2
    lines = out.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: DATA_DIR: cannot write to {data_dir}"), lines
    assert fake.identify_count == 0


async def test_a_clashing_http_port_stops_start_up_before_any_discord_call(tmp_path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
            fake.add_guild(name="G")
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bot",
                cwd=str(tmp_path),
                env=bot_env(
                    fake, tmp_path, image_backend="openai", image_backend_url=backend.url, http_port=port
                ),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            async with asyncio.timeout(30):
                out, _ = await proc.communicate()
            assert proc.returncode == 2
            text = out.decode()
            assert "Traceback" not in text, text
            errors = [line for line in text.splitlines() if line.startswith("error:") or " ERROR " in line]
            assert errors == [
                f"error: HTTP_PORT: cannot listen on 127.0.0.1:{port} (Address already in use); choose a free "
                "port, or HTTP_PORT=0 for any free one"
            ], text
            # Not logged in, no commands synced, no gateway: Discord heard nothing at all.
            assert fake.requests == []
            assert fake.identify_count == 0


async def test_start_up_logs_which_env_file_was_read(tmp_path) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    (here / ".env").write_text("USER_MAX_JOBS=4\n")
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        fake.add_guild(name="G")
        settings = {"image_backend": "openai", "image_backend_url": backend.url}
        async with bot_process(fake, here, **settings) as bot:
            assert await bot.terminate() == 0
        assert (
            f"INFO bot.service.app settings read from .env env_file={here / '.env'} data_dir={here}"
        ) in bot.text
        async with bot_process(fake, elsewhere, **settings) as bot:
            assert await bot.terminate() == 0
        assert (
            "INFO bot.service.app no .env found; settings from the environment only "
            f"looked_for={elsewhere / '.env'}"
        ) in bot.text


async def test_a_result_rate_limited_at_grace_end_still_posts(tmp_path) -> None:
    """Issue 8, defect 2: the job SUCCEEDED and its final edit got a 429 that outlasts the grace period. It is
    not cancelled with the leftovers: it posts within the report window, and its delivery is recorded."""
    async with (
        FinalEditTrouble(mode="429", retry_after=4.0, token=TOKEN) as fake,
        FakeOpenAI(delay=0.3) as backend,
    ):
        guild = fake.add_guild(name="G")
        async with bot_process(
            fake, tmp_path, image_backend="openai", image_backend_url=backend.url, shutdown_grace_s=1
        ) as bot:
            user = fake.add_member(guild.id)
            interaction = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "slow to post"}
            )
            async with asyncio.timeout(20):
                await fake.troubled.wait()
            status = await bot.terminate(timeout=30)
        assert status == 0, bot.text
        final = interaction.original
        assert final is not None and is_done(final), (embed_author(final), bot.text)
        assert final.history[-1].time <= gateway_closed_at(fake)
        assert_clean(bot.text)
    store = JobStore(tmp_path / "bot.sqlite3")
    async with store:
        (job,) = await store.list_jobs()
    assert job.state is JobState.SUCCEEDED and job.delivered_at is not None and job.delivery_error is None
