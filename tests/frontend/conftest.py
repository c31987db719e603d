"""Runs the real bot, in this process, against the fake Discord and a fake image backend over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.frontend.client import ImagineBot, point_discord_at
from bot.frontend.identify import IdentifyGate
from bot.service.app import Service, build_service
from bot.service.runtime import open_engine
from bot.settings import load_settings
from tests.conftest import TOKEN
from tests.fakes.discord import FakeDiscord, FakeGuild


@dataclass
class Harness:
    fake: FakeDiscord
    bot: ImagineBot
    guild: FakeGuild
    data_dir: Path
    service: Service

    @property
    def channel_id(self) -> str:
        return self.guild.channels[0].id

    async def imagine(
        self, user_id: int | str, prompt: str, *, guild: FakeGuild | None = None, **options: Any
    ):
        guild = guild or self.guild
        return await self.fake.invoke_command(
            guild.id, guild.channels[0].id, user_id, "imagine", {"prompt": prompt, **options}
        )


def bot_settings(fake: FakeDiscord, data_dir: Path, backend: str, backend_url: str, **overrides: Any):
    values: dict[str, Any] = {
        "discord_token": TOKEN,
        "discord_api_base": fake.api_base,
        "discord_gateway_url": fake.gateway_url,
        "image_backend": backend,
        "image_backend_url": backend_url,
        "data_dir": data_dir,
        "http_port": 0,
        "shutdown_grace_s": 5,
    }
    if "image_backends" in overrides:  # a pool replaces IMAGE_BACKEND (both set stops start-up)
        del values["image_backend"], values["image_backend_url"]
    values.update(overrides)
    return load_settings(env_file=None, **values)


@contextlib.asynccontextmanager
async def running_bot(
    fake: FakeDiscord,
    data_dir: Path,
    *,
    backend: str = "openai",
    backend_url: str,
    clock: Callable[[], float] | None = None,
    guild: FakeGuild | None = None,
    ready_timeout: float = 10.0,
    identify_gate: IdentifyGate | None = None,
    **overrides: Any,
) -> AsyncIterator[Harness]:
    settings = bot_settings(fake, data_dir, backend, backend_url, **overrides)
    point_discord_at(settings.discord_api_base, settings.discord_gateway_url)
    guild = guild or (next(iter(fake.guilds.values())) if fake.guilds else fake.add_guild(name="Test Guild"))
    async with open_engine(settings) as engine:
        service = build_service(
            engine,
            clock=clock or fake.clock,
            progress_interval=0.2,
            guild_ready_timeout=0.05,
            identify_gate=identify_gate,
        )
        async with serving(service, fake, guild, data_dir, ready_timeout=ready_timeout) as harness:
            yield harness


@contextlib.asynccontextmanager
async def serving(
    service: Service, fake: FakeDiscord, guild: FakeGuild, data_dir: Path, *, ready_timeout: float = 10.0
) -> AsyncIterator[Harness]:
    """Start a built service's web server and bot, wait until the bot is ready; close both after."""
    bot = service.bot
    await service.start_web()
    runner = asyncio.create_task(bot.start(TOKEN), name="bot-under-test")
    try:
        # With max_concurrency 1 (the fake's default for one recommended shard) shards IDENTIFY 5.5 s apart.
        async with asyncio.timeout(ready_timeout):
            while not bot.ready_once.is_set():
                if runner.done():
                    runner.result()
                await asyncio.sleep(0.01)
        yield Harness(fake, bot, guild, data_dir, service)
    finally:
        await bot.close()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        await service.stop_web()


def image_attachments(message) -> list:
    return [a for a in message.attachments if a.filename.rsplit(".", 1)[-1] in {"png", "jpg", "webp"}]


def embed_author(message) -> str:
    embeds = message.embeds
    return (embeds[0].get("author") or {}).get("name", "") if embeds else ""


def is_done(message) -> bool:
    return embed_author(message).startswith("Done") and bool(image_attachments(message))
