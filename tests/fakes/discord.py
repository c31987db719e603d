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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import logging
import mimetypes
import os
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

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

OPTION_TYPES = {"sub_command": 1, "sub_command_group": 2, "string": 3, "integer": 4, "boolean": 5}
_JSON = "application/json"


def point_discord_py_at(api_base: str, gateway_url: str) -> None:
    """Point discord.py's REST base and default gateway at another server (here: the fake)."""
    import discord.gateway
    import discord.http
    import yarl

    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


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


class _Snowflakes:
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


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def _snowflake_time(snowflake: str) -> float:
    return ((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000


# --------------------------------------------------------------------------- model


@dataclass
class FakeUser:
    """A Discord user (a human invoking commands, or the bot itself)."""

    id: str
    username: str
    global_name: str | None = None
    bot: bool = False

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
    """A guild text channel; `nsfw` matters for content policy tests."""

    id: str
    guild_id: str
    name: str
    nsfw: bool = False
    position: int = 0
    type: int = 0

    def payload(self, *, with_guild: bool = True) -> dict[str, Any]:
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

    def channel(self, channel_id: int | str) -> FakeChannel:
        for ch in self.channels:
            if ch.id == str(channel_id):
                return ch
        raise KeyError(f"guild {self.id} has no channel {channel_id}")


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
            "timestamp": _iso(self.created_at),
            "edited_timestamp": _iso(self.edited_at) if self.edited_at else None,
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


class FakeInteraction:
    """An interaction the fake dispatched, and everything the bot did with it."""

    def __init__(self, fake: FakeDiscord, payload: dict[str, Any], user_id: str) -> None:
        self._fake = fake
        self.payload = payload
        self.id: str = payload["id"]
        self.token: str = payload["token"]
        self.type: int = payload["type"]
        self.guild_id: str | None = payload.get("guild_id")
        self.channel_id: str = payload["channel_id"]
        self.user_id = user_id
        self.attachment_size_limit: int = payload["attachment_size_limit"]
        self.created_at: float = _snowflake_time(self.id)
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


class _ApiError(Exception):
    def __init__(self, status: int, message: str, code: int, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.errors = status, message, code, errors

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return body


def _form_error(path: str, code: str, message: str) -> _ApiError:
    """Discord's 50035 "Invalid Form Body" with a nested errors object."""
    node: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(path.split(".")):
        node = {part: node}
    return _ApiError(400, "Invalid Form Body", 50035, node)


@dataclass
class _Upload:
    index: int
    filename: str
    content_type: str
    data: bytes


@dataclass
class _Body:
    json: Any = None
    uploads: list[_Upload] = field(default_factory=list)


_BODY_KEY = web.RequestKey("fake_discord_body", _Body)


@dataclass
class _Injection:
    method: str
    pattern: re.Pattern[str]
    count: int
    status: int
    body: Any
    headers: dict[str, str]

    def matches(self, method: str, path: str) -> bool:
        return self.count > 0 and self.method in ("*", method) and bool(self.pattern.search(path))


@dataclass
class _Session:
    """Resumable gateway session state (survives the socket)."""

    session_id: str
    identify: dict[str, Any]
    seq: int = 0
    events: list[tuple[int, str, Any]] = field(default_factory=list)
    ws: web.WebSocketResponse | None = None
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    heartbeats: list[float] = field(default_factory=list)
    disconnected_at: float | None = None


def _json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Exact `application/json` (no charset): discord.py only parses that as JSON."""
    resp = web.Response(body=json.dumps(data).encode(), status=status, headers=headers)
    resp.content_type = _JSON
    return resp


def _walk_components(components: Iterable[dict[str, Any]]) -> Iterable[dict[str, Any]]:
    for comp in components:
        yield comp
        for key in ("components", "accessory"):
            child = comp.get(key)
            if isinstance(child, list):
                yield from _walk_components(child)
            elif isinstance(child, dict):
                yield from _walk_components([child])


# --------------------------------------------------------------------------- the fake


class FakeDiscord:
    """Fake Discord REST API + gateway. See the module docstring."""

    def __init__(
        self,
        token: str = "test-token",
        app_id: int | str | None = None,
        *,
        heartbeat_interval_ms: int = 41250,
        clock: FakeClock | None = None,
        bot_name: str = "ImagineBot",
        ack_deadline_s: float | None = 3.0,
        rate_limit: tuple[int, float] = (50, 1.0),
        api_version: int = 10,
    ) -> None:
        self.token = token
        self.clock = clock or FakeClock()
        self.snowflake = _Snowflakes(self.clock)
        self.app_id = str(app_id) if app_id is not None else self.snowflake()
        self.bot_user = FakeUser(id=self.app_id, username=bot_name, bot=True)
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.ack_deadline_s = ack_deadline_s
        self.rate_limit = rate_limit
        self.api_version = api_version

        self.guilds: dict[str, FakeGuild] = {}
        self.users: dict[str, FakeUser] = {}
        self.messages: dict[str, FakeMessage] = {}
        self.interactions: dict[str, FakeInteraction] = {}
        self._by_token: dict[str, FakeInteraction] = {}
        self.commands: dict[str | None, dict[str, dict[str, Any]]] = {}
        self.sync_calls: list[tuple[str | None, float]] = []
        self.requests: list[RecordedRequest] = []
        self._injections: list[_Injection] = []
        self._buckets: dict[str, tuple[float, int]] = {}

        self.sessions: dict[str, _Session] = {}
        self._sockets: set[web.WebSocketResponse] = set()
        self._server_close_codes: dict[int, int] = {}
        self.gateway_available = True
        self.identify_count = 0
        self.resume_count = 0
        self.ready_count = 0
        self.refused_connections = 0
        self.close_codes: list[int | None] = []
        self.presence_updates: list[dict[str, Any]] = []

        self._change = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self, port: int = 0, host: str = "127.0.0.1") -> None:
        """Listen on host:port (0 = a free port)."""
        app = web.Application(middlewares=[self._api_middleware], client_max_size=1024**3)
        self._add_routes(app)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._host = host
        self._port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Close gateway sockets (1001 going away), then the HTTP server."""
        await self.disconnect_gateway(code=1001)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}"

    @property
    def api_base(self) -> str:
        return f"{self.base_url}/api/v{self.api_version}"

    @property
    def gateway_url(self) -> str:
        return f"ws://{self._host}:{self._port}/gateway"

    # ------------------------------------------------------------------ state helpers

    def _notify(self) -> None:
        self._change.set()
        self._change = asyncio.Event()

    async def wait_for_state(
        self, predicate: Callable[[], Any], timeout: float = 5.0, what: str = "state"
    ) -> Any:
        """Wait until predicate() is truthy (re-checked on every fake state change); return its value."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
            event = self._change
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, 0.25))

    async def wait_for_ready(self, count: int | None = None, timeout: float = 10.0) -> None:
        """Wait until READY has been sent at least `count` times (default 1): the bot identified."""
        target = 1 if count is None else count
        await self.wait_for_state(lambda: self.ready_count >= target, timeout, f"READY #{target}")

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def add_user(self, user_id: int | str | None = None, *, username: str | None = None) -> FakeUser:
        uid = str(user_id) if user_id is not None else self.snowflake()
        user = self.users.get(uid)
        if user is None:
            user = FakeUser(id=uid, username=username or f"user{len(self.users) + 1}", global_name=username)
            self.users[uid] = user
        return user

    def add_guild(
        self,
        guild_id: int | str | None = None,
        *,
        name: str = "Fake Guild",
        channels: Sequence[dict[str, Any] | str] = ("general",),
        owner_id: int | str | None = None,
        attachment_size_limit: int = DEFAULT_ATTACHMENT_LIMIT,
        everyone_permissions: int = DEFAULT_MEMBER_PERMISSIONS,
        bot_permissions: int = DEFAULT_BOT_PERMISSIONS,
        locale: str = "en-US",
    ) -> FakeGuild:
        """Create a guild; if the bot is connected it receives GUILD_CREATE (like joining a server)."""
        gid = str(guild_id) if guild_id is not None else self.snowflake()
        owner = self.add_user(owner_id, username="owner") if owner_id is not None else self.add_user()
        chans = []
        for pos, spec in enumerate(channels):
            spec = {"name": spec} if isinstance(spec, str) else spec
            chans.append(
                FakeChannel(
                    id=str(spec.get("id") or self.snowflake()),
                    guild_id=gid,
                    name=spec.get("name", f"channel-{pos}"),
                    nsfw=bool(spec.get("nsfw", False)),
                    position=pos,
                )
            )
        guild = FakeGuild(
            id=gid,
            name=name,
            owner_id=owner.id,
            channels=chans,
            attachment_size_limit=attachment_size_limit,
            everyone_permissions=everyone_permissions,
            bot_permissions=bot_permissions,
            bot_role_id=self.snowflake(),
            locale=locale,
            created_at=self.clock(),
        )
        guild.members[owner.id] = FakeMember(owner.id, ADMINISTRATOR | everyone_permissions, self.clock())
        self.guilds[gid] = guild
        if any(s.ws is not None for s in self.sessions.values()):
            self._spawn(self.dispatch("GUILD_CREATE", self._guild_create_payload(guild)))
        return guild

    def add_member(
        self,
        guild_id: int | str,
        user_id: int | str | None = None,
        *,
        permissions: int | None = None,
        **user: Any,
    ) -> FakeUser:
        """Add a member with explicit permission bits (None = the guild's @everyone permissions)."""
        guild = self.guilds[str(guild_id)]
        u = self.add_user(user_id, **user)
        perms = guild.everyone_permissions if permissions is None else permissions
        guild.members[u.id] = FakeMember(u.id, perms, self.clock())
        return u

    def channel(self, channel_id: int | str) -> FakeChannel:
        for g in self.guilds.values():
            for ch in g.channels:
                if ch.id == str(channel_id):
                    return ch
        raise KeyError(f"unknown channel {channel_id}")

    def channel_messages(
        self, channel_id: int | str, *, include_ephemeral: bool = False, include_deleted: bool = False
    ) -> list[FakeMessage]:
        """Messages in a channel, oldest first (ephemeral/deleted ones are hidden like in a client)."""
        return sorted(
            (
                m
                for m in self.messages.values()
                if m.channel_id == str(channel_id)
                and (include_ephemeral or not m.ephemeral)
                and (include_deleted or not m.deleted)
            ),
            key=lambda m: int(m.id),
        )

    def interaction(self, interaction_id_or_token: str | int) -> FakeInteraction:
        key = str(interaction_id_or_token)
        return self.interactions.get(key) or self._by_token[key]

    def expire_token(self, token_or_interaction: str | FakeInteraction) -> None:
        """Make an interaction token dead now (as after 15 minutes)."""
        inter = (
            token_or_interaction
            if isinstance(token_or_interaction, FakeInteraction)
            else self.interaction(token_or_interaction)
        )
        inter.force_expired = True

    @property
    def sync_count(self) -> int:
        return len(self.sync_calls)

    @property
    def last_close_code(self) -> int | None:
        return self.close_codes[-1] if self.close_codes else None

    @property
    def connected_sessions(self) -> list[_Session]:
        return [s for s in self.sessions.values() if s.ws is not None]

    @property
    def heartbeats(self) -> list[float]:
        return [t for s in self.sessions.values() for t in s.heartbeats]

    @staticmethod
    def find_component(message: FakeMessage | dict[str, Any], *, label: str) -> str:
        """custom_id of the component with this label (raises LookupError if absent)."""
        comps = message.components if isinstance(message, FakeMessage) else message.get("components", [])
        for comp in _walk_components(comps):
            if comp.get("label") == label and comp.get("custom_id"):
                return comp["custom_id"]
        raise LookupError(f"no component labelled {label!r}")

    def requests_matching(self, method: str = "*", pattern: str = "") -> list[RecordedRequest]:
        rx = re.compile(pattern)
        return [r for r in self.requests if method in ("*", r.method) and rx.search(r.path)]

    # ------------------------------------------------------------------ injection

    def inject_429(
        self,
        method: str,
        path_pattern: str,
        count: int = 1,
        retry_after: float = 0.3,
        via: bool = True,
        global_: bool = False,
    ) -> None:
        """Answer the next `count` matching requests with 429 (path_pattern: regex searched in the path)."""
        headers = {
            "Retry-After": str(max(1, int(retry_after + 0.999))),
            "X-RateLimit-Limit": str(self.rate_limit[0]),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Scope": "global" if global_ else "user",
        }
        if global_:
            headers["X-RateLimit-Global"] = "true"
        if via:
            headers["Via"] = "1.1 google"
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": global_}
        self._injections.append(
            _Injection(method.upper(), re.compile(path_pattern), count, 429, body, headers)
        )

    def inject_error(
        self,
        method: str,
        path_pattern: str,
        status: int,
        body: Any = None,
        count: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `count` matching requests with status/body (str body = text/plain)."""
        if body is None:
            body = {"message": f"{status}: injected error", "code": 0}
        self._injections.append(
            _Injection(method.upper(), re.compile(path_pattern), count, status, body, headers or {})
        )

    @property
    def pending_injections(self) -> int:
        return sum(i.count for i in self._injections)

    # ------------------------------------------------------------------ gateway control

    async def disconnect_gateway(self, code: int | None = None) -> None:
        """Close every gateway socket (default 4000, resumable) — for reconnect tests."""
        for ws in list(self._sockets):
            await self._close_ws(ws, code or 4000, b"fake disconnect")

    async def _close_ws(self, ws: web.WebSocketResponse, code: int, message: bytes) -> None:
        """Server-initiated close; the code we sent is what `close_codes` records for this socket."""
        self._server_close_codes[id(ws)] = code
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code=code, message=message), 2.0)

    def set_gateway_available(self, available: bool) -> None:
        """False: refuse new gateway upgrades with 503 (an outage); existing sockets are untouched."""
        self.gateway_available = available

    async def dispatch(self, event: str, data: Any) -> None:
        """Send a dispatch to connected sessions; buffer it for the latest one if none is connected."""
        targets = self.connected_sessions
        if not targets:
            if not self.sessions:
                raise RuntimeError(f"cannot dispatch {event}: no gateway session (is the bot connected?)")
            latest = max(self.sessions.values(), key=lambda s: s.disconnected_at or 0)
            targets = [latest]
        for session in targets:
            await self._send_dispatch(session, event, data)

    async def _send_dispatch(self, session: _Session, event: str, data: Any) -> None:
        async with session.send_lock:
            session.seq += 1
            session.events.append((session.seq, event, data))
            del session.events[:-1000]
            if session.ws is not None and not session.ws.closed:
                await session.ws.send_str(json.dumps({"op": 0, "t": event, "s": session.seq, "d": data}))

    # ------------------------------------------------------------------ driving interactions

    def _find_command(self, name: str, guild_id: str | None) -> dict[str, Any]:
        for scope in (guild_id, None):
            cmd = self.commands.get(scope, {}).get(name)
            if cmd is not None and cmd.get("type", 1) == 1:
                return cmd
        raise LookupError(
            f"command /{name} is not synced (guild {guild_id} or global): Discord would not show it"
        )

    def _member_payload(self, guild: FakeGuild, user: FakeUser, permissions: int, *, with_user: bool) -> dict:
        member = guild.members.get(user.id)
        data: dict[str, Any] = {
            "roles": list(member.roles) if member else [],
            "flags": 0,
            "joined_at": _iso(member.joined_at if member else guild.created_at),
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

    def _permissions_for(self, guild: FakeGuild, user_id: str, override: int | None) -> int:
        if override is not None:
            return override
        member = guild.members.get(user_id)
        return member.permissions if member else guild.everyone_permissions

    def _build_options(
        self,
        defs: list[dict[str, Any]],
        values: dict[str, Any] | list[dict[str, Any]],
        guild: FakeGuild,
        resolved: dict[str, dict[str, Any]],
        *,
        focused: str | None = None,
    ) -> list[dict[str, Any]]:
        """Typed options as Discord's client would send them, validated against the synced definition."""
        if isinstance(values, list):
            return values
        by_name = {d["name"]: d for d in defs}
        out: list[dict[str, Any]] = []
        for name, value in values.items():
            d = by_name.get(name)
            if d is None:
                raise ValueError(f"option {name!r} is not in the synced command ({sorted(by_name)})")
            otype = d["type"]
            opt: dict[str, Any] = {"name": name, "type": otype}
            if name == focused:
                opt["value"] = str(value)
                opt["focused"] = True
                out.append(opt)
                continue
            if otype == 3:
                value = str(value)
                if not d.get("min_length", 0) <= len(value) <= d.get("max_length", 6000):
                    raise ValueError(f"option {name!r}: length {len(value)} outside the command's bounds")
            elif otype in (4, 10):
                value = int(value) if otype == 4 else float(value)
                if ("min_value" in d and value < d["min_value"]) or (
                    "max_value" in d and value > d["max_value"]
                ):
                    raise ValueError(f"option {name!r}: {value} outside the command's bounds")
            elif otype == 5:
                value = bool(value)
            elif otype == 6:
                uid = str(value.id if isinstance(value, FakeUser) else value)
                user = self.add_user(uid)
                resolved.setdefault("users", {})[uid] = user.payload()
                if uid in guild.members:
                    resolved.setdefault("members", {})[uid] = self._member_payload(
                        guild, user, self._permissions_for(guild, uid, None), with_user=False
                    )
                value = uid
            elif otype == 7:
                ch = guild.channel(value.id if isinstance(value, FakeChannel) else value)
                resolved.setdefault("channels", {})[ch.id] = {
                    **ch.payload(),
                    "permissions": str(ADMINISTRATOR),
                }
                value = ch.id
            if d.get("choices") and value not in [c["value"] for c in d["choices"]]:
                raise ValueError(f"option {name!r}: {value!r} is not one of the command's choices")
            opt["value"] = value
            out.append(opt)
        if focused is None:
            missing = [d["name"] for d in defs if d.get("required") and d["name"] not in values]
            if missing:
                raise ValueError(f"required options missing: {missing}")
        return out

    def _command_data(
        self,
        guild: FakeGuild,
        name: str,
        options: dict[str, Any] | list[dict[str, Any]] | None,
        subcommand: str | None,
        focused: str | None = None,
    ) -> dict[str, Any]:
        cmd = self._find_command(name, guild.id)
        resolved: dict[str, dict[str, Any]] = {}
        defs = cmd.get("options", [])
        path = subcommand.split() if subcommand else []
        if not path and any(o["type"] in (1, 2) for o in defs):
            raise ValueError(f"/{name} has subcommands: pass subcommand=")
        chain: list[dict[str, Any]] = []
        for part in path:
            sub = next((o for o in defs if o["name"] == part and o["type"] in (1, 2)), None)
            if sub is None:
                raise ValueError(f"/{name} has no subcommand {part!r}")
            chain.append(sub)
            defs = sub.get("options", [])
        leaf_opts = self._build_options(defs, options or {}, guild, resolved, focused=focused)
        for sub in reversed(chain):
            leaf_opts = [{"name": sub["name"], "type": sub["type"], "options": leaf_opts}]
        data: dict[str, Any] = {"id": cmd["id"], "name": name, "type": 1, "options": leaf_opts}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        if resolved:
            data["resolved"] = resolved
        return data

    def _interaction_payload(
        self,
        itype: int,
        guild: FakeGuild,
        channel: FakeChannel,
        user: FakeUser,
        permissions: int,
        data: dict[str, Any],
        attachment_size_limit: int | None,
        locale: str,
    ) -> dict[str, Any]:
        app_perms = ADMINISTRATOR if guild.bot_permissions & ADMINISTRATOR else guild.bot_permissions
        return {
            "id": self.snowflake(),
            "application_id": self.app_id,
            "type": itype,
            "token": "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48),
            "version": 1,
            "attachment_size_limit": attachment_size_limit or guild.attachment_size_limit,
            "guild_id": guild.id,
            "guild": {"id": guild.id, "locale": guild.locale, "features": list(guild.features)},
            "guild_locale": guild.locale,
            "locale": locale,
            "channel_id": channel.id,
            "channel": {**channel.payload(), "permissions": str(permissions)},
            "app_permissions": str(app_perms),
            "entitlements": [],
            "entitlement_sku_ids": [],
            "authorizing_integration_owners": {"0": guild.id},
            "context": 0,
            "member": self._member_payload(guild, user, permissions, with_user=True),
            "data": data,
        }

    async def _send_interaction(self, payload: dict[str, Any], user_id: str) -> FakeInteraction:
        inter = FakeInteraction(self, payload, user_id)
        self.interactions[inter.id] = inter
        self._by_token[inter.token] = inter
        inter.dispatched_monotonic = time.monotonic()
        await self.dispatch("INTERACTION_CREATE", payload)
        self._notify()
        return inter

    async def invoke_command(
        self,
        guild_id: int | str,
        channel_id: int | str,
        user_id: int | str,
        name: str,
        options: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        subcommand: str | None = None,
        permissions: int | None = None,
        attachment_size_limit: int | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Dispatch a slash command (type 2) exactly as Discord would for a synced command."""
        guild = self.guilds[str(guild_id)]
        channel = guild.channel(channel_id)
        user = self.add_user(user_id)
        perms = self._permissions_for(guild, user.id, permissions)
        data = self._command_data(guild, name, options, subcommand)
        payload = self._interaction_payload(
            2, guild, channel, user, perms, data, attachment_size_limit, locale
        )
        return await self._send_interaction(payload, user.id)

    async def autocomplete(
        self,
        guild_id: int | str,
        channel_id: int | str,
        user_id: int | str,
        name: str,
        options: dict[str, Any],
        focused: str,
        *,
        subcommand: str | None = None,
        permissions: int | None = None,
    ) -> FakeInteraction:
        """Dispatch an autocomplete (type 4); the answer is callback type 8 with data.choices."""
        guild = self.guilds[str(guild_id)]
        channel = guild.channel(channel_id)
        user = self.add_user(user_id)
        perms = self._permissions_for(guild, user.id, permissions)
        data = self._command_data(guild, name, options, subcommand, focused=focused)
        payload = self._interaction_payload(4, guild, channel, user, perms, data, None, "en-US")
        return await self._send_interaction(payload, user.id)

    async def click_button(
        self,
        message_or_id: FakeMessage | str | int,
        custom_id: str,
        user_id: int | str,
        *,
        permissions: int | None = None,
        attachment_size_limit: int | None = None,
    ) -> FakeInteraction:
        """Click a button that is really on the message (disabled/absent buttons are refused)."""
        return await self._component_interaction(
            message_or_id, custom_id, user_id, 2, None, permissions, attachment_size_limit
        )

    async def select(
        self,
        message_or_id: FakeMessage | str | int,
        custom_id: str,
        values: list[str],
        user_id: int | str,
        *,
        permissions: int | None = None,
    ) -> FakeInteraction:
        """Pick values in a string select menu on the message."""
        return await self._component_interaction(
            message_or_id, custom_id, user_id, 3, values, permissions, None
        )

    async def _component_interaction(
        self,
        message_or_id: FakeMessage | str | int,
        custom_id: str,
        user_id: int | str,
        component_type: int,
        values: list[str] | None,
        permissions: int | None,
        attachment_size_limit: int | None,
    ) -> FakeInteraction:
        msg = message_or_id if isinstance(message_or_id, FakeMessage) else self.messages[str(message_or_id)]
        if msg.deleted:
            raise ValueError(f"message {msg.id} was deleted")
        comp = next((c for c in _walk_components(msg.components) if c.get("custom_id") == custom_id), None)
        if comp is None or comp.get("type") != component_type:
            raise ValueError(f"message {msg.id} has no component type {component_type} with id {custom_id!r}")
        if comp.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled")
        uid = str(user_id)
        if msg.ephemeral and msg.owner_user_id and msg.owner_user_id != uid:
            raise ValueError("only the recipient can see (and click) an ephemeral message")
        channel = self.channel(msg.channel_id)
        guild = self.guilds[channel.guild_id]
        user = self.add_user(uid)
        perms = self._permissions_for(guild, uid, permissions)
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component_type}
        if values is not None:
            data["values"] = values
        payload = self._interaction_payload(
            3, guild, channel, user, perms, data, attachment_size_limit, "en-US"
        )
        payload["message"] = msg.payload(self.base_url)
        return await self._send_interaction(payload, uid)

    # ------------------------------------------------------------------ HTTP plumbing

    def _add_routes(self, app: web.Application) -> None:
        api = "/api/v{version:\\d+}"
        r = app.router
        r.add_get("/gateway", self._gateway_handler)
        r.add_get(f"{api}/gateway", self._h_gateway)
        r.add_get(f"{api}/gateway/bot", self._h_gateway)
        r.add_get(f"{api}/users/@me", self._h_me)
        r.add_get(f"{api}/oauth2/applications/@me", self._h_app)
        r.add_get(f"{api}/applications/@me", self._h_app)
        for scope in ("", "/guilds/{guild_id}"):
            r.add_put(f"{api}/applications/{{app_id}}{scope}/commands", self._h_put_commands)
            r.add_get(f"{api}/applications/{{app_id}}{scope}/commands", self._h_get_commands)
        r.add_post(f"{api}/interactions/{{interaction_id}}/{{token}}/callback", self._h_callback)
        wh = f"{api}/webhooks/{{webhook_id}}/{{token}}"
        r.add_post(wh, self._h_followup)
        r.add_get(f"{wh}/messages/{{message_id}}", self._h_webhook_message)
        r.add_patch(f"{wh}/messages/{{message_id}}", self._h_webhook_message)
        r.add_delete(f"{wh}/messages/{{message_id}}", self._h_webhook_message)
        r.add_get(f"{api}/channels/{{channel_id}}", self._h_get_channel)
        r.add_post(f"{api}/channels/{{channel_id}}/messages", self._h_channel_post)
        r.add_post(f"{api}/channels/{{channel_id}}/typing", self._h_typing)
        for method in ("GET", "PATCH", "DELETE"):
            r.add_route(
                method, f"{api}/channels/{{channel_id}}/messages/{{message_id}}", self._h_channel_message
            )
        r.add_get(f"{api}/guilds/{{guild_id}}", self._h_get_guild)
        r.add_get(f"{api}/guilds/{{guild_id}}/members/{{user_id}}", self._h_get_member)
        r.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._h_cdn)
        self._add_control_routes(app)

    @web.middleware
    async def _api_middleware(self, request: web.Request, handler: Callable[..., Awaitable[Any]]) -> Any:
        if not request.path.startswith("/api/"):
            return await handler(request)
        rel = re.sub(r"^/api/v\d+", "", request.path) or "/"
        record = RecordedRequest(request.method, rel, dict(request.query), self.clock())
        self.requests.append(record)
        try:
            body = await self._read_body(request)
            request[_BODY_KEY] = body
            record.json = body.json
            record.files = [
                {
                    "index": u.index,
                    "filename": u.filename,
                    "size": len(u.data),
                    "content_type": u.content_type,
                }
                for u in body.uploads
            ]
            injection = next((i for i in self._injections if i.matches(request.method, rel)), None)
            if injection is not None:
                injection.count -= 1
                record.injected = True
                if isinstance(injection.body, str):
                    resp = web.Response(
                        text=injection.body, status=injection.status, headers=injection.headers
                    )
                else:
                    resp = _json_response(injection.body, injection.status, injection.headers)
            else:
                self._check_auth(request, rel)
                resp = await handler(request)
        except _ApiError as e:
            resp = _json_response(e.body(), e.status)
        except web.HTTPException as e:
            resp = _json_response({"message": f"{e.status}: {e.reason}", "code": 0}, e.status)
        if not record.injected:
            resp.headers.update(self._ratelimit_headers(request))
        record.status = resp.status
        self._notify()
        return resp

    def _check_auth(self, request: web.Request, rel: str) -> None:
        if rel.startswith(("/webhooks/", "/interactions/")):
            return  # interaction webhooks authenticate by token in the path
        if request.headers.get("Authorization") != f"Bot {self.token}":
            raise _ApiError(401, "401: Unauthorized", 0)

    async def _read_body(self, request: web.Request) -> _Body:
        if not request.body_exists:
            return _Body()
        if request.content_type == "multipart/form-data":
            body = _Body()
            reader = await request.multipart()
            next_index = 0
            while True:
                part = await reader.next()
                if part is None:
                    break
                data = await part.read()  # type: ignore[union-attr]
                name = part.name or ""
                if name == "payload_json":
                    body.json = json.loads(data)
                    continue
                m = re.fullmatch(r"files\[(\d+)\]", name)
                index = int(m.group(1)) if m else next_index
                next_index = max(next_index, index + 1)
                filename = part.filename or f"file{index}"
                ctype = mimetypes.guess_type(filename)[0] or part.headers.get("Content-Type", "")
                body.uploads.append(
                    _Upload(index, filename, ctype or "application/octet-stream", bytes(data))
                )
            return body
        raw = await request.read()
        if not raw:
            return _Body()
        try:
            return _Body(json=json.loads(raw))
        except ValueError:
            raise _ApiError(400, "400: Bad Request (body is not JSON)", 50109) from None

    def _ratelimit_headers(self, request: web.Request) -> dict[str, str]:
        route = request.match_info.route.resource
        template = route.canonical if route is not None else request.path
        bucket = hashlib.sha1(f"{request.method} {template}".encode()).hexdigest()[:16]
        major = ":".join(
            request.match_info.get(k, "") for k in ("channel_id", "guild_id", "webhook_id", "token")
        )
        key = f"{bucket}:{major}"
        limit, window = self.rate_limit
        now = time.monotonic()
        reset_at, used = self._buckets.get(key, (now + window, 0))
        if now >= reset_at:
            reset_at, used = now + window, 0
        used += 1
        self._buckets[key] = (reset_at, used)
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(limit - used, 0)),
            "X-RateLimit-Reset": f"{time.time() + (reset_at - now):.3f}",
            "X-RateLimit-Reset-After": f"{reset_at - now:.3f}",
            "X-RateLimit-Bucket": bucket,
        }

    # ------------------------------------------------------------------ REST handlers: identity

    async def _h_gateway(self, request: web.Request) -> web.Response:
        data: dict[str, Any] = {"url": self.gateway_url}
        if request.path.endswith("/bot"):
            data |= {
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 86400000,
                    "max_concurrency": 1,
                },
            }
        return _json_response(data)

    async def _h_me(self, request: web.Request) -> web.Response:
        return _json_response({**self.bot_user.payload(), "verified": True, "mfa_enabled": False})

    async def _h_app(self, request: web.Request) -> web.Response:
        owner = {"id": self.snowflake(), "username": "owner", "discriminator": "0", "avatar": None}
        return _json_response(
            {
                "id": self.app_id,
                "name": self.bot_user.username,
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": owner,
                "verify_key": "0" * 64,
                "flags": 0,
                "team": None,
                "bot": self.bot_user.payload(),
            }
        )

    async def _h_put_commands(self, request: web.Request) -> web.Response:
        if request.match_info["app_id"] != self.app_id:
            raise _ApiError(403, "Missing Access", 50001)
        scope = request.match_info.get("guild_id")
        if scope is not None and scope not in self.guilds:
            raise _ApiError(403, "Missing Access", 50001)
        body = request[_BODY_KEY].json
        if not isinstance(body, list):
            raise _form_error("_root", "LIST_TYPE_CONVERT", "Must be a list.")
        if len([c for c in body if c.get("type", 1) == 1]) > 100:
            raise _form_error("_root", "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
        old = self.commands.get(scope, {})
        stored: dict[str, dict[str, Any]] = {}
        for cmd in body:
            if not re.fullmatch(r"[-_\w]{1,32}", cmd.get("name", "")) or cmd["name"] != cmd["name"].lower():
                raise _form_error("0.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
            if cmd.get("type", 1) == 1 and not 1 <= len(cmd.get("description", "")) <= 100:
                raise _form_error(
                    "0.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                )
            prev = old.get(cmd["name"])
            entry = {
                "default_member_permissions": None,
                "dm_permission": True,
                "nsfw": False,
                "options": [],
                "type": 1,
                **cmd,
                "id": prev["id"] if prev else self.snowflake(),
                "application_id": self.app_id,
                "version": self.snowflake(),
            }
            if scope is not None:
                entry["guild_id"] = scope
            stored[cmd["name"]] = entry
        self.commands[scope] = stored
        self.sync_calls.append((scope, self.clock()))
        return _json_response(list(stored.values()))

    async def _h_get_commands(self, request: web.Request) -> web.Response:
        return _json_response(list(self.commands.get(request.match_info.get("guild_id"), {}).values()))

    async def _h_get_channel(self, request: web.Request) -> web.Response:
        ch = self._channel_or_404(request.match_info["channel_id"])
        return _json_response(ch.payload())

    async def _h_get_guild(self, request: web.Request) -> web.Response:
        guild = self.guilds.get(request.match_info["guild_id"])
        if guild is None:
            raise _ApiError(404, "Unknown Guild", 10004)
        payload = self._guild_create_payload(guild)
        for key in ("channels", "members", "member_count", "unavailable", "joined_at", "large"):
            payload.pop(key, None)
        return _json_response(payload)

    async def _h_get_member(self, request: web.Request) -> web.Response:
        guild = self.guilds.get(request.match_info["guild_id"])
        if guild is None:
            raise _ApiError(404, "Unknown Guild", 10004)
        uid = request.match_info["user_id"]
        if uid == self.app_id:
            return _json_response(self._bot_member_payload(guild))
        if uid not in guild.members:
            raise _ApiError(404, "Unknown Member", 10007)
        return _json_response(
            self._member_payload(guild, self.users[uid], guild.members[uid].permissions, with_user=True)
        )

    async def _h_typing(self, request: web.Request) -> web.Response:
        self._channel_or_404(request.match_info["channel_id"])
        return web.Response(status=204)

    async def _h_cdn(self, request: web.Request) -> web.Response:
        aid = request.match_info["attachment_id"]
        for m in self.messages.values():
            for a in m.attachments:
                if a.id == aid:
                    return web.Response(body=a.data, content_type=a.content_type)
        raise web.HTTPNotFound()

    # ------------------------------------------------------------------ messages

    def _channel_or_404(self, channel_id: str) -> FakeChannel:
        try:
            return self.channel(channel_id)
        except KeyError:
            raise _ApiError(404, "Unknown Channel", 10003) from None

    def _validate(
        self, payload: dict[str, Any], uploads: list[_Upload], limit: int, *, creating: bool
    ) -> None:
        """Discord's checks: upload size (413/40005) first, then form-body limits (400/50035)."""
        for up in uploads:
            if len(up.data) > limit:
                raise _ApiError(413, "Request entity too large", 40005)
        if len(uploads) > 10:
            raise _form_error("files", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        content = payload.get("content")
        if content is not None and len(str(content)) > 2000:
            raise _form_error("content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
        embeds = payload.get("embeds") or []
        if len(embeds) > 10:
            raise _form_error("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        total = sum(
            len(e.get("title") or "")
            + len(e.get("description") or "")
            + len((e.get("footer") or {}).get("text") or "")
            + len((e.get("author") or {}).get("name") or "")
            + sum(len(f.get("name", "")) + len(f.get("value", "")) for f in e.get("fields") or [])
            for e in embeds
        )
        if total > 6000:
            raise _form_error("embeds", "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
        components = payload.get("components") or []
        if not int(payload.get("flags") or 0) & IS_COMPONENTS_V2:
            if len(components) > 5:
                raise _form_error("components", "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
            for i, row in enumerate(components):
                if row.get("type") != 1 or not 1 <= len(row.get("components", [])) <= 5:
                    raise _form_error(
                        f"components.{i}", "COMPONENT_LAYOUT_WIDTH_EXCEEDED", "Invalid action row"
                    )
        seen: set[str] = set()
        for comp in _walk_components(components):
            cid = comp.get("custom_id")
            if cid is None:
                continue
            if not 1 <= len(cid) <= 100:
                raise _form_error("components", "BASE_TYPE_BAD_LENGTH", "custom_id must be 1-100 in length.")
            if cid in seen:
                raise _form_error(
                    "components", "COMPONENT_CUSTOM_ID_DUPLICATED", "Component custom id duplicated"
                )
            seen.add(cid)
        if creating and not (content or embeds or uploads or components or payload.get("sticker_ids")):
            raise _ApiError(400, "Cannot send an empty message", 50006)

    def _apply_attachments(
        self, existing: list[FakeAttachment], spec: list[dict[str, Any]] | None, uploads: list[_Upload]
    ) -> list[FakeAttachment]:
        """Discord's `attachments` semantics: listed ids of existing ones are kept, index ids are new files."""
        by_index = {u.index: u for u in uploads}
        used: set[int] = set()
        out: list[FakeAttachment] = []
        if spec is None:
            out.extend(existing)
        else:
            old = {a.id: a for a in existing}
            for i, item in enumerate(spec):
                sid = str(item.get("id"))
                if sid in old:
                    out.append(old[sid])
                    continue
                try:
                    up = by_index[int(sid)]
                except (KeyError, ValueError):
                    raise _form_error(
                        f"attachments.{i}.id", "ATTACHMENT_NOT_FOUND", f"Unknown attachment {sid}"
                    ) from None
                used.add(up.index)
                out.append(
                    FakeAttachment(
                        self.snowflake(),
                        item.get("filename") or up.filename,
                        up.content_type,
                        up.data,
                        item.get("description"),
                    )
                )
        for up in uploads:
            if up.index not in used:
                out.append(FakeAttachment(self.snowflake(), up.filename, up.content_type, up.data))
        return out

    def _create_message(
        self,
        channel: FakeChannel,
        payload: dict[str, Any],
        uploads: list[_Upload],
        *,
        mtype: int = 0,
        flags: int = 0,
        inter: FakeInteraction | None = None,
    ) -> FakeMessage:
        now = self.clock()
        msg = FakeMessage(
            id=self.snowflake(),
            channel_id=channel.id,
            guild_id=channel.guild_id,
            author=self.bot_user.payload(),
            content=str(payload.get("content") or ""),
            embeds=list(payload.get("embeds") or []),
            components=list(payload.get("components") or []),
            attachments=self._apply_attachments([], payload.get("attachments"), uploads),
            flags=flags,
            type=mtype,
            created_at=now,
            allowed_mentions=payload.get("allowed_mentions"),
            webhook_id=self.app_id if inter else None,
            interaction_id=inter.id if inter else None,
            owner_user_id=inter.user_id if inter else None,
            message_reference=payload.get("message_reference"),
        )
        msg.snapshot(now, "create")
        self.messages[msg.id] = msg
        return msg

    def _edit_message(self, msg: FakeMessage, payload: dict[str, Any], uploads: list[_Upload]) -> None:
        if msg.deleted:
            raise _ApiError(404, "Unknown Message", 10008)
        if "content" in payload:
            msg.content = str(payload["content"] or "")
        if "embeds" in payload:
            msg.embeds = list(payload["embeds"] or [])
        if "components" in payload:
            msg.components = list(payload["components"] or [])
        if "allowed_mentions" in payload:
            msg.allowed_mentions = payload["allowed_mentions"]
        if "flags" in payload and payload["flags"] is not None:
            editable = SUPPRESS_EMBEDS | IS_COMPONENTS_V2
            msg.flags = (msg.flags & ~editable) | (int(payload["flags"]) & editable)
        if "attachments" in payload or uploads:
            msg.attachments = self._apply_attachments(msg.attachments, payload.get("attachments"), uploads)
        msg.flags &= ~LOADING
        msg.edited_at = self.clock()
        msg.snapshot(msg.edited_at, "edit")

    def _delete_message(self, msg: FakeMessage) -> None:
        msg.deleted = True
        msg.snapshot(self.clock(), "delete")

    async def _h_channel_post(self, request: web.Request) -> web.Response:
        channel = self._channel_or_404(request.match_info["channel_id"])
        guild = self.guilds[channel.guild_id]
        body: _Body = request[_BODY_KEY]
        payload = body.json or {}
        perms = guild.bot_permissions
        if not perms & ADMINISTRATOR and (perms & (VIEW_CHANNEL | SEND_MESSAGES)) != (
            VIEW_CHANNEL | SEND_MESSAGES
        ):
            raise _ApiError(403, "Missing Permissions", 50013)
        if body.uploads and not perms & (ATTACH_FILES | ADMINISTRATOR):
            raise _ApiError(403, "Missing Permissions", 50013)
        self._validate(payload, body.uploads, guild.attachment_size_limit, creating=True)
        flags = int(payload.get("flags") or 0) & (SUPPRESS_EMBEDS | IS_COMPONENTS_V2 | (1 << 12))
        mtype = 19 if payload.get("message_reference") else 0
        msg = self._create_message(channel, payload, body.uploads, mtype=mtype, flags=flags)
        return _json_response(msg.payload(self.base_url))

    async def _h_channel_message(self, request: web.Request) -> web.Response:
        channel = self._channel_or_404(request.match_info["channel_id"])
        msg = self.messages.get(request.match_info["message_id"])
        if msg is None or msg.deleted or msg.channel_id != channel.id or msg.ephemeral:
            raise _ApiError(404, "Unknown Message", 10008)
        if request.method == "GET":
            return _json_response(msg.payload(self.base_url))
        if request.method == "DELETE":
            self._delete_message(msg)
            return web.Response(status=204)
        if msg.author["id"] != self.app_id:
            raise _ApiError(403, "Cannot edit a message authored by another user", 50005)
        body: _Body = request[_BODY_KEY]
        payload = body.json or {}
        self._validate(
            payload, body.uploads, self.guilds[channel.guild_id].attachment_size_limit, creating=False
        )
        self._edit_message(msg, payload, body.uploads)
        return _json_response(msg.payload(self.base_url))

    # ------------------------------------------------------------------ interactions REST

    def _inter_by_webhook(self, request: web.Request) -> FakeInteraction:
        token = request.match_info["token"]
        inter = self._by_token.get(token)
        if request.match_info["webhook_id"] != self.app_id:
            raise _ApiError(404, "Unknown Webhook", 10015)
        if inter is None or inter.expired():
            raise _ApiError(401, "Invalid Webhook Token", 50027)
        return inter

    async def _h_callback(self, request: web.Request) -> web.Response:
        inter = self.interactions.get(request.match_info["interaction_id"])
        if inter is None or request.match_info["token"] != inter.token:
            raise _ApiError(404, "Unknown interaction", 10062)
        if inter.callbacks:
            raise _ApiError(400, "Interaction has already been acknowledged.", 40060)
        if inter.expired() or (
            self.ack_deadline_s is not None and self.clock() - inter.created_at > self.ack_deadline_s
        ):
            raise _ApiError(404, "Unknown interaction", 10062)
        body: _Body = request[_BODY_KEY]
        cb = body.json or {}
        ctype = cb.get("type")
        data = cb.get("data") or {}
        allowed = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 4: {8}, 5: {4, 5, 6, 7}}.get(inter.type, set())
        if ctype not in allowed:
            raise _form_error("type", "INTERACTION_RESPONSE_TYPE_INVALID", f"Invalid response type {ctype}")
        message: FakeMessage | None = None
        channel = self.channel(inter.channel_id)
        if ctype == 4:
            self._validate(data, body.uploads, inter.attachment_size_limit, creating=True)
            flags = int(data.get("flags") or 0) & (EPHEMERAL | SUPPRESS_EMBEDS | IS_COMPONENTS_V2 | (1 << 12))
            message = self._create_message(
                channel, data, body.uploads, mtype=20 if inter.type == 2 else 19, flags=flags, inter=inter
            )
        elif ctype == 5:
            flags = (int(data.get("flags") or 0) & EPHEMERAL) | LOADING
            message = self._create_message(
                channel, {}, [], mtype=20 if inter.type == 2 else 19, flags=flags, inter=inter
            )
        elif ctype in (6, 7):
            if inter.component_message_id not in self.messages:
                raise _form_error("type", "INTERACTION_RESPONSE_TYPE_INVALID", "No message to update")
            message = self.messages[inter.component_message_id]
            if ctype == 7:
                self._validate(data, body.uploads, inter.attachment_size_limit, creating=False)
                self._edit_message(message, data, body.uploads)
        elif ctype == 8:
            if len(data.get("choices") or []) > 25:
                raise _form_error("data.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        elif ctype == 9 and not (data.get("custom_id") and data.get("title") and data.get("components")):
            raise _form_error("data", "BASE_TYPE_REQUIRED", "A modal needs custom_id, title and components.")
        now = self.clock()
        inter.callbacks.append(
            CallbackRecord(
                type=ctype,
                time=now,
                monotonic=time.monotonic(),
                data=data,
                files=[{"filename": u.filename, "size": len(u.data)} for u in body.uploads],
            )
        )
        inter.original = message
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        resource: dict[str, Any] = {"type": ctype}
        if message is not None and ctype in (4, 5, 7):
            resource["message"] = message.payload(self.base_url)
        return _json_response(
            {
                "interaction": {
                    "id": inter.id,
                    "type": inter.type,
                    "response_message_id": message.id if message else None,
                    "response_message_loading": bool(message and message.loading),
                    "response_message_ephemeral": bool(message and message.ephemeral),
                },
                "resource": resource,
            }
        )

    async def _h_followup(self, request: web.Request) -> web.Response:
        inter = self._inter_by_webhook(request)
        if not inter.acknowledged:
            raise _ApiError(404, "Unknown Webhook", 10015)
        body: _Body = request[_BODY_KEY]
        payload = body.json or {}
        self._validate(payload, body.uploads, inter.attachment_size_limit, creating=True)
        flags = int(payload.get("flags") or 0) & (EPHEMERAL | SUPPRESS_EMBEDS | IS_COMPONENTS_V2)
        msg = self._create_message(
            self.channel(inter.channel_id), payload, body.uploads, flags=flags, inter=inter
        )
        inter.followups.append(msg)
        if request.query.get("wait") not in ("1", "true", "True"):
            return web.Response(status=204)
        return _json_response(msg.payload(self.base_url))

    async def _h_webhook_message(self, request: web.Request) -> web.Response:
        inter = self._inter_by_webhook(request)
        mid = request.match_info["message_id"]
        if mid == "@original":
            msg = inter.original
        else:
            msg = next((m for m in [inter.original, *inter.followups] if m is not None and m.id == mid), None)
        if msg is None or msg.deleted:
            raise _ApiError(404, "Unknown Message", 10008)
        if request.method == "GET":
            return _json_response(msg.payload(self.base_url))
        if request.method == "DELETE":
            self._delete_message(msg)
            return web.Response(status=204)
        body: _Body = request[_BODY_KEY]
        self._validate(body.json or {}, body.uploads, inter.attachment_size_limit, creating=False)
        self._edit_message(msg, body.json or {}, body.uploads)
        return _json_response(msg.payload(self.base_url))

    # ------------------------------------------------------------------ gateway

    def _bot_member_payload(self, guild: FakeGuild) -> dict[str, Any]:
        return {
            "user": self.bot_user.payload(),
            "roles": [guild.bot_role_id],
            "joined_at": _iso(guild.created_at),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "nick": None,
            "avatar": None,
            "pending": False,
            "premium_since": None,
        }

    def _guild_create_payload(self, guild: FakeGuild) -> dict[str, Any]:
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
                role(guild.bot_role_id, self.bot_user.username, guild.bot_permissions, 1, True),
            ],
            "emojis": [],
            "stickers": [],
            "channels": [ch.payload(with_guild=False) for ch in guild.channels],
            "threads": [],
            "members": [self._bot_member_payload(guild)],
            "member_count": len(guild.members) + 1,
            "large": False,
            "unavailable": False,
            "joined_at": _iso(guild.created_at),
            "voice_states": [],
            "presences": [],
            "premium_tier": 0,
            "system_channel_id": None,
            "nsfw_level": 0,
            "mfa_level": 0,
            "verification_level": 0,
        }

    async def _gateway_handler(self, request: web.Request) -> web.StreamResponse:
        if not self.gateway_available:
            self.refused_connections += 1
            self._notify()
            return _json_response({"message": "Service Unavailable", "code": 0}, 503)
        ws = web.WebSocketResponse(max_msg_size=0, compress=False, timeout=2.0)
        await ws.prepare(request)
        self._sockets.add(ws)
        session: _Session | None = None
        try:
            await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_interval_ms}}))
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                try:
                    frame = json.loads(msg.data)
                    op = frame["op"]
                except (ValueError, KeyError, TypeError):
                    await self._close_ws(ws, 4002, b"Error while decoding payload.")
                    break
                session = await self._on_gateway_op(ws, session, op, frame.get("d"))
                self._notify()
        finally:
            self._sockets.discard(ws)
            if session is not None and session.ws is ws:
                session.ws = None
                session.disconnected_at = time.monotonic()
            self.close_codes.append(self._server_close_codes.pop(id(ws), None) or ws.close_code)
            self._notify()
        return ws

    async def _on_gateway_op(
        self, ws: web.WebSocketResponse, session: _Session | None, op: int, d: Any
    ) -> _Session | None:
        if op == 1:  # heartbeat
            if session is not None:
                session.heartbeats.append(self.clock())
            await ws.send_str(json.dumps({"op": 11}))
            return session
        if op == 2:  # identify
            if session is not None:
                await self._close_ws(ws, 4005, b"Already authenticated.")
                return session
            if not isinstance(d, dict) or d.get("token") != self.token:
                await self._close_ws(ws, 4004, b"Authentication failed.")
                return None
            self.identify_count += 1
            session = _Session(session_id=secrets.token_hex(16), identify=d, ws=ws)
            self.sessions[session.session_id] = session
            shard = d.get("shard")
            ready: dict[str, Any] = {
                "v": self.api_version,
                "user": {**self.bot_user.payload(), "verified": True, "mfa_enabled": False},
                "guilds": [{"id": gid, "unavailable": True} for gid in self.guilds],
                "session_id": session.session_id,
                "session_type": "normal",
                "resume_gateway_url": self.gateway_url,
                "application": {"id": self.app_id, "flags": 0},
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "guild_join_requests": [],
                "geo_ordered_rtc_regions": [],
                "user_settings": {},
            }
            if shard:
                ready["shard"] = shard
            await self._send_dispatch(session, "READY", ready)
            self.ready_count += 1
            for guild in list(self.guilds.values()):
                await self._send_dispatch(session, "GUILD_CREATE", self._guild_create_payload(guild))
            return session
        if op == 6:  # resume
            old = self.sessions.get((d or {}).get("session_id", ""))
            if session is not None:
                await self._close_ws(ws, 4005, b"Already authenticated.")
                return session
            if (d or {}).get("token") != self.token:
                await self._close_ws(ws, 4004, b"Authentication failed.")
                return None
            if old is None or old.ws is not None:
                await ws.send_str(json.dumps({"op": 9, "d": False}))
                return None
            self.resume_count += 1
            old.ws = ws
            async with old.send_lock:
                seq = int(d.get("seq") or 0)
                for s, event, data in old.events:
                    if s > seq:
                        await ws.send_str(json.dumps({"op": 0, "t": event, "s": s, "d": data}))
            await self._send_dispatch(old, "RESUMED", {})
            return old
        if session is None:
            if op in (3, 4, 8):
                await self._close_ws(ws, 4003, b"Not authenticated.")
                return None
            await self._close_ws(ws, 4001, b"Unknown opcode.")
            return None
        if op == 3:
            self.presence_updates.append(d)
            return session
        if op == 4:  # voice state: accepted, ignored
            return session
        if op == 8:  # request guild members
            guild = self.guilds.get(str((d or {}).get("guild_id")))
            if guild is not None:
                members = [self._bot_member_payload(guild)] + [
                    self._member_payload(guild, self.users[uid], m.permissions, with_user=True)
                    for uid, m in guild.members.items()
                ]
                chunk = {
                    "guild_id": guild.id,
                    "members": members,
                    "chunk_index": 0,
                    "chunk_count": 1,
                    "nonce": (d or {}).get("nonce"),
                }
                await self._send_dispatch(session, "GUILD_MEMBERS_CHUNK", chunk)
            return session
        await self._close_ws(ws, 4001, b"Unknown opcode.")
        return session

    # ------------------------------------------------------------------ control API (cross-process)

    def _add_control_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/_fake/guilds", self._c_add_guild)
        r.add_post("/_fake/members", self._c_add_member)
        r.add_post("/_fake/invoke", self._c_invoke)
        r.add_post("/_fake/click", self._c_click)
        r.add_get("/_fake/interactions/{id}", self._c_interaction)
        r.add_get("/_fake/attachments/{message_id}/{index}", self._c_attachment)
        r.add_get("/_fake/channels/{channel_id}/messages", self._c_channel_messages)
        r.add_get("/_fake/state", self._c_state)
        r.add_get("/_fake/requests", self._c_requests)
        r.add_post("/_fake/gateway", self._c_gateway)
        r.add_post("/_fake/inject", self._c_inject)
        r.add_post("/_fake/clock", self._c_clock)
        r.add_post("/_fake/expire", self._c_expire)

    @staticmethod
    async def _control(request: web.Request, fn: Callable[[dict[str, Any]], Awaitable[Any]]) -> web.Response:
        try:
            body = await request.json() if request.body_exists else {}
            return _json_response(await fn(body))
        except (KeyError, ValueError, LookupError, RuntimeError, TypeError) as e:
            return _json_response({"error": f"{type(e).__name__}: {e}"}, 400)

    def _guild_summary(self, g: FakeGuild) -> dict[str, Any]:
        return {
            "id": g.id,
            "name": g.name,
            "owner_id": g.owner_id,
            "attachment_size_limit": g.attachment_size_limit,
            "channels": [{"id": c.id, "name": c.name, "nsfw": c.nsfw} for c in g.channels],
            "members": {uid: str(m.permissions) for uid, m in g.members.items()},
        }

    async def _c_add_guild(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            kwargs = {
                k: b[k]
                for k in (
                    "name",
                    "channels",
                    "owner_id",
                    "attachment_size_limit",
                    "bot_permissions",
                    "locale",
                )
                if k in b
            }
            return self._guild_summary(self.add_guild(b.get("guild_id"), **kwargs))

        return await self._control(request, go)

    async def _c_add_member(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            perms = b.get("permissions")
            u = self.add_member(
                b["guild_id"], b.get("user_id"), permissions=None if perms is None else int(perms)
            )
            return {"user_id": u.id}

        return await self._control(request, go)

    async def _c_invoke(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            perms = b.get("permissions")
            inter = await self.invoke_command(
                b["guild_id"],
                b["channel_id"],
                b["user_id"],
                b["name"],
                b.get("options") or {},
                subcommand=b.get("subcommand"),
                permissions=None if perms is None else int(perms),
                attachment_size_limit=b.get("attachment_size_limit"),
            )
            return {"interaction_id": inter.id, "token": inter.token}

        return await self._control(request, go)

    async def _c_click(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            msg = self.messages[str(b["message_id"])]
            custom_id = b.get("custom_id") or self.find_component(msg, label=b["label"])
            perms = b.get("permissions")
            inter = await self.click_button(
                msg, custom_id, b["user_id"], permissions=None if perms is None else int(perms)
            )
            return {"interaction_id": inter.id, "token": inter.token}

        return await self._control(request, go)

    async def _c_interaction(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            inter = self.interaction(request.match_info["id"])
            return inter.summary() | {"messages": [m.summary() for m in inter.messages()]}

        return await self._control(request, go)

    async def _c_attachment(self, request: web.Request) -> web.Response:
        msg = self.messages.get(request.match_info["message_id"])
        try:
            att = msg.attachments[int(request.match_info["index"])] if msg else None
        except (IndexError, ValueError):
            att = None
        if att is None:
            return _json_response({"error": "no such attachment"}, 404)
        return web.Response(body=att.data, content_type=att.content_type)

    async def _c_channel_messages(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            incl = request.query.get("include_ephemeral") == "1"
            return [
                m.summary()
                for m in self.channel_messages(request.match_info["channel_id"], include_ephemeral=incl)
            ]

        return await self._control(request, go)

    def state(self) -> dict[str, Any]:
        """Counters for assertions across processes."""
        return {
            "requests": len(self.requests),
            "gateway_sessions": len(self.connected_sessions),
            "sessions_total": len(self.sessions),
            "gateway_available": self.gateway_available,
            "ready_count": self.ready_count,
            "identify_count": self.identify_count,
            "resume_count": self.resume_count,
            "refused_connections": self.refused_connections,
            "heartbeats": len(self.heartbeats),
            "last_close_code": self.last_close_code,
            "close_codes": self.close_codes,
            "sync_count": self.sync_count,
            "commands": {str(k): sorted(v) for k, v in self.commands.items()},
            "interactions": len(self.interactions),
            "messages": len(self.messages),
            "pending_injections": self.pending_injections,
            "clock_offset": self.clock.offset,
            "guilds": [self._guild_summary(g) for g in self.guilds.values()],
        }

    async def _c_state(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            return self.state()

        return await self._control(request, go)

    async def _c_requests(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            return [dataclasses.asdict(r) for r in self.requests]

        return await self._control(request, go)

    async def _c_gateway(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            if "available" in b:
                self.set_gateway_available(bool(b["available"]))
            if b.get("disconnect"):
                await self.disconnect_gateway(b.get("code"))
            return self.state()

        return await self._control(request, go)

    async def _c_inject(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            if b.get("status", 429) == 429 and "body" not in b:
                self.inject_429(
                    b["method"],
                    b["path"],
                    int(b.get("count", 1)),
                    float(b.get("retry_after", 0.3)),
                    bool(b.get("via", True)),
                    bool(b.get("global", False)),
                )
            else:
                self.inject_error(
                    b["method"], b["path"], int(b["status"]), b.get("body"), int(b.get("count", 1))
                )
            return {"pending_injections": self.pending_injections}

        return await self._control(request, go)

    async def _c_clock(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            self.clock.advance(float(b.get("advance", 0)))
            return {"offset": self.clock.offset, "now": self.clock()}

        return await self._control(request, go)

    async def _c_expire(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            self.expire_token(b.get("token") or b["interaction_id"])
            return {"expired": True}

        return await self._control(request, go)


# --------------------------------------------------------------------------- CLI


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeDiscord(token=args.token, heartbeat_interval_ms=args.heartbeat_interval_ms)
    await fake.start(port=args.port, host=args.host)
    user = fake.add_user(username="tester")
    guild = fake.add_guild(
        name="Fake Guild",
        channels=[{"name": "general"}, {"name": "nsfw-art", "nsfw": True}],
        owner_id=user.id,
    )
    info = {
        "message": f"ready on {fake.base_url}",
        "url": fake.base_url,
        "api_base": fake.api_base,
        "gateway_url": fake.gateway_url,
        "token": fake.token,
        "app_id": fake.app_id,
        "guild_id": guild.id,
        "channel_id": guild.channels[0].id,
        "nsfw_channel_id": guild.channels[1].id,
        "user_id": user.id,
        "pid": os.getpid(),
    }
    print(json.dumps(info), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Discord (REST + gateway) for tests.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", default="test-token")
    parser.add_argument("--heartbeat-interval-ms", type=int, default=41250)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
