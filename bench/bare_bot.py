"""The floor for ``bench.discord_bench``: a bare discord.py bot whose ``/imagine`` only answers "ok".

    DISCORD_TOKEN=... DISCORD_API_BASE=http://... DISCORD_GATEWAY_URL=ws://... python -m bench.bare_bot

Same intents as the real bot (guilds only) and the same ``/imagine prompt:`` option, so the fake Discord sends
both bots the same INTERACTION_CREATE; the command is synced globally in ``setup_hook`` like the real bot's.
SIGTERM/SIGINT close it cleanly.
"""

from __future__ import annotations

import asyncio
import os
import signal

import discord
import yarl
from discord import app_commands

discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False


class BareBot(discord.Client):
    def __init__(self) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        super().__init__(intents=intents, guild_ready_timeout=0.05)
        self.tree = app_commands.CommandTree(self)

        @self.tree.command(name="imagine", description="Answer at once")
        async def imagine(interaction: discord.Interaction, prompt: str) -> None:
            await interaction.response.send_message("ok")

    async def setup_hook(self) -> None:
        await self.tree.sync()


async def main() -> None:
    token = os.environ["DISCORD_TOKEN"]
    if api_base := os.environ.get("DISCORD_API_BASE"):
        discord.http.Route.BASE = api_base.rstrip("/")
    if gateway := os.environ.get("DISCORD_GATEWAY_URL"):
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway)
    bot = BareBot()
    loop = asyncio.get_running_loop()
    closing: set[asyncio.Task[None]] = set()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: closing.add(loop.create_task(bot.close())))
    async with bot:
        await bot.start(token)


if __name__ == "__main__":
    asyncio.run(main())
