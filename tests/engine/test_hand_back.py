"""Rolling restarts: when shutdown begins and another process is there, queued jobs start no more; running ones
get the grace, and each job still queued is then handed back (another process runs it) instead of cancelled. A
hand-back that fails or is refused, or no other process, falls back to the cancel as before."""

from __future__ import annotations

import asyncio

from bot.engine.manager import JobEvent, JobManager
from bot.engine.models import Job, JobState
from tests.helpers import ControlledBackend, make_manager, req


class Fleet:
    """The other processes, as far as the manager sees them: they take what is handed back (or not)."""

    def __init__(self, *, there: bool = True, takes: bool = True, fails: bool = False) -> None:
        self.there = there
        self.takes = takes
        self.fails = fails
        self.handed: list[str] = []

    async def available(self) -> bool:
        return self.there

    async def take(self, job: Job) -> bool:
        if self.fails:
            raise OSError("database is away")
        self.handed.append(job.id)
        return self.takes


def watched(manager: JobManager) -> tuple[list[str], list[str]]:
    finished: list[str] = []
    delivered: list[str] = []
    manager.add_listener(lambda job, event: finished.append(job.id) if event is JobEvent.FINISHED else None)

    async def deliver(job: Job) -> None:
        delivered.append(job.id)

    manager.deliver = deliver
    return finished, delivered


async def test_jobs_still_queued_at_the_grace_end_are_handed_back_not_cancelled() -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1, guild_concurrency=1)
    fleet = Fleet()
    manager.hand_back = fleet
    finished, delivered = watched(manager)
    running = await manager.submit(req("g1:running"), guild_id=1, user_id=1)
    queued = [await manager.submit(req(f"g1:queued {i}"), guild_id=1, user_id=2 + i) for i in range(2)]
    await backend.wait_calls(1)

    shutdown = asyncio.create_task(manager.shutdown(grace=5))
    await asyncio.sleep(0.05)
    backend.release_all()  # the running one finishes within the grace; nothing else starts here
    await shutdown

    assert len(backend.calls) == 1
    assert sorted(fleet.handed) == sorted(job.id for job in queued)
    for job in queued:
        assert job.state is JobState.QUEUED  # no end of its own: the process that takes it runs it
        assert job.id not in finished and job.id not in delivered
        assert manager.get(job.id) is None
    # The running one finished and was posted here; the drain did not wait the grace out for the queued ones.
    assert running.state is JobState.SUCCEEDED
    assert finished == [running.id] and delivered == [running.id]
    for user in (1, 2, 3):
        assert manager.active_count(1, user) == 0
    assert manager.task_count() == 0
    manager.check_invariants()


async def test_a_hand_back_nobody_takes_or_that_fails_cancels_the_job_as_before() -> None:
    for fleet in (Fleet(takes=False), Fleet(fails=True), Fleet(there=False)):
        backend = ControlledBackend()
        manager = make_manager(backend, backend_concurrency=1, guild_concurrency=1)
        manager.hand_back = fleet
        finished, delivered = watched(manager)
        await manager.submit(req("g1:running"), guild_id=1, user_id=1)
        queued = await manager.submit(req("g1:queued"), guild_id=1, user_id=2)
        await backend.wait_calls(1)

        await manager.shutdown(grace=0.05)

        assert queued.state is JobState.CANCELLED and queued.error_reason == "shutdown"
        assert queued.error_message == "Stopped by a restart."
        assert queued.id in finished and queued.id in delivered
        assert manager.task_count() == 0
        manager.check_invariants()


async def test_a_running_job_at_the_grace_end_is_stopped_not_handed_back() -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1, guild_concurrency=1)
    fleet = Fleet()
    manager.hand_back = fleet
    running = await manager.submit(req("g1:running"), guild_id=1, user_id=1)
    await backend.wait_calls(1)
    await manager.shutdown(grace=0.05)
    assert fleet.handed == []
    assert running.state is JobState.CANCELLED and running.error_reason == "shutdown"


async def test_without_a_fleet_nothing_is_handed_back() -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1, guild_concurrency=1)
    await manager.submit(req("g1:running"), guild_id=1, user_id=1)
    queued = await manager.submit(req("g1:queued"), guild_id=1, user_id=2)
    await backend.wait_calls(1)
    await manager.shutdown(grace=0.05)
    assert queued.state is JobState.CANCELLED and queued.error_reason == "shutdown"
