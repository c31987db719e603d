"""Fixtures every test package shares: the wire-level fakes, started and stopped per test, and one real
PostgreSQL cluster per session with a fresh database per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import discord
import pytest
from hypothesis import HealthCheck, settings

from bot.engine.manager import JobManager
from tests.fakes.a1111 import FakeA1111
from tests.fakes.discord import FakeDiscord
from tests.fakes.openai_api import FakeOpenAI
from tests.pg import ClusterError, PgCluster, start_cluster, unavailable

# Property tests: CI runs a fixed, derandomized budget; HYPOTHESIS_PROFILE=long explores for as long as asked
# (HYPOTHESIS_MAX_EXAMPLES, default 20,000).
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.register_profile(
    "long",
    max_examples=int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "20000")),
    stateful_step_count=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
LONG_RUN = os.environ.get("HYPOTHESIS_PROFILE") == "long"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A long exploration runs for as long as it was asked to: no per-test timeout (pyproject's 120 s)."""
    if LONG_RUN:
        for item in items:
            item.add_marker(pytest.mark.timeout(0))


#: The bot token the fake Discord accepts in tests.
TOKEN = "test-token-abcdef123456"


@pytest.fixture(autouse=True)
def restore_discord_endpoints() -> Any:
    """Tests point discord.py at a fake (class attributes); put Discord's real endpoints back afterwards."""
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    yield
    discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


@pytest.fixture(autouse=True)
def no_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DATABASE_URL in the environment running the tests (CI services often set one) must not move every
    test's bot onto that database: tests that want PostgreSQL ask for ``pg_url``."""
    monkeypatch.delenv("DATABASE_URL", raising=False)


@pytest.fixture
async def fake_discord() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(token=TOKEN) as fake:
        yield fake


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
async def fake_a1111() -> AsyncIterator[FakeA1111]:
    async with FakeA1111() as fake:
        yield fake


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One real PostgreSQL server for the whole session (started on first use, removed at the end).

    Fails in CI when PostgreSQL is missing or will not start, skips on a developer machine without the
    binaries (see tests/pg.py); pytest
    remembers that outcome, so the other PostgreSQL tests report it without trying again.
    """
    try:
        cluster = start_cluster()
    except ClusterError as exc:
        unavailable(str(exc), missing=exc.missing)
    yield cluster
    cluster.destroy()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """The URL of a fresh, empty database on the session's cluster (its own for each test)."""
    return pg_cluster.create_database()


@pytest.fixture
async def closing() -> AsyncIterator[Callable[[JobManager], None]]:
    """Register a manager to be shut down after the test (its probing cancelled and awaited too)."""
    managers: list[JobManager] = []
    yield managers.append
    for manager in managers:
        await manager.shutdown(0)
        assert not manager.pool.probing
