"""Running the bot: open dependencies, connect, and on SIGTERM/SIGINT drain before logging out.

One bot per DATA_DIR, or a fleet on one database: without DATABASE_URL the process holds ``DATA_DIR/bot.lock``;
with it, it registers in the database's ``processes`` table instead (bot/service/fleet.py), so processes with
distinct SHARD_IDS may share one DATA_DIR.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord

from bot.engine import Engine
from bot.engine.store_pg import PgJobStore
from bot.frontend.client import ImagineBot, point_discord_at
from bot.service.dispatch import FleetQueue
from bot.service.fleet import HandBackToFleet, OutageGuard, ProcessLease, Takeover, process_lease
from bot.service.metrics import Metrics
from bot.service.runtime import open_engine
from bot.service.web import HEARTBEAT_GRACE_S, Health, WebServer
from bot.settings import Settings, SettingsError

log = logging.getLogger(__name__)


@dataclass
class Service:
    """The running bot and what serves it: /healthz and /metrics, wired to the engine and the client."""

    engine: Engine
    bot: ImagineBot
    health: Health
    metrics: Metrics
    web: WebServer | None
    #: In a fleet (DATABASE_URL): what the bot does while the database is away (bot/service/fleet.py).
    outage: OutageGuard | None = None
    #: In a fleet: takes over the jobs of processes that die (started by the bot after its own recovery).
    takeover: Takeover | None = None
    #: In a fleet: the one fair queue all processes share (started and closed by the bot).
    fleet_queue: FleetQueue | None = None

    async def start_web(self) -> None:
        """Bind /healthz and /metrics (503 until READY): before logging in, so a clashing port stops start-up
        before anything is done at Discord."""
        if self.web is not None:
            await self.web.start()

    async def stop_web(self) -> None:
        if self.web is not None:  # /healthz said 503 ("draining") until here
            await self.web.stop()


def build_service(
    engine: Engine,
    *,
    serve_http: bool = True,
    lease: ProcessLease | None = None,
    heartbeat_grace_s: float = HEARTBEAT_GRACE_S,
    **bot_options: Any,
) -> Service:
    health = Health(engine.store, heartbeat=lease, heartbeat_grace_s=heartbeat_grace_s)
    metrics = Metrics(engine.manager, cache=engine.cache)
    engine.manager.add_listener(metrics.on_job_event)
    outage = takeover = fleet_queue = None
    if lease is not None and isinstance(engine.store, PgJobStore):
        # Every job this process creates or claims is written as its own, and only while it is.
        engine.store.join_fleet(lease.me.id, ttl_s=lease.ttl_s)
        outage = OutageGuard(engine.manager, engine.store, lease).install()
        takeover = Takeover(engine.store, lease)
        engine.manager.hand_back = HandBackToFleet(engine.store, lease)  # rolling restarts lose no queued job
        # Backends' capacities, guilds' limits and turns between guilds hold for the fleet as a whole.
        fleet_queue = FleetQueue(engine.store, engine.manager, ttl_s=lease.ttl_s).install()
    bot = ImagineBot(
        engine,
        health=health,
        discord_errors=metrics,
        takeover=takeover,
        fleet_queue=fleet_queue,
        **bot_options,
    )
    settings = engine.settings
    web = WebServer(health, metrics, port=settings.http_port, host=settings.http_host) if serve_http else None
    return Service(engine, bot, health, metrics, web, outage, takeover, fleet_queue)


def install_signal_handlers(bot: ImagineBot) -> Callable[[], None]:
    """SIGTERM (docker stop) and SIGINT start ``bot.close()``, which drains before logging out. Returns that
    same "close soon" for other reasons to stop (idempotent: one close however many ask)."""
    loop = asyncio.get_running_loop()
    closing: set[asyncio.Task[None]] = set()

    def close_soon() -> None:
        if closing:
            return
        task = loop.create_task(bot.close(), name="close-on-signal")
        closing.add(task)
        task.add_done_callback(closing.discard)

    def on_signal(signum: signal.Signals) -> None:
        log.info("signal received; shutting down", extra={"signal": signum.name})
        close_soon()

    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread, or Windows
            loop.add_signal_handler(signum, on_signal, signum)
    return close_soon


def _lock_data_dir_sync(data_dir: Path) -> int:
    """Hold ``DATA_DIR/bot.lock`` for the process's life: two bots on one DATA_DIR would each take the
    other's running jobs for a crashed process's leftovers."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / "bot.lock", os.O_CREAT | os.O_RDWR, 0o644)
    except OSError as exc:
        raise SettingsError(f"DATA_DIR: cannot write to {data_dir} ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise SettingsError(
            f"DATA_DIR: {data_dir} is in use by another running copy of the bot; give each bot its own"
        ) from None
    return fd


def _make_data_dir_sync(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(f"DATA_DIR: cannot write to {data_dir} ({exc.strerror or exc})") from None


async def run_bot(settings: Settings) -> int:
    token = settings.token()
    if settings.database_url is None:
        lock = await asyncio.to_thread(_lock_data_dir_sync, settings.data_dir)
        try:
            return await _serve(settings, token)
        finally:
            os.close(lock)
    # A fleet: the processes table says which shards are taken; DATA_DIR (the cache) may be shared.
    await asyncio.to_thread(_make_data_dir_sync, settings.data_dir)
    async with process_lease(settings) as lease:
        status = await _serve(settings, token, lease)
    return 1 if lease.lost_to is not None else status


def log_env_file(settings: Settings) -> None:
    """Which .env was read: run from another directory, a bot without its .env is otherwise a puzzle.
    (Logged once the bot starts; a one-line start-up error says it itself, and ``check`` prints it.)"""
    data_dir = str(settings.data_dir.absolute())  # relative to where it was started, like the .env
    if settings.env_file_read is not None:
        log.info(
            "settings read from .env", extra={"env_file": str(settings.env_file_read), "data_dir": data_dir}
        )
    else:
        log.info(
            "no .env found; settings from the environment only",
            extra={"looked_for": str(Path(".env").absolute()), "data_dir": data_dir},
        )


async def _serve(settings: Settings, token: str, lease: ProcessLease | None = None) -> int:
    log_env_file(settings)
    point_discord_at(settings.discord_api_base, settings.discord_gateway_url)
    async with open_engine(settings, process_id=lease.me.id if lease is not None else None) as engine:
        service = build_service(engine, lease=lease)
        bot = service.bot
        close_on_signal = install_signal_handlers(bot)
        if lease is not None:  # another process took our shards while the database was away: leave to it
            lease.on_lost = close_on_signal
        await service.start_web()
        try:
            async with bot:
                await bot.start(token)
        except discord.LoginFailure:
            log.error("Discord refused the token (401): check DISCORD_TOKEN")
            return 1
        except discord.PrivilegedIntentsRequired:
            log.error("Discord refused the requested intents")
            return 1
        finally:
            if service.takeover is not None:  # the bot's drain closed it already, unless start-up failed
                await service.takeover.close()
            if service.fleet_queue is not None:  # likewise
                await service.fleet_queue.close()
            await service.stop_web()
    log.info("stopped cleanly")
    return 0


async def run_sync(settings: Settings, *, clear: bool) -> int:
    """``python -m bot sync [--clear]``: log in over REST only, sync, and leave."""
    token = settings.token()
    point_discord_at(settings.discord_api_base, settings.discord_gateway_url)
    async with open_engine(settings) as engine:
        # A one-off sync beside a running bot: it must not touch that bot's jobs, nor take its HTTP_PORT.
        bot = build_service(engine, serve_http=False, sync_commands=False, recover_jobs=False).bot
        async with bot:
            try:
                await bot.login(token)
            except discord.LoginFailure:
                log.error("Discord refused the token (401): check DISCORD_TOKEN")
                return 1
            await bot.sync_now(clear=clear)
            if not clear:
                assert bot.application_id is not None
                await engine.store.set_meta(f"commands:{bot.application_id}", bot.command_signature())
    print("commands cleared" if clear else "commands synced")
    return 0
