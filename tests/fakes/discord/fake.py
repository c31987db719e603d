"""FakeDiscord: the fake's world and lifecycle, composed of one object per protocol surface.

    FakeDiscord            world state (guilds, users, messages, interactions, commands, requests), clock,
    │                      ids, lifecycle, waiting helpers, and the public facade the tests use
    ├── RestApi            /api/ middleware (recording, injection, auth, rate-limit headers), REST routes
    ├── MessageStore       message create/edit/delete and Discord's limits (shared by REST and interactions)
    ├── InteractionApi     dispatching interactions; callback, follow-up and @original routes
    ├── Gateway            websocket sessions, heartbeats, READY/GUILD_CREATE, RESUME, dispatch
    └── ControlApi         /_fake/ routes for tests in another process

The collaborators hold a reference to the FakeDiscord and read the world through it; each owns only its
own machinery (sockets and sessions, injected answers and buckets, the token index).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from .control import ControlApi
from .gateway import Gateway, Session
from .interactions import InteractionApi
from .messages import MessageStore
from .model import (
    ADMINISTRATOR,
    DEFAULT_ATTACHMENT_LIMIT,
    DEFAULT_BOT_PERMISSIONS,
    DEFAULT_MEMBER_PERMISSIONS,
    DM_CHANNEL,
    FakeChannel,
    FakeClock,
    FakeGuild,
    FakeInteraction,
    FakeMember,
    FakeMessage,
    FakeUser,
    RecordedRequest,
    Snowflakes,
    guild_create_payload,
    walk_components,
)
from .rest import RestApi

log = logging.getLogger(__name__)


def point_discord_py_at(api_base: str, gateway_url: str) -> None:
    """Point discord.py's REST base and default gateway at another server (here: the fake)."""
    import discord.gateway
    import discord.http
    import yarl

    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class FakeDiscord:
    """Fake Discord REST API + gateway. See the module docstring."""

    def __init__(
        self,
        token: str = "test-token",
        app_id: int | str | None = None,
        *,
        heartbeat_interval_ms: int = 41250,
        heartbeat_ack_delay_s: float = 0.1,
        clock: FakeClock | None = None,
        bot_name: str = "ImagineBot",
        ack_deadline_s: float | None = 3.0,
        rate_limit: tuple[int, float] = (50, 1.0),
        api_version: int = 10,
        recommended_shards: int = 1,
        max_concurrency: int | None = None,
        enforce_identify_limit: bool = False,
    ) -> None:
        self.token = token
        self.clock = clock or FakeClock()
        self.snowflake = Snowflakes(self.clock)
        self.app_id = str(app_id) if app_id is not None else self.snowflake()
        self.bot_user = FakeUser(id=self.app_id, username=bot_name, bot=True)
        self.heartbeat_interval_ms = heartbeat_interval_ms
        # Real Discord's HEARTBEAT_ACK arrives a network round trip after the heartbeat. discord.py 2.7
        # stamps the send time in its keep-alive thread only after the send completes, so an ACK that comes
        # back at once (loopback) is measured against the previous beat: latency = the heartbeat interval,
        # and "Can't keep up, ... websocket is 41.3s behind" on every run. 0 answers inline (the old way).
        self.heartbeat_ack_delay_s = heartbeat_ack_delay_s
        self.ack_deadline_s = ack_deadline_s
        self.rate_limit = rate_limit
        self.api_version = api_version
        #: What GET /gateway/bot recommends as ``shards``.
        self.recommended_shards = recommended_shards
        #: GET /gateway/bot's ``session_start_limit.max_concurrency``; None: as many as ``recommended_shards``
        #: (all recommended shards may IDENTIFY at once). See ``session_start_concurrency``.
        self.max_concurrency = max_concurrency
        #: Enforce Discord's session start limit: an IDENTIFY sooner than ``identify_interval_s`` after the
        #: last accepted one of its rate-limit key (``shard_id % session_start_concurrency``) is answered with
        #: op 9, as Discord does. Off by default: the many tests that restart a bot against one fake would
        #: each wait 5 s for it, as Discord would make them; the shard tests turn it on.
        self.enforce_identify_limit = enforce_identify_limit
        self.identify_interval_s = 5.0
        #: The ``url`` GET /gateway/bot answers (None: this fake's own gateway); a bogus one proves that a
        #: client which must not use it does not.
        self.gateway_bot_url: str | None = None

        self.guilds: dict[str, FakeGuild] = {}
        self.users: dict[str, FakeUser] = {}
        self.messages: dict[str, FakeMessage] = {}
        self.interactions: dict[str, FakeInteraction] = {}
        self.commands: dict[str | None, dict[str, dict[str, Any]]] = {}
        self.sync_calls: list[tuple[str | None, float]] = []
        #: Awaited before a PUT of the commands is answered (a test widens the window two syncs could race in).
        self.hold_command_sync: Callable[[], Awaitable[None]] | None = None
        self.requests: list[RecordedRequest] = []
        #: DM channels by recipient user id (POST /users/@me/channels opens them).
        self.dm_channels: dict[str, FakeChannel] = {}
        #: The application's owner, as GET /oauth2/applications/@me reports it; see make_team_app().
        self.app_owner = FakeUser(id=self.snowflake(), username="app-owner")
        self.users[self.app_owner.id] = self.app_owner
        #: For a team application: the team's id and its owner (the owner above is then the team's
        #: pseudo-user, as Discord reports it).
        self.team_id: str | None = None
        self.team_owner: FakeUser | None = None

        self.rest = RestApi(self)
        self.message_store = MessageStore(self)
        self.interaction_api = InteractionApi(self)
        self.gateway = Gateway(self)
        self.control = ControlApi(self)

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
        app = web.Application(middlewares=[self.rest.middleware], client_max_size=1024**3)
        self.gateway.add_routes(app)
        self.rest.add_routes(app)
        self.interaction_api.add_routes(app)
        self.control.add_routes(app)
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

    def notify(self) -> None:
        """Wake everyone waiting in wait_for_state (called after every request and gateway frame)."""
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

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run coro in a task the fake keeps (cancelled by stop()); a failure is logged, not lost."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fake Discord task failed", exc_info=task.exception())

    def add_user(self, user_id: int | str | None = None, *, username: str | None = None) -> FakeUser:
        uid = str(user_id) if user_id is not None else self.snowflake()
        user = self.users.get(uid)
        if user is None:
            user = FakeUser(id=uid, username=username or f"user{len(self.users) + 1}", global_name=username)
            self.users[uid] = user
        return user

    def guild_id_on_shard(self, shard_id: int, shard_count: int) -> str:
        """A fresh guild id whose events belong to ``shard_id`` of ``shard_count`` (for add_guild)."""
        value = int(self.snowflake())
        ms = value >> 22
        ms += (shard_id - ms) % shard_count
        return str((ms << 22) | (value & ((1 << 22) - 1)))

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
        applications_commands: bool = True,
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
            applications_commands=applications_commands,
        )
        guild.members[owner.id] = FakeMember(owner.id, ADMINISTRATOR | everyone_permissions, self.clock())
        self.guilds[gid] = guild
        if any(s.ws is not None and s.owns(gid) for s in self.sessions.values()):
            self.spawn(self.dispatch("GUILD_CREATE", guild_create_payload(guild, self.bot_user)))
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
        for ch in self.dm_channels.values():
            if ch.id == str(channel_id):
                return ch
        raise KeyError(f"unknown channel {channel_id}")

    def make_team_app(self, owner_user_id: int | str | None = None) -> FakeUser:
        """Make the application a team's: GET applications/@me then names the team and its owner."""
        self.team_owner = self.add_user(owner_user_id, username="team-owner")
        self.team_id = self.snowflake()
        self.app_owner = FakeUser(id=self.team_id, username=f"team{self.team_id}")
        return self.team_owner

    def open_dm(self, user_id: int | str) -> FakeChannel:
        """The DM channel with a user (created once, as Discord does)."""
        user = self.users[str(user_id)]
        channel = self.dm_channels.get(user.id)
        if channel is None:
            channel = FakeChannel(id=self.snowflake(), guild_id="", name="", type=DM_CHANNEL, recipient=user)
            self.dm_channels[user.id] = channel
        return channel

    def dms_to(self, user_id: int | str) -> list[FakeMessage]:
        """Messages the bot sent a user in their DMs, oldest first."""
        channel = self.dm_channels.get(str(user_id))
        return self.channel_messages(channel.id) if channel is not None else []

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
        return self.interactions.get(key) or self.interaction_api.by_token[key]

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

    @staticmethod
    def find_component(message: FakeMessage | dict[str, Any], *, label: str) -> str:
        """custom_id of the component with this label (raises LookupError if absent)."""
        comps = message.components if isinstance(message, FakeMessage) else message.get("components", [])
        for comp in walk_components(comps):
            if comp.get("label") == label and comp.get("custom_id"):
                return comp["custom_id"]
        raise LookupError(f"no component labelled {label!r}")

    def requests_matching(self, method: str = "*", pattern: str = "") -> list[RecordedRequest]:
        rx = re.compile(pattern)
        return [r for r in self.requests if method in ("*", r.method) and rx.search(r.path)]

    def state(self) -> dict[str, Any]:
        """Counters for assertions across processes."""
        return {
            "requests": len(self.requests),
            "gateway_sessions": len(self.connected_sessions),
            "sessions_total": len(self.sessions),
            "gateway_available": self.gateway_available,
            "ready_count": self.ready_count,
            "identify_count": self.identify_count,
            "identified_shards": self.gateway.identified_shards,
            "rate_limited_identifies": len(self.gateway.rate_limited_identifies),
            "max_concurrency": self.session_start_concurrency,
            "enforce_identify_limit": self.enforce_identify_limit,
            "connected_shards": self.gateway.connected_shards,
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
            "guilds": [g.summary() for g in self.guilds.values()],
            "owner_id": (self.team_owner or self.app_owner).id,
            "dms": {uid: len(self.dms_to(uid)) for uid in self.dm_channels},
        }

    # ------------------------------------------------------------------ REST: injection

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
        self.rest.inject_429(method, path_pattern, count, retry_after, via, global_)

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
        self.rest.inject_error(method, path_pattern, status, body, count, headers)

    @property
    def pending_injections(self) -> int:
        return self.rest.pending_injections

    # ------------------------------------------------------------------ gateway

    @property
    def session_start_concurrency(self) -> int:
        """The ``max_concurrency`` GET /gateway/bot answers (and the limit enforces)."""
        return self.max_concurrency or max(1, self.recommended_shards)

    @property
    def sessions(self) -> dict[str, Session]:
        return self.gateway.sessions

    @property
    def gateway_available(self) -> bool:
        return self.gateway.available

    @property
    def identify_count(self) -> int:
        return self.gateway.identify_count

    @property
    def resume_count(self) -> int:
        return self.gateway.resume_count

    @property
    def ready_count(self) -> int:
        return self.gateway.ready_count

    @property
    def refused_connections(self) -> int:
        return self.gateway.refused_connections

    @property
    def close_codes(self) -> list[int | None]:
        return self.gateway.close_codes

    @property
    def presence_updates(self) -> list[dict[str, Any]]:
        return self.gateway.presence_updates

    @property
    def last_close_code(self) -> int | None:
        return self.gateway.last_close_code

    @property
    def connected_sessions(self) -> list[Session]:
        return self.gateway.connected_sessions

    @property
    def heartbeats(self) -> list[float]:
        return self.gateway.heartbeats

    async def disconnect_gateway(self, code: int | None = None, *, shard: int | None = None) -> None:
        """Close every gateway socket (default 4000, resumable), or only ``shard``'s — for reconnect tests."""
        await self.gateway.disconnect(code, shard=shard)

    def set_gateway_available(self, available: bool) -> None:
        """False: refuse new gateway upgrades with 503 (an outage); existing sockets are untouched."""
        self.gateway.set_available(available)

    async def dispatch(self, event: str, data: Any) -> None:
        """Send a dispatch to the connected sessions owning its guild (DMs: shard 0; unsharded sessions get
        everything); buffer it for the latest such session if none is connected."""
        await self.gateway.dispatch(event, data)

    # ------------------------------------------------------------------ driving interactions

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
        return await self.interaction_api.invoke_command(
            guild_id,
            channel_id,
            user_id,
            name,
            options,
            subcommand=subcommand,
            permissions=permissions,
            attachment_size_limit=attachment_size_limit,
            locale=locale,
        )

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
        return await self.interaction_api.autocomplete(
            guild_id,
            channel_id,
            user_id,
            name,
            options,
            focused,
            subcommand=subcommand,
            permissions=permissions,
        )

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
        return await self.interaction_api.click_button(
            message_or_id,
            custom_id,
            user_id,
            permissions=permissions,
            attachment_size_limit=attachment_size_limit,
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
        return await self.interaction_api.select(
            message_or_id, custom_id, values, user_id, permissions=permissions
        )
