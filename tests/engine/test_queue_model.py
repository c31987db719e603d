"""The pure queue model, driven by a hypothesis state machine; every invariant checked after every step.

Also: positions from the counted structures against a brute-force simulation of the round-robin order, the
bucketing rule, and the shrunk counterexamples of defects 1, 3 and 4 as plain regression tests.
"""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import note as hypothesis_note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bot.engine.queue import (
    FlightState,
    GuildQueue,
    JobPhase,
    Position,
    QueueModel,
    Requeued,
    Start,
    Stop,
    Ticket,
    estimate_wait,
    mean_generation_s,
    shown_position,
)

GUILDS = st.integers(1, 3)
MEMBERS = st.integers(1, 3)
PROMPTS = st.sampled_from(["a", "b", "c", None])  # None: a private flight (reroll)
REASONS = st.sampled_from(["cancelled", "timeout", "shutdown", "store_failed"])


def brute_order(queue: GuildQueue) -> list[Ticket]:
    """The order tickets would start in if nothing else arrived, by simulating the turns one at a time."""
    members = {m: list(member.tickets) for m, member in queue.members.items()}
    marks = {m: member.mark for m, member in queue.members.items()}
    tick = max([mark[1] for mark in marks.values() if mark and mark[0] == 1] + [0])
    order: list[Ticket] = []
    while members:
        member_id = min(members, key=lambda m: marks[m])
        order.append(members[member_id].pop(0))
        if members[member_id]:
            tick += 10**9  # later than any real mark: to the back of the rotation
            marks[member_id] = (1, tick)
        else:
            del members[member_id]
    return order


class QueueMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.limits = {1: 1, 2: 2, 3: 2}
        self.model = QueueModel({"big": 2, "small": 1}, guild_limit=lambda g: self.limits[g])
        self.ids = itertools.count(1)
        self.live: set[str] = set()  # jobs the test believes have not ended
        self.ended: set[str] = set()
        self.started_flights: set[int] = set()
        self.stopped: set[int] = set()
        self.positions: dict[str, int] = {}
        self.noting = True

    def note(self, text: str) -> None:
        if self.noting:
            hypothesis_note(text)

    # -- effects --------------------------------------------------------------------------------------------
    def apply(self, decisions: list[object]) -> None:
        self.note(repr(decisions))
        for decision in decisions:
            if isinstance(decision, Start):
                self.started_flights.add(decision.flight)
                for job in decision.jobs:
                    assert self.model.phase(job) is JobPhase.RUNNING
                    self.positions.pop(job, None)
            elif isinstance(decision, Stop):
                assert decision.flight not in self.stopped
                self.stopped.add(decision.flight)
            elif isinstance(decision, Position):
                assert self.model.phase(decision.job) is JobPhase.WAITING
                self.positions[decision.job] = decision.position
            elif isinstance(decision, Requeued):
                for job in decision.jobs:
                    assert self.model.phase(job) is JobPhase.WAITING

    def fairness_before(self) -> tuple[int | None, dict[int, str | None]]:
        """The guild that should be served next (no pools restricting), and each guild's front job."""
        fronts = {g: (q.front().job if q.front() else None) for g, q in self.model.guilds.items()}
        candidates = [
            g for g, q in self.model.guilds.items() if q.members and q.running < self.model.guild_limit(g)
        ]
        best = min(
            candidates,
            key=lambda g: (self.model._guild_served.get(g, -1), self.model._guild_arrival.get(g, 0)),
            default=None,
        )
        return best, fronts

    # -- rules ----------------------------------------------------------------------------------------------
    @rule(guild=GUILDS, member=MEMBERS, prompt=PROMPTS, images=st.integers(1, 4), pool=st.booleans())
    def admit(self, guild: int, member: int, prompt: str | None, images: int, pool: bool) -> None:
        job = f"j{next(self.ids)}"
        # Restricted flights ("small" only) share a key space of their own, as a model or size would.
        key = None if prompt is None else (f"{prompt}:small" if pool else prompt)
        eligible = ("small",) if pool else None
        decisions = self.model.admit(job, guild, member, key=key, images=images, eligible=eligible)
        self.live.add(job)
        self.apply(decisions)
        # Defect 3: a newcomer never shares a flight that is stopping.
        flight = self.model.flight_of(job)
        assert flight is not None and flight.state is not FlightState.STOPPING

    @precondition(lambda self: self.live)
    @rule(data=st.data(), reason=REASONS)
    def leave(self, data: st.DataObject, reason: str) -> None:
        job = data.draw(st.sampled_from(sorted(self.live)))
        fair_guild, fronts = self.fairness_before()
        restricted = self.model._restricted
        decisions = self.model.leave(job, reason)
        self.live.discard(job)
        self.ended.add(job)
        self.apply(decisions)
        grants = [d for d in decisions if isinstance(d, Start)]
        if len(grants) == 1 and not restricted and fair_guild is not None:
            holder = self.model.flights[grants[0].flight].holder
            entry = self.model.jobs[holder]
            if fronts.get(entry.guild_id) == holder:
                assert entry.guild_id == fair_guild or not self._could_serve(fair_guild, fronts)

    def _could_serve(self, guild: int, fronts: dict[int, str | None]) -> bool:
        front = fronts.get(guild)
        return front is not None and front in self.model.jobs and self.model.phase(front) is JobPhase.WAITING

    @precondition(lambda self: any(f.state is not FlightState.QUEUED for f in self.model.flights.values()))
    @rule(data=st.data(), outcome=st.sampled_from(["succeeded", "failed", "timed_out", "wound_down"]))
    def end_flight(self, data: st.DataObject, outcome: str) -> None:
        flights = sorted(f.id for f in self.model.flights.values() if f.state is not FlightState.QUEUED)
        flight_id = data.draw(st.sampled_from(flights))
        flight = self.model.flights[flight_id]
        jobs = set(flight.jobs)
        fair_guild, fronts = self.fairness_before()
        restricted = self.model._restricted
        decisions = self.model.flight_ended(flight_id, outcome)
        for job in jobs:
            assert self.model.ended[job] == outcome
        self.live -= jobs
        self.ended |= jobs
        self.apply(decisions)
        grants = [d for d in decisions if isinstance(d, Start)]
        if len(grants) == 1 and not restricted and fair_guild is not None:
            holder = self.model.flights[grants[0].flight].holder
            assert self.model.jobs[holder].guild_id == fair_guild
            assert fronts[fair_guild] == holder  # the member served longest ago, its oldest job

    @rule()
    def announce(self) -> None:
        self.apply(self.model.positions())  # k changes since the last call: edges within k are checked

    @rule(guild=GUILDS, raise_by=st.integers(0, 2))
    def raise_limit(self, guild: int, raise_by: int) -> None:
        self.limits[guild] = min(4, self.limits[guild] + raise_by)
        self.apply(self.model.limits_changed())

    @rule()
    def grow_pool(self) -> None:
        self.apply(self.model.set_backends({"big": 2, "small": min(3, self.model.backends["small"] + 1)}))

    @rule(held=st.booleans())
    def hold_starts(self, held: bool) -> None:
        self.apply(self.model.hold(held))

    # -- invariants -----------------------------------------------------------------------------------------
    @invariant()
    def nothing_starts_while_held(self) -> None:
        """While starts are held no slot is taken (flights end, jobs join running ones); released, the model is
        work-conserving again at once (model_invariants)."""
        if self.model.held:
            assert self.model.slots_held <= getattr(self, "slots_seen", 0)
        self.slots_seen = self.model.slots_held

    @invariant()
    def model_invariants(self) -> None:
        self.model.check_invariants()

    @invariant()
    def every_job_ends_once_and_is_counted(self) -> None:
        assert set(self.model.jobs) == self.live
        assert not (self.live & self.ended)
        assert set(self.model.ended) == self.ended

    @invariant()
    def positions_match_brute_force(self) -> None:
        pending = self.model.positions_pending
        for queue in self.model.guilds.values():
            order = brute_order(queue)
            for place, ticket in enumerate(order, start=1):
                assert queue.position(ticket) == place
                assert queue.at(place) is ticket
                # Once announced, what was last announced shows the same as the true position.
                if not pending:
                    assert shown_position(self.positions[ticket.job]) == shown_position(place)
            assert queue.at(len(order) + 1) is None

    @invariant()
    def one_slot_per_flight(self) -> None:
        held = sum(1 for f in self.model.flights.values() if f.state is not FlightState.QUEUED)
        assert held == self.model.slots_held


TestQueueMachine = QueueMachine.TestCase


class FleetGrantedMachine(QueueMachine):
    """The same model in a fleet (``external``): nothing starts but through :meth:`QueueModel.grant`, which
    gives the slot to the member of the granted guild served longest ago with a ticket that backend serves."""

    def __init__(self) -> None:
        super().__init__()
        self.model = QueueModel({"big": 2, "small": 1}, guild_limit=lambda g: self.limits[g], external=True)
        #: The most slots that may be held now: raised by a grant alone.
        self.ceiling = 0

    @rule(guild=GUILDS, backend=st.sampled_from(["big", "small"]))
    def grant(self, guild: int, backend: str) -> None:
        queue = self.model.guilds.get(guild)
        expected = None
        if (
            queue is not None
            and not self.model.held
            and self.model.running[backend] < self.model.backends[backend]
            and queue.running < self.model.guild_limit(guild)
        ):
            # The rule (the same as the model's own dispatch): the member served longest ago (by mark) with a
            # ticket this backend serves, and that member's oldest such ticket; not the first servable ticket in
            # the guild's round order, which may belong to a member served more recently.
            for _, _, member in sorted((m.mark, id(m), m) for m in queue.members.values()):
                servable = [
                    t
                    for t in member.tickets
                    if self.model.flights[t.flight].eligible is None
                    or backend in self.model.flights[t.flight].eligible
                ]
                if servable:
                    expected = servable[0].job
                    break
        demand_before = self.model.demand(guild)
        held_before = self.model.slots_held
        decisions = self.model.grant(guild, backend)
        self.apply(decisions)
        starts = [d for d in decisions if isinstance(d, Start)]
        if expected is None:
            assert not starts and self.model.slots_held == held_before
            return
        assert len(starts) == 1 and starts[0].backend == backend and expected in starts[0].jobs
        assert self.model.slots_held == held_before + 1
        assert self.model.flights[starts[0].flight].charged_guild == guild
        assert sum(self.model.demand(guild).values()) < sum(demand_before.values())
        assert guild in self.model.take_demand_changes()
        self.ceiling = self.model.slots_held

    @invariant()
    def nothing_starts_without_a_grant(self) -> None:
        """Outside ``grant`` the slots held only go down (flights end), whatever is admitted or released."""
        assert self.model.slots_held <= self.ceiling
        self.ceiling = self.model.slots_held


TestFleetGrantedMachine = FleetGrantedMachine.TestCase


# -- positions --------------------------------------------------------------------------------------------------
@given(st.lists(st.tuples(st.integers(1, 30), st.booleans(), st.booleans()), max_size=300))
def test_positions_agree_with_brute_force_in_a_deep_queue(ops: list[tuple[int, bool, bool]]) -> None:
    model = QueueModel({"b": 1}, guild_limit=lambda g: 1)
    shown: dict[str, int] = {}
    ids = itertools.count()
    waiting: list[str] = []
    for member, serve, announce in ops:
        if serve and model.flights:
            running = [f.id for f in model.flights.values() if f.state is FlightState.RUNNING]
            decisions = model.flight_ended(running[0]) if running else []
        else:
            job = f"j{next(ids)}"
            waiting.append(job)
            decisions = model.admit(job, 1, member, key=None)
        if announce:
            decisions = decisions + model.positions()
        for decision in decisions:
            if isinstance(decision, Position):
                shown[decision.job] = decision.position
    for decision in model.positions():
        shown[decision.job] = decision.position
    queue = model.guilds.get(1)
    if queue is None:
        return
    for place, ticket in enumerate(brute_order(queue), start=1):
        assert queue.position(ticket) == place
        assert shown_position(shown[ticket.job]) == shown_position(place)


def test_deep_queue_announces_only_what_changes() -> None:
    model = QueueModel({"b": 1}, guild_limit=lambda g: 1)
    for index in range(5000):
        model.admit(f"j{index}", 1, index, key=None)
    model.positions()
    running = next(f.id for f in model.flights.values() if f.state is FlightState.RUNNING)
    model.flight_ended(running)
    announced = model.positions()
    # Everyone moved up one; only bucket edges show something new: 1..10 exact, then 19, 29, ..., 999.
    assert 10 < len(announced) <= 40
    model.check_invariants()


@pytest.mark.parametrize(
    ("position", "shown"),
    [
        (1, (1, True)),
        (10, (10, True)),
        (11, (10, False)),
        (99, (90, False)),
        (100, (100, False)),
        (999, (900, False)),
        (1000, (1000, False)),
        (123_456, (1000, False)),
    ],
)
def test_shown_position_buckets(position: int, shown: tuple[int, bool]) -> None:
    assert shown_position(position) == shown


def test_estimated_wait_from_recent_generations() -> None:
    assert estimate_wait(4, mean_generation_s([10.0, 30.0]), slots=2) == 40.0
    assert estimate_wait(4, mean_generation_s([]), slots=2) is None


# -- shrunk counterexamples, kept as plain regression tests -------------------------------------------------------
def test_defect1_cancelled_queued_job_leaves_no_empty_guild_in_rotation() -> None:
    """Two run in a guild, a third waits and is cancelled: the next dispatch must not crash or leak."""
    model = QueueModel({"b": 4}, guild_limit=lambda g: 2)
    for job in ("j1", "j2", "j3"):
        model.admit(job, 1, 1, key=job)
    model.leave("j3", "cancelled")
    model.check_invariants()
    model.admit("j4", 2, 1, key="j4")  # any other guild's submit dispatches
    decisions = model.flight_ended(model.flight_of("j1").id)  # type: ignore[union-attr]
    model.check_invariants()
    assert 1 in model.guilds and model.guilds[1].running == 1
    assert not [d for d in decisions if isinstance(d, Start)]
    model.flight_ended(model.flight_of("j2").id)  # type: ignore[union-attr]
    model.flight_ended(model.flight_of("j4").id)  # type: ignore[union-attr]
    assert not model.guilds and model.slots_held == 0
    model.check_invariants()


def test_defect3_newcomer_never_joins_a_stopping_flight() -> None:
    model = QueueModel({"b": 1}, guild_limit=lambda g: 1)
    model.admit("j1", 1, 1, key="same")
    dying = model.flight_of("j1")
    assert model.leave("j1", "cancelled") == [Stop(dying.id)]  # type: ignore[union-attr]
    model.admit("j2", 1, 2, key="same")
    fresh = model.flight_of("j2")
    assert fresh is not dying and fresh.state is FlightState.QUEUED  # type: ignore[union-attr]
    model.check_invariants()
    model.flight_ended(dying.id, "wound_down")  # type: ignore[union-attr]
    assert model.phase("j2") is JobPhase.RUNNING
    model.check_invariants()


def test_defect4_identical_prompt_in_an_idle_guild_does_not_wait_behind_another_backlog() -> None:
    model = QueueModel({"b": 3}, guild_limit=lambda g: 1)
    model.admit("a1", 1, 1, key="other")  # guild 1 is at its limit ...
    model.admit("a2", 1, 1, key="same")  # ... so its "same" waits in guild 1's queue
    decisions = model.admit("b1", 2, 7, key="same")  # guild 2 is idle: its own ticket starts the flight
    assert Start(model.flight_of("b1").id, "b", ("a2", "b1")) in decisions  # type: ignore[union-attr]
    flight = model.flight_of("b1")
    assert flight.charged_guild == 2 and model.running_in(1) == 1  # type: ignore[union-attr]
    model.check_invariants()


def test_holder_leaving_moves_the_slot_to_a_guild_with_room_or_requeues() -> None:
    model = QueueModel({"b": 3}, guild_limit=lambda g: 1)
    model.admit("a1", 1, 1, key="same")
    model.admit("x", 2, 1, key="busy")  # guild 2 at its limit
    model.admit("b1", 2, 2, key="same")  # joins the running flight
    decisions = model.leave("a1", "cancelled")
    # Guild 2 has no room: the generation stops and b1 waits again with its own ticket.
    assert any(isinstance(d, Stop) for d in decisions)
    assert any(isinstance(d, Requeued) and d.jobs == ("b1",) for d in decisions)
    model.check_invariants()
    model.admit("c1", 3, 1, key="same")  # guild 3 is idle and joins the fresh flight: it starts there
    assert model.phase("b1") is JobPhase.RUNNING and model.flight_of("b1").charged_guild == 3  # type: ignore[union-attr]
    model.check_invariants()
    model.leave("c1", "cancelled")
    assert model.phase("b1") is JobPhase.WAITING
    model.check_invariants()


def test_pools_least_loaded_backend_and_eligibility() -> None:
    model = QueueModel({"big": 4, "small": 1}, guild_limit=lambda g: 8)
    model.admit("s1", 1, 1, key="s1", eligible=["small"])
    model.admit("s2", 1, 2, key="s2", eligible=["small"])  # small is full: waits
    decisions = model.admit("any", 1, 3, key="any")  # served by big although s2 is ahead of it
    assert Start(model.flight_of("any").id, "big", ("any",)) in decisions  # type: ignore[union-attr]
    assert model.phase("s2") is JobPhase.WAITING
    model.check_invariants()


# The state machine's own shrunk counterexamples with each fix reverted, replayed as they were found.
def _machine() -> QueueMachine:
    machine = QueueMachine()
    machine.noting = False
    machine.check = lambda: (  # type: ignore[attr-defined]
        machine.model_invariants(),
        machine.every_job_ends_once_and_is_counted(),
        machine.positions_match_brute_force(),
        machine.one_slot_per_flight(),
    )
    return machine


def test_shrunk_defect1_a_finished_guild_leaves_the_rotation() -> None:
    machine = _machine()
    machine.admit(guild=1, member=1, prompt="a", images=1, pool=False)
    machine.apply(machine.model.flight_ended(machine.model.flight_of("j1").id, "succeeded"))  # type: ignore[union-attr]
    machine.live.discard("j1")
    machine.ended.add("j1")
    machine.check()  # type: ignore[attr-defined]
    assert not machine.model.guilds


def test_shrunk_defect3_the_cancelled_generation_is_not_joinable() -> None:
    machine = _machine()
    machine.admit(guild=1, member=1, prompt="a", images=1, pool=False)
    machine.apply(machine.model.leave("j1", "cancelled"))
    machine.live.discard("j1")
    machine.ended.add("j1")
    machine.check()  # type: ignore[attr-defined]
    machine.admit(guild=1, member=1, prompt="a", images=1, pool=False)
    machine.check()  # type: ignore[attr-defined]


def test_shrunk_defect4_a_joiner_of_a_waiting_flight_gets_its_own_ticket() -> None:
    machine = _machine()
    machine.admit(guild=1, member=1, prompt="a", images=1, pool=False)
    machine.admit(guild=1, member=1, prompt="b", images=1, pool=False)
    machine.admit(guild=1, member=1, prompt="b", images=1, pool=False)
    machine.check()  # type: ignore[attr-defined]
    assert machine.model.waiting_in(1) == 2


def test_shrunk_a_fleet_grant_goes_to_the_member_served_longest_ago_even_past_its_unservable_front() -> None:
    """Found by the long run: member 1's first ticket only "small" serves; a grant on "big" still goes to member 1
    (served longest ago, with a ticket "big" serves), not to member 2, whose ticket is first in round order."""
    model = QueueModel({"big": 2, "small": 1}, guild_limit=lambda g: 2, external=True)
    model.admit("j1", 2, 1, key="a:small", eligible=("small",))
    model.admit("j2", 2, 1, key="a")
    model.admit("j3", 2, 2, key="b")
    (start,) = [d for d in model.grant(2, "big") if isinstance(d, Start)]
    assert start.jobs == ("j2",) and start.backend == "big"
    model.check_invariants()
