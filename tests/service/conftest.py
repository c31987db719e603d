"""Fixtures of the fleet tests: several real bot processes against one fake Discord and one data directory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TOKEN
from tests.fakes.discord import FakeDiscord

#: The lease in the fleet tests (LEASE_TTL_S): a heartbeat every second, dead after 3 s of silence.
TTL = 3


def two_shard_fleet(kind: str, url: str, pg_url: str, **more: Any) -> dict[str, Any]:
    """Settings of a process of a two-shard fleet on ``pg_url`` (its SHARD_IDS are given where it starts),
    with the backend ``kind`` at ``url``."""
    return {
        "image_backend": kind,
        "image_backend_url": url,
        "database_url": pg_url,
        "lease_ttl_s": TTL,
        "shard_count": 2,
        **more,
    }


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(token=TOKEN) as fake:
        yield fake


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path
