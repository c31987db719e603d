"""/healthz: the Health rules on their own, then every transition against the real bot and the fake Discord."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.frontend.client import point_discord_at
from bot.service.app import build_service
from bot.service.runtime import open_engine
from bot.service.web import Health, WebServer
from bot.settings import SettingsError
from tests.frontend.conftest import TOKEN, bot_settings, is_done, running_bot


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get_health(http: aiohttp.ClientSession, web: WebServer | None) -> tuple[int, dict[str, Any]]:
    assert web is not None and web.port
    async with http.get(f"{web.url}/healthz") as response:
        return response.status, await response.json()


async def poll_health(
    http: aiohttp.ClientSession, web: WebServer | None, status: int, timeout: float = 10.0
) -> dict[str, Any]:
    """Poll /healthz until it answers ``status``; returns that body."""
    last: tuple[int, dict[str, Any]] | None = None
    async with asyncio.timeout(timeout):
        while True:
            last = await get_health(http, web)
            if last[0] == status:
                return last[1]
            await asyncio.sleep(0.05)


# -- Health on its own -------------------------------------------------------------------------------------


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeStore:
    def __init__(self, answer: bool = True, delay: float = 0.0) -> None:
        self.answer = answer
        self.delay = delay

    async def ping(self, timeout_s: float = 1.0) -> bool:
        await asyncio.sleep(self.delay)
        return self.answer


async def test_health_rules_with_an_injected_clock() -> None:
    clock = ManualClock()
    health = Health(FakeStore(), clock=clock)  # default 60 s grace
    ok, body = await health.check()
    assert not ok and body["status"] == "starting" and body["checks"]["ready"] is False

    health.mark_ready()
    ok, body = await health.check()
    assert ok and body == {
        "status": "ok",
        "checks": {
            "ready": True,
            "gateway": "connected",
            "gateway_ok": True,
            "store": "ok",
            "draining": False,
        },
    }

    health.gateway_down()
    clock.now += 59
    health.gateway_down()  # failed reconnect attempts do not restart the outage
    ok, body = await health.check()
    assert ok and body["checks"]["gateway"] == "down 59s"
    clock.now += 2
    ok, body = await health.check()
    assert not ok and body["status"] == "unhealthy" and body["checks"]["gateway_ok"] is False

    health.gateway_up()
    ok, _ = await health.check()
    assert ok

    health.mark_draining()
    ok, body = await health.check()
    assert not ok and body["status"] == "draining"


async def test_health_counts_every_shard_of_the_process() -> None:
    clock = ManualClock()
    health = Health(FakeStore(), gateway_grace_s=10, clock=clock)
    health.expect_shards([0, 1])
    health.gateway_up(0)
    health.mark_ready()  # READY does not vouch for a shard that has not connected
    ok, body = await health.check()
    assert not ok and body["checks"]["shards"] == {"0": "connected", "1": "down"}

    health.gateway_up(1)
    ok, body = await health.check()
    assert ok and body["checks"]["gateway"] == "connected"
    assert body["checks"]["shards"] == {"0": "connected", "1": "connected"}

    health.gateway_down(1)
    clock.now += 6
    health.gateway_down(0)  # a second shard dropping does not restart the outage
    clock.now += 5
    ok, body = await health.check()
    assert not ok and body["checks"]["gateway"] == "down 11s"
    health.gateway_up(1)
    ok, _ = await health.check()
    assert not ok  # shard 0 is still down, and has been for longer than the grace
    health.gateway_up(0)
    ok, body = await health.check()
    assert ok and health.down_since is None and health.disconnects == 1


async def test_health_store_failing_or_hanging_is_unhealthy_within_the_bound() -> None:
    health = Health(FakeStore(answer=False))
    health.mark_ready()
    ok, body = await health.check()
    assert not ok and body["checks"]["store"] == "failed"

    hanging = Health(FakeStore(delay=30), store_timeout_s=0.2)
    hanging.mark_ready()
    loop = asyncio.get_running_loop()
    started = loop.time()
    ok, body = await hanging.check()
    assert not ok and body["checks"]["store"] == "failed"
    assert loop.time() - started < 1.5


async def test_web_server_port_zero_picks_a_free_port_and_logs_no_access(http, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    health = Health()
    health.mark_ready()
    first, second = WebServer(health, port=0, host="127.0.0.1"), WebServer(health, port=0, host="127.0.0.1")
    await first.start()
    await second.start()
    try:
        assert first.port and second.port and first.port != second.port
        assert any(r.getMessage() == "http server listening" and r.port == first.port for r in caplog.records)
        caplog.clear()
        async with http.get(f"{first.url}/healthz") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("application/json")
        async with http.get(f"{first.url}/metrics") as response:
            assert response.status == 404  # no metrics object given
        assert not [r for r in caplog.records if r.name.startswith("aiohttp")]
    finally:
        await first.stop()
        await second.stop()
        await second.stop()  # idempotent


# -- the real bot ------------------------------------------------------------------------------------------


async def test_healthz_is_503_until_ready_then_200(fake_discord, fake_openai, tmp_path, http) -> None:
    """The server is up from setup_hook on; READY comes later (here: one second after the last GUILD_CREATE)."""
    fake_discord.add_guild(name="Test Guild")
    settings = bot_settings(fake_discord, tmp_path, "openai", fake_openai.url)
    point_discord_at(settings.discord_api_base, settings.discord_gateway_url)
    async with open_engine(settings) as engine:
        service = build_service(engine, clock=fake_discord.clock, guild_ready_timeout=1.0)
        bot = service.bot
        await service.start_web()  # bound before logging in
        assert service.web is not None and service.web.port
        runner = asyncio.create_task(bot.start(TOKEN), name="bot-under-test")
        try:
            status, body = await get_health(http, service.web)
            assert status == 503 and body["status"] == "starting", body
            assert body["checks"]["ready"] is False and not bot.ready_once.is_set()

            body = await poll_health(http, service.web, 200, timeout=10)
            assert body["status"] == "ok" and bot.ready_once.is_set()
        finally:
            await bot.close()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
            await service.stop_web()


async def test_healthz_rides_out_a_short_outage_and_fails_a_long_one(
    fake_discord, fake_openai, tmp_path, http
) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        health = h.bot.health
        health.gateway_grace_s = 1.5
        status, body = await get_health(http, h.service.web)
        assert status == 200 and body["checks"]["gateway"] == "connected"

        loop = asyncio.get_running_loop()
        fake_discord.set_gateway_available(False)
        await fake_discord.disconnect_gateway()
        async with asyncio.timeout(5):
            while health.down_since is None:
                await asyncio.sleep(0.01)
        outage_started = loop.time()
        # Down, but for less than the grace period: still healthy (no restart for a normal reconnect).
        status, body = await get_health(http, h.service.web)
        assert status == 200, body
        assert body["checks"]["gateway"].startswith("down")
        assert loop.time() - outage_started < 1.5

        body = await poll_health(http, h.service.web, 503, timeout=5)
        assert loop.time() - outage_started >= 1.4
        assert body["status"] == "unhealthy" and body["checks"]["gateway_ok"] is False

        fake_discord.set_gateway_available(True)
        body = await poll_health(http, h.service.web, 200, timeout=20)
        assert body["checks"]["gateway"] == "connected"
        assert fake_discord.refused_connections >= 1


async def test_healthz_is_503_while_draining(fake_discord, fake_openai, tmp_path, http) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        fake_openai.configure(delay=1.5)
        inter = await h.imagine(user.id, "a slow painting")
        await fake_discord.wait_for_state(lambda: fake_openai.state.generations >= 1, timeout=5)
        assert (await get_health(http, h.service.web))[0] == 200

        closing = asyncio.create_task(h.bot.close())
        body = await poll_health(http, h.service.web, 503, timeout=2)
        assert body["status"] == "draining" and body["checks"]["draining"] is True
        assert h.bot.manager.running_count() == 1  # still finishing the job: 503 came first
        web = h.service.web
        await closing
        # The drain let the job finish and post; /healthz stays 503 until the service stops serving it.
        assert is_done(inter.messages()[0])
        assert (await get_health(http, web))[0] == 503
        await h.service.stop_web()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(f"{web.url}/healthz"):
                pass


async def test_healthz_is_503_when_the_store_does_not_answer(
    fake_discord, fake_openai, tmp_path, http, monkeypatch
) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        assert (await get_health(http, h.service.web))[0] == 200
        store = h.bot.engine.store

        async def broken_ping(timeout_s: float = 1.0) -> bool:
            return False

        monkeypatch.setattr(store, "ping", broken_ping)
        status, body = await get_health(http, h.service.web)
        assert status == 503 and body["status"] == "unhealthy" and body["checks"]["store"] == "failed"

        async def hanging_ping(timeout_s: float = 1.0) -> bool:
            await asyncio.sleep(30)
            return True

        monkeypatch.setattr(store, "ping", hanging_ping)
        h.bot.health.store_timeout_s = 0.2
        loop = asyncio.get_running_loop()
        started = loop.time()
        status, body = await get_health(http, h.service.web)
        assert status == 503 and body["checks"]["store"] == "failed"
        assert loop.time() - started < 2

        monkeypatch.undo()
        assert (await get_health(http, h.service.web))[0] == 200  # the real ping answers again


async def test_http_host_defaults_to_loopback_and_is_configurable(
    fake_discord, fake_openai, tmp_path
) -> None:
    async with running_bot(fake_discord, tmp_path / "a", backend_url=fake_openai.url) as harness:
        web = harness.service.web
        assert web is not None and web.address == ("127.0.0.1", web.port)
    async with running_bot(
        fake_discord, tmp_path / "b", backend_url=fake_openai.url, http_host="0.0.0.0"
    ) as harness:
        web = harness.service.web
        assert web is not None and web.address == ("0.0.0.0", web.port)
        async with aiohttp.ClientSession() as http, http.get(f"{web.url}/healthz") as response:
            assert response.status in (200, 503)


async def test_an_address_not_of_this_machine_is_one_line_naming_http_host() -> None:
    server = WebServer(Health(), port=0, host="192.0.2.1")  # TEST-NET-1: never a local address
    with pytest.raises(SettingsError) as caught:
        await server.start()
    assert str(caught.value).startswith("HTTP_HOST: cannot listen on 192.0.2.1:0 (")


def test_the_health_probe_follows_http_host(monkeypatch) -> None:
    from bot.service.healthcheck import probe_host

    assert probe_host("") == probe_host("0.0.0.0") == "127.0.0.1"
    assert probe_host("::") == "[::1]"
    assert probe_host("10.1.2.3") == "10.1.2.3"


def test_the_image_and_compose_listen_on_every_interface_of_the_container() -> None:
    """HTTP_HOST's default is loopback; inside a container the probe and a Prometheus container need more."""
    root = Path(__file__).resolve().parents[2]
    dockerfile = root / "Dockerfile"
    env_lines = [line.strip() for line in dockerfile.read_text().splitlines()]
    assert "HTTP_HOST=0.0.0.0" in env_lines
    assert "      HTTP_HOST: 0.0.0.0" in (root / "docker-compose.yml").read_text().splitlines()
    # .env.example must not override the image's value with loopback (env files win over image ENV).
    assert "HTTP_HOST=" not in [
        line.split("=")[0] + "="
        for line in (root / ".env.example").read_text().splitlines()
        if line[:1] != "#"
    ]
