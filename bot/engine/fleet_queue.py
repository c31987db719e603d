"""The fleet's one fair queue, at the level the dispatcher decides: which guild gets the next free backend slot.

Several bot processes share one database (bot/service/dispatch.py). Each guild lives in exactly one process (its
gateway shard), so the turns between the *members* of a guild are decided there, by that process's queue model
(:meth:`bot.engine.queue.QueueModel.grant`). What only the fleet can decide is the rest of the queue model's rule:
the backends' capacities, each guild's limit, and the turns *between guilds*. One process at a time (the holder of
an advisory lock) runs this planner over the fleet's rows and writes the slots it grants.

No asyncio, no database, no clock: :meth:`FleetPlanner.plan` reads what waits (``Demand``: per process, guild and
set of backends that may serve it) and what is held (``Slot``), and answers with grants. The only state kept
between plans is when each guild was last served, so a new dispatcher rebuilds everything else from the rows (and
the turns start afresh: never-served guilds in the order their demand first appeared).

The rule is the queue model's (bot/engine/queue.py): whenever a slot is free on backend ``b``, it goes to the
guild served longest ago (never-served guilds first, by when their demand appeared) that is under its limit and
has a waiting job ``b`` can serve; among the free backends that serve it, the least loaded (held / capacity).

Invariants of a plan (``check_plan`` verifies them; the property tests call it on every plan):

1. Limits: slots held plus granted on a backend <= its capacity; per guild <= its limit; per demand row <= what
   waits there (its ``waiting`` less the slots granted to it that its row does not show yet, ``pending``).
2. Work conservation: after the plan, no backend has a free slot while a guild under its limit has a waiting job
   that backend can serve.
3. Order: each grant goes to the guild that the rule above names at that moment (checked against a brute-force
   replay).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from dataclasses import dataclass

#: Guilds whose last turn is remembered; past this, those with nothing waiting are forgotten (bounded memory).
MAX_REMEMBERED_GUILDS = 10_000


@dataclass(frozen=True, slots=True)
class Demand:
    """What one process has waiting in one guild for one set of backends (None: any backend)."""

    owner: str
    guild_id: int
    eligible: frozenset[str] | None
    waiting: int
    guild_limit: int
    #: Orders guilds never served (the server's time its demand row appeared, as a number).
    first_seen: float = 0.0


@dataclass(frozen=True, slots=True)
class Slot:
    """A slot granted on ``backend`` to ``owner`` for ``guild_id``, while it is held (granted or running)."""

    epoch: int
    owner: str
    guild_id: int
    backend: str
    eligible: frozenset[str] | None
    #: Granted (or just taken up) but not yet shown by its owner's demand row: it still counts against that row.
    pending: bool = False


@dataclass(frozen=True, slots=True)
class Grant:
    """Grant one slot on ``backend`` to ``owner`` for a job of ``guild_id`` that ``eligible`` describes."""

    owner: str
    guild_id: int
    backend: str
    eligible: frozenset[str] | None


class _Want:
    __slots__ = ("demand", "remaining")

    def __init__(self, demand: Demand, remaining: int) -> None:
        self.demand = demand
        self.remaining = remaining


class FleetPlanner:
    """Plans grants over the fleet's rows; remembers only when each guild was last served."""

    def __init__(self, capacities: dict[str, int]) -> None:
        self.capacities = dict(capacities)
        self._served: dict[int, int] = {}
        self._tick = 0

    def last_served(self, guild_id: int) -> int:
        """The tick of the guild's last grant (-1: never served by this planner)."""
        return self._served.get(guild_id, -1)

    def plan(self, demand: Iterable[Demand], slots: Iterable[Slot]) -> list[Grant]:
        """The grants that fill every free slot the rule allows, in the order the rule gives them."""
        capacities = self.capacities
        used, held, pending = _tally(capacities, slots)
        wants: dict[int, list[_Want]] = {}
        limits: dict[int, int] = {}
        first_seen: dict[int, float] = {}
        for row in demand:
            remaining = row.waiting - pending.get((row.owner, row.guild_id, row.eligible), 0)
            if remaining <= 0:
                continue
            wants.setdefault(row.guild_id, []).append(_Want(row, remaining))
            limits[row.guild_id] = max(limits.get(row.guild_id, 1), row.guild_limit, 1)
            first_seen[row.guild_id] = min(first_seen.get(row.guild_id, row.first_seen), row.first_seen)
        ready = [(self.last_served(g), first_seen[g], g) for g in wants]
        heapq.heapify(ready)
        grants: list[Grant] = []
        while ready:
            free = [b for b, capacity in capacities.items() if used[b] < capacity]
            if not free:
                break
            _, _, guild_id = heapq.heappop(ready)
            if held.get(guild_id, 0) >= limits[guild_id]:
                continue  # at its limit: its next turn comes when one of its slots ends
            choice = _first_servable(wants[guild_id], free)
            if choice is None:
                continue  # only busy backends serve it; free only shrinks within a plan
            want, candidates = choice
            backend = min(candidates, key=lambda b: (used[b] / capacities[b], b))
            used[backend] += 1
            held[guild_id] = held.get(guild_id, 0) + 1
            want.remaining -= 1
            self._tick += 1
            self._served[guild_id] = self._tick
            grants.append(Grant(want.demand.owner, guild_id, backend, want.demand.eligible))
            if any(w.remaining > 0 for w in wants[guild_id]):
                heapq.heappush(ready, (self._tick, first_seen[guild_id], guild_id))
        self._forget_beyond_bound(wants)
        return grants

    def _forget_beyond_bound(self, waiting: dict[int, list[_Want]]) -> None:
        if len(self._served) > MAX_REMEMBERED_GUILDS:
            self._served = {g: t for g, t in self._served.items() if g in waiting}


_PendingKey = tuple[str, int, frozenset[str] | None]


def _tally(
    capacities: dict[str, int], slots: Iterable[Slot]
) -> tuple[dict[str, int], dict[int, int], dict[_PendingKey, int]]:
    """Slots held per backend and per guild, and those granted but not yet shown, per demand row."""
    used = dict.fromkeys(capacities, 0)
    held: dict[int, int] = {}
    pending: dict[_PendingKey, int] = {}
    for slot in slots:
        if slot.backend in used:
            used[slot.backend] += 1
        held[slot.guild_id] = held.get(slot.guild_id, 0) + 1
        if slot.pending:
            key = (slot.owner, slot.guild_id, slot.eligible)
            pending[key] = pending.get(key, 0) + 1
    return used, held, pending


def _first_servable(wants: list[_Want], free: list[str]) -> tuple[_Want, list[str]] | None:
    for want in wants:
        if want.remaining <= 0:
            continue
        eligible = want.demand.eligible
        candidates = free if eligible is None else [b for b in free if b in eligible]
        if candidates:
            return want, candidates
    return None


class PlanError(AssertionError):
    """A plan broke one of the invariants in the module docstring."""


def check_plan(
    capacities: dict[str, int],
    demand: list[Demand],
    slots: list[Slot],
    grants: list[Grant],
    last_served: dict[int, int],
) -> None:
    """Raise :class:`PlanError` unless ``grants`` keep invariants 1-3 (``last_served``: the planner's ticks
    before the plan, by guild)."""
    used, held, pending = _tally(capacities, slots)
    remaining = {
        (d.owner, d.guild_id, d.eligible): d.waiting - pending.get((d.owner, d.guild_id, d.eligible), 0)
        for d in demand
    }
    limits: dict[int, int] = {}
    first: dict[int, float] = {}
    for d in demand:
        limits[d.guild_id] = max(limits.get(d.guild_id, 1), d.guild_limit, 1)
        first[d.guild_id] = min(first.get(d.guild_id, d.first_seen), d.first_seen)
    served = dict(last_served)
    tick = max(served.values(), default=0)

    def servable(guild_id: int, free: list[str]) -> bool:
        if held.get(guild_id, 0) >= limits.get(guild_id, 1):
            return False
        return any(
            n > 0 and (e is None or any(b in e for b in free))
            for (_, g, e), n in remaining.items()
            if g == guild_id
        )

    for grant in grants:
        free = [b for b, c in capacities.items() if used[b] < c]
        if grant.backend not in free:
            raise PlanError(f"granted {grant.backend} over its capacity {capacities.get(grant.backend)}")
        if grant.eligible is not None and grant.backend not in grant.eligible:
            raise PlanError(f"granted {grant.backend} to a job only {sorted(grant.eligible)} may serve")
        key = (grant.owner, grant.guild_id, grant.eligible)
        if remaining.get(key, 0) <= 0:
            raise PlanError(f"granted guild {grant.guild_id} more than waits there")
        if held.get(grant.guild_id, 0) >= limits.get(grant.guild_id, 1):
            raise PlanError(f"granted guild {grant.guild_id} over its limit {limits.get(grant.guild_id)}")
        contenders = [g for g in limits if servable(g, free)]
        fair = min(contenders, key=lambda g: (served.get(g, -1), first[g], g))
        if grant.guild_id != fair:
            raise PlanError(f"granted guild {grant.guild_id} while guild {fair} was served longer ago")
        servers = [b for b in free if grant.eligible is None or b in grant.eligible]
        least = min(servers, key=lambda b: (used[b] / capacities[b], b))
        if grant.backend != least:
            raise PlanError(f"granted {grant.backend}, not the least loaded {least}")
        used[grant.backend] += 1
        held[grant.guild_id] = held.get(grant.guild_id, 0) + 1
        remaining[key] -= 1
        tick += 1
        served[grant.guild_id] = tick
    free = [b for b, c in capacities.items() if used[b] < c]
    for guild_id in limits:
        if free and servable(guild_id, free):
            raise PlanError(f"a slot is free on {free} while guild {guild_id} waits for one")
