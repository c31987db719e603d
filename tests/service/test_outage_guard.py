"""What a fleet process does while its database is away (bot/service/fleet.py, ``OutageGuard``): no new job
while the job store is away or the lease is not renewed, no new generation while the lease is not renewed,
and back to normal (each backend as its breaker says) once the heartbeat is written again.

A real JobManager with controlled backends, a real ProcessLease whose heartbeat store the test makes fail;
the PostgreSQL end to end is tests/service/test_pg_outage.py.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bot.engine.errors import RequestRejected
from bot.engine.manager import JobManager
from bot.engine.models import JobState
from bot.engine.store import StoreError
from bot.service.fleet import UNAVAILABLE, OutageGuard, ProcessLease, this_process
from bot.settings import load_settings
from tests.engine.test_pool import LOST, PoolBackend, entry, make
from tests.helpers import ControlledBackend, make_manager, req, until


class HeartbeatStore:
    """The lease's side of the database: a heartbeat that is written, or refused while ``away``."""

    def __init__(self) -> None:
        self.away = False
        self.reachable = True  # what the guard reads as the job store's state in these tests

    async def heartbeat_process(self, process_id: str) -> bool:
        if self.away:
            raise StoreError("Cannot reach the PostgreSQL database postgresql://bot@db/imagine (refused)")
        return True


def guarded(manager: JobManager) -> tuple[OutageGuard, ProcessLease, HeartbeatStore]:
    store = HeartbeatStore()
    lease = ProcessLease(store, this_process(load_settings(env_file=None)), ttl_s=30)  # type: ignore[arg-type]
    guard = OutageGuard(manager, store, lease).install()  # type: ignore[arg-type]
    return guard, lease, store


async def test_a_lease_that_cannot_be_renewed_starts_no_new_generation_until_it_is(
    closing: Callable[[JobManager], None],
) -> None:
    backend = ControlledBackend()
    manager = make_manager(backend, guild_concurrency=1)
    closing(manager)
    _, lease, store = guarded(manager)
    running = await manager.submit(req("g1:running"), guild_id=1, user_id=1)
    queued = await manager.submit(req("g1:queued"), guild_id=1, user_id=2)
    await backend.wait_calls(1)

    store.away = True
    await lease.beat()
    assert not lease.renewing and manager.starts_held
    backend.release_all()  # the running one may finish...
    await manager.wait(running.id)
    assert running.state is JobState.SUCCEEDED
    # ...and its slot is granted to nobody: the queued job keeps its place, no backend call is made.
    assert manager.backend_in_flight == 0 and manager.guild_waiting(1) == 1
    assert queued.state is JobState.QUEUED and len(backend.calls) == 1
    manager.check_invariants()

    store.away = False
    await lease.beat()
    assert lease.renewing and not manager.starts_held
    await backend.wait_calls(2)
    backend.release_all()
    await manager.wait(queued.id)
    assert queued.state is JobState.SUCCEEDED
    manager.check_invariants()


async def test_new_jobs_are_refused_with_a_sentence_while_the_store_is_away_or_the_lease_unrenewed(
    closing: Callable[[JobManager], None],
) -> None:
    manager = make_manager(ControlledBackend(auto_release=True))
    closing(manager)
    guard, lease, store = guarded(manager)
    manager.check_admission(req("g1:fine"), 1, 1)  # both well: admitted

    store.reachable = False
    with pytest.raises(RequestRejected) as info:
        manager.check_admission(req("g1:x"), 1, 1)
    assert info.value.message == UNAVAILABLE and info.value.code == "database_away"
    with pytest.raises(RequestRejected, match="cannot take new image requests"):
        await manager.submit(req("g1:x"), guild_id=1, user_id=1)
    assert manager.active_jobs() == []

    store.reachable = True
    store.away = True
    await lease.beat()
    with pytest.raises(RequestRejected, match="cannot take new image requests"):
        manager.check_admission(req("g1:x"), 1, 1)
    store.away = False
    await lease.beat()
    job = await manager.submit(req("g1:after"), guild_id=1, user_id=1)
    await manager.wait(job.id)
    assert job.state is JobState.SUCCEEDED
    assert guard.refused == 3
    assert "DATABASE_URL" not in UNAVAILABLE and "PostgreSQL" not in UNAVAILABLE  # no operator advice


async def test_what_the_breaker_decided_while_starts_were_held_applies_once_they_are_released(
    closing: Callable[[JobManager], None],
) -> None:
    """A backend taken out by its circuit breaker during the hold stays out after it: only the healthy one
    gets the queued jobs (one at a time, its capacity)."""
    a, b = PoolBackend(), PoolBackend()
    a.probe_ok = False
    manager = make([entry("a", a, 1), entry("b", b, 1)], trip=1)
    closing(manager)
    _, lease, store = guarded(manager)
    first = [await manager.submit(req(f"first {i}"), guild_id=1, user_id=i) for i in range(2)]
    await until(lambda: len(a.calls) == 1 and len(b.calls) == 1)
    waiting = [await manager.submit(req(f"waiting {i}"), guild_id=1, user_id=10 + i) for i in range(2)]

    store.away = True
    await lease.beat()
    a.fail_with = LOST  # its generation fails after the backend accepted it: the breaker takes "a" out
    a.release_all()
    b.release_all()
    for job in first:
        await manager.wait(job.id)
    assert manager.pool["a"].up is False and manager.backend_in_flight == 0
    assert manager.guild_waiting(1) == 2

    store.away = False
    await lease.beat()
    assert manager.backend_in_flight == 1  # on "b" alone: "a" is still out
    await until(lambda: len(b.calls) == 2)
    assert len(a.calls) == 1
    b.release_all()
    await until(lambda: len(b.calls) == 3)
    b.release_all()
    for job in waiting:
        await manager.wait(job.id)
        assert (job.state, job.backend) == (JobState.SUCCEEDED, "b")
    manager.check_invariants()


async def test_a_backend_its_breaker_brings_back_during_the_hold_is_granted_nothing_until_it_ends(
    closing: Callable[[JobManager], None],
) -> None:
    a, b = PoolBackend(), PoolBackend()
    manager = make([entry("a", a, 1), entry("b", b, 1)], trip=1)
    closing(manager)
    _, lease, store = guarded(manager)
    first = [await manager.submit(req(f"first {i}"), guild_id=1, user_id=i) for i in range(2)]
    await until(lambda: len(a.calls) == 1 and len(b.calls) == 1)
    waiting = await manager.submit(req("waiting"), guild_id=1, user_id=10)

    store.away = True
    await lease.beat()
    a.fail_with = (
        LOST  # taken out, then its probe answers at once: back in the pool, as far as the breaker knows
    )
    a.release_all()
    await manager.wait(first[0].id)
    await until(lambda: a.probes > 0 and manager.pool["a"].up)
    assert manager.backend_in_flight == 1 and manager.guild_waiting(1) == 1  # only b's first, still held
    b.release_all()
    await manager.wait(first[1].id)
    assert manager.backend_in_flight == 0 and waiting.state is JobState.QUEUED

    store.away = False
    await lease.beat()
    assert manager.backend_in_flight == 1
    a.fail_with = None
    a.release_all()
    b.release_all()
    await until(lambda: len(a.calls) + len(b.calls) == 3)
    a.release_all()
    b.release_all()
    await manager.wait(waiting.id)
    assert waiting.state is JobState.SUCCEEDED
    manager.check_invariants()
