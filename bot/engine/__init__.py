"""The job engine: the queue model, the manager, admission, policy, store, cache and recovery decisions.

Nothing in this package imports discord, the concrete backends, the frontend or the service: the engine
speaks through :mod:`bot.engine.backend` (the interface every backend implements) and callbacks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

    from bot.engine.backend import Backend
    from bot.engine.cache import ResultCache
    from bot.engine.manager import JobManager
    from bot.engine.models import Job
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

    @property
    def cancels_reach_other_processes(self) -> bool:
        """A fleet on PostgreSQL: a job another process runs can be cancelled from here."""
        return hasattr(self.store, "request_cancel")

    async def cancel_elsewhere(self, job_id: str, *, by: str | None, wait_s: float = 10.0) -> Job | None:
        """Cancel a job another process of the fleet runs (its row is marked, a NOTIFY wakes that process, which
        stops the backend call), and wait up to ``wait_s`` for its end. Returns the job as last read; None when
        no other process can be asked (no fleet: the store is not PostgreSQL)."""
        request_cancel = getattr(self.store, "request_cancel", None)
        if request_cancel is None:
            return None
        await request_cancel(job_id, by=by)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            job = await self.store.get_job(job_id)
            if job is None or job.state.is_terminal or loop.time() >= deadline:
                return job
            await asyncio.sleep(0.2)
