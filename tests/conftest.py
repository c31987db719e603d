"""Fixtures every test package shares: the wire-level fakes, started and stopped per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import discord
import pytest
from hypothesis import HealthCheck, settings

from tests.fakes.a1111 import FakeA1111
from tests.fakes.discord import FakeDiscord
from tests.fakes.openai_api import FakeOpenAI

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

#: The bot token the fake Discord accepts in tests.
TOKEN = "test-token-abcdef123456"


@pytest.fixture(autouse=True)
def restore_discord_endpoints() -> Any:
    """Tests point discord.py at a fake (class attributes); put Discord's real endpoints back afterwards."""
    base, gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    yield
    discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = base, gateway


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
