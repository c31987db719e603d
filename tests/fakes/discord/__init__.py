"""A protocol-faithful fake Discord (REST + gateway) on aiohttp.

Why: the bot's behaviour that matters (acknowledging in time, editing with files, honouring upload
limits, surviving 429s and gateway drops, shutting down cleanly) only shows up on the wire. This fake
speaks the wire protocol discord.py 2.7 expects (see /work/shared/notes/discord-protocol.md), so tests
can run the real bot, in-process or as a subprocess, and assert on what Discord would have seen.

In-process::

    async with FakeDiscord(token="test-token") as fake:
        point_discord_py_at(fake.api_base, fake.gateway_url)
        guild = fake.add_guild(name="g", channels=[{"name": "general"}])
        ...
        inter = await fake.invoke_command(guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "x"})
        await inter.wait_for_callback()

Standalone: ``python -m tests.fakes.discord --port N`` (control API under ``/_fake/``).

Where things are: ``model`` (users, guilds, channels, messages, interactions and their payloads), ``rest``
(REST routes and the request middleware), ``messages`` (message storage and Discord's limits),
``interactions`` (dispatching interactions and answering them), ``gateway`` (the websocket), ``control``
(the ``/_fake/`` API), ``fake`` (FakeDiscord, which composes them), ``__main__`` (the standalone server).
"""

from .fake import FakeDiscord, point_discord_py_at
from .model import (
    ADMINISTRATOR,
    DEFAULT_BOT_PERMISSIONS,
    DEFAULT_MEMBER_PERMISSIONS,
    CallbackRecord,
    FakeAttachment,
    FakeChannel,
    FakeClock,
    FakeGuild,
    FakeInteraction,
    FakeMember,
    FakeMessage,
    FakeUser,
    MessageRevision,
    RecordedRequest,
)

__all__ = [
    "ADMINISTRATOR",
    "DEFAULT_BOT_PERMISSIONS",
    "DEFAULT_MEMBER_PERMISSIONS",
    "CallbackRecord",
    "FakeAttachment",
    "FakeChannel",
    "FakeClock",
    "FakeDiscord",
    "FakeGuild",
    "FakeInteraction",
    "FakeMember",
    "FakeMessage",
    "FakeUser",
    "MessageRevision",
    "RecordedRequest",
    "point_discord_py_at",
]
