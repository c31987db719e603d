"""The job manager while its store is away, as the operator's log shows it.

The store says once that the database is away (one WARNING, bot/engine/store_pg.py); the manager says once
that job records wait to be written (one WARNING for the spell, with the store's reason, no traceback) and once
that they are written again, not per job and per retry round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

import bot.engine.manager as manager_module
from bot.engine.manager import JobManager
from bot.engine.models import Job, JobState
from bot.engine.store import StoreError
from tests.helpers import ControlledBackend, make_manager, req, until

AWAY = (
    "Cannot reach the PostgreSQL database postgresql://bot@db/imagine (refused); "
    "check DATABASE_URL and that the server is running."
)


class AwayStore:
    """Takes writes, or refuses them as the PostgreSQL store does while its database is away."""

    def __init__(self) -> None:
        self.away = False
        self.refused = 0
        self.records: dict[str, JobState] = {}

    async def save_job(self, job: Job) -> None:
        if self.away:
            self.refused += 1
            raise StoreError(AWAY)
        self.records[job.id] = job.state


async def test_writes_refused_while_the_store_is_away_are_one_warning_not_one_per_job_and_retry(
    closing: Callable[[JobManager], None], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_module, "STORE_RETRY_S", 0.01)
    caplog.set_level(logging.DEBUG, logger="bot.engine.manager")
    backend = ControlledBackend()
    store = AwayStore()
    manager = make_manager(backend, store=store)
    closing(manager)
    jobs = [await manager.submit(req(f"g1:{i}"), guild_id=1, user_id=i) for i in range(5)]
    await backend.wait_calls(2)
    store.away = True

    def all_ended() -> bool:
        backend.release_all()
        return all(job.state.is_terminal for job in jobs)

    await until(all_ended)
    await until(lambda: store.refused >= 20)  # several retry rounds while it is away
    store.away = False
    await until(lambda: not manager.unsaved_jobs())
    assert all(store.records[job.id] is JobState.SUCCEEDED for job in jobs)

    lines = [r for r in caplog.records if r.name == "bot.engine.manager"]
    warnings = [r.getMessage() for r in lines if r.levelno >= logging.WARNING]
    assert warnings == [f"could not record job states; retrying until the store takes them: {AWAY}"]
    assert [r.getMessage() for r in lines if r.exc_info] == []  # a store that says why needs no traceback
    assert [
        r.getMessage() for r in lines if r.levelno == logging.INFO and "written again" in r.getMessage()
    ] == ["job records written again; the store agrees with memory"]
