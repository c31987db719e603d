"""Fixtures of the fleet tests: several real bot processes against one fake Discord and one data directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import TOKEN
from tests.fakes.discord import FakeDiscord

#: The lease in the fleet tests (LEASE_TTL_S): a heartbeat every second, dead after 3 s of silence.
TTL = 3


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path
