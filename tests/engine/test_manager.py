"""The job manager: limits held and reached, fairness, cancellation, timeouts, shutdown, single flight."""

from __future__ import annotations

import asyncio
import random

import pytest

from bot.engine.cache import Found
from bot.engine.errors import FailureReason, GenerationError, RequestRejected, ShuttingDown
from bot.engine.manager import JobEvent
from bot.engine.models import ImageRequest, Job, JobState
from tests.helpers import ControlledBackend, make_manager, req, until


async def test_random_load_never_exceeds_and_reaches_limits(closing) -> None:
    rng = random.Random(1234)
    backend = ControlledBackend(auto_release=True, delay=lambda: rng.uniform(0.005, 0.03))
    manager = make_manager(backend, backend_concurrency=6, guild_concurrency=2)
    closing(manager)
    manager.set_guild_limit(3, 1)
    manager.set_guild_limit(4, 3)
    samples: list[tuple[int, dict[int, int], dict[int, int]]] = []
    manager.add_listener(
        lambda job, event: samples.append(
            (
                manager.backend_in_flight,
                {g: manager.guild_in_flight(g) for g in range(1, 6)},
                {g: manager.guild_waiting(g) for g in range(1, 6)},
            )
        )
    )
    jobs: list[Job] = []
    for index in range(120):
        guild = rng.randint(1, 5)
        jobs.append(
            await manager.submit(req(f"g{guild}:job {index}"), guild_id=guild, user_id=rng.randint(1, 4))
        )
        if rng.random() < 0.3:
            await asyncio.sleep(0)
    await asyncio.gather(*(manager.wait(j.id) for j in jobs))

    assert all(j.state is JobState.SUCCEEDED for j in jobs)
    limits = {1: 2, 2: 2, 3: 1, 4: 3, 5: 2}
    # Never exceeded, measured by the backend itself ...
    assert backend.max_in_flight <= 6
    for guild, limit in limits.items():
        assert backend.max_per_guild[f"g{guild}"] <= limit, guild
    # ... and reached: at every moment, either the backend was full or every guild with waiting work was
    # at its own limit (no slot left idle while someone could use it).
    assert backend.max_in_flight == 6
    assert len(samples) > 300
    for total, running, waiting in samples:
        assert total <= 6 and all(running[g] <= limits[g] for g in limits)
        assert total == 6 or all(running[g] == limits[g] for g in limits if waiting[g]), (
            total,
            running,
            waiting,
        )


async def test_guild_limits_reached_when_backend_is_the_bottleneck(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=3, guild_concurrency=2)
    closing(manager)
    for index in range(4):
        await manager.submit(req(f"g1:{index}"), guild_id=1, user_id=index)
    await backend.wait_calls(2)
    await asyncio.sleep(0.05)
    assert backend.in_flight == 2  # guild 1 alone: its own limit, not the backend's
    await manager.submit(req("g2:a"), guild_id=2, user_id=1)
    await backend.wait_calls(3)
    assert backend.in_flight == 3  # min(2 guilds x 2, 3)
    backend.release_all()


async def test_backend_gate_is_round_robin_across_guilds(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1, guild_concurrency=4)
    closing(manager)
    for index in range(4):
        await manager.submit(req(f"gA:{index}"), guild_id=1, user_id=1)
    await backend.wait_calls(1)
    await manager.submit(req("gB:0"), guild_id=2, user_id=1)
    await manager.submit(req("gC:0"), guild_id=3, user_id=1)
    for expected_calls in range(2, 7):
        backend.release_all()
        await backend.wait_calls(expected_calls)
    backend.release_all()
    # Guild A's backlog does not delay B and C: after A's first job, B and C go next.
    assert backend.start_order[:4] == ["gA:0", "gB:0", "gC:0", "gA:1"]


async def test_users_take_turns_inside_a_guild(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=4, guild_concurrency=1)
    closing(manager)
    for index in range(3):
        await manager.submit(req(f"g1:alice{index}"), guild_id=1, user_id=1)
    queued_bob = await manager.submit(req("g1:bob0"), guild_id=1, user_id=2)
    await manager.submit(req("g1:carol0"), guild_id=1, user_id=3)
    await backend.wait_calls(1)
    await until(
        lambda: queued_bob.queue_position == 1
    )  # bob is next although alice queued two more before him
    for expected in range(2, 6):
        backend.release_all()
        await backend.wait_calls(expected)
    backend.release_all()
    assert backend.start_order == ["g1:alice0", "g1:bob0", "g1:carol0", "g1:alice1", "g1:alice2"]


async def test_queue_positions_are_known_and_updated(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1, guild_concurrency=1)
    closing(manager)
    events: list[tuple[str, JobEvent, int | None]] = []
    manager.add_listener(lambda job, event: events.append((job.id, event, job.queue_position)))
    first = await manager.submit(req("g1:a"), guild_id=1, user_id=1)
    second = await manager.submit(req("g1:b"), guild_id=1, user_id=2)
    third = await manager.submit(req("g1:c"), guild_id=1, user_id=3)
    await backend.wait_calls(1)
    await until(lambda: third.queue_position == 2)
    assert second.queue_position == 1
    assert first.queue_position is None
    backend.release_all()
    await until(lambda: third.queue_position == 1)
    assert (third.id, JobEvent.QUEUED, 1) in events
    backend.release_all()
    await until(lambda: len(backend.calls) == 3)
    backend.release_all()


async def test_cancel_queued_job_never_reaches_backend(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1)
    closing(manager)
    running = await manager.submit(req("g1:run"), guild_id=1, user_id=1)
    queued = await manager.submit(req("g1:wait"), guild_id=1, user_id=2)
    await backend.wait_calls(1)
    assert queued.state is JobState.QUEUED
    assert await manager.cancel(queued.id, by="an admin") is True
    assert queued.state is JobState.CANCELLED
    assert queued.error_message == "Cancelled by an admin."
    assert queued.cancelled_by == "an admin"
    backend.release_all()
    await manager.wait(running.id)
    await asyncio.sleep(0.05)
    assert [c.request.prompt for c in backend.calls] == ["g1:run"]
    assert await manager.cancel(running.id) is False  # finished jobs cannot be cancelled


async def test_cancel_running_job_reaches_backend_and_frees_slot(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1)
    closing(manager)
    running = await manager.submit(req("g1:run"), guild_id=1, user_id=1)
    waiting = await manager.submit(req("g2:next"), guild_id=2, user_id=1)
    await backend.wait_calls(1)
    assert running.state is JobState.RUNNING
    assert await manager.cancel(running.id) is True
    assert backend.calls[0].cancelled is True
    assert running.state is JobState.CANCELLED
    await backend.wait_calls(2)  # the freed slot went to the next job
    backend.release_all()
    await manager.wait(waiting.id)
    assert waiting.state is JobState.SUCCEEDED


async def test_queue_timeout(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1, queue_timeout_s=0.2)
    closing(manager)
    await manager.submit(req("g1:hog"), guild_id=1, user_id=1)
    late = await manager.submit(req("g1:late"), guild_id=1, user_id=2)
    await manager.wait(late.id)
    assert late.state is JobState.TIMED_OUT
    assert late.error_reason == FailureReason.TIMEOUT.value
    assert "queue" in (late.error_message or "")
    assert len(backend.calls) == 1
    backend.release_all()


async def test_job_timeout_counts_from_backend_call(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, job_timeout_s=0.2)
    closing(manager)
    job = await manager.submit(req("g1:slow"), guild_id=1, user_id=1)
    await manager.wait(job.id)
    assert job.state is JobState.TIMED_OUT
    assert backend.calls[0].cancelled is True
    assert manager.backend_in_flight == 0


async def test_failing_backend_releases_its_slot(closing) -> None:
    backend = ControlledBackend(auto_release=True)
    backend.fail_with = GenerationError(FailureReason.UNAVAILABLE, "The image service is down.")
    manager = make_manager(backend, backend_concurrency=1, guild_concurrency=1)
    closing(manager)
    first = await manager.submit(req("g1:a"), guild_id=1, user_id=1)
    await manager.wait(first.id)
    assert first.state is JobState.FAILED
    assert first.error_reason == "unavailable"
    assert first.error_message == "The image service is down."
    assert manager.backend_in_flight == 0
    backend.fail_with = RuntimeError("boom")
    second = await manager.submit(req("g1:b"), guild_id=1, user_id=1)
    await manager.wait(second.id)
    assert second.state is JobState.FAILED
    assert second.error_reason == "internal"
    assert "boom" not in (second.error_message or "")  # no internals in front of users
    backend.fail_with = None
    third = await manager.submit(req("g1:c"), guild_id=1, user_id=1)
    await manager.wait(third.id)
    assert third.state is JobState.SUCCEEDED


async def test_user_limit_refuses_with_reason(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, user_max_jobs=2)
    closing(manager)
    first = await manager.submit(req("g1:a"), guild_id=1, user_id=7)
    await manager.submit(req("g1:b"), guild_id=1, user_id=7)
    with pytest.raises(RequestRejected) as refused:
        await manager.submit(req("g1:c"), guild_id=1, user_id=7)
    assert refused.value.code == "user_limit"
    assert "2 image jobs" in refused.value.message
    await manager.submit(req("g2:c"), guild_id=2, user_id=7)  # the limit is per guild
    await backend.wait_calls(1)
    backend.calls[0].release.set()
    await manager.wait(first.id)
    await manager.submit(req("g1:d"), guild_id=1, user_id=7)
    backend.release_all()


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (ImageRequest(prompt="   "), "empty"),
        (ImageRequest(prompt="x" * 1501), "1500"),
        (ImageRequest(prompt="ok", negative_prompt="n" * 501), "500"),
        (ImageRequest(prompt="ok", count=5), "Count"),
        (ImageRequest(prompt="ok", count=0), "Count"),
        (ImageRequest(prompt="ok", width=999, height=3), "999x3"),
        (ImageRequest(prompt="ok", seed=-1), "Seed"),
        (ImageRequest(prompt="ok", model="nope"), "nope"),
    ],
)
async def test_invalid_requests_refused_before_a_job_exists(closing, request_, fragment) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, models=["test-model"])
    closing(manager)
    with pytest.raises(RequestRejected) as refused:
        await manager.submit(request_, guild_id=1, user_id=1)
    assert fragment in refused.value.message
    assert manager.active_jobs() == []
    assert manager.task_count() == 0


async def test_shutdown_drains_running_work_within_grace() -> None:
    baseline = asyncio.all_tasks()
    backend = ControlledBackend(auto_release=True, delay=0.1)
    manager = make_manager(backend, backend_concurrency=2)
    delivered: list[tuple[str, JobState]] = []

    async def deliver(job: Job) -> None:
        await asyncio.sleep(0.01)
        delivered.append((job.id, job.state))

    manager.deliver = deliver
    jobs = [await manager.submit(req(f"g1:{i}"), guild_id=1, user_id=i) for i in range(3)]
    await manager.shutdown(grace=5)
    assert [j.state for j in jobs] == [JobState.SUCCEEDED] * 3
    assert sorted(delivered) == sorted((j.id, JobState.SUCCEEDED) for j in jobs)
    assert manager.task_count() == 0
    assert asyncio.all_tasks() == baseline
    with pytest.raises(ShuttingDown):
        await manager.submit(req("g1:late"), guild_id=1, user_id=1)


async def test_shutdown_cancels_what_outlives_grace_and_tells_it() -> None:
    baseline = asyncio.all_tasks()
    backend = ControlledBackend()
    manager = make_manager(backend, backend_concurrency=1)
    delivered: list[tuple[str, JobState, str | None]] = []

    async def deliver(job: Job) -> None:
        delivered.append((job.id, job.state, job.error_reason))

    manager.deliver = deliver
    running = await manager.submit(req("g1:forever"), guild_id=1, user_id=1)
    queued = await manager.submit(req("g1:never"), guild_id=1, user_id=2)
    await backend.wait_calls(1)
    await manager.shutdown(grace=0.2)
    assert running.state is JobState.CANCELLED
    assert queued.state is JobState.CANCELLED
    assert running.error_message == "Stopped by a restart."
    assert backend.calls[0].cancelled is True  # the backend heard of it
    assert {(j, s, r) for j, s, r in delivered} == {
        (running.id, JobState.CANCELLED, "shutdown"),
        (queued.id, JobState.CANCELLED, "shutdown"),
    }
    assert manager.task_count() == 0
    assert asyncio.all_tasks() == baseline


async def test_shutdown_hard_stops_a_stuck_delivery(monkeypatch) -> None:
    import bot.engine.manager as manager_module

    monkeypatch.setattr(manager_module, "SHUTDOWN_REPORT_S", 0.2)
    baseline = asyncio.all_tasks()
    backend = ControlledBackend(auto_release=True)
    manager = make_manager(backend)

    async def stuck(job: Job) -> None:
        await asyncio.Event().wait()

    manager.deliver = stuck
    await manager.submit(req("g1:a"), guild_id=1, user_id=1)
    await backend.wait_calls(1)
    await manager.shutdown(grace=0.1)
    assert asyncio.all_tasks() == baseline


async def test_single_flight_shares_one_generation(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend)
    closing(manager)
    a = await manager.submit(req("g1:same"), guild_id=1, user_id=1)
    b = await manager.submit(req("g1:same"), guild_id=2, user_id=2)
    await backend.wait_calls(1)
    await asyncio.sleep(0.05)
    assert len(backend.calls) == 1
    assert b.state is JobState.RUNNING
    backend.release_all()
    await asyncio.gather(manager.wait(a.id), manager.wait(b.id))
    assert a.state is b.state is JobState.SUCCEEDED
    assert a.result is not None and b.result is not None
    assert a.result.images == b.result.images


async def test_one_waiter_leaving_does_not_stop_the_shared_generation(closing) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend)
    closing(manager)
    a = await manager.submit(req("g1:same"), guild_id=1, user_id=1)
    b = await manager.submit(req("g1:same"), guild_id=1, user_id=2)
    await backend.wait_calls(1)
    await manager.cancel(a.id)
    assert a.state is JobState.CANCELLED
    assert backend.calls[0].cancelled is False
    backend.release_all()
    await manager.wait(b.id)
    assert b.state is JobState.SUCCEEDED
    # The last waiter leaving does stop it.
    c = await manager.submit(req("g1:other"), guild_id=1, user_id=1)
    d = await manager.submit(req("g1:other"), guild_id=1, user_id=2)
    await backend.wait_calls(2)
    await manager.cancel(c.id)
    assert backend.calls[1].cancelled is False
    await manager.cancel(d.id)
    assert backend.calls[1].cancelled is True
    assert manager.backend_in_flight == 0


async def test_fresh_requests_do_not_share(closing) -> None:
    backend = ControlledBackend(auto_release=True)
    manager = make_manager(backend)
    closing(manager)
    jobs = [await manager.submit(req("g1:same", fresh=True), guild_id=1, user_id=i) for i in range(2)]
    await asyncio.gather(*(manager.wait(j.id) for j in jobs))
    assert len(backend.calls) == 2


async def test_listeners_hear_progress_and_errors_in_listeners_are_contained(closing) -> None:
    backend = ControlledBackend(auto_release=True)
    manager = make_manager(backend)
    closing(manager)
    events: list[JobEvent] = []

    def broken(job: Job, event: JobEvent) -> None:
        raise RuntimeError("listener bug")

    manager.add_listener(broken)
    manager.add_listener(lambda job, event: events.append(event))
    job = await manager.submit(req("g1:x"), guild_id=1, user_id=1)
    await manager.wait(job.id)
    assert job.state is JobState.SUCCEEDED
    assert events == [JobEvent.QUEUED, JobEvent.STARTED, JobEvent.PROGRESS, JobEvent.FINISHED]


class SlowStore:
    """A store whose writes take a while, like a busy disk: the window where a job is being submitted."""

    def __init__(self) -> None:
        self.saved: list[tuple[str, JobState]] = []
        self.gate = asyncio.Event()

    async def save_job(self, job: Job) -> None:
        if not self.saved:
            await self.gate.wait()
        self.saved.append((job.id, job.state))


async def test_cancel_while_the_job_is_still_being_submitted(closing) -> None:
    backend = ControlledBackend(auto_release=True)
    store = SlowStore()
    manager = make_manager(backend, store=store)
    closing(manager)
    submitting = asyncio.create_task(manager.submit(req("g1:slow disk"), guild_id=1, user_id=1))
    await until(lambda: manager.active_jobs() != [])
    (job,) = manager.active_jobs()
    cancelling = asyncio.create_task(manager.cancel(job.id, by="an admin"))
    await asyncio.sleep(0.05)
    store.gate.set()
    await submitting
    assert await cancelling is True
    assert job.state is JobState.CANCELLED
    assert backend.calls == []
    assert manager.active_count(1, 1) == 0
    assert store.saved[-1] == (job.id, JobState.CANCELLED)


async def test_cancel_right_after_submit_does_not_hang(closing) -> None:
    backend = ControlledBackend(auto_release=True)
    manager = make_manager(backend)
    closing(manager)
    job = await manager.submit(req("g1:instant cancel"), guild_id=1, user_id=1)
    async with asyncio.timeout(2):
        assert await manager.cancel(job.id) is True
    assert job.state is JobState.CANCELLED
    assert backend.calls == []
    assert manager.task_count() == 0 or await manager.wait(job.id) is not None


async def test_shutdown_waits_for_a_submit_in_progress() -> None:
    baseline = asyncio.all_tasks()
    backend = ControlledBackend()  # never finishes by itself
    store = SlowStore()
    manager = make_manager(backend, store=store)
    submitting = asyncio.create_task(manager.submit(req("g1:late"), guild_id=1, user_id=1))
    await until(lambda: manager.active_jobs() != [])
    shutting = asyncio.create_task(manager.shutdown(grace=0))
    await asyncio.sleep(0.05)
    store.gate.set()
    job = await submitting
    await shutting
    assert job.state is JobState.CANCELLED
    assert asyncio.all_tasks() == baseline


class RecordingCache:
    """A cache that always misses and records what is stored (a collaborator of the unit under test)."""

    def __init__(self) -> None:
        self.puts: list[str] = []

    async def lookup(self, key: str, *, claim: bool = False) -> Found:
        return Found(None)

    async def put(self, key: str, result) -> list[str]:
        self.puts.append(key)
        return [f"ref-{len(self.puts)}"]

    async def release_fill(self, key: str) -> None:
        raise AssertionError("nothing was claimed outside a fleet")


async def test_a_shared_generation_is_stored_once_and_every_job_gets_its_refs(closing) -> None:
    backend = ControlledBackend()
    cache = RecordingCache()
    manager = make_manager(backend, cache=cache)
    closing(manager)
    jobs = [await manager.submit(req("g1:same"), guild_id=1, user_id=u) for u in range(3)]
    await backend.wait_calls(1)
    backend.release_all()
    await asyncio.gather(*(manager.wait(j.id) for j in jobs))
    assert len(backend.calls) == 1
    assert len(cache.puts) == 1
    assert [j.image_refs for j in jobs] == [["ref-1"]] * 3
