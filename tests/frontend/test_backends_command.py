"""/backends end to end: the real bot on a pool (fake A1111 + fake OpenAI) against the fake Discord."""

from __future__ import annotations

import json

from tests.fakes.a1111 import FakeA1111
from tests.fakes.discord import DEFAULT_MEMBER_PERMISSIONS
from tests.frontend.conftest import is_done, running_bot
from tests.frontend.test_admin import MANAGE_GUILD, answer, command

KEY = "sk-pool-secret-4242"


async def test_backends_shows_health_load_and_last_error_without_urls_or_keys(
    fake_discord, fake_openai, tmp_path
) -> None:
    async with FakeA1111() as gpu:
        pool = [
            {"name": "attic-gpu", "kind": "a1111", "url": gpu.url, "sizes": ["1024x1024"]},
            {"name": "cloud", "kind": "openai", "url": fake_openai.url, "api_key": KEY, "concurrency": 2},
        ]
        async with running_bot(
            fake_discord, tmp_path, backend_url="", image_backends=json.dumps(pool), image_model="dall-e-2"
        ) as h:
            synced = fake_discord.commands[None]
            assert int(synced["backends"]["default_member_permissions"]) == MANAGE_GUILD
            member = fake_discord.add_member(h.guild.id, permissions=DEFAULT_MEMBER_PERMISSIONS)
            ephemeral, text = await answer(await command(fake_discord, h.guild, member, "backends"))
            assert ephemeral and "Manage Server" in text
            admin = fake_discord.add_member(h.guild.id, permissions=DEFAULT_MEMBER_PERMISSIONS | MANAGE_GUILD)
            ephemeral, text = await answer(await command(fake_discord, h.guild, admin, "backends"))
            lines = text.splitlines()
            assert ephemeral and len(lines) == 2
            assert lines[0] == "**attic-gpu** · a1111 · up · 0/1 busy"
            assert lines[1] == "**cloud** · openai · up · 0/2 busy"

            await gpu.kill()  # it goes away: (ties go by name, so it is tried first) jobs move to cloud, and after three failures it is out
            user = fake_discord.add_member(h.guild.id)
            for i in range(3):
                job = await h.imagine(user.id, f"a lighthouse {i}")
                await job.wait_until(is_done, timeout=15)
            assert fake_openai.state.generations == 3
            ephemeral, text = await answer(await command(fake_discord, h.guild, admin, "backends"))
            gpu_line, cloud_line = text.splitlines()
            assert gpu_line.startswith(
                "**attic-gpu** · a1111 · **out** (being probed) · 0/1 busy · last error"
            )
            assert "could not connect" in gpu_line
            assert cloud_line == "**cloud** · openai · up · 0/2 busy"
            assert gpu.url.split("//")[1] not in text and fake_openai.url.split("//")[1] not in text
            assert KEY not in text
