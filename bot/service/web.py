"""The bot's own HTTP server (``HTTP_PORT``): ``/healthz`` for the container's probe and ``/metrics`` for Prometheus.

It listens on ``HTTP_HOST`` (127.0.0.1 unless set; the Docker image sets 0.0.0.0). It is bound before the bot
logs in, so a clashing port stops start-up with one line before anything is done at Discord, and it stops after
the bot has closed, so a probe sees 503 for the whole drain. ``HTTP_PORT=0`` means "any free port": the bound
port is logged and kept in :attr:`WebServer.port` (tests use that; a container publishes a fixed port instead).

``/healthz`` answers 200 only when all of these hold, 503 otherwise:

- the bot has been READY once (start-up is not healthy yet);
- it is not draining for shutdown;
- the job store answers a trivial query within ``store_timeout_s`` (2 s) — or, for a process in a fleet
  (``DATABASE_URL``: it heartbeats a row, see :mod:`bot.service.fleet`), the heartbeat has been written within
  the last ``heartbeat_grace_s`` (30 s) and no other process took this one's shards: a database restart of a
  few seconds is no reason for an orchestrator to kill every bot mid-job. (The ping is still reported.)
- the gateway is connected — every shard this process runs — or has been down for at most
  ``gateway_grace_s`` (60 s), counted from the first shard that dropped: discord.py reconnects on its own,
  and an orchestrator must not kill a bot mid-job over a normal reconnect. A process whose one shard of two
  is down is not healthy: the guilds of that shard hear nothing from anyone.

The body is a small JSON object: ``{"status": "ok"|"starting"|"draining"|"unhealthy", "checks": {...}}``.
Access logs are off: a probe every few seconds is not news.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from bot.service.healthcheck import probe_host
from bot.service.metrics import CONTENT_TYPE
from bot.settings import SettingsError

if TYPE_CHECKING:
    from bot.engine.store import JobStore
    from bot.service.metrics import Metrics

log = logging.getLogger(__name__)

GATEWAY_GRACE_S = 60.0
HEARTBEAT_GRACE_S = 30.0
STORE_TIMEOUT_S = 2.0
#: HTTP_HOST's default: loopback only. The Docker image sets 0.0.0.0 so the container's probe and a Prometheus
#: container on the same network reach it; on a host, /metrics is not for the whole network by default.
DEFAULT_HOST = "127.0.0.1"


class HeartbeatProbe(Protocol):
    """A fleet process's lease (bot/service/fleet.py): why it is unhealthy, or None."""

    def problem(self, grace_s: float) -> str | None: ...


class Health:
    """The bot's health as the client's gateway hooks report it, plus a live store ping.

    ``clock`` (monotonic seconds), ``gateway_grace_s`` and ``heartbeat_grace_s`` (also through
    ``build_service``) are injectable so tests need not wait a minute.
    """

    def __init__(
        self,
        store: JobStore | None = None,
        *,
        gateway_grace_s: float = GATEWAY_GRACE_S,
        store_timeout_s: float = STORE_TIMEOUT_S,
        heartbeat: HeartbeatProbe | None = None,
        heartbeat_grace_s: float = HEARTBEAT_GRACE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.heartbeat = heartbeat
        self.heartbeat_grace_s = heartbeat_grace_s
        self.gateway_grace_s = gateway_grace_s
        self.store_timeout_s = store_timeout_s
        self.clock = clock
        self.ready = False
        self.draining = False
        #: Connected or not, per shard this process runs (``None``: the one connection, until told shards).
        self.shards: dict[int | None, bool] = {None: False}
        self.down_since: float | None = None
        self.disconnects = 0

    # -- reported by the client -------------------------------------------------------------------------
    def expect_shards(self, shard_ids: list[int]) -> None:
        """The shards this process runs (before the first connects); each then reports for itself."""
        self.shards = {shard: self.shards.get(shard, False) for shard in shard_ids}

    @property
    def per_shard(self) -> bool:
        return None not in self.shards

    @property
    def gateway_connected(self) -> bool:
        return all(self.shards.values())

    def mark_ready(self) -> None:
        """READY (first or again): the bot has its gateway sessions (shards report each their own)."""
        self.ready = True
        if not self.per_shard:
            self.gateway_up()

    def gateway_up(self, shard_id: int | None = None) -> None:
        """A session is live again (READY or RESUMED): ``shard_id``'s, or every one (None)."""
        for shard in self.shards if shard_id is None else [shard_id]:
            self.shards[shard] = True
        if self.gateway_connected and self.down_since is not None:
            log.info("gateway back", extra={"down_s": round(self.clock() - self.down_since, 1)})
            self.down_since = None

    def gateway_down(self, shard_id: int | None = None) -> None:
        """A socket dropped (or a reconnect attempt failed): the outage starts at the first report."""
        for shard in self.shards if shard_id is None else [shard_id]:
            self.shards[shard] = False
        if self.down_since is None:
            self.down_since = self.clock()
            self.disconnects += 1

    def mark_draining(self) -> None:
        self.draining = True

    # -- evaluated per probe ----------------------------------------------------------------------------
    def gateway_down_for(self) -> float:
        return 0.0 if self.down_since is None else max(0.0, self.clock() - self.down_since)

    async def store_ok(self) -> bool:
        if self.store is None:
            return True
        try:
            # ping() bounds its query; this also bounds a stuck database thread.
            async with asyncio.timeout(self.store_timeout_s + 0.5):
                return bool(await self.store.ping(self.store_timeout_s))
        except Exception:
            return False

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """``(healthy, body)``; the body says which check failed."""
        store_ok = await self.store_ok()
        down_for = self.gateway_down_for()
        # A shard that never connected is down, not "down for 0 s": the grace is for reconnects.
        reconnecting = self.down_since is not None and down_for <= self.gateway_grace_s
        gateway_ok = self.ready and (self.gateway_connected or reconnecting)
        if self.gateway_connected:
            gateway = "connected"
        elif not self.ready:
            gateway = "connecting"
        else:
            gateway = f"down {down_for:.0f}s"
        checks: dict[str, Any] = {
            "ready": self.ready,
            "gateway": gateway,
            "gateway_ok": gateway_ok,
            "store": "ok" if store_ok else "failed",
            "draining": self.draining,
        }
        if self.per_shard:
            checks["shards"] = {
                str(k): "connected" if up else "down" for k, up in sorted(self.shards.items())
            }
        if self.heartbeat is not None:
            problem = self.heartbeat.problem(self.heartbeat_grace_s)
            checks["heartbeat"] = problem or "ok"
            database_ok = problem is None
        else:
            database_ok = store_ok
        healthy = self.ready and not self.draining and database_ok and gateway_ok
        if healthy:
            status = "ok"
        elif self.draining:
            status = "draining"
        elif not self.ready:
            status = "starting"
        else:
            status = "unhealthy"
        return healthy, {"status": status, "checks": checks}


class WebServer:
    """aiohttp server for ``/healthz`` and ``/metrics``; :meth:`start` and :meth:`stop` are idempotent."""

    def __init__(
        self,
        health: Health,
        metrics: Metrics | None = None,
        *,
        port: int = 8080,
        host: str = DEFAULT_HOST,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.host = host
        self.requested_port = port
        #: The bound port once started (differs from the requested one when that was 0).
        self.port: int | None = None
        #: The bound (address, port) once started, as the socket reports it.
        self.address: tuple[str, int] | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        assert self.port is not None, "the web server is not running"
        return f"http://{probe_host(self.host)}:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics_page)
        return app

    async def start(self) -> None:
        if self._runner is not None:
            return
        runner = web.AppRunner(self.make_app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.requested_port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            # A clear one-line error (exit status 2 from main) instead of a traceback, naming the setting to fix.
            # asyncio rewords bind errors ("error while attempting to bind on address ..."): say it plainly.
            reason = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else (exc.strerror or str(exc))
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                raise SettingsError(
                    f"HTTP_PORT: cannot listen on {self.host}:{self.requested_port} ({reason}); choose a free "
                    "port, or HTTP_PORT=0 for any free one"
                ) from None
            raise SettingsError(
                f"HTTP_HOST: cannot listen on {self.host}:{self.requested_port} ({reason}); use an address "
                "of this machine, 127.0.0.1 or 0.0.0.0"
            ) from None
        self._runner = runner
        self.address = (str(runner.addresses[0][0]), int(runner.addresses[0][1]))
        self.port = self.address[1]
        log.info("http server listening", extra={"host": self.host, "port": self.port})

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
            log.info("http server stopped")

    # -- handlers -------------------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        healthy, body = await self.health.check()
        return web.json_response(body, status=200 if healthy else 503, headers={"Cache-Control": "no-store"})

    async def metrics_page(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            raise web.HTTPNotFound()
        data = await self.metrics.scrape()
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE})
