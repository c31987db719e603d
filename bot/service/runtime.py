"""Opens and closes the engine's dependencies in one place, for the bot, the CLI and ``check`` alike."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import aiohttp

from bot import __version__
from bot.backends import create_pool
from bot.engine import Engine
from bot.engine.cache import ResultCache
from bot.engine.cache_pg import PgIndex
from bot.engine.catalog import ModelCatalog
from bot.engine.manager import JobManager
from bot.engine.retention import RetentionTask
from bot.engine.store import JobStore
from bot.engine.store_pg import PgJobStore, session_name
from bot.settings import Settings

USER_AGENT = f"imagine-bot/{__version__} (+self-hosted)"


def make_session() -> aiohttp.ClientSession:
    """The one HTTP session for backends; each call sets its own finer timeouts."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, connect=15, sock_read=120),
        headers={"User-Agent": USER_AGENT},
        connector=aiohttp.TCPConnector(limit=64),
    )


def open_store(settings: Settings, *, process_id: str | None = None) -> JobStore | PgJobStore:
    """The job store the settings ask for (not yet opened): PostgreSQL with DATABASE_URL, else SQLite.
    ``process_id``: the fleet process whose sessions these are (PostgreSQL's ``application_name``)."""
    if settings.database_url is not None:
        return PgJobStore(settings.database_url.get_secret_value(), session_name=session_name(process_id))
    return JobStore(settings.data_dir / "bot.sqlite3")


@contextlib.asynccontextmanager
async def open_engine(
    settings: Settings, *, restrict_models: bool = True, process_id: str | None = None
) -> AsyncIterator[Engine]:
    """Store, cache, HTTP session, backend, manager, model catalog and the retention task, opened in order and
    closed in reverse.

    The store is PostgreSQL when DATABASE_URL is set, and so is the image cache's index (its tables in the same
    database, shared by a fleet); the image files stay in DATA_DIR/cache either way.
    ``restrict_models=False`` (the operator's command line): any model may be named and no list is fetched.
    ``process_id``: this process's row in a fleet (its database sessions are named after it).

    The manager is shut down with no grace here; callers that want a drain call ``shutdown`` first.
    """
    data_dir = settings.data_dir
    store = open_store(settings, process_id=process_id)
    await store.open()
    try:
        cache = ResultCache(
            data_dir / "cache",
            ttl_s=settings.cache_ttl_s,
            max_bytes=settings.cache_max_mb * 1024 * 1024,
            index=PgIndex(store) if isinstance(store, PgJobStore) else None,
        )
        await cache.open()
        try:
            # Whatever was opened is closed in reverse, also when a later step fails (a second pool entry that
            # cannot start, a catalog that cannot fetch): the exit stack holds each close as its part opens.
            async with make_session() as session, contextlib.AsyncExitStack() as opened:
                pool = create_pool(settings, session)
                backend = pool.primary.backend
                # Backends with a connection of their own (ComfyUI's websocket) open it and check their set-up
                # here, and close it after the manager stopped using them.
                for entry in pool:
                    await entry.backend.start()
                    opened.push_async_callback(entry.backend.aclose)
                opened.push_async_callback(pool.aclose)
                manager = JobManager.from_settings(settings, pool, store=store, cache=cache)
                # With IMAGE_MODELS empty, members choose among the backend's own list (a pool: the union of
                # its entries' lists), kept fresh here.
                catalog = ModelCatalog(
                    None if pool.many else backend,
                    configured=settings.image_models,
                    default=manager.default_model,
                    restricted=restrict_models,
                    parts=[entry.catalog for entry in pool if entry.catalog is not None],
                )
                manager.catalog = catalog
                opened.push_async_callback(catalog.close)
                await catalog.start()
                retention = RetentionTask(store, cache, retention_days=settings.history_retention_days)
                retention.start()
                try:
                    yield Engine(settings, session, store, cache, backend, manager, retention)
                finally:
                    await retention.stop()
                    await manager.shutdown(0)
        finally:
            await cache.close()
    finally:
        await store.close()
