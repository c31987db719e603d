"""open_engine closes what it opened, in reverse, also when a later part fails to open."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from bot.engine.backend import Backend, Capabilities, ProgressCallback
from bot.engine.catalog import ModelCatalog
from bot.engine.models import GeneratedImage, ImageRequest
from bot.engine.pool import BackendPool, PoolEntry
from bot.service import runtime
from bot.settings import Settings, load_settings


class Recorded(Backend):
    """A backend that notes when it is started and closed (and can refuse to start)."""

    capabilities = Capabilities(sizes=((512, 512),))

    def __init__(self, name: str, log: list[str], *, fails_to_start: bool = False) -> None:
        self.name = name
        self.log = log
        self.fails_to_start = fails_to_start

    async def start(self) -> None:
        if self.fails_to_start:
            raise RuntimeError(f"{self.name} cannot start")
        self.log.append(f"start {self.name}")

    async def aclose(self) -> None:
        self.log.append(f"close {self.name}")

    async def generate(
        self, request: ImageRequest, on_progress: ProgressCallback = lambda _: None
    ) -> list[GeneratedImage]:
        raise AssertionError("not used")

    async def list_models(self) -> list[str]:
        return []


def settings(tmp_path: Path) -> Settings:
    return load_settings(
        env_file=None, image_backend="openai", image_backend_url="http://127.0.0.1:9", data_dir=tmp_path
    )


def use_pool(monkeypatch: pytest.MonkeyPatch, *backends: Recorded) -> None:
    def create_pool(_settings: Settings, _session: aiohttp.ClientSession) -> BackendPool:
        return BackendPool([PoolEntry(b.name, b, 1) for b in backends])

    monkeypatch.setattr(runtime, "create_pool", create_pool)


async def test_a_pool_entry_that_cannot_start_closes_the_ones_already_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    use_pool(monkeypatch, Recorded("a", log), Recorded("b", log), Recorded("c", log, fails_to_start=True))
    with pytest.raises(RuntimeError, match="c cannot start"):
        async with runtime.open_engine(settings(tmp_path)):
            pytest.fail("the engine must not open")
    assert log == ["start a", "start b", "close b", "close a"]


async def test_a_catalog_that_cannot_start_closes_the_backends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    use_pool(monkeypatch, Recorded("a", log))

    async def refuse(self: ModelCatalog) -> None:
        raise RuntimeError("catalog cannot start")

    monkeypatch.setattr(ModelCatalog, "start", refuse)
    with pytest.raises(RuntimeError, match="catalog cannot start"):
        async with runtime.open_engine(settings(tmp_path)):
            pytest.fail("the engine must not open")
    assert log == ["start a", "close a"]


async def test_a_normal_close_shuts_the_manager_down_before_closing_the_backends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    use_pool(monkeypatch, Recorded("a", log), Recorded("b", log))
    async with runtime.open_engine(settings(tmp_path)) as engine:
        assert log == ["start a", "start b"]
        assert engine.manager.accepting
    assert not engine.manager.accepting
    assert log == ["start a", "start b", "close b", "close a"]
