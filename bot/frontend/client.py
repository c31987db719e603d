"""The Discord client: receives its settings and engine from ``main()``, starts in ``setup_hook``, drains in
``close()`` before discord.py closes the gateway and the HTTP session.

It is an ``AutoShardedBot``: with ``SHARD_COUNT`` (and ``SHARD_IDS``) it runs those gateway shards, without them
every shard ``GET /gateway/bot`` recommends. Each guild's events arrive on the shard ``(guild_id >> 22) %
SHARD_COUNT``, so the process running that shard is the only one that hears from that guild. Start-up::

    login (REST) -> setup_hook -> launch_shards: GET /gateway/bot (the count unless SHARD_COUNT gives it,
                    and max_concurrency) -> log the shards
                 -> launch_shard per shard (retried with backoff while the gateway is unreachable)
                    -> before_identify_hook: the IdentifyGate holds the IDENTIFY until Discord allows it
                 -> READY per shard (on_shard_connect) -> on_ready once every shard is ready
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp
import discord
import yarl
from discord import app_commands
from discord.backoff import ExponentialBackoff
from discord.ext import commands
from discord.gateway import DiscordWebSocket, ReconnectWebSocket
from discord.shard import Shard

from bot.engine import Engine
from bot.engine.models import Job
from bot.engine.policy import GuildPolicy
from bot.engine.recovery import RecoveryReport, recover_jobs, recover_unfinished_jobs
from bot.engine.store import ShardFilter
from bot.frontend.identify import IdentifyGate, max_concurrency_of
from bot.frontend.interactions import tell_failure
from bot.frontend.messenger import DiscordErrorSink, JobMessenger
from bot.frontend.owner import OwnerNotifier
from bot.settings import SettingsError

log = logging.getLogger(__name__)

# The bot never joins voice: don't warn about missing voice libraries on every start.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False

#: Discord's JSON error code for "Missing Access".
MISSING_ACCESS = 50001


def dev_guild_problem(guild_id: int | str) -> str:
    """The one line an operator reads when DEV_GUILD_ID names a server the bot cannot sync commands to."""
    return (
        f"DEV_GUILD_ID: Discord refused access to server {guild_id} (403 Missing Access): the bot is not in "
        "that server or was invited without the applications.commands scope; invite it with the link "
        "`python -m bot check` prints, or leave DEV_GUILD_ID empty to sync commands globally"
    )


EXTENSIONS = ("bot.frontend.cogs.imagine", "bot.frontend.cogs.admin", "bot.frontend.cogs.user")


class GatewayWatcher(Protocol):
    """Told about the client's life (the service's /healthz keeps it), shard by shard."""

    def expect_shards(self, shard_ids: list[int]) -> None: ...
    def mark_ready(self) -> None: ...
    def gateway_up(self, shard_id: int | None = None) -> None: ...
    def gateway_down(self, shard_id: int | None = None) -> None: ...
    def mark_draining(self) -> None: ...


#: Recovers jobs this process has just claimed: the decisions start-up recovery makes, with this bot's
#: ways of telling a member.
JobRecovery = Callable[[list[Job]], Awaitable[RecoveryReport]]


class TakeoverWatcher(Protocol):
    """Takes over the jobs of other processes that die (a fleet's: bot/service/fleet.py). Started once this
    process's own start-up recovery is done; closed first when the bot drains."""

    def start(self, recover: JobRecovery) -> None: ...
    async def close(self) -> None: ...


class FleetQueueRunner(Protocol):
    """The fleet's shared queue (bot/service/dispatch.py): started before any job is recovered, closed after the
    drain (the drain's last generations give their slots back through it)."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...


class _NoWatcher:
    def expect_shards(self, shard_ids: list[int]) -> None:
        pass

    def mark_ready(self) -> None:
        pass

    def gateway_up(self, shard_id: int | None = None) -> None:
        pass

    def gateway_down(self, shard_id: int | None = None) -> None:
        pass

    def mark_draining(self) -> None:
        pass


def point_discord_at(api_base: str | None, gateway_url: str | None) -> None:
    """Send REST and the gateway somewhere else (a rate-limit proxy, or a local fake Discord).

    discord.py reads ``Route.BASE`` for every REST call (webhooks and interaction callbacks included) and
    ``DiscordWebSocket.DEFAULT_GATEWAY`` whenever a shard reconnects from scratch. (The first connection of
    each shard goes where :meth:`ImagineBot.gateway_for_shards` says.)
    """
    if api_base:
        discord.http.Route.BASE = api_base.rstrip("/")
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)


class ImagineTree(app_commands.CommandTree):
    """One place where a failing command becomes a plain sentence (never endless "thinking…")."""

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        command = interaction.command.qualified_name if interaction.command else "?"
        log.error("/%s failed", command, exc_info=error, extra={"user": interaction.user.id})
        await tell_failure(interaction)


#: A first connection that failed for these reasons is tried again (the gateway is down or refusing);
#: anything else (a bad token: close 4004, an intent not granted: 4014) stops start-up as discord.py does.
_GATEWAY_UNREACHABLE = (OSError, aiohttp.ClientError, asyncio.TimeoutError, ReconnectWebSocket)


class ImagineBot(commands.AutoShardedBot):
    def __init__(
        self,
        engine: Engine,
        *,
        health: GatewayWatcher | None = None,
        discord_errors: DiscordErrorSink | None = None,
        clock: Callable[[], float] = time.time,
        sync_commands: bool = True,
        recover_jobs: bool = True,
        progress_interval: float = 1.5,
        identify_gate: IdentifyGate | None = None,
        takeover: TakeoverWatcher | None = None,
        fleet_queue: FleetQueueRunner | None = None,
        **options: object,
    ) -> None:
        intents = discord.Intents.none()
        intents.guilds = True
        settings = engine.settings
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            help_command=None,
            tree_cls=ImagineTree,
            allowed_mentions=discord.AllowedMentions.none(),
            allowed_contexts=app_commands.AppCommandContext(
                guild=True, dm_channel=False, private_channel=False
            ),
            allowed_installs=app_commands.AppInstallationType(guild=True, user=False),
            # None: as many as GET /gateway/bot recommends, all in this process.
            shard_count=settings.shard_count,
            shard_ids=settings.shard_ids,
            **options,  # type: ignore[arg-type]
        )
        self.engine = engine
        self.settings = engine.settings
        self.clock = clock
        self.sync_commands = sync_commands
        self.recover_jobs = recover_jobs
        self.takeover = takeover
        self.fleet_queue = fleet_queue
        self.messenger = JobMessenger(
            self,
            cache=engine.cache,
            store=engine.store,
            errors=discord_errors,
            clock=clock,
            min_interval=progress_interval,
        )
        self.health: GatewayWatcher = health or _NoWatcher()
        self.draining = False
        self.ready_once = asyncio.Event()
        self._drain_task: asyncio.Task[None] | None = None
        #: The ``url`` of GET /gateway/bot, when this process asked it for the shard count.
        self._recommended_gateway: yarl.URL | None = None
        #: When each shard may IDENTIFY (max_concurrency from GET /gateway/bot, set in launch_shards).
        self.identify_gate = identify_gate or IdentifyGate()

    @property
    def manager(self):
        return self.engine.manager

    async def setup_hook(self) -> None:
        self.manager.deliver = self.messenger.deliver
        self.manager.add_listener(self.messenger.on_job_event)
        # Problems only the operator can fix reach the application's owner by DM (rate-limited there).
        self.manager.alerts.add_notifier(OwnerNotifier(self))
        # Per-guild settings and quotas: loaded and hooked into admission before any command can run.
        self.policy = GuildPolicy(self.manager, store=self.engine.store, clock=self.clock)
        await self.policy.load()
        self.policy.install()
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        if self.fleet_queue is not None:  # before recovery: recovered jobs wait for the fleet's slots too
            await self.fleet_queue.start()
        # Jobs a dead process left behind: resume the queued ones, report the interrupted ones.
        if self.recover_jobs:
            await recover_unfinished_jobs(
                self.engine.store, self.manager, shards=self.shard_filter, **self._recovery_hooks()
            )
            # In a fleet: from now on, the jobs of another process that dies are taken over here.
            if self.takeover is not None:
                self.takeover.start(self.recover_claimed)
        if self.sync_commands:
            await self.sync_if_changed()

    @property
    def shard_filter(self) -> ShardFilter | None:
        """The guilds whose events arrive here (None: every guild, without SHARD_IDS)."""
        shard_ids, count = self.settings.shard_ids, self.settings.shard_count
        if not shard_ids or not count:
            return None
        return ShardFilter(count, tuple(shard_ids))

    async def recover_claimed(self, jobs: list[Job]) -> RecoveryReport:
        """Recover jobs this process claimed from a dead one (whatever their guild: results go through each
        interaction's webhook, or the channel past the token, so no gateway shard is needed to post them)."""
        return await recover_jobs(jobs, self.engine.store, self.manager, **self._recovery_hooks())

    def _recovery_hooks(self) -> dict[str, Any]:
        """What recovery needs from the frontend, the same at start-up and for a takeover."""
        return {
            "can_reply": self.messenger.token_usable,
            "report": self.messenger.post_and_record,
            "cache": self.engine.cache,
            "clock": self.clock,
        }

    async def on_ready(self) -> None:
        """Every shard of this process is READY (once at start; again only if all re-identify)."""
        self.ready_once.set()
        self.health.mark_ready()  # /healthz: start-up is over
        log.info("connected", extra={"user": str(self.user), "guilds": len(self.guilds)})

    # -- gateway state for /healthz (bot/service/web.py), per shard: the gateway is up when all of this
    # process's shards are; a reconnect shorter than the grace period stays healthy --
    async def on_shard_connect(self, shard_id: int) -> None:
        self.health.gateway_up(shard_id)  # READY on that shard

    async def on_shard_ready(self, shard_id: int) -> None:
        self.health.gateway_up(shard_id)

    async def on_shard_resumed(self, shard_id: int) -> None:
        self.health.gateway_up(shard_id)

    async def on_shard_disconnect(self, shard_id: int) -> None:
        self.health.gateway_down(shard_id)  # also after each failed reconnect attempt

    # -- gateway start-up ---------------------------------------------------------------------------------
    def gateway_for_shards(self, offered: yarl.URL) -> yarl.URL:
        """Where every shard's first connection goes: DISCORD_GATEWAY_URL when set (a proxy, a fake), else
        the URL GET /gateway/bot gave (when this process asked it), else what discord.py offers."""
        override = self.settings.discord_gateway_url
        if override:
            return yarl.URL(override)
        return self._recommended_gateway or offered

    async def launch_shards(self) -> None:
        """Settle the shard count, ``max_concurrency`` and the shards this process runs, say so, then let
        discord.py launch them.

        Without SHARD_COUNT discord.py would ask GET /gateway/bot itself and connect to the URL it returns,
        past DISCORD_GATEWAY_URL: ask it here for the count, so every shard goes through
        :meth:`gateway_for_shards`. With SHARD_COUNT it is asked only for ``max_concurrency`` (once per
        start; if that fails, shards identify 5 s apart as discord.py's default hook has them).
        """
        if self.is_closed():
            return
        if self.shard_count is None:
            self.shard_count, url, limits = await self.http.get_bot_gateway()
            self._recommended_gateway = yarl.URL(url)
            self.identify_gate.configure(max_concurrency_of(limits))
        elif self.identify_gate.max_concurrency is None:
            self.identify_gate.configure(await self._fetch_max_concurrency())
        shard_ids = sorted(self.shard_ids or range(self.shard_count))
        self.health.expect_shards(shard_ids)
        log.info(
            "gateway shards",
            extra={
                "shards": ",".join(map(str, shard_ids)),
                "shard_count": self.shard_count,
                "source": "SHARD_COUNT" if self.settings.shard_count else "GET /gateway/bot",
                "max_concurrency": self.identify_gate.max_concurrency or "unknown",
            },
        )
        await super().launch_shards()

    async def _fetch_max_concurrency(self) -> int | None:
        """``max_concurrency`` from GET /gateway/bot; None (with a warning) when Discord does not say."""
        try:
            _count, _url, limits = await self.http.get_bot_gateway()
        except (TimeoutError, discord.DiscordException, aiohttp.ClientError, OSError) as exc:
            log.warning(
                "GET /gateway/bot failed; shards identify 5 s apart",
                extra={"error": type(exc).__name__},
            )
            return None
        return max_concurrency_of(limits)

    async def before_identify_hook(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Called by discord.py right before each IDENTIFY (first connections and re-identifies alike)."""
        await self.identify_gate.wait(shard_id, initial=initial)

    async def launch_shard(self, gateway: yarl.URL, shard_id: int, *, initial: bool = False) -> None:
        """Connect one shard; while the gateway is unreachable, retry with backoff and one line per attempt.

        discord.py's own version retries every 5 s forever, logging a traceback each time, and forgets
        ``initial`` on a retry (so the first shard then waits 5 s before its IDENTIFY).
        """
        gateway = self.gateway_for_shards(gateway)
        backoff = ExponentialBackoff()
        while not self.is_closed():
            try:
                connecting = DiscordWebSocket.from_client(
                    self, initial=initial, gateway=gateway, shard_id=shard_id
                )
                async with asyncio.timeout(self.shard_connect_timeout):  # not wait_for: it can lose a cancel
                    ws = await connecting
            except _GATEWAY_UNREACHABLE as exc:
                delay = backoff.delay()
                log.warning(
                    "gateway unreachable at start-up; retrying",
                    extra={"shard": shard_id, "retry_s": round(delay, 1), "error": type(exc).__name__},
                )
                await asyncio.sleep(delay)
                continue
            self._run_shard(ws)
            return

    def _run_shard(self, ws: DiscordWebSocket) -> None:
        """Hand a connected shard to discord.py, as its launch_shard does. discord.py 2.7 has no public way to
        do this: the registry and event queue are AutoShardedClient's name-mangled attributes."""
        shard = Shard(ws, self, self._AutoShardedClient__queue.put_nowait)  # type: ignore[attr-defined]
        self._AutoShardedClient__shards[shard.id] = shard  # type: ignore[attr-defined]
        shard.launch()

    # -- command sync -----------------------------------------------------------------------------------
    def _sync_target(self) -> discord.Object | None:
        guild_id = self.settings.dev_guild_id
        return discord.Object(guild_id) if guild_id else None

    def command_signature(self) -> str:
        guild = self._sync_target()
        payload = [command.to_dict(self.tree) for command in self.tree.get_commands()]
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(f"{guild.id if guild else 'global'}|{text}".encode()).hexdigest()

    async def sync_if_changed(self) -> bool:
        """Sync only when the command set (or the application, or the target) changed since last time.

        Once for the fleet: compare and sync hold the store's lock (PostgreSQL's advisory lock with
        DATABASE_URL), so of processes starting together one syncs and the others find the signature current.
        """
        assert self.application_id is not None
        key = f"commands:{self.application_id}"
        signature = self.command_signature()
        async with self.engine.store.advisory_lock(key):
            if await self.engine.store.get_meta(key) == signature:
                log.info("commands unchanged; not syncing")
                return False
            await self.sync_now()
            await self.engine.store.set_meta(key, signature)
        return True

    async def sync_now(self, *, clear: bool = False) -> None:
        """Push the commands (to DEV_GUILD_ID when set); a server the bot may not use is a bad setting."""
        guild = self._sync_target()
        if guild is not None:
            self.tree.clear_commands(guild=guild)
            if not clear:
                self.tree.copy_global_to(guild=guild)
            try:
                synced = await self.tree.sync(guild=guild)
            except discord.Forbidden as exc:
                if exc.code != MISSING_ACCESS:
                    raise
                # Discord's answer when the bot is not in that server, or was invited without the
                # applications.commands scope: the operator's setting, not a crash.
                raise SettingsError(dev_guild_problem(guild.id)) from None
        else:
            if clear:
                self.tree.clear_commands(guild=None)
            synced = await self.tree.sync()
        log.info("commands synced", extra={"count": len(synced), "guild": guild.id if guild else "global"})

    # -- shutdown -----------------------------------------------------------------------------------------
    async def close(self) -> None:
        """Drain our own work first: refuse new jobs, let running ones finish and post, then log out."""
        if self._drain_task is None:
            self._drain_task = asyncio.create_task(self._drain(), name="drain")
        await asyncio.shield(self._drain_task)
        await super().close()

    async def _drain(self) -> None:
        self.health.mark_draining()  # first: /healthz turns 503 before anything else happens
        self.draining = True
        grace = self.settings.shutdown_grace_s
        log.info("shutting down", extra={"grace_s": grace, "active_jobs": len(self.manager.active_jobs())})
        if self.takeover is not None:  # take no other process's jobs while draining our own
            await self.takeover.close()
        try:
            await self.manager.shutdown(grace)
        finally:
            if self.fleet_queue is not None:  # what is left of our place in the fleet's queue goes back
                await self.fleet_queue.close()
            await self.messenger.close()
