"""Command sync: on start only when something changed, to DEV_GUILD_ID when set, and on demand."""

from __future__ import annotations

import asyncio
import json
import sys

from tests.fakes.discord import FakeDiscord
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import TOKEN, embed_author, is_done, running_bot
from tests.frontend.process import ROOT, bot_env, bot_process


async def run_sync(fake: FakeDiscord, data_dir, *args: str, **settings: object) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "sync",
        *args,
        cwd=str(data_dir),
        env=bot_env(fake, data_dir, **settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_start_syncs_once_then_only_on_change(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        fake.add_guild(name="G")
        async with running_bot(fake, tmp_path, backend_url=backend.url):
            pass
        assert fake.sync_count == 1
        names = {c["name"] for c in fake.commands[None].values()}
        assert "imagine" in names
        async with running_bot(fake, tmp_path, backend_url=backend.url):
            pass
        assert fake.sync_count == 1  # same commands, same application: no sync
        # A different size list changes the /imagine command: the next start syncs again.
        async with running_bot(fake, tmp_path, backend="a1111", backend_url=backend.url):
            pass
        assert fake.sync_count == 2


async def test_dev_guild_gets_the_commands(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        guild = fake.add_guild(name="G")
        async with running_bot(fake, tmp_path, backend_url=backend.url, dev_guild_id=int(guild.id)):
            pass
        assert "imagine" in {c["name"] for c in fake.commands[guild.id].values()}
        assert not fake.commands.get(None)


async def test_sync_command_on_demand_and_clear(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        fake.add_guild(name="G")
        settings = {"image_backend": "openai", "image_backend_url": backend.url}
        status, out = await run_sync(fake, tmp_path, **settings)
        assert status == 0, out
        assert "commands synced" in out
        assert "imagine" in {c["name"] for c in fake.commands[None].values()}
        status, out = await run_sync(fake, tmp_path, "--clear", **settings)
        assert status == 0, out
        assert "commands cleared" in out
        assert not fake.commands[None]
        assert ROOT.is_dir()


async def test_sync_with_a_bad_token_says_so(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        status, out = await run_sync(
            fake,
            tmp_path,
            image_backend="openai",
            image_backend_url=backend.url,
            discord_token="wrong-token-123456",
        )
        assert status == 1
        assert "DISCORD_TOKEN" in out
        assert "Traceback" not in out
        assert "wrong-token-123456" not in out


async def test_guild_only_commands_and_only_the_guilds_intent(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        fake.add_guild(name="G")
        async with running_bot(fake, tmp_path, backend_url=backend.url):
            (session,) = fake.sessions.values()
            assert session.identify["intents"] == 1  # GUILDS only: no message content, no members
        for command in fake.commands[None].values():
            assert command.get("contexts") == [0], command["name"]  # servers only, not DMs
            assert command.get("integration_types") == [0], command["name"]  # installed to servers, not users


async def test_sync_beside_a_running_bot_leaves_its_jobs_alone(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI(delay=2) as backend:
        guild = fake.add_guild(name="G")
        settings = {"image_backend": "openai", "image_backend_url": backend.url}
        async with bot_process(fake, tmp_path, **settings) as bot:
            user = fake.add_member(guild.id)
            inter = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "busy"}
            )
            await inter.wait_until(lambda m: "Generating" in embed_author(m), timeout=10)
            status, out = await run_sync(fake, tmp_path, **settings)
            assert status == 0, out
            message = await inter.wait_until(is_done, timeout=10)
            assert "Interrupted" not in json.dumps([r.embeds for r in message.history])
            assert await bot.terminate() == 0
