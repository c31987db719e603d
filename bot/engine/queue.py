"""The queue model: one synchronous, pure owner of who waits, who runs, and what every member has in flight.

No asyncio and no clock of its own: the manager calls an operation, the model changes its state and answers
with *decisions* (a flight to start on a backend, a flight to stop, jobs sent back to the queue, positions to
announce), and the manager carries them out (tasks, backend calls, store writes). The property tests drive it
directly.

Vocabulary::

    job      one member's request (a Discord message); ends exactly once (``leave`` or its flight's end)
    flight   one generation, shared by identical requests (same key); QUEUED -> RUNNING -> STOPPING -> gone
    ticket   a waiting job's place in its own guild's queue (one per waiting job, never per flight)
    slot     a flight running on backend ``b``; counted against the guild of the job holding it

Scheduling (``backends = {name: capacity}``, each flight may be served only by some of them): whenever a slot
is free on backend ``b``, it goes to the guild served longest ago (never-served guilds first, in arrival order)
that is under its limit and has a ticket ``b`` can serve; inside that guild to the member served longest ago
with such a ticket; among free backends that serve the chosen ticket, the least loaded (running / capacity).
Fairness is global across backends.

A fleet (``external``: several processes on one database, bot/service/dispatch.py): the slots are the fleet's,
so this model grants nothing by itself. The fleet's dispatcher grants a slot on a backend to a guild, and
:meth:`QueueModel.grant` gives it, inside that guild, to the member served longest ago with a ticket that backend
can serve. Each guild lives in one process (its gateway shard), so the members' turns are decided here exactly;
the turns between guilds and the backends' capacities are the dispatcher's. What waits is published as
*demand*: per guild, how many tickets wait for each eligible set (kept counted, so publishing costs the guilds
that changed, never the queue's depth).

Pools: a backend taken *out* (``set_out``: its circuit breaker opened) is granted nothing until it is back; its
running flights carry on. A running flight the backend never accepted (``bounce``) goes back to the queue with
that backend removed from its eligible set, so it is never granted there again; its jobs wait again.

Invariants (``check_invariants`` verifies every one; the tests call it after every operation):

1. Limits are never exceeded: running flights per backend <= its capacity; slots held per guild <= its limit.
   (A limit lowered under running work is honoured by granting nothing more until the guild is under it; the
   check assumes limits are not lowered under running work.)
2. Work-conserving: after an operation no backend has a free slot while a ticket it can serve waits in a guild
   under its limit.
3. Every held slot belongs to exactly one live flight (RUNNING or STOPPING); a flight holds at most one slot,
   however many guilds its jobs come from. While a flight waits, each of its jobs keeps its own ticket in its own
   guild's queue; the first ticket granted starts the flight (its guild is charged) and the others are withdrawn.
   When the job holding the slot leaves, the slot moves to a remaining job whose guild has room, or the flight
   stops and its remaining jobs go back to the queue.
4. A STOPPING flight (its last job left, the backend is winding down) still holds its slot until the manager
   reports ``flight_ended``, and is never joined: an identical newcomer starts a fresh flight. A flight's
   eligible set is never empty and names configured backends only; no slot is granted on a backend taken out,
   nor anywhere while starts are held (``hold``: a slot then counts as not free, for invariant 2 too). In a
   fleet (``external``) no slot counts as free here either: starts come from :meth:`QueueModel.grant` alone, and
   work conservation is the dispatcher's invariant (bot/engine/fleet_queue.py).
5. Every job ends exactly once; the per-member record (jobs and images queued or running, plus reservations
   admitted but not yet submitted) is the one count admission reads.
6. Positions: a waiting job's position is its place in its guild's order if nothing else arrived (members take
   turns, served longest ago first). They are kept in counted structures (Fenwick trees per round), so reading
   one costs O(log n) and an operation announces only the few tickets whose *shown* position changed.
7. Demand: each guild's count of waiting tickets per eligible set equals its tickets (``GuildQueue.demand``).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

#: Bucketed positions: exact up to this, then in tens, hundreds, then "1,000+".
EXACT_POSITIONS = 10
MAX_SHOWN_POSITION = 1000


class InvariantError(AssertionError):
    """The model's state broke one of the invariants in the module docstring."""


class FlightState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    STOPPING = (
        "stopping"  # no job waits for it any more; the backend call is winding down, the slot still held
    )


class JobPhase(StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    ENDED = "ended"


# -- decisions ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Start:
    """Start flight ``flight`` on ``backend``; its jobs are now running."""

    flight: int
    backend: str
    jobs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop flight ``flight``'s backend call (nobody waits for it); report ``flight_ended`` once wound down."""

    flight: int


@dataclass(frozen=True, slots=True)
class Requeued:
    """These running jobs lost their generation (its holder left, no guild had room) and wait again."""

    jobs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Moved:
    """The slot of ``flight`` now counts against ``guild_id`` (the job that held it left)."""

    flight: int
    guild_id: int


@dataclass(frozen=True, slots=True)
class Position:
    """What the user sees of a waiting job's position changed: announce ``position`` (1-based)."""

    job: str
    position: int


Decision = Start | Stop | Requeued | Moved | Position


def shown_position(position: int) -> tuple[int, bool]:
    """The bucket a user sees: ``(value, exact)``: exact up to 10, in tens to 100, hundreds to 1,000, then 1,000+.

    ``(20, False)`` reads "20+". Two positions with the same bucket are not worth a message edit.
    """
    if position <= EXACT_POSITIONS:
        return position, True
    if position < 100:
        return position // 10 * 10, False
    if position < MAX_SHOWN_POSITION:
        return position // 100 * 100, False
    return MAX_SHOWN_POSITION, False


def mean_generation_s(recent_generation_s: Iterable[float]) -> float | None:
    """Mean of recent generation times, or None without any history."""
    times = list(recent_generation_s)
    return sum(times) / len(times) if times else None


def estimate_wait(position: int, mean_s: float | None, slots: int) -> float | None:
    """Seconds until a job at ``position`` starts, from the mean recent generation time; None without one.

    ``slots``: generations that run at once for this job's guild (its limit, capped by the backends).
    """
    if mean_s is None or position <= 0:
        return None
    return position * mean_s / max(1, slots)


#: The first position of each shown bucket (a ticket moving across one of these shows something new).
_EDGES = (*range(1, EXACT_POSITIONS + 2), *range(20, 101, 10), *range(200, MAX_SHOWN_POSITION + 1, 100), 1001)


# -- counted structures ---------------------------------------------------------------------------------------
class Fenwick:
    """A sparse Fenwick (binary indexed) tree over indexes 1..size: counts, prefix sums and select in O(log).

    ``size`` doubles as larger indexes arrive (node ``2 * size`` then covers everything before it), so costs
    follow the indexes in use, not a fixed bound.
    """

    __slots__ = ("_size", "_tree", "total")

    def __init__(self) -> None:
        self._tree: dict[int, int] = {}
        self._size = 1
        self.total = 0

    def add(self, index: int, delta: int) -> None:
        while index > self._size:
            self._size *= 2
            if self.total:
                self._tree[self._size] = self.total
        self.total += delta
        tree, size = self._tree, self._size
        while index <= size:
            value = tree.get(index, 0) + delta
            if value:
                tree[index] = value
            else:
                tree.pop(index, None)
            index += index & -index

    def prefix(self, index: int) -> int:
        """Sum over 1..index."""
        total, tree = 0, self._tree
        index = min(index, self._size)
        while index > 0:
            total += tree.get(index, 0)
            index -= index & -index
        return total

    def select(self, rank: int) -> int:
        """The smallest index whose prefix sum reaches ``rank`` (1-based); requires 1 <= rank <= total."""
        index, step, tree = 0, self._size, self._tree
        while step:
            probe = index + step
            value = tree.get(probe, 0)
            if probe <= self._size and value < rank:
                index = probe
                rank -= value
            step >>= 1
        return index + 1


@dataclass(eq=False, slots=True)
class Ticket:
    job: str
    guild_id: int
    member_id: int
    flight: int
    #: Its flight's eligible backends when it was issued (they change only while the flight runs: no tickets).
    eligible: frozenset[str] | None = None
    #: The last position announced for it (as shown_position buckets it), or None before the first.
    shown: tuple[int, bool] | None = None


class _Member:
    __slots__ = ("mark", "tickets")

    def __init__(self) -> None:
        self.tickets: deque[Ticket] = deque()
        #: (region, index): region 0 = never served (index = arrival), 1 = served (index = last serve tick).
        self.mark: tuple[int, int] | None = None


class GuildQueue:
    """One guild's waiting tickets, members taking turns, with positions in counted structures.

    The order if nothing else arrived is by rounds: round k holds the k-th ticket of every member with at least
    k, in rotation order (never-served members in arrival order, then served members by last serve). Serving the
    front ticket removes exactly the first element of that order, so most operations shift every later
    position by one: only tickets at bucket edges change what they show.
    """

    __slots__ = (
        "_arrivals",
        "_by_index",
        "_levels",
        "_tick",
        "demand",
        "dirty_changes",
        "dirty_from",
        "dirty_members",
        "guild_id",
        "last_served",
        "members",
        "running",
    )

    def __init__(self, guild_id: int) -> None:
        self.guild_id = guild_id
        self.members: dict[int, _Member] = {}
        self.last_served: dict[int, int] = {}
        self.running = 0  # slots charged to this guild
        self._tick = 0
        self._arrivals = 0  # members arrived so far (a never-served member's mark)
        #: _levels[k-1][region]: members with at least k tickets, indexed by their mark in that region.
        self._levels: list[tuple[Fenwick, Fenwick]] = []
        #: Created with the first waiting member: most guilds come and go with nobody waiting (a free slot).
        self._by_index: tuple[dict[int, int], dict[int, int]] | None = None
        #: Changes not yet announced: the earliest position changed, how many changes, whose tickets.
        self.dirty_from: int | None = None
        self.dirty_changes = 0
        self.dirty_members: set[int] | None = None
        #: Waiting tickets per eligible set (None: any backend): what this guild asks the fleet for.
        self.demand: dict[frozenset[str] | None, int] = {}

    # -- size ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(fresh.total + served.total for fresh, served in self._levels)

    @property
    def idle(self) -> bool:
        return not self.members and self.running == 0

    def tickets(self) -> Iterator[Ticket]:
        for member in self.members.values():
            yield from member.tickets

    # -- marks and levels -----------------------------------------------------------------------------------
    def _level(self, k: int) -> tuple[Fenwick, Fenwick]:
        while len(self._levels) < k:
            self._levels.append((Fenwick(), Fenwick()))
        return self._levels[k - 1]

    def _place(self, member: _Member, levels: range, delta: int) -> None:
        assert member.mark is not None
        region, index = member.mark
        for k in levels:
            self._level(k)[region].add(index, delta)

    def _set_mark(self, member_id: int, member: _Member, mark: tuple[int, int] | None) -> None:
        count = len(member.tickets)
        by_index = self._by_index
        if by_index is None:
            by_index = self._by_index = ({}, {})
        if member.mark is not None:
            self._place(member, range(1, count + 1), -1)
            del by_index[member.mark[0]][member.mark[1]]
        member.mark = mark
        if mark is not None:
            by_index[mark[0]][mark[1]] = member_id
            self._place(member, range(1, count + 1), +1)

    # -- changes --------------------------------------------------------------------------------------------
    def push(self, ticket: Ticket) -> None:
        member = self.members.get(ticket.member_id)
        if member is None:
            member = self.members[ticket.member_id] = _Member()
            served = self.last_served.get(ticket.member_id)
            if served is None:
                self._arrivals += 1
            mark = (1, served) if served is not None else (0, self._arrivals)
            self._set_mark(ticket.member_id, member, mark)
        member.tickets.append(ticket)
        self._place(member, range(len(member.tickets), len(member.tickets) + 1), +1)
        self.demand[ticket.eligible] = self.demand.get(ticket.eligible, 0) + 1

    def remove(self, ticket: Ticket) -> None:
        member = self.members[ticket.member_id]
        self._place(member, range(len(member.tickets), len(member.tickets) + 1), -1)
        member.tickets.remove(ticket)
        left = self.demand[ticket.eligible] - 1
        if left:
            self.demand[ticket.eligible] = left
        else:
            del self.demand[ticket.eligible]
        if not member.tickets:
            self._set_mark(ticket.member_id, member, None)
            del self.members[ticket.member_id]

    def served(self, member_id: int) -> None:
        """The member's ticket was just granted: it goes to the back of the rotation."""
        self._tick += 1
        self.last_served[member_id] = self._tick
        member = self.members.get(member_id)
        if member is not None:
            self._set_mark(member_id, member, (1, self._tick))

    # -- order ----------------------------------------------------------------------------------------------
    def rotation(self) -> Iterator[int]:
        """Members with waiting tickets, in the order they are served (O(members log); for slow paths only)."""
        by_index = self._by_index
        if by_index is None:
            return
        for region in (0, 1):
            yield from (by_index[region][i] for i in sorted(by_index[region]))

    def position(self, ticket: Ticket) -> int:
        member = self.members[ticket.member_id]
        index = member.tickets.index(ticket)  # a member's tickets are few (bounded by the member limit)
        before = 0
        for k in range(1, index + 1):
            fresh, served = self._levels[k - 1]
            before += fresh.total + served.total
        fresh, served = self._levels[index]
        assert member.mark is not None
        region, mark = member.mark
        ahead = fresh.prefix(mark - 1) if region == 0 else fresh.total + served.prefix(mark - 1)
        return before + ahead + 1

    def at(self, position: int) -> Ticket | None:
        """The ticket at a 1-based position, or None past the end: O(rounds + log n)."""
        rank, by_index = position, self._by_index
        if by_index is None:
            return None
        for k, (fresh, served) in enumerate(self._levels, start=1):
            size = fresh.total + served.total
            if rank > size:
                rank -= size
                continue
            if rank <= fresh.total:
                member_id = by_index[0][fresh.select(rank)]
            else:
                member_id = by_index[1][served.select(rank - fresh.total)]
            return self.members[member_id].tickets[k - 1]
        return None

    def front(self) -> Ticket | None:
        return self.at(1)

    def order(self) -> Iterator[Ticket]:
        """Every waiting ticket in start order, in one pass: O(n + members x rounds), for full announcements."""
        rotation = [self.members[m] for m in self.rotation()]
        for k in range(len(self._levels)):
            for member in rotation:
                if len(member.tickets) > k:
                    yield member.tickets[k]


@dataclass(eq=False, slots=True)
class Flight:
    id: int
    key: str | None  # None: private (never shared)
    eligible: frozenset[str] | None  # backends that can serve it; None: any
    state: FlightState = FlightState.QUEUED
    jobs: dict[str, None] = field(default_factory=dict)  # insertion-ordered set
    backend: str | None = None
    holder: str | None = None  # the job whose guild is charged for the slot
    charged_guild: int | None = None


@dataclass(eq=False, slots=True)
class JobEntry:
    id: str
    guild_id: int
    member_id: int
    images: int
    flight: int
    phase: JobPhase = JobPhase.WAITING
    ticket: Ticket | None = None
    end_reason: str | None = None


@dataclass(slots=True)
class MemberRecord:
    """What one member of one guild has queued or running, and admitted but not yet submitted."""

    jobs: int = 0
    images: int = 0
    reserved: int = 0
    reserved_images: int = 0

    @property
    def empty(self) -> bool:
        return not (self.jobs or self.images or self.reserved or self.reserved_images)


class QueueModel:
    """The queue's whole state and its transitions. See the module docstring for the rules."""

    def __init__(
        self,
        backends: dict[str, int],
        *,
        guild_limit: Callable[[int], int],
        external: bool = False,
    ) -> None:
        self.backends = dict(backends)
        self.running: dict[str, int] = dict.fromkeys(self.backends, 0)
        self._guild_limit = guild_limit
        self.guilds: dict[int, GuildQueue] = {}
        self.flights: dict[int, Flight] = {}
        self.jobs: dict[str, JobEntry] = {}
        self.members: dict[tuple[int, int], MemberRecord] = {}
        self._joinable: dict[str, int] = {}  # key -> QUEUED/RUNNING flight
        self._flight_ids = itertools.count(1)
        self._guild_served: dict[int, int] = {}
        self._guild_arrival: dict[int, int] = {}
        self._guild_tick = 0
        self._guild_seq = itertools.count(1)
        #: Guilds that may have a grantable ticket (heap of (last served, arrival, guild); stale entries skipped).
        self._ready: list[tuple[int, int, int]] = []
        self._in_ready: set[int] = set()
        self._dirty: set[int] = set()  # guilds with position changes not yet announced
        self._restricted = 0  # flights with an eligibility set (slow dispatch path only when > 0)
        self.out: set[str] = set()  # backends taken out (circuit breaker open): granted nothing
        #: Starts held (the process cannot renew its lease): nothing is granted anywhere; see :meth:`hold`.
        self.held = False
        #: Slots come from the fleet's dispatcher (:meth:`grant`); none counts as free here.
        self.external = external
        #: Guilds whose demand changed since :meth:`take_demand_changes` (tracked only when ``external``).
        self._demand_changed: set[int] = set()
        self.ended: dict[str, str] = {}  # job -> end reason, for jobs this model ended (tests read it)

    # -- inspection -----------------------------------------------------------------------------------------
    def guild_limit(self, guild_id: int) -> int:
        return max(1, self._guild_limit(guild_id))

    def member(self, guild_id: int, member_id: int) -> MemberRecord:
        return self.members.get((guild_id, member_id)) or MemberRecord()

    def waiting_in(self, guild_id: int) -> int:
        queue = self.guilds.get(guild_id)
        return len(queue) if queue is not None else 0

    def running_in(self, guild_id: int) -> int:
        queue = self.guilds.get(guild_id)
        return queue.running if queue is not None else 0

    @property
    def slots_held(self) -> int:
        return sum(self.running.values())

    def phase(self, job_id: str) -> JobPhase | None:
        entry = self.jobs.get(job_id)
        return entry.phase if entry else None

    def position(self, job_id: str) -> int | None:
        entry = self.jobs.get(job_id)
        if entry is None or entry.ticket is None:
            return None
        return self.guilds[entry.guild_id].position(entry.ticket)

    def flight_of(self, job_id: str) -> Flight | None:
        entry = self.jobs.get(job_id)
        return self.flights.get(entry.flight) if entry else None

    # -- reservations (admitted, not yet submitted) ------------------------------------------------------------
    def reserve(self, guild_id: int, member_id: int, images: int) -> None:
        record = self.members.get((guild_id, member_id))
        if record is None:
            record = self.members[(guild_id, member_id)] = MemberRecord()
        record.reserved += 1
        record.reserved_images += images

    def unreserve(self, guild_id: int, member_id: int, images: int) -> None:
        record = self.members.get((guild_id, member_id))
        if record is None or record.reserved <= 0:
            raise InvariantError(f"no reservation for {(guild_id, member_id)}")
        record.reserved -= 1
        record.reserved_images -= images
        if record.empty:
            del self.members[(guild_id, member_id)]

    # -- operations -----------------------------------------------------------------------------------------
    def admit(
        self,
        job_id: str,
        guild_id: int,
        member_id: int,
        *,
        key: str | None,
        images: int = 1,
        eligible: Iterable[str] | None = None,
    ) -> list[Decision]:
        """A job enters: joins the live flight with its key (unless stopping) or opens one, then dispatch."""
        if job_id in self.jobs or job_id in self.ended:
            raise InvariantError(f"job {job_id} admitted twice")
        flight = self.flights.get(self._joinable[key]) if key is not None and key in self._joinable else None
        if flight is None:
            flight = Flight(next(self._flight_ids), key, None if eligible is None else frozenset(eligible))
            self.flights[flight.id] = flight
            if flight.eligible is not None:
                self._restricted += 1
            if key is not None:
                self._joinable[key] = flight.id
        entry = JobEntry(job_id, guild_id, member_id, images, flight.id)
        self.jobs[job_id] = entry
        flight.jobs[job_id] = None
        record = self.members.get((guild_id, member_id))
        if record is None:
            record = self.members[(guild_id, member_id)] = MemberRecord()
        record.jobs += 1
        record.images += images
        decisions: list[Decision] = []
        if flight.state is FlightState.RUNNING:
            entry.phase = JobPhase.RUNNING  # shares a generation already on a backend: no slot, no ticket
            decisions.append(Start(flight.id, flight.backend or "", (job_id,)))
        elif not (len(flight.jobs) == 1 and self._start_at_once(entry, flight, decisions)):
            self._enqueue(entry, decisions)
            self._dispatch(decisions)
        return decisions

    def leave(self, job_id: str, reason: str) -> list[Decision]:
        """A job ends before its flight does (cancel, queue timeout, shutdown, a failed write)."""
        entry = self.jobs.pop(job_id, None)
        if entry is None:
            raise InvariantError(f"job {job_id} ended twice or never existed")
        decisions: list[Decision] = []
        self._end(entry, reason)
        if entry.ticket is not None:
            self._withdraw(entry, decisions)
        flight = self.flights[entry.flight]
        del flight.jobs[job_id]
        if flight.state is FlightState.QUEUED:
            if not flight.jobs:
                self._drop_flight(flight)
        elif flight.state is FlightState.RUNNING:
            if not flight.jobs:
                self._stop(flight, decisions)
            elif flight.holder == job_id:
                self._move_slot(flight, decisions)
        self._dispatch(decisions)
        return decisions

    def flight_ended(self, flight_id: int, reason: str = "done") -> list[Decision]:
        """The flight's backend call is over (result, failure or wound down): its jobs end, its slot frees."""
        flight = self.flights.pop(flight_id, None)
        if flight is None or flight.state is FlightState.QUEUED:
            raise InvariantError(f"flight {flight_id} ended without running")
        if flight.key is not None and self._joinable.get(flight.key) == flight_id:
            del self._joinable[flight.key]
        if flight.eligible is not None:
            self._restricted -= 1
        for job_id in flight.jobs:
            entry = self.jobs.pop(job_id)
            self._end(entry, reason)
        self._free_slot(flight)
        decisions: list[Decision] = []
        self._dispatch(decisions)
        return decisions

    def grant(self, guild_id: int, backend: str) -> list[Decision]:
        """The fleet granted one slot on ``backend`` to ``guild_id`` (``external``): it goes to the member of that
        guild served longest ago with a ticket ``backend`` can serve (that member's oldest such). Nothing starts
        (an empty list; the caller gives the slot back) when starts are held, the backend is out, unknown or
        full here, the guild is at its limit or nothing of it waiting can run there."""
        queue = self.guilds.get(guild_id)
        if (
            self.held
            or queue is None
            or not queue.members
            or backend in self.out
            or self.running.get(backend, 0) >= self.backends.get(backend, 0)
            or queue.running >= self.guild_limit(guild_id)
        ):
            return []
        front = queue.front()
        ticket = self._pick(queue, front, [backend])
        if ticket is None:
            return []
        decisions: list[Decision] = []
        self._grant(queue, ticket, ticket is front, [backend], decisions)
        return decisions

    def demand(self, guild_id: int) -> dict[frozenset[str] | None, int]:
        """Waiting tickets of ``guild_id`` per eligible set (None: any backend); empty when nobody waits."""
        queue = self.guilds.get(guild_id)
        return dict(queue.demand) if queue is not None else {}

    @property
    def demand_changes_pending(self) -> bool:
        return bool(self._demand_changed)

    def take_demand_changes(self) -> set[int]:
        """Guilds whose demand changed since the last call (``external`` only)."""
        changed, self._demand_changed = self._demand_changed, set()
        return changed

    def set_backends(self, backends: dict[str, int]) -> list[Decision]:
        for name in backends:
            self.running.setdefault(name, 0)
        self.backends = dict(backends)
        decisions: list[Decision] = []
        self._dispatch(decisions)
        return decisions

    def set_out(self, backend: str, out: bool) -> list[Decision]:
        """Take a backend out (granted nothing; its running flights carry on) or bring it back."""
        if backend not in self.backends:
            raise InvariantError(f"unknown backend {backend}")
        if out:
            self.out.add(backend)
        else:
            self.out.discard(backend)
        return self._dispatch_everywhere()  # skipped guilds may be servable now

    def hold(self, held: bool) -> list[Decision]:
        """Hold every start (``True``): nothing is granted, running flights carry on, waiting jobs keep their
        places. Released (``False``), waiting work starts at once."""
        self.held = held
        return self._dispatch_everywhere() if not held else []

    def bounce(self, flight_id: int, *, exclude: bool = True) -> list[Decision]:
        """A running flight's backend did not take the generation: the flight waits again, never on that backend
        (``exclude``), or for that very backend to be back (``exclude=False``, when it was taken out and no
        other serves the flight).

        Its slot frees; each of its jobs gets a ticket in its own guild again (``Requeued``). The caller makes
        sure another configured backend is eligible (else it ends the flight instead).
        """
        flight = self.flights.get(flight_id)
        if flight is None or flight.state is not FlightState.RUNNING or flight.backend is None:
            raise InvariantError(f"flight {flight_id} bounced without running")
        if exclude:
            remaining = self.eligible_after_bounce(flight)
        else:
            remaining = flight.eligible if flight.eligible is not None else frozenset(self.backends)
        if not remaining:
            raise InvariantError(f"flight {flight_id} bounced with no other backend to go to")
        self._free_slot(flight)
        if flight.eligible is None:
            self._restricted += 1
        flight.eligible = remaining
        flight.state = FlightState.QUEUED
        flight.backend = flight.holder = flight.charged_guild = None
        decisions: list[Decision] = []
        riders = tuple(flight.jobs)
        for job_id in riders:
            self._enqueue(self.jobs[job_id], decisions)
        decisions.append(Requeued(riders))
        self._dispatch(decisions)
        return decisions

    def eligible_after_bounce(self, flight: Flight) -> frozenset[str]:
        """The backends a running flight could still go to if its own refused it."""
        eligible = flight.eligible if flight.eligible is not None else frozenset(self.backends)
        return frozenset(b for b in eligible if b != flight.backend and b in self.backends)

    def limits_changed(self) -> list[Decision]:
        """Call after a guild's limit changed: waiting work may start at once."""
        return self._dispatch_everywhere()

    def _dispatch_everywhere(self) -> list[Decision]:
        """Every guild with someone waiting is considered again (a limit, a backend or the hold changed)."""
        for guild_id, queue in self.guilds.items():
            if queue.members:
                self._mark_ready(guild_id)
        decisions: list[Decision] = []
        self._dispatch(decisions)
        return decisions

    # -- internals: tickets ---------------------------------------------------------------------------------
    def _guild(self, guild_id: int) -> GuildQueue:
        queue = self.guilds.get(guild_id)
        if queue is None:
            queue = self.guilds[guild_id] = GuildQueue(guild_id)
            self._guild_arrival.setdefault(guild_id, next(self._guild_seq))
        return queue

    def _enqueue(self, entry: JobEntry, decisions: list[Decision]) -> None:
        queue = self._guild(entry.guild_id)
        ticket = Ticket(
            entry.id, entry.guild_id, entry.member_id, entry.flight, self.flights[entry.flight].eligible
        )
        entry.ticket = ticket
        if self.external:
            self._demand_changed.add(entry.guild_id)
        entry.phase = JobPhase.WAITING
        queue.push(ticket)
        self._mark_ready(entry.guild_id)
        self._announce(queue, decisions, ticket.member_id, queue.position(ticket))

    def _withdraw(self, entry: JobEntry, decisions: list[Decision]) -> None:
        ticket, entry.ticket = entry.ticket, None
        assert ticket is not None
        queue = self.guilds[entry.guild_id]
        start = queue.position(ticket)
        queue.remove(ticket)
        if self.external:
            self._demand_changed.add(entry.guild_id)
        self._announce(queue, decisions, ticket.member_id, start)
        self._forget_if_idle(queue)

    def _announce(self, queue: GuildQueue, decisions: list[Decision], member_id: int, start: int) -> None:
        """Note one change at position ``start`` of a guild; :meth:`positions` tells the tickets it moved.

        A change shifts every later position by at most one and leaves earlier ones alone (module docstring,
        invariant 6), so after k changes only tickets within k of a bucket edge from the earliest change on, and
        the changed members' own tickets, can show something new.
        """
        queue.dirty_from = start if queue.dirty_from is None else min(queue.dirty_from, start)
        queue.dirty_changes += 1
        if queue.dirty_members is None:
            queue.dirty_members = {member_id}
        else:
            queue.dirty_members.add(member_id)
        self._dirty.add(queue.guild_id)

    def positions(self) -> list[Position]:
        """Positions whose shown bucket changed since the last call: O(edges x changes x log n) per guild.

        The manager calls it at most every POSITION_INTERVAL_S; the tests after every step (or every few).
        """
        decisions: list[Decision] = []
        dirty, self._dirty = self._dirty, set()
        for guild_id in dirty:
            queue = self.guilds.get(guild_id)
            if queue is None or queue.dirty_from is None:
                continue
            start, changes, members = queue.dirty_from, queue.dirty_changes, queue.dirty_members or ()
            queue.dirty_from, queue.dirty_changes, queue.dirty_members = None, 0, None
            own: set[int] = set()
            for member_id in members:
                member = queue.members.get(member_id)
                if member is None:
                    continue
                for ticket in member.tickets:
                    own.add(id(ticket))
                    self._show(ticket, queue.position(ticket), decisions)
            size = len(queue)
            if changes * 2 * len(_EDGES) >= size:
                # So many changes that most tickets may show something new: one pass in order is cheaper.
                for place, ticket in enumerate(queue.order(), start=1):
                    if place >= start and id(ticket) not in own:
                        self._show(ticket, place, decisions)
                continue
            wanted: set[int] = set()
            for edge in _EDGES:
                wanted.update(range(max(1, start, edge - changes), min(size, edge + changes) + 1))
            for place in sorted(wanted):
                ticket = queue.at(place)
                if ticket is None:
                    break
                if id(ticket) not in own:
                    self._show(ticket, place, decisions)
        return decisions  # type: ignore[return-value]

    @property
    def positions_pending(self) -> bool:
        """Changes not yet announced through :meth:`positions`."""
        return bool(self._dirty)

    @staticmethod
    def _show(ticket: Ticket, position: int, decisions: list[Decision]) -> None:
        shown = shown_position(position)
        if shown != ticket.shown:
            ticket.shown = shown
            decisions.append(Position(ticket.job, position))

    # -- internals: slots -----------------------------------------------------------------------------------
    def _mark_ready(self, guild_id: int) -> None:
        if guild_id in self._in_ready:
            return
        self._in_ready.add(guild_id)
        heapq.heappush(
            self._ready,
            (self._guild_served.get(guild_id, -1), self._guild_arrival.get(guild_id, 0), guild_id),
        )

    def _free(self) -> list[str]:
        if self.held or self.external:
            return []
        return [
            name
            for name, capacity in self.backends.items()
            if self.running.get(name, 0) < capacity and name not in self.out
        ]

    def _servable(self, flight: Flight, free: list[str]) -> list[str]:
        return free if flight.eligible is None else [b for b in free if b in flight.eligible]

    def _dispatch(self, decisions: list[Decision]) -> None:
        """Grant free slots until none is free or nothing waiting can use one (work conservation)."""
        skipped: list[tuple[int, int, int]] = []
        while self._ready:
            free = self._free()
            if not free:
                break
            served, arrival, guild_id = heapq.heappop(self._ready)
            queue = self.guilds.get(guild_id)
            if queue is None or not queue.members or served != self._guild_served.get(guild_id, -1):
                self._in_ready.discard(guild_id)
                if queue is not None and queue.members:
                    self._mark_ready(guild_id)  # stale entry: re-file under its current mark
                continue
            if queue.running >= self.guild_limit(guild_id):
                self._in_ready.discard(guild_id)  # back in when a slot of it frees or its limit rises
                continue
            front = queue.front()
            ticket = self._pick(queue, front, free)
            if ticket is None:
                skipped.append((served, arrival, guild_id))  # only backends that are busy can serve it
                continue
            self._in_ready.discard(guild_id)
            self._grant(queue, ticket, ticket is front, free, decisions)
            if queue.members:
                self._mark_ready(guild_id)
        for item in skipped:
            heapq.heappush(self._ready, item)

    def _pick(self, queue: GuildQueue, front: Ticket | None, free: list[str]) -> Ticket | None:
        if front is None:
            return None
        if not self._restricted or self._servable(self.flights[front.flight], free):
            return front
        for member_id in queue.rotation():  # slow path: pools with eligibility, front not servable now
            for ticket in queue.members[member_id].tickets:
                if self._servable(self.flights[ticket.flight], free):
                    return ticket
        return None

    def _start_at_once(self, entry: JobEntry, flight: Flight, decisions: list[Decision]) -> bool:
        """A new flight starts without a ticket when its guild has nobody waiting and room, and a free backend
        serves it: exactly what dispatch would grant, since no other waiting ticket can use a free slot
        (invariant 2) and inside the guild nobody is ahead. Returns False (nothing changed) otherwise."""
        queue = self.guilds.get(entry.guild_id)
        if queue is not None and (queue.members or queue.running >= self.guild_limit(entry.guild_id)):
            return False
        candidates = self._servable(flight, self._free())
        if not candidates:
            return False
        queue = self._guild(entry.guild_id)
        self._charge(queue, flight, entry.id, candidates)
        queue.served(entry.member_id)
        entry.phase = JobPhase.RUNNING
        decisions.append(Start(flight.id, flight.backend, (entry.id,)))  # type: ignore[arg-type]
        return True

    def _charge(self, queue: GuildQueue, flight: Flight, job_id: str, candidates: list[str]) -> None:
        """The flight takes a slot on the least loaded of ``candidates``, charged to ``queue``'s guild."""
        if len(candidates) == 1:
            backend = candidates[0]
        else:
            backend = min(candidates, key=lambda b: (self.running[b] / self.backends[b], b))
        self.running[backend] += 1
        queue.running += 1
        self._guild_tick += 1
        self._guild_served[queue.guild_id] = self._guild_tick
        flight.state = FlightState.RUNNING
        flight.backend = backend
        flight.holder = job_id
        flight.charged_guild = queue.guild_id

    def _grant(
        self, queue: GuildQueue, ticket: Ticket, front: bool, free: list[str], decisions: list[Decision]
    ) -> None:
        flight = self.flights[ticket.flight]
        self._charge(queue, flight, ticket.job, self._servable(flight, free))
        queue.remove(ticket)
        if self.external:
            self._demand_changed.add(queue.guild_id)
        queue.served(ticket.member_id)
        self.jobs[ticket.job].ticket = None
        # Granted out of order (pools), positions move unevenly: announce the whole guild, from the start.
        self._announce(queue, decisions, ticket.member_id, 1)
        if not front:
            queue.dirty_changes += len(queue)
        # The flight's other jobs give up their tickets in their own guilds: one generation, one slot.
        for job_id in flight.jobs:
            entry = self.jobs[job_id]
            entry.phase = JobPhase.RUNNING
            if entry.ticket is not None:
                self._withdraw(entry, decisions)
        decisions.append(Start(flight.id, flight.backend, tuple(flight.jobs)))  # type: ignore[arg-type]

    def _move_slot(self, flight: Flight, decisions: list[Decision]) -> None:
        """The holder left a flight others still wait for: charge a remaining job's guild with room, or stop."""
        old = self.guilds[flight.charged_guild] if flight.charged_guild is not None else None
        if old is not None:
            old.running -= 1
            self._after_guild_release(old)
        for job_id in flight.jobs:
            guild_id = self.jobs[job_id].guild_id
            if self.running_in(guild_id) < self.guild_limit(guild_id):
                queue = self._guild(guild_id)
                queue.running += 1
                flight.holder, flight.charged_guild = job_id, guild_id
                decisions.append(Moved(flight.id, guild_id))
                return
        # Nobody's guild has room: the generation stops (it keeps its slot while winding down, charged to no
        # guild), and its jobs wait again, each with a ticket in its own guild.
        flight.charged_guild = None
        riders = tuple(flight.jobs)
        flight.jobs = {}
        self._stop(flight, decisions)
        replacement = Flight(next(self._flight_ids), flight.key, flight.eligible)
        self.flights[replacement.id] = replacement
        if replacement.eligible is not None:
            self._restricted += 1
        if replacement.key is not None:
            self._joinable[replacement.key] = replacement.id
        for job_id in riders:
            entry = self.jobs[job_id]
            entry.flight = replacement.id
            replacement.jobs[job_id] = None
            self._enqueue(entry, decisions)
        decisions.append(Requeued(riders))

    def _stop(self, flight: Flight, decisions: list[Decision]) -> None:
        flight.state = FlightState.STOPPING
        flight.holder = None
        if flight.key is not None and self._joinable.get(flight.key) == flight.id:
            del self._joinable[flight.key]  # defect 3: a dying flight is never joined
        decisions.append(Stop(flight.id))

    def _drop_flight(self, flight: Flight) -> None:
        del self.flights[flight.id]
        if flight.eligible is not None:
            self._restricted -= 1
        if flight.key is not None and self._joinable.get(flight.key) == flight.id:
            del self._joinable[flight.key]

    def _free_slot(self, flight: Flight) -> None:
        assert flight.backend is not None
        self.running[flight.backend] -= 1
        if flight.charged_guild is not None:
            queue = self.guilds[flight.charged_guild]
            queue.running -= 1
            self._after_guild_release(queue)

    def _after_guild_release(self, queue: GuildQueue) -> None:
        if queue.members:
            self._mark_ready(queue.guild_id)
        self._forget_if_idle(queue)

    def _forget_if_idle(self, queue: GuildQueue) -> None:
        # Defect 1: a guild with nobody waiting and nothing running leaves the rotation at once.
        if queue.idle and self.guilds.get(queue.guild_id) is queue:
            del self.guilds[queue.guild_id]
            if len(self._guild_served) > 10_000:  # keep marks only while informative (bounded memory)
                self._guild_served.pop(queue.guild_id, None)
                self._guild_arrival.pop(queue.guild_id, None)

    def _end(self, entry: JobEntry, reason: str) -> None:
        if entry.phase is JobPhase.ENDED or entry.id in self.ended:
            raise InvariantError(f"job {entry.id} ended twice")
        entry.phase = JobPhase.ENDED
        entry.end_reason = reason
        self.ended[entry.id] = reason
        record = self.members[(entry.guild_id, entry.member_id)]
        record.jobs -= 1
        record.images -= entry.images
        if record.empty:
            del self.members[(entry.guild_id, entry.member_id)]

    def forget_ended(self, job_id: str) -> None:
        """Drop the memory that a job ended (the manager calls it; tests keep it to check 'ended once')."""
        self.ended.pop(job_id, None)

    # -- the probe ------------------------------------------------------------------------------------------
    def check_invariants(self) -> None:
        """Raise :class:`InvariantError` if any invariant of the module docstring does not hold."""

        def fail(message: str) -> None:
            raise InvariantError(message)

        # 1. limits, and 3. slots belong to live flights, one each.
        live = [f for f in self.flights.values() if f.state is not FlightState.QUEUED]
        per_backend = {name: 0 for name in self.running}
        per_guild: dict[int, int] = {}
        for flight in live:
            if flight.backend not in per_backend:
                fail(f"flight {flight.id} runs on unknown backend {flight.backend}")
            per_backend[flight.backend] += 1  # type: ignore[index]
            if flight.charged_guild is not None:
                per_guild[flight.charged_guild] = per_guild.get(flight.charged_guild, 0) + 1
            if flight.state is FlightState.RUNNING:
                if flight.holder not in flight.jobs:
                    fail(f"flight {flight.id} is held by {flight.holder}, not one of its jobs")
                if self.jobs[flight.holder].guild_id != flight.charged_guild:  # type: ignore[index]
                    fail(f"flight {flight.id} charged to a guild its holder is not in")
            elif flight.jobs:
                fail(f"stopping flight {flight.id} still has jobs")
        if per_backend != self.running:
            fail(f"backend counts {self.running} disagree with flights {per_backend}")
        for name, count in self.running.items():
            if count > self.backends.get(name, 0):
                fail(f"backend {name} runs {count} flights over its capacity {self.backends.get(name, 0)}")
        for guild_id, queue in self.guilds.items():
            if queue.running != per_guild.get(guild_id, 0):
                fail(
                    f"guild {guild_id} counts {queue.running} slots, flights say {per_guild.get(guild_id, 0)}"
                )
        for guild_id in per_guild:
            if guild_id not in self.guilds:
                fail(f"guild {guild_id} holds slots but left the rotation")
        # Tickets: one per waiting job, in its own guild; none for running jobs; no empty guilds kept.
        tickets = 0
        for guild_id, queue in self.guilds.items():
            if queue.idle:
                fail(f"guild {guild_id} is idle but kept (defect 1)")
            for member_id, member in queue.members.items():
                if not member.tickets:
                    fail(f"member {member_id} of guild {guild_id} kept with no tickets")
                for ticket in member.tickets:
                    tickets += 1
                    entry = self.jobs.get(ticket.job)
                    if entry is None or entry.ticket is not ticket or entry.guild_id != guild_id:
                        fail(f"ticket of {ticket.job} belongs to no waiting job of guild {guild_id}")
                    if self.flights[ticket.flight].state is not FlightState.QUEUED:
                        fail(
                            f"ticket of {ticket.job} waits for a flight already {self.flights[ticket.flight].state}"
                        )
            if len(queue) != sum(len(m.tickets) for m in queue.members.values()):
                fail(f"guild {guild_id}'s counted structures disagree with its queues")
            # 7. demand.
            demand: dict[frozenset[str] | None, int] = {}
            for ticket in queue.tickets():
                if ticket.eligible != self.flights[ticket.flight].eligible:
                    fail(f"ticket of {ticket.job} names other backends than its flight")
                demand[ticket.eligible] = demand.get(ticket.eligible, 0) + 1
            if demand != queue.demand:
                fail(f"guild {guild_id} asks for {queue.demand}, its tickets for {demand}")
        for entry in self.jobs.values():
            flight = self.flights.get(entry.flight)
            if flight is None or entry.id not in flight.jobs:
                fail(f"job {entry.id} is in no flight")
            waiting = flight.state is FlightState.QUEUED
            if waiting != (entry.phase is JobPhase.WAITING) or waiting != (entry.ticket is not None):
                fail(f"job {entry.id} is {entry.phase} with flight {flight.state}")
        if tickets != sum(1 for e in self.jobs.values() if e.ticket is not None):
            fail("a ticket exists without its job")
        for flight in self.flights.values():
            if flight.state is FlightState.QUEUED and not flight.jobs:
                fail(f"queued flight {flight.id} has no jobs")
            if flight.eligible is not None and (
                not flight.eligible or not flight.eligible <= set(self.backends)
            ):
                fail(f"flight {flight.id} may run on {sorted(flight.eligible)}, not configured backends")
            if flight.state is FlightState.QUEUED and flight.backend is not None:
                fail(f"queued flight {flight.id} still names backend {flight.backend}")
        if sum(1 for f in self.flights.values() if f.eligible is not None) != self._restricted:
            fail("the count of flights with an eligible set is off")
        if not self.out <= set(self.backends):
            fail(f"unknown backends taken out: {sorted(self.out - set(self.backends))}")
        for flight_id in self._joinable.values():
            if self.flights[flight_id].state is FlightState.STOPPING:
                fail(f"stopping flight {flight_id} is joinable (defect 3)")
        # 2. work conservation.
        free = self._free()
        if free:
            for guild_id, queue in self.guilds.items():
                if queue.running >= self.guild_limit(guild_id):
                    continue
                for ticket in queue.tickets():
                    if self._servable(self.flights[ticket.flight], free):
                        fail(f"backend slot free while {ticket.job} of guild {guild_id} could use it")
        for guild_id, count in per_guild.items():
            if count > self.guild_limit(guild_id):
                fail(f"guild {guild_id} holds {count} slots over its limit {self.guild_limit(guild_id)}")
        # 5. the per-member record agrees with the jobs.
        counted: dict[tuple[int, int], tuple[int, int]] = {}
        for entry in self.jobs.values():
            jobs, images = counted.get((entry.guild_id, entry.member_id), (0, 0))
            counted[(entry.guild_id, entry.member_id)] = (jobs + 1, images + entry.images)
        for key, record in self.members.items():
            if (record.jobs, record.images) != counted.get(key, (0, 0)):
                fail(f"member {key} record {record} disagrees with jobs {counted.get(key)}")
        for key in counted:
            if key not in self.members:
                fail(f"member {key} has jobs but no record")
        # 6. positions shown are the positions.
        for queue in self.guilds.values():
            if queue.dirty_from is not None:
                continue  # announced at the next positions() call
            for ticket in queue.tickets():
                if ticket.shown != shown_position(queue.position(ticket)):
                    fail(f"ticket {ticket.job} shows {ticket.shown}, is at {queue.position(ticket)}")
