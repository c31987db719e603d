"""Fixtures the engine tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from bot.engine.manager import JobManager


@pytest.fixture
async def closing() -> AsyncIterator[Callable[[JobManager], None]]:
    """Register a manager to be shut down after the test (its probing cancelled and awaited too)."""
    managers: list[JobManager] = []
    yield managers.append
    for manager in managers:
        await manager.shutdown(0)
        assert not manager.pool.probing
