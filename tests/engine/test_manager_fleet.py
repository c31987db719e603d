"""The manager in a fleet (``use_fleet_slots``): nothing starts without a slot the fleet granted, the slot goes
back when the generation ends, and a slot the fleet takes back stops its generation and sends the jobs back to
wait (never lost, never run twice at once). The fleet's side is a recording stand-in here; the real one, on
PostgreSQL, is tested in tests/service/test_dispatch.py."""

from __future__ import annotations

import asyncio

from bot.engine.models import JobState
from tests.helpers import ControlledBackend, make_manager, req, until


class Fleet:
    def __init__(self) -> None:
        self.demand_changes = 0
        self.freed: list[int] = []

    def demand_changed(self) -> None:
        self.demand_changes += 1

    def slot_freed(self, epoch: int) -> None:
        self.freed.append(epoch)


def fleet_manager(backend: ControlledBackend, **kw: object):
    manager = make_manager(backend, **kw)
    fleet = Fleet()
    manager.use_fleet_slots(fleet)
    return manager, fleet


async def test_nothing_starts_until_the_fleet_grants_a_slot_and_the_slot_goes_back_at_the_end(
    closing,
) -> None:
    backend = ControlledBackend()
    manager, fleet = fleet_manager(backend)
    closing(manager)
    job = await manager.submit(req("g1:a fox"), guild_id=1, user_id=1)
    await until(lambda: manager.demand(1) == {None: 1})
    assert fleet.demand_changes >= 1 and 1 in manager.take_demand_changes()
    await asyncio.sleep(0.05)
    assert not backend.calls and job.state is JobState.QUEUED  # a free local slot is not ours to take
    assert not manager.grant_slot(7, 2, "controlled")  # nothing waits in guild 2
    assert manager.grant_slot(7, 1, "controlled")
    await backend.wait_calls(1)
    assert manager.demand(1) == {} and manager.slots_held() == {7: manager.queue.flight_of(job.id).id}
    backend.release_all()
    await manager.wait(job.id)
    assert job.state is JobState.SUCCEEDED and fleet.freed == [7]
    assert manager.slots_held() == {}


async def test_a_grant_goes_to_the_member_served_longest_ago_in_that_guild(closing) -> None:
    backend = ControlledBackend(auto_release=True)
    manager, _ = fleet_manager(backend, guild_concurrency=3)
    closing(manager)
    first = [await manager.submit(req(f"g1:first {i}"), guild_id=1, user_id=1) for i in range(2)]
    other = await manager.submit(req("g1:other"), guild_id=1, user_id=2)
    await until(lambda: manager.demand(1) == {None: 3})
    for epoch in (1, 2, 3):
        assert manager.grant_slot(epoch, 1, "controlled")
        await backend.wait_calls(epoch)
    assert [c.request.prompt for c in backend.calls] == ["g1:first 0", "g1:other", "g1:first 1"]
    for job in (*first, other):
        await manager.wait(job.id)


async def test_a_lost_slot_stops_its_generation_and_the_job_waits_for_another(closing) -> None:
    backend = ControlledBackend()
    manager, fleet = fleet_manager(backend)
    closing(manager)
    job = await manager.submit(req("g1:a heron"), guild_id=1, user_id=1)
    await until(lambda: manager.demand(1) == {None: 1})
    assert manager.grant_slot(5, 1, "controlled")
    await until(lambda: job.state is JobState.RUNNING)
    manager.slot_lost(5)
    await until(lambda: backend.calls[0].cancelled)
    await until(lambda: job.state is JobState.QUEUED and sum(manager.demand(1).values()) == 1)
    assert fleet.freed == [5]
    assert manager.pool.primary.failures == 0  # a lapsed lease says nothing about the backend's health
    assert manager.grant_slot(6, 1, "controlled")
    await backend.wait_calls(2)
    backend.release_all()
    await manager.wait(job.id)
    assert job.state is JobState.SUCCEEDED and fleet.freed == [5, 6]
    assert sum(1 for c in backend.calls if c.finished) == 1


async def test_held_starts_publish_no_demand_and_refuse_grants(closing) -> None:
    backend = ControlledBackend(auto_release=True)
    manager, fleet = fleet_manager(backend)
    closing(manager)
    job = await manager.submit(req("g1:a wren"), guild_id=1, user_id=1)
    await until(lambda: manager.demand(1) == {None: 1})
    changes = fleet.demand_changes
    manager.hold_starts(True)
    assert fleet.demand_changes > changes and manager.demand(1) == {}
    assert not manager.grant_slot(1, 1, "controlled")
    manager.hold_starts(False)
    assert manager.demand(1) == {None: 1} and manager.grant_slot(2, 1, "controlled")
    await manager.wait(job.id)
    assert job.state is JobState.SUCCEEDED and fleet.freed == [2]


async def test_a_cancelled_running_job_gives_its_slot_back(closing) -> None:
    backend = ControlledBackend()
    manager, fleet = fleet_manager(backend)
    closing(manager)
    job = await manager.submit(req("g1:an owl"), guild_id=1, user_id=1)
    await until(lambda: manager.demand(1) == {None: 1})
    assert manager.grant_slot(9, 1, "controlled")
    await until(lambda: job.state is JobState.RUNNING)
    assert await manager.cancel(job.id)
    assert fleet.freed == [9] and manager.slots_held() == {}
