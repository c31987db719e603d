"""The fleet's planner: every plan keeps the limits, conserves work and follows the turns (checked by
``check_plan`` against a brute-force replay), and a fleet of processes driven by it gives each guild the share
one process's queue model gives it, in every window of 20 starts."""

from __future__ import annotations

import itertools
from collections import Counter, deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.engine.fleet_queue import Demand, FleetPlanner, Grant, PlanError, Slot, check_plan
from bot.engine.queue import QueueModel, Start

BACKENDS = {"big": 3, "small": 1}
ELIGIBLE = st.sampled_from([None, frozenset({"small"}), frozenset({"big"}), frozenset({"big", "small"})])


@st.composite
def fleet_rows(draw: st.DrawFn) -> tuple[list[Demand], list[Slot]]:
    guilds = draw(st.lists(st.integers(1, 8), min_size=1, max_size=8, unique=True))
    demand: list[Demand] = []
    slots: list[Slot] = []
    epochs = itertools.count(1)
    for guild in guilds:
        owner = draw(st.sampled_from(["a", "b"]))
        limit = draw(st.integers(1, 3))
        for eligible in draw(st.lists(ELIGIBLE, min_size=1, max_size=2, unique=True)):
            demand.append(Demand(owner, guild, eligible, draw(st.integers(0, 5)), limit, float(guild % 3)))
        for _ in range(draw(st.integers(0, 2))):
            backend = draw(st.sampled_from(sorted(BACKENDS)))
            slots.append(Slot(next(epochs), owner, guild, backend, None, pending=draw(st.booleans())))
    # Never more held than the capacity (the rows the dispatcher reads obey its earlier plans).
    per_backend: Counter[str] = Counter()
    kept = []
    for slot in slots:
        if per_backend[slot.backend] < BACKENDS[slot.backend]:
            per_backend[slot.backend] += 1
            kept.append(slot)
    return demand, kept


@settings(max_examples=300)
@given(rounds=st.lists(fleet_rows(), min_size=1, max_size=4))
def test_every_plan_keeps_limits_conserves_work_and_follows_the_turns(
    rounds: list[tuple[list[Demand], list[Slot]]],
) -> None:
    planner = FleetPlanner(BACKENDS)
    for demand, slots in rounds:  # the turns carry over from plan to plan
        before = {g: planner.last_served(g) for g in {d.guild_id for d in demand}}
        before = {g: t for g, t in before.items() if t >= 0}
        grants = planner.plan(demand, slots)
        check_plan(BACKENDS, demand, slots, grants, before)


def test_check_plan_catches_an_unfair_grant_and_a_wasted_slot() -> None:
    demand = [Demand("a", 1, None, 2, 2, 0.0), Demand("b", 2, None, 2, 2, 1.0)]
    with pytest.raises(PlanError, match="served longer ago"):
        check_plan({"x": 1}, demand, [], [Grant("b", 2, "x", None)], {})
    with pytest.raises(PlanError, match="is free"):
        check_plan({"x": 2}, demand, [], [Grant("a", 1, "x", None)], {})
    with pytest.raises(PlanError, match="over its capacity"):
        check_plan({"x": 1}, demand, [Slot(1, "a", 1, "x", None)], [Grant("a", 1, "x", None)], {})


def test_a_slot_granted_but_not_yet_shown_by_demand_is_not_granted_twice() -> None:
    planner = FleetPlanner({"x": 4})
    demand = [Demand("a", 1, None, 1, 4, 0.0)]
    assert planner.plan(demand, [Slot(1, "a", 1, "x", None, pending=True)]) == []
    assert planner.plan(demand, [Slot(1, "a", 1, "x", None, pending=False)]) == [Grant("a", 1, "x", None)]


def test_never_served_guilds_go_in_the_order_their_demand_appeared_then_by_last_turn() -> None:
    planner = FleetPlanner({"x": 1})
    demand = [
        Demand("a", 7, None, 3, 1, 2.0),
        Demand("b", 3, None, 3, 1, 1.0),
        Demand("a", 5, None, 3, 1, 3.0),
    ]
    order = []
    slots: list[Slot] = []
    for _ in range(6):
        grants = planner.plan(demand, slots)
        assert len(grants) == 1
        order.append(grants[0].guild_id)
        slots = []  # the slot ends before the next plan
    assert order == [3, 7, 5, 3, 7, 5]


def _one_process_order(jobs: list[tuple[int, int]], capacity: int, limit: int) -> list[int]:
    """The guilds in the order one process's queue model starts their jobs (each ends in start order)."""
    model = QueueModel({"x": capacity}, guild_limit=lambda g: limit)
    order: list[int] = []
    running: deque[int] = deque()
    pending = deque(jobs)
    ids = itertools.count()

    def note(decisions: list[object]) -> None:
        for d in decisions:
            if isinstance(d, Start):
                order.append(model.flights[d.flight].charged_guild)  # type: ignore[arg-type]
                running.append(d.flight)

    while pending:  # the burst arrives while the first slots are busy
        guild, member = pending.popleft()
        note(model.admit(f"j{next(ids)}", guild, member, key=None))
    while running:
        note(model.flight_ended(running.popleft()))
    return order


def _fleet_order(jobs: list[tuple[int, int]], owners: dict[int, str], capacity: int, limit: int) -> list[int]:
    """The same burst in a fleet: each guild's process has its own model (external), the planner grants."""
    models = {
        o: QueueModel({"x": capacity}, guild_limit=lambda g: limit, external=True)
        for o in set(owners.values())
    }
    planner = FleetPlanner({"x": capacity})
    ids = itertools.count()
    for guild, member in jobs:
        models[owners[guild]].admit(f"j{next(ids)}", guild, member, key=None)
    first_seen: dict[int, float] = {}
    for n, (guild, _) in enumerate(jobs):
        first_seen.setdefault(guild, float(n))
    held: deque[tuple[str, int, int]] = deque()  # (owner, guild, flight), in start order
    order: list[int] = []
    epochs = itertools.count(1)
    while True:
        demand = [
            Demand(owner, guild, eligible, waiting, limit, first_seen[guild])
            for owner, model in models.items()
            for guild in model.guilds
            for eligible, waiting in model.demand(guild).items()
        ]
        slots = [Slot(next(epochs), o, g, "x", None) for o, g, _ in held]
        for grant in planner.plan(demand, slots):
            starts = [
                d for d in models[grant.owner].grant(grant.guild_id, grant.backend) if isinstance(d, Start)
            ]
            assert len(starts) == 1
            order.append(grant.guild_id)
            held.append((grant.owner, grant.guild_id, starts[0].flight))
        if not held:
            return order
        owner, _, flight = held.popleft()
        models[owner].flight_ended(flight)


@settings(max_examples=100)
@given(
    guilds=st.integers(2, 12),
    jobs_per_guild=st.lists(st.integers(1, 12), min_size=12, max_size=12),
    capacity=st.integers(1, 4),
    limit=st.integers(1, 3),
    split=st.lists(st.sampled_from(["a", "b"]), min_size=12, max_size=12),
)
def test_a_fleet_gives_each_guild_its_one_process_share_in_every_window_of_20_starts(
    guilds: int, jobs_per_guild: list[int], capacity: int, limit: int, split: list[str]
) -> None:
    jobs = []
    for round_ in range(max(jobs_per_guild)):  # interleaved arrivals, as a burst over many guilds gives
        for guild in range(1, guilds + 1):
            if round_ < jobs_per_guild[guild - 1]:
                jobs.append((guild, round_ % 3))
    owners = {g: split[g - 1] for g in range(1, guilds + 1)}
    single = _one_process_order(jobs, capacity, limit)
    fleet = _fleet_order(jobs, owners, capacity, limit)
    assert Counter(fleet) == Counter(single)
    for start in range(max(1, len(single) - 19)):
        ours, theirs = Counter(fleet[start : start + 20]), Counter(single[start : start + 20])
        for guild in range(1, guilds + 1):
            assert abs(ours[guild] - theirs[guild]) <= 1, (start, guild, fleet, single)
