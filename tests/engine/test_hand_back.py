"""Rolling restarts: when shutdown begins and another process is there, queued jobs start no more; running ones
get the grace, and each job still queued is then handed back (another process runs it) instead of cancelled. A
running job whose generation another process can follow up by its backend id (Horde, ComfyUI) is handed over
too, its backend call abandoned without a remote cancel, as soon as nothing else keeps the process. A hand-back
that fails or is refused, or no other process, falls back to the cancel as before."""

from __future__ import annotations

import asyncio

from bot.engine.backend import Capabilities, ResumableBackend, stop_remotely
from bot.engine.catalog import ModelCatalog
from bot.engine.manager import JobEvent, JobManager
from bot.engine.models import GeneratedImage, Job, JobState
from bot.engine.pool import BackendPool, PoolEntry
from tests.helpers import ControlledBackend, make_manager, req, until


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


# -- running jobs whose generation another process can follow up (Horde, ComfyUI) ---------------------------------


class Followable(ResumableBackend):
    """A resumable backend whose generations never finish here: submitted, their id told, then waited on. Its
    remote cancel (a Horde DELETE, a ComfyUI interrupt) is what a cancel not handed over does."""

    name = "followable"

    def __init__(self) -> None:
        self.capabilities = Capabilities(sizes=((512, 512),), cancel=True)
        self.submitted: list[str] = []
        self.remote_cancels: list[str] = []
        self.abandoned: list[str] = []

    async def generate(self, request, on_progress=lambda _: None, *, on_submitted=None):  # type: ignore[override]
        ref = f"remote-{len(self.submitted) + 1}"
        self.submitted.append(ref)
        if on_submitted is not None:
            await on_submitted(ref)  # type: ignore[misc]
        return await self._wait(ref)

    async def resume(self, ref, on_progress=lambda _: None, *, count=None):  # type: ignore[override]
        return await self._wait(ref)

    async def _wait(self, ref: str) -> list[GeneratedImage]:
        try:
            await asyncio.Event().wait()  # the remote generation takes its time
        except asyncio.CancelledError:
            (self.remote_cancels if stop_remotely() else self.abandoned).append(ref)
            raise
        raise AssertionError("unreachable")


class Records:
    """The store: what each job's record said when it was last written."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[JobState, str | None]] = {}

    async def save_job(self, job: Job) -> None:
        await asyncio.sleep(0)  # a real write awaits
        self.last[job.id] = (job.state, job.backend_ref)


def fleet_manager(*, grace_store: Records | None = None) -> tuple[JobManager, Followable, ControlledBackend]:
    """A pool of a Horde-like entry (model "h") and a plain one (model "g"), handing back to a fleet."""
    followable, plain = Followable(), ControlledBackend()
    pool = BackendPool(
        [
            PoolEntry("horde", followable, 2, catalog=ModelCatalog(None, configured=("h",))),
            PoolEntry("gpu", plain, 2, catalog=ModelCatalog(None, configured=("g",))),
        ]
    )
    manager = make_manager(pool, store=grace_store, default_model="h", guild_concurrency=4)
    return manager, followable, plain


async def test_a_running_generation_another_process_can_follow_up_is_handed_over_at_once() -> None:
    records = Records()
    manager, followable, _ = fleet_manager(grace_store=records)
    fleet = Fleet()
    manager.hand_back = fleet
    finished, delivered = watched(manager)
    taken: list[str] = []
    manager.add_listener(lambda job, event: taken.append(job.id) if event is JobEvent.TAKEN else None)
    job = await manager.submit(req("a castle", model="h"), guild_id=1, user_id=1)
    await until(lambda: records.last.get(job.id) == (JobState.RUNNING, "remote-1"))

    started = asyncio.get_running_loop().time()
    await manager.shutdown(grace=30)

    # Nothing else kept the process: handed over at once, not after the grace.
    assert asyncio.get_running_loop().time() - started < 5
    # The generation goes on remotely (no cancel sent), the record stays as it was, nothing is posted here.
    assert followable.remote_cancels == [] and followable.abandoned == ["remote-1"]
    assert records.last[job.id] == (JobState.RUNNING, "remote-1")
    assert job.state is JobState.RUNNING and job.backend_ref == "remote-1"
    assert fleet.handed == [job.id] and finished == [] and delivered == []
    assert taken == [job.id]  # its listeners (the messenger) stop editing its message
    assert manager.get(job.id) is None and manager.active_count(1, 1) == 0
    assert manager.task_count() == 0
    manager.check_invariants()


async def test_a_shared_generation_is_handed_over_with_all_its_jobs() -> None:
    records = Records()
    manager, followable, _ = fleet_manager(grace_store=records)
    fleet = Fleet()
    manager.hand_back = fleet
    finished, delivered = watched(manager)
    first = await manager.submit(req("a castle", model="h"), guild_id=1, user_id=1)
    await until(lambda: records.last.get(first.id) == (JobState.RUNNING, "remote-1"))
    # Joins the generation in flight after its id was recorded: it is followed up by that same id.
    joiner = await manager.submit(req("a castle", model="h"), guild_id=1, user_id=2)
    await until(lambda: records.last.get(joiner.id, (None,))[0] is JobState.RUNNING)

    await manager.shutdown(grace=30)

    assert followable.submitted == ["remote-1"] and followable.abandoned == ["remote-1"]
    assert followable.remote_cancels == []
    for job in (first, joiner):
        assert records.last[job.id] == (JobState.RUNNING, "remote-1")
    assert sorted(fleet.handed) == sorted([first.id, joiner.id]) and finished == [] and delivered == []
    assert manager.task_count() == 0
    manager.check_invariants()


async def test_while_other_work_keeps_the_process_the_generation_is_followed_here() -> None:
    # A plain backend's job keeps the process for the grace: the Horde one is not handed over meanwhile (the
    # other process could claim it only after this one exits) but at the grace's end; the plain one is
    # stopped, as before.
    records = Records()
    manager, followable, plain = fleet_manager(grace_store=records)
    fleet = Fleet()
    manager.hand_back = fleet
    finished, delivered = watched(manager)
    horde_job = await manager.submit(req("a castle", model="h"), guild_id=1, user_id=1)
    plain_job = await manager.submit(req("a lighthouse", model="g"), guild_id=1, user_id=2)
    await until(lambda: records.last.get(horde_job.id) == (JobState.RUNNING, "remote-1"))
    await plain.wait_calls(1)

    shutdown = asyncio.create_task(manager.shutdown(grace=0.3))
    await asyncio.sleep(0.1)
    assert followable.abandoned == [] and fleet.handed == []  # still followed here, within the grace
    await shutdown

    assert followable.remote_cancels == [] and followable.abandoned == ["remote-1"]
    assert records.last[horde_job.id] == (JobState.RUNNING, "remote-1") and fleet.handed == [horde_job.id]
    assert horde_job.id not in finished and horde_job.id not in delivered
    assert plain_job.state is JobState.CANCELLED and plain_job.error_message == "Stopped by a restart."
    assert plain.calls[0].cancelled and finished == [plain_job.id] and delivered == [plain_job.id]
    assert manager.task_count() == 0
    manager.check_invariants()


async def test_once_the_other_work_is_done_the_generation_is_handed_over_without_waiting_the_grace() -> None:
    manager, followable, plain = fleet_manager()
    fleet = Fleet()
    manager.hand_back = fleet
    _, delivered = watched(manager)
    horde_job = await manager.submit(req("a castle", model="h"), guild_id=1, user_id=1)
    plain_job = await manager.submit(req("a lighthouse", model="g"), guild_id=1, user_id=2)
    await until(lambda: horde_job.backend_ref is not None)
    await plain.wait_calls(1)

    started = asyncio.get_running_loop().time()
    shutdown = asyncio.create_task(manager.shutdown(grace=30))
    await asyncio.sleep(0.05)
    plain.release_all()
    await shutdown

    assert asyncio.get_running_loop().time() - started < 5
    assert plain_job.state is JobState.SUCCEEDED and delivered == [plain_job.id]
    assert fleet.handed == [horde_job.id] and followable.abandoned == ["remote-1"]
    assert followable.remote_cancels == []


async def test_a_refused_hand_over_or_no_fleet_stops_the_generation_as_before() -> None:
    for fleet in (Fleet(takes=False), Fleet(fails=True), Fleet(there=False), None):
        manager, followable, _ = fleet_manager()
        manager.hand_back = fleet
        finished, delivered = watched(manager)
        job = await manager.submit(req("a castle", model="h"), guild_id=1, user_id=1)
        await until(lambda j=job: j.backend_ref is not None)

        await manager.shutdown(grace=0.05)

        assert followable.remote_cancels == ["remote-1"] and followable.abandoned == []
        assert job.state is JobState.CANCELLED and job.error_message == "Stopped by a restart."
        assert finished == [job.id] and delivered == [job.id]
        assert manager.task_count() == 0
        manager.check_invariants()


async def test_a_generation_not_submitted_yet_when_the_grace_ends_is_stopped() -> None:
    # No id recorded: nobody could follow it up, so it is stopped (and its submit, had it one, cancelled).
    class Submitting(Followable):
        async def generate(self, request, on_progress=lambda _: None, *, on_submitted=None):  # type: ignore[override]
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    backend = Submitting()
    manager = make_manager(backend)
    fleet = Fleet()
    manager.hand_back = fleet
    job = await manager.submit(req("a castle"), guild_id=1, user_id=1)
    await until(lambda: job.state is JobState.RUNNING)
    await manager.shutdown(grace=0.05)
    assert job.state is JobState.CANCELLED and fleet.handed == []
