"""Opens and closes the engine's dependencies in one place, for the bot, the CLI and ``check`` alike."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp

from bot.backends import create_backend
from bot.engine import Engine
from bot.engine.cache import ResultCache
from bot.engine.catalog import ModelCatalog
from bot.engine.manager import JobManager
from bot.engine.store import JobStore
from bot.settings import Settings

USER_AGENT = "imagine-bot/0.1 (+self-hosted)"


def make_session() -> aiohttp.ClientSession:
    """The one HTTP session for backends; each call sets its own finer timeouts."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=15, sock_read=120),
        headers={"User-Agent": USER_AGENT},
        connector=aiohttp.TCPConnector(limit=64),
    )


@contextlib.asynccontextmanager
async def open_engine(settings: Settings, *, restrict_models: bool = True) -> AsyncIterator[Engine]:
    """Store, cache, HTTP session, backend, manager and model catalog, opened in order and closed in reverse.

    ``restrict_models=False`` (the operator's command line): any model may be named and no list is fetched.

    The manager is shut down with no grace here; callers that want a drain call ``shutdown`` first.
    """
    data_dir = settings.data_dir
    store = JobStore(data_dir / "bot.sqlite3")
    await store.open()
    try:
        cache = ResultCache(
            data_dir / "cache",
            ttl_s=settings.cache_ttl_s,
            max_bytes=settings.cache_max_mb * 1024 * 1024,
        )
        await cache.open()
        try:
            async with make_session() as session:
                backend = create_backend(settings, session)
                manager = JobManager.from_settings(settings, backend, store=store, cache=cache)
                # With IMAGE_MODELS empty, members choose among the backend's own list, kept fresh here.
                catalog = ModelCatalog(
                    backend,
                    configured=settings.image_models,
                    default=manager.default_model,
                    restricted=restrict_models,
                )
                manager.catalog = catalog
                await catalog.start()
                try:
                    yield Engine(settings, session, store, cache, backend, manager)
                finally:
                    try:
                        await manager.shutdown(0)
                    finally:
                        await catalog.close()
        finally:
            await cache.close()
    finally:
        await store.close()
