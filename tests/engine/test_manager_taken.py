"""A process whose lease lapsed while another claimed its jobs (bot/engine/manager.py, ``JobTaken``): its late
writes are refused by the store, and it drops those jobs without a post, a record or a generation of its own.
Real PostgreSQL (one database per test), the manager driven in this process.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from bot.engine.manager import JobEvent, JobManager
from bot.engine.models import Job, JobState
from bot.engine.store_pg import PgJobStore
from tests.helpers import ControlledBackend, make_manager, req, until

TTL = 3.0


async def sql(pg_url: str, statement: str, *args: object) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


@pytest.fixture
async def stores(pg_url: str) -> AsyncIterator[tuple[PgJobStore, PgJobStore]]:
    """Two fleet members' stores: the one whose lease will lapse, and the survivor that claims its jobs."""
    opened = []
    for name in ("lapsed", "survivor"):
        store = PgJobStore(pg_url, max_size=2)
        await store.open()
        await sql(pg_url, "INSERT INTO processes (id, host, pid) VALUES ($1, 'host', 1)", name)
        store.join_fleet(name, ttl_s=TTL)
        opened.append(store)
    yield opened[0], opened[1]
    for store in opened:
        await store.close()


class Heard:
    """What the Discord layer would have seen: events and deliveries."""

    def __init__(self, manager: JobManager) -> None:
        self.events: list[JobEvent] = []
        self.delivered: list[str] = []
        manager.add_listener(lambda job, event: self.events.append(event))

        async def deliver(job: Job) -> None:
            self.delivered.append(job.id)

        manager.deliver = deliver


async def lapse_and_claim(pg_url: str, survivor: PgJobStore) -> Job:
    """The lapsed process goes silent past its lease; the survivor claims its one job and records its own
    decision (as recovery does: here, interrupted)."""
    await sql(pg_url, "UPDATE processes SET heartbeat_at = now() - interval '1 minute' WHERE id = 'lapsed'")
    (job,) = (await survivor.take_over_jobs())["lapsed"]
    job.state = JobState.INTERRUPTED
    await survivor.save_job(job)
    return job


async def test_a_running_job_claimed_by_another_process_finishes_here_unposted_and_unrecorded(
    pg_url, stores, closing
) -> None:
    lapsed, survivor = stores
    backend = ControlledBackend()
    manager = make_manager(backend, store=lapsed)
    closing(manager)
    heard = Heard(manager)
    job = await manager.submit(req("g1:a lighthouse"), guild_id=1, user_id=1)
    await backend.wait_calls(1)
    await until(lambda: job.state is JobState.RUNNING)
    await lapse_and_claim(pg_url, survivor)

    backend.release_all()  # the generation here ends after the claim: its result is not ours to post
    await manager.wait(job.id)
    assert heard.delivered == []
    assert JobEvent.TAKEN in heard.events and JobEvent.FINISHED not in heard.events
    stored = await survivor.get_job(job.id)
    assert stored is not None and stored.state is JobState.INTERRUPTED  # the survivor's word stands
    assert manager.active_jobs() == [] and manager.active_count(1, 1) == 0
    assert manager.unsaved_jobs() == []  # not retried: retrying cannot help
    manager.check_invariants()


async def test_a_queued_job_claimed_by_another_process_never_starts_here(pg_url, stores, closing) -> None:
    """Held while the lease could not be renewed (OutageGuard), then released: the first write (RUNNING) is
    refused, so the job leaves at once and its generation is stopped before it made anything."""
    lapsed, survivor = stores
    backend = ControlledBackend()
    manager = make_manager(backend, store=lapsed)
    closing(manager)
    heard = Heard(manager)
    manager.hold_starts(True)
    job = await manager.submit(req("g1:a queued fox"), guild_id=1, user_id=1)
    await lapse_and_claim(pg_url, survivor)

    manager.hold_starts(False)  # the lease was renewed: queued jobs may start
    await manager.wait(job.id)
    assert heard.delivered == []
    assert JobEvent.STARTED not in heard.events and JobEvent.TAKEN in heard.events
    assert all(call.cancelled for call in backend.calls)  # nothing generated here
    assert not any(call.finished for call in backend.calls)
    stored = await survivor.get_job(job.id)
    assert stored is not None and stored.state is JobState.INTERRUPTED and stored.started_at is None
    assert manager.active_jobs() == [] and manager.backend_in_flight == 0
    manager.check_invariants()
