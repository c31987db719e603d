"""The job engine: the queue model, the manager, admission, policy, store, cache and recovery decisions.

Nothing in this package imports discord, the concrete backends, the frontend or the service: the engine
speaks through :mod:`bot.engine.backend` (the interface every backend implements) and callbacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

    from bot.engine.backend import Backend
    from bot.engine.cache import ResultCache
    from bot.engine.manager import JobManager
    from bot.engine.retention import RetentionTask
    from bot.engine.store import JobStore
    from bot.engine.store_pg import PgJobStore
    from bot.settings import Settings


@dataclass
class Engine:
    """The engine's parts, opened together by :func:`bot.service.runtime.open_engine` and closed in reverse."""

    settings: Settings
    session: aiohttp.ClientSession
    store: JobStore | PgJobStore  # SQLite in DATA_DIR, or PostgreSQL with DATABASE_URL: the same interface
    cache: ResultCache
    backend: Backend
    manager: JobManager
    #: Prunes history past HISTORY_RETENTION_DAYS in the background (started and stopped by open_engine).
    retention: RetentionTask | None = None
