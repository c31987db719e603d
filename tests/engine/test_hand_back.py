"""Rolling restarts: at the grace's end a job still queued is handed back (another process runs it) instead of
being cancelled; a running one is not; a hand-back that fails or is refused falls back to the cancel."""

from __future__ import annotations

from bot.engine.manager import JobEvent, JobManager
from bot.engine.models import Job, JobState
from tests.helpers import ControlledBackend, make_manager, req


class Fleet:
    """The other processes, as far as the manager sees them: they take what is handed back (or not)."""

    def __init__(self, *, takes: bool = True, fails: bool = False) -> None:
        self.takes = takes
        self.fails = fails
        self.handed: list[str] = []

    async def hand_back(self, job: Job) -> bool:
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
    manager.hand_back = fleet.hand_back
    finished, delivered = watched(manager)
    running = await manager.submit(req("g1:running"), guild_id=1, user_id=1)
    queued = [await manager.submit(req(f"g1:queued {i}"), guild_id=1, user_id=2 + i) for i in range(2)]
    await backend.wait_calls(1)

    await manager.shutdown(grace=0.05)

    assert sorted(fleet.handed) == sorted(job.id for job in queued)
    for job in queued:
        assert job.state is JobState.QUEUED  # no end of its own: the process that takes it runs it
        assert job.id not in finished and job.id not in delivered
        assert manager.get(job.id) is None
    # The running one is not handed over: it is stopped as before, and its member hears it.
    assert running.state is JobState.CANCELLED and running.error_reason == "shutdown"
    assert finished == [running.id] and delivered == [running.id]
    for user in (1, 2, 3):
        assert manager.active_count(1, user) == 0
    assert manager.task_count() == 0
    manager.check_invariants()


async def test_a_hand_back_nobody_takes_or_that_fails_cancels_the_job_as_before() -> None:
    for fleet in (Fleet(takes=False), Fleet(fails=True)):
        backend = ControlledBackend()
        manager = make_manager(backend, backend_concurrency=1, guild_concurrency=1)
        manager.hand_back = fleet.hand_back
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


async def test_without_a_fleet_nothing_is_handed_back() -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1, guild_concurrency=1)
    await manager.submit(req("g1:running"), guild_id=1, user_id=1)
    queued = await manager.submit(req("g1:queued"), guild_id=1, user_id=2)
    await backend.wait_calls(1)
    await manager.shutdown(grace=0.05)
    assert queued.state is JobState.CANCELLED and queued.error_reason == "shutdown"
