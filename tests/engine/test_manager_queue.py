"""The manager over the queue model: defects 1, 3, 4 and 5 end to end in the engine, shutdown and deliveries,
failed writes retried until the store agrees, one count per member, and the model's probe after each step."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot.engine.errors import EndReason
from bot.engine.manager import JobEvent, JobManager
from bot.engine.models import GeneratedImage, Job, JobState
from tests.helpers import ControlledBackend, make_manager, req, until


async def ended(manager: JobManager, job: Job) -> Job:
    await manager.wait(job.id)  # None once it has left memory: the job object is the record then
    return job


class SlowCancelBackend(ControlledBackend):
    """Takes a while to wind down after a cancel (an interrupt sent over HTTP)."""

    def __init__(self, wind_down_s: float = 0.2) -> None:
        super().__init__()
        self.wind_down_s = wind_down_s

    async def generate(self, request, on_progress=lambda _: None) -> list[GeneratedImage]:
        try:
            return await super().generate(request, on_progress)
        except asyncio.CancelledError:
            await asyncio.sleep(self.wind_down_s)
            raise


async def test_defect1_cancelling_a_queued_job_keeps_the_scheduler_working(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, guild_concurrency=2)
    closing(manager)
    running = [await manager.submit(req(f"g1:run{i}"), guild_id=1, user_id=i) for i in range(2)]
    queued = await manager.submit(req("g1:wait"), guild_id=1, user_id=3)
    await backend.wait_calls(2)
    assert await manager.cancel(queued.id) is True
    manager.check_invariants()
    other = await manager.submit(req("g2:other"), guild_id=2, user_id=1)  # any other guild's submit
    await backend.wait_calls(3)
    later = await manager.submit(req("g1:later"), guild_id=1, user_id=4)
    backend.release_all()
    for job in [*running, other]:
        assert (await ended(manager, job)).state is JobState.SUCCEEDED
    await backend.wait_calls(4)
    backend.release_all()
    assert (await ended(manager, later)).state is JobState.SUCCEEDED
    assert manager.backend_in_flight == 0
    manager.check_invariants()


async def test_defect3_a_newcomer_does_not_join_a_generation_being_cancelled(closing) -> None:
    backend = SlowCancelBackend(wind_down_s=0.3)
    manager = make_manager(backend, backend_concurrency=2)
    closing(manager)
    first = await manager.submit(req("g1:same"), guild_id=1, user_id=1)
    await backend.wait_calls(1)
    cancelling = asyncio.create_task(manager.cancel(first.id))
    await until(lambda: backend.calls[0].cancelled)
    newcomer = await manager.submit(req("g1:same"), guild_id=1, user_id=2)  # while the first winds down
    await backend.wait_calls(2)  # a fresh generation, not the dying one
    backend.release_all()
    assert await cancelling is True
    assert (await ended(manager, newcomer)).state is JobState.SUCCEEDED
    assert newcomer.cancelled_by is None and newcomer.error_reason is None
    manager.check_invariants()


async def test_defect4_same_prompt_in_an_idle_guild_starts_at_once_and_counts_there(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=4, guild_concurrency=1)
    closing(manager)
    await manager.submit(req("g1:backlog"), guild_id=1, user_id=1)
    await backend.wait_calls(1)
    waiting = await manager.submit(req("g1:same"), guild_id=1, user_id=2)  # guild 1 at its limit
    assert waiting.state is JobState.QUEUED
    idle = await manager.submit(req("g1:same"), guild_id=2, user_id=9)  # same prompt, idle guild
    await backend.wait_calls(2)
    await until(lambda: idle.state is JobState.RUNNING and waiting.state is JobState.RUNNING)
    assert manager.guild_in_flight(2) == 1 and manager.guild_in_flight(1) == 1
    manager.check_invariants()
    backend.release_all()
    for job in (waiting, idle):
        assert (await ended(manager, job)).state is JobState.SUCCEEDED
    assert len(backend.calls) == 2  # still one shared generation


class FailingFirstWrite:
    """A store whose writes wait for the test, then fail (a full disk)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()

    async def save_job(self, job: Job) -> None:
        await self.gate.wait()
        raise OSError("disk full")


async def test_defect5_cancel_does_not_wait_forever_on_a_job_whose_first_write_failed(closing) -> None:
    backend = ControlledBackend(auto_release=True)
    store = FailingFirstWrite()
    manager = make_manager(backend, store=store)
    closing(manager)
    submitting = asyncio.create_task(manager.submit(req("g1:x"), guild_id=1, user_id=1))
    await until(lambda: manager.active_jobs() != [])
    (job,) = manager.active_jobs()
    cancelling = asyncio.create_task(manager.cancel(job.id))
    await asyncio.sleep(0.02)
    store.gate.set()
    with pytest.raises(OSError):
        await submitting
    async with asyncio.timeout(2):
        assert await cancelling is False  # no job ever existed
    assert manager.active_count(1, 1) == 0 and manager.get(job.id) is None
    manager.check_invariants()


class FlakyStore:
    """Records writes; fails the ones the test asks it to fail."""

    def __init__(self) -> None:
        self.records: dict[str, JobState] = {}
        self.fail_states: set[JobState] = set()

    async def save_job(self, job: Job) -> None:
        if job.state in self.fail_states:
            self.fail_states.discard(job.state)
            raise OSError("database is locked")
        self.records[job.id] = job.state


async def test_a_failed_write_is_retried_until_the_store_agrees(closing, monkeypatch) -> None:
    import bot.engine.manager as manager_module

    monkeypatch.setattr(manager_module, "STORE_RETRY_S", 0.01)
    backend = ControlledBackend(auto_release=True)
    store = FlakyStore()
    store.fail_states = {JobState.SUCCEEDED}
    manager = make_manager(backend, store=store)
    closing(manager)
    job = await manager.submit(req("g1:x"), guild_id=1, user_id=1)
    await manager.wait(job.id)
    assert job.state is JobState.SUCCEEDED
    await until(lambda: store.records.get(job.id) is JobState.SUCCEEDED)
    assert manager.unsaved_jobs() == []


async def test_shutdown_never_cancels_a_delivery_in_progress(monkeypatch) -> None:
    import bot.engine.manager as manager_module

    monkeypatch.setattr(manager_module, "SHUTDOWN_REPORT_S", 1.0)
    backend = ControlledBackend(auto_release=True)
    manager = make_manager(backend)
    delivered: list[tuple[str, JobState]] = []
    posting = asyncio.Event()

    async def slow_post(job: Job) -> None:
        posting.set()
        await asyncio.sleep(0.4)  # a slow upload, a 429 on the final edit
        delivered.append((job.id, job.state))

    manager.deliver = slow_post
    job = await manager.submit(req("g1:a"), guild_id=1, user_id=1)
    await posting.wait()
    await manager.shutdown(grace=0.05)  # the grace ends while the result is being posted
    assert delivered == [(job.id, JobState.SUCCEEDED)]
    assert job.state is JobState.SUCCEEDED


async def test_the_drain_log_counts_jobs_not_tasks(caplog) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend)
    jobs = [await manager.submit(req("g1:same"), guild_id=1, user_id=u) for u in range(3)]
    await backend.wait_calls(1)
    await until(lambda: all(j.state is JobState.RUNNING for j in jobs))
    with caplog.at_level(logging.INFO, logger="bot.engine.manager"):
        await manager.shutdown(grace=0)
    (drain,) = [r for r in caplog.records if r.getMessage() == "draining jobs"]
    assert drain.jobs == 3  # type: ignore[attr-defined]


async def test_one_count_per_member_from_admission_to_the_end(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, user_max_jobs=2)
    closing(manager)
    with manager.holding(1, 1, 4):  # admitted, being acknowledged
        assert manager.active_count(1, 1) == 1 and manager.images_in_flight(1, 1) == 4
    job = await manager.submit(req("g1:a", count=2), guild_id=1, user_id=1)
    assert manager.active_count(1, 1) == 1 and manager.images_in_flight(1, 1) == 2
    heard: list[int] = []
    manager.add_listener(
        lambda j, e: heard.append(manager.images_in_flight(1, 1)) if e is JobEvent.FINISHED else None
    )
    await backend.wait_calls(1)
    backend.release_all()
    await manager.wait(job.id)
    assert heard == [2]  # still counted while FINISHED is heard (the quota adds it then), no gap
    assert manager.active_count(1, 1) == 0 and manager.images_in_flight(1, 1) == 0


async def test_cancel_reasons_are_one_enum(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1)
    closing(manager)
    job = await manager.submit(req("g1:a"), guild_id=1, user_id=1)
    await manager.cancel(job.id, reason="cancelled", by="someone")
    assert job.error_reason == EndReason.CANCELLED
