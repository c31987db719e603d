"""The fake Discord's world: users, guilds, channels, members, messages, interactions, and their payloads.

Why a module of its own: REST, gateway and interaction handlers all read and write the same world; the
objects here hold its state and know how Discord serialises them (the wire shapes discord.py 2.7 parses),
and nothing here speaks HTTP.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

DISCORD_EPOCH_MS = 1420070400000
TOKEN_LIFETIME_S = 15 * 60
DEFAULT_ATTACHMENT_LIMIT = 10 * 1024 * 1024
EPHEMERAL = 1 << 6
LOADING = 1 << 7
SUPPRESS_EMBEDS = 1 << 2
IS_COMPONENTS_V2 = 1 << 15

ADMINISTRATOR = 1 << 3
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
ATTACH_FILES = 1 << 15
# A realistic @everyone member: read, write, react, embed, attach, history, external emoji, commands.
DEFAULT_MEMBER_PERMISSIONS = (
    (1 << 6) | VIEW_CHANNEL | SEND_MESSAGES | (1 << 14) | ATTACH_FILES | (1 << 16) | (1 << 18) | (1 << 31)
)
DEFAULT_BOT_PERMISSIONS = DEFAULT_MEMBER_PERMISSIONS | (1 << 13)  # + manage messages

DM_CHANNEL = 1

OPTION_TYPES = {"sub_command": 1, "sub_command_group": 2, "string": 3, "integer": 4, "boolean": 5}


# --------------------------------------------------------------------------- clock & ids


class FakeClock:
    """Wall clock with an offset, so tests can age tokens without sleeping."""

    def __init__(self, base: Callable[[], float] = time.time) -> None:
        self._base = base
        self.offset = 0.0

    def __call__(self) -> float:
        return self._base() + self.offset

    def advance(self, seconds: float) -> None:
        """Move fake time forward (token expiry, ack deadlines, snowflake timestamps)."""
        self.offset += seconds


class Snowflakes:
    """Timestamp-based ids, so discord.py's created_at / Interaction.expires_at match the fake clock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._inc = itertools.count()
        self._last = 0

    def __call__(self) -> str:
        ms = int(self._clock() * 1000) - DISCORD_EPOCH_MS
        value = (ms << 22) | (1 << 17) | (next(self._inc) & 0xFFF)
        value = max(value, self._last + 1)  # strictly increasing even within one millisecond
        self._last = value
        return str(value)


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def snowflake_time(snowflake: str) -> float:
    return ((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000


def shard_of(guild_id: int | str, shard_count: int) -> int:
    """The shard whose session receives a guild's events (Discord's rule)."""
    return (int(guild_id) >> 22) % shard_count


# --------------------------------------------------------------------------- model


@dataclass
class FakeUser:
    """A Discord user (a human invoking commands, or the bot itself)."""

    id: str
    username: str
    global_name: str | None = None
    bot: bool = False
    # False: the user does not accept DMs from this bot (Discord answers 50007 to a message in their DM).
    accepts_dms: bool = True

    def payload(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "username": self.username,
            "discriminator": "0",
            "global_name": self.global_name,
            "avatar": None,
            "public_flags": 0,
            "flags": 0,
        }
        if self.bot:
            data["bot"] = True
        return data


@dataclass
class FakeChannel:
    """A guild text channel (`nsfw` matters for content policy tests), or a DM (type 1, no guild)."""

    id: str
    guild_id: str  # "" for a DM
    name: str
    nsfw: bool = False
    position: int = 0
    type: int = 0
    recipient: FakeUser | None = None  # a DM's other end

    @property
    def is_dm(self) -> bool:
        return self.type == DM_CHANNEL

    def payload(self, *, with_guild: bool = True) -> dict[str, Any]:
        if self.recipient is not None:
            return {
                "id": self.id,
                "type": self.type,
                "recipients": [self.recipient.payload()],
                "last_message_id": None,
                "flags": 0,
            }
        data: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "name": self.name,
            "position": self.position,
            "nsfw": self.nsfw,
            "permission_overwrites": [],
            "topic": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "parent_id": None,
            "flags": 0,
        }
        if with_guild:
            data["guild_id"] = self.guild_id
        return data


@dataclass
class FakeMember:
    """Guild membership: the user plus the permission bits Discord computes for the channel."""

    user_id: str
    permissions: int
    joined_at: float
    roles: list[str] = field(default_factory=list)
    nick: str | None = None


@dataclass
class FakeGuild:
    """A guild with channels, members and its own upload limit."""

    id: str
    name: str
    owner_id: str
    channels: list[FakeChannel]
    attachment_size_limit: int = DEFAULT_ATTACHMENT_LIMIT
    everyone_permissions: int = DEFAULT_MEMBER_PERMISSIONS
    bot_permissions: int = DEFAULT_BOT_PERMISSIONS
    bot_role_id: str = ""
    locale: str = "en-US"
    features: list[str] = field(default_factory=list)
    members: dict[str, FakeMember] = field(default_factory=dict)
    created_at: float = 0.0
    # False: the bot was invited without the applications.commands scope (guild commands answer 50001).
    applications_commands: bool = True

    def channel(self, channel_id: int | str) -> FakeChannel:
        for ch in self.channels:
            if ch.id == str(channel_id):
                return ch
        raise KeyError(f"guild {self.id} has no channel {channel_id}")

    def summary(self) -> dict[str, Any]:
        """JSON-able view (control API)."""
        return {
            "id": self.id,
            "name": self.name,
            "owner_id": self.owner_id,
            "attachment_size_limit": self.attachment_size_limit,
            "channels": [{"id": c.id, "name": c.name, "nsfw": c.nsfw} for c in self.channels],
            "members": {uid: str(m.permissions) for uid, m in self.members.items()},
        }


@dataclass
class FakeAttachment:
    """An uploaded file, bytes kept so tests can open the image the bot sent."""

    id: str
    filename: str
    content_type: str
    data: bytes
    description: str | None = None

    @property
    def size(self) -> int:
        return len(self.data)

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "filename": self.filename,
            "size": self.size,
            "content_type": self.content_type,
        }


@dataclass
class MessageRevision:
    """One state of a message (creation or an edit), with the fake-clock time it happened."""

    time: float
    content: str
    embeds: list[dict[str, Any]]
    components: list[dict[str, Any]]
    attachments: list[dict[str, Any]]
    flags: int
    kind: str  # "create" | "edit" | "delete"


@dataclass
class FakeMessage:
    """A message as Discord stores it; `history` keeps every revision in order."""

    id: str
    channel_id: str
    guild_id: str | None
    author: dict[str, Any]
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[FakeAttachment] = field(default_factory=list)
    flags: int = 0
    type: int = 0
    created_at: float = 0.0
    edited_at: float | None = None
    allowed_mentions: Any = None
    webhook_id: str | None = None
    interaction_id: str | None = None
    owner_user_id: str | None = None  # who may see an ephemeral message
    message_reference: dict[str, Any] | None = None
    deleted: bool = False
    history: list[MessageRevision] = field(default_factory=list)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def loading(self) -> bool:
        return bool(self.flags & LOADING)

    @property
    def edits(self) -> list[MessageRevision]:
        return [r for r in self.history if r.kind == "edit"]

    def snapshot(self, when: float, kind: str) -> None:
        self.history.append(
            MessageRevision(
                time=when,
                content=self.content,
                embeds=json.loads(json.dumps(self.embeds)),
                components=json.loads(json.dumps(self.components)),
                attachments=[a.summary() for a in self.attachments],
                flags=self.flags,
                kind=kind,
            )
        )

    def payload(self, cdn_base: str) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "content": self.content,
            "channel_id": self.channel_id,
            "author": self.author,
            "attachments": [
                {
                    **a.summary(),
                    "url": f"{cdn_base}/attachments/{self.channel_id}/{a.id}/{a.filename}",
                    "proxy_url": f"{cdn_base}/attachments/{self.channel_id}/{a.id}/{a.filename}",
                    **({"description": a.description} if a.description else {}),
                }
                for a in self.attachments
            ],
            "embeds": self.embeds,
            "components": self.components,
            "flags": self.flags,
            "timestamp": iso(self.created_at),
            "edited_timestamp": iso(self.edited_at) if self.edited_at else None,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "pinned": False,
            "tts": False,
        }
        if self.guild_id:
            data["guild_id"] = self.guild_id
        if self.webhook_id:
            data["webhook_id"] = self.webhook_id
            data["application_id"] = self.webhook_id
        if self.message_reference:
            data["message_reference"] = self.message_reference
        return data

    def summary(self) -> dict[str, Any]:
        """JSON-able view without bytes (control API)."""
        return {
            "id": self.id,
            "channel_id": self.channel_id,
            "content": self.content,
            "embeds": self.embeds,
            "components": self.components,
            "attachments": [a.summary() for a in self.attachments],
            "flags": self.flags,
            "ephemeral": self.ephemeral,
            "deleted": self.deleted,
            "allowed_mentions": self.allowed_mentions,
            "history": [dataclasses.asdict(r) for r in self.history],
        }


@dataclass
class RecordedRequest:
    """One REST request as the fake saw it (for assertions on the wire traffic)."""

    method: str
    path: str  # relative to the API base, e.g. "/users/@me"
    query: dict[str, str]
    time: float
    status: int = 0
    json: Any = None
    files: list[dict[str, Any]] = field(default_factory=list)
    injected: bool = False


@dataclass
class CallbackRecord:
    """The interaction callback (the "ack"): type 4 message, 5 defer, 6/7 update, 8 choices, 9 modal."""

    type: int
    time: float
    monotonic: float
    data: dict[str, Any]
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def flags(self) -> int:
        return int(self.data.get("flags") or 0)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)


class InteractionHost(Protocol):
    """What a FakeInteraction asks of the fake that dispatched it."""

    clock: FakeClock

    def channel_messages(self, channel_id: int | str) -> list[FakeMessage]: ...

    async def wait_for_state(
        self, predicate: Callable[[], Any], timeout: float = 5.0, what: str = "state"
    ) -> Any: ...


class FakeInteraction:
    """An interaction the fake dispatched, and everything the bot did with it."""

    def __init__(self, fake: InteractionHost, payload: dict[str, Any], user_id: str) -> None:
        self._fake = fake
        self.payload = payload
        self.id: str = payload["id"]
        self.token: str = payload["token"]
        self.type: int = payload["type"]
        self.guild_id: str | None = payload.get("guild_id")
        self.channel_id: str = payload["channel_id"]
        self.user_id = user_id
        self.attachment_size_limit: int = payload["attachment_size_limit"]
        self.created_at: float = snowflake_time(self.id)
        self.dispatched_monotonic: float = 0.0
        self.callbacks: list[CallbackRecord] = []
        self.original: FakeMessage | None = None
        self.followups: list[FakeMessage] = []
        self.component_message_id: str | None = (payload.get("message") or {}).get("id")
        self.force_expired = False

    @property
    def callback(self) -> CallbackRecord | None:
        return self.callbacks[0] if self.callbacks else None

    @property
    def acknowledged(self) -> bool:
        return bool(self.callbacks)

    @property
    def ephemeral(self) -> bool:
        return bool(self.callback and self.callback.ephemeral)

    @property
    def ack_latency(self) -> float | None:
        """Seconds (real time) from dispatch to the callback reaching the fake."""
        if not self.callback:
            return None
        return self.callback.monotonic - self.dispatched_monotonic

    @property
    def edits(self) -> list[MessageRevision]:
        return self.original.edits if self.original else []

    @property
    def expires_at(self) -> float:
        return self.created_at + TOKEN_LIFETIME_S

    def expired(self) -> bool:
        return self.force_expired or self._fake.clock() >= self.expires_at

    def messages(self) -> list[FakeMessage]:
        """Original, follow-ups, then channel messages posted since the interaction (in that order)."""
        out: list[FakeMessage] = []
        if self.original:
            out.append(self.original)
        out.extend(self.followups)
        out.extend(
            m
            for m in self._fake.channel_messages(self.channel_id)
            if int(m.id) > int(self.id) and m not in out
        )
        return out

    async def wait_for_callback(self, timeout: float = 5.0) -> CallbackRecord:
        """Resolve once the bot has acknowledged the interaction."""
        await self._fake.wait_for_state(lambda: self.callback, timeout, f"callback for interaction {self.id}")
        assert self.callback is not None
        return self.callback

    async def wait_until(self, predicate: Callable[[FakeMessage], Any], timeout: float = 5.0) -> FakeMessage:
        """Resolve with the first message of this interaction (original/follow-up/channel) matching."""

        def check() -> FakeMessage | None:
            for m in self.messages():
                if predicate(m):
                    return m
            return None

        return await self._fake.wait_for_state(check, timeout, f"message matching predicate ({self.id})")

    def summary(self) -> dict[str, Any]:
        cb = self.callback
        return {
            "id": self.id,
            "token": self.token,
            "type": self.type,
            "created_at": self.created_at,
            "expired": self.expired(),
            "ack_latency": self.ack_latency,
            "callback": None
            if cb is None
            else {
                "type": cb.type,
                "time": cb.time,
                "data": cb.data,
                "flags": cb.flags,
                "ephemeral": cb.ephemeral,
            },
            "callback_count": len(self.callbacks),
            "original": self.original.summary() if self.original else None,
            "followups": [m.summary() for m in self.followups],
        }


def walk_components(components: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for comp in components:
        yield comp
        for key in ("components", "accessory"):
            child = comp.get(key)
            if isinstance(child, list):
                yield from walk_components(child)
            elif isinstance(child, dict):
                yield from walk_components([child])


# --------------------------------------------------------------------------- payloads


def member_payload(guild: FakeGuild, user: FakeUser, permissions: int, *, with_user: bool) -> dict:
    """A guild member as interactions and member chunks carry it."""
    member = guild.members.get(user.id)
    data: dict[str, Any] = {
        "roles": list(member.roles) if member else [],
        "flags": 0,
        "joined_at": iso(member.joined_at if member else guild.created_at),
        "permissions": str(permissions),
        "deaf": False,
        "mute": False,
        "nick": member.nick if member else None,
        "avatar": None,
        "premium_since": None,
        "pending": False,
        "communication_disabled_until": None,
    }
    if with_user:
        data["user"] = user.payload()
    return data


def bot_member_payload(guild: FakeGuild, bot_user: FakeUser) -> dict[str, Any]:
    """The bot's own membership (GUILD_CREATE, GET member)."""
    return {
        "user": bot_user.payload(),
        "roles": [guild.bot_role_id],
        "joined_at": iso(guild.created_at),
        "deaf": False,
        "mute": False,
        "flags": 0,
        "nick": None,
        "avatar": None,
        "pending": False,
        "premium_since": None,
    }


def guild_create_payload(guild: FakeGuild, bot_user: FakeUser) -> dict[str, Any]:
    """GUILD_CREATE as the gateway sends it (GET /guilds/{id} trims it)."""

    def role(rid: str, name: str, perms: int, position: int, managed: bool) -> dict[str, Any]:
        return {
            "id": rid,
            "name": name,
            "permissions": str(perms),
            "position": position,
            "color": 0,
            "hoist": False,
            "managed": managed,
            "mentionable": False,
            "flags": 0,
        }

    return {
        "id": guild.id,
        "name": guild.name,
        "owner_id": guild.owner_id,
        "icon": None,
        "splash": None,
        "preferred_locale": guild.locale,
        "features": list(guild.features),
        "roles": [
            role(guild.id, "@everyone", guild.everyone_permissions, 0, False),
            role(guild.bot_role_id, bot_user.username, guild.bot_permissions, 1, True),
        ],
        "emojis": [],
        "stickers": [],
        "channels": [ch.payload(with_guild=False) for ch in guild.channels],
        "threads": [],
        "members": [bot_member_payload(guild, bot_user)],
        "member_count": len(guild.members) + 1,
        "large": False,
        "unavailable": False,
        "joined_at": iso(guild.created_at),
        "voice_states": [],
        "presences": [],
        "premium_tier": 0,
        "system_channel_id": None,
        "nsfw_level": 0,
        "mfa_level": 0,
        "verification_level": 0,
    }
