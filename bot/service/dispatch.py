"""The fleet's one fair queue on PostgreSQL: every process's jobs share the backends' capacities, the guilds'
limits and the turns between guilds (``DATABASE_URL`` set; wired by bot/service/app.py).

Each guild lives in one process (its gateway shard), which keeps that guild's queue in its own queue model (the
members' turns, positions, shared generations). What only the fleet can decide is who gets the next free slot on
a backend; that is decided by one *dispatcher* — whichever process holds ``DISPATCH_LOCK_KEY`` — running the
queue model's rule between guilds (bot/engine/fleet_queue.py) over rows in the database::

    a job waits here    -> this process publishes its demand: per guild and eligible backends, how many wait
                           (one statement for every guild that changed, batched, that also gives back
                           finished slots and NOTIFYs bot_dispatch)
    dispatcher          -> on bot_dispatch (and every poll): reads the slots held and the live processes'
                           demand (one statement), plans, writes grants as fleet_slots rows with a fresh
                           epoch and an expiry (one statement, NOTIFY bot_grant with the owner's id)
    this process        -> on bot_grant (and every poll): takes up its grants and renews its slots (one
                           statement), starts each granted guild's next job (JobManager.grant_slot), gives a
                           grant it cannot use back at once
    the generation ends -> the slot is given back with the next publish

The same connection hears ``bot_fill`` (payload: a cache key): another process put the result of a request
jobs here wait for instead of generating it again (bot/engine/cache_pg.py's fills), and they look again.

Wake-ups are ids only, heard on one dedicated connection per process (:class:`~bot.engine.store_pg.
FleetConnection`), which is also where the dispatcher holds its lock and writes its grants: a dispatcher whose
connection died has lost the lock with it and can write nothing. After a reconnect the process listens again and
re-reads at once; every process also polls every ``min(2 s, LEASE_TTL_S / 3)``, so a lost NOTIFY costs at most
one poll.

Faults:

- A slot is renewed by each poll; its expiry is PostgreSQL's ``now()``. A process that dies (or cannot renew
  for ``LEASE_TTL_S``) loses its slots at the dispatcher's next round, and its jobs go to a survivor
  (bot/service/fleet.py, ``Takeover``).
- A process that finds a slot it still uses missing from its poll (it lapsed; the dispatcher may have granted it
  again) stops that generation and its jobs wait for a new slot (``JobManager.slot_lost``): a generation keeps
  running only while its epoch is unchanged.
- The dispatcher dies: its connection closes, the lock frees, and another process takes it at its next poll
  and rebuilds everything from the rows (the guilds' turns start afresh). A dispatcher whose host is lost
  closes nothing: PostgreSQL keeps its session and the lock; once its lease has lapsed, the next takeover round
  of any process ends that session (``PgJobStore.end_dead_sessions``), and the lock is free for the next poll.
- The database is away: publishes are retried (nothing is lost: the next one carries every change), grants
  stop, the lease holds starts (bot/service/fleet.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable

from bot.engine.fleet_queue import Demand, FleetPlanner, Slot
from bot.engine.manager import JobManager
from bot.engine.store import StoreError
from bot.engine.store_pg import (
    CANCEL_CHANNEL,
    DISPATCH_CHANNEL,
    FILL_CHANNEL,
    GRANT_CHANNEL,
    FleetConnection,
    PgJobStore,
)

log = logging.getLogger(__name__)

#: The longest a process waits between two polls of its grants (and a dispatcher between two rounds).
POLL_S = 2.0
#: Changes arriving within this long of each other go out in one publish (a burst: one statement, not one
#: per job), and wake-ups within this long of a dispatcher round make one more round, not one each.
PUBLISH_BATCH_S = 0.02
DISPATCH_BATCH_S = 0.02
#: After a failed publish or poll (the database away), the wait before the next try.
RETRY_S = 1.0

ANY_BACKEND = "*"


def encode_eligible(eligible: frozenset[str] | None) -> str:
    return ANY_BACKEND if eligible is None else json.dumps(sorted(eligible))


def decode_eligible(text: str) -> frozenset[str] | None:
    return None if text == ANY_BACKEND else frozenset(json.loads(text))


class FleetQueue:
    """This process's part in the fleet's queue (the manager's :class:`~bot.engine.manager.FleetSlots`), and
    the dispatcher while it holds the lock."""

    def __init__(
        self,
        store: PgJobStore,
        manager: JobManager,
        *,
        ttl_s: float,
        poll_s: float = POLL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.manager = manager
        self.ttl_s = ttl_s
        self.poll_s = min(poll_s, ttl_s / 3)
        self.clock = clock
        self.connection = FleetConnection(store)
        self.planner = FleetPlanner(manager.pool.capacities())
        #: Guilds whose rows in fleet_demand are not known to be empty (published with something waiting).
        self._published: set[int] = set()
        self._changed: set[int] = set()
        self._freed: set[int] = set()
        self._held_as_published = False
        self._out_as_published: frozenset[str] = frozenset()
        self._publish_wanted = asyncio.Event()
        self._poll_wanted = asyncio.Event()
        self._dispatch_wanted = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancels: set[asyncio.Task[None]] = set()
        self._closing = False
        #: Counters for tests and /metrics: rounds planned, slots granted, polls, publishes.
        self.rounds = 0
        self.granted = 0
        self.polls = 0
        self.publishes = 0
        self.lost = 0

    # -- lifecycle --------------------------------------------------------------------------------------------
    def install(self) -> FleetQueue:
        """Make the manager take its slots from the fleet (before any job exists)."""
        self.manager.use_fleet_slots(self)
        return self

    async def start(self) -> None:
        await self._connect()
        for name, loop in (
            ("fleet-publish", self._publish_forever),
            ("fleet-poll", self._poll_forever),
            ("fleet-dispatch", self._dispatch_forever),
        ):
            task = asyncio.create_task(loop(), name=name)
            self._tasks.add(task)
            task.add_done_callback(_log_if_crashed)

    async def close(self) -> None:
        """After the manager drained: give back what is left (demand, slots), then release the lock."""
        if self._closing:
            return
        self._closing = True
        for task in list(self._tasks) + list(self._cancels):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._cancels, return_exceptions=True)
        self._tasks.clear()
        try:
            await self.store.leave_fleet_queue()
        except StoreError as exc:  # the rows go when this process's row expires
            log.info("could not give back this process's place in the fleet's queue: %s", exc.message)
        await self.connection.close()

    @property
    def dispatching(self) -> bool:
        return self.connection.holds_lock

    # -- the manager's hooks ------------------------------------------------------------------------------------
    def demand_changed(self) -> None:
        if not self._closing:
            self._publish_wanted.set()

    def slot_freed(self, epoch: int) -> None:
        self._freed.add(epoch)
        if not self._closing:
            self._publish_wanted.set()

    # -- wake-ups -----------------------------------------------------------------------------------------------
    async def _connect(self) -> bool:
        try:
            await self.connection.connect(
                {
                    DISPATCH_CHANNEL: lambda _: self._dispatch_wanted.set(),
                    GRANT_CHANNEL: self._heard_grant,
                    CANCEL_CHANNEL: self._heard_cancel,
                    FILL_CHANNEL: self._heard_fill,
                }
            )
        except StoreError as exc:
            log.debug("fleet connection not open: %s", exc.message)
            return False
        # Anything announced while we were not listening is in the rows: read them now.
        self._poll_wanted.set()
        self._dispatch_wanted.set()
        self._publish_wanted.set()
        return True

    def _heard_grant(self, owner: str) -> None:
        if owner == self.store.owner:
            self._poll_wanted.set()

    def _heard_fill(self, key: str) -> None:
        """Another process put (or gave up) a result jobs here may be waiting for."""
        if self.manager.cache is not None:
            self.manager.cache.fill_changed(key)

    def _heard_cancel(self, job_id: str) -> None:
        if self.manager.get(job_id) is not None:
            self._poll_wanted.set()

    @staticmethod
    async def _wait(event: asyncio.Event, at_most_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(at_most_s):
                await event.wait()
        event.clear()

    # -- publishing demand ---------------------------------------------------------------------------------------
    async def _publish_forever(self) -> None:
        while True:
            await self._publish_wanted.wait()
            await asyncio.sleep(PUBLISH_BATCH_S)  # a burst of changes: one statement
            self._publish_wanted.clear()
            if not await self.publish():
                await asyncio.sleep(RETRY_S)
                self._publish_wanted.set()

    async def publish(self) -> bool:
        """Send what changed since the last publish; False (kept for the next try) when it failed."""
        manager = self.manager
        self._changed |= manager.take_demand_changes()
        held, out = manager.starts_held, frozenset(manager.backends_out())
        if held != self._held_as_published or out != self._out_as_published:
            self._changed |= self._published | set(manager.waiting_guilds())
        if not self._changed and not self._freed:
            return True
        guilds, freed = sorted(self._changed), sorted(self._freed)
        backends = set(manager.pool.capacities())
        rows: dict[tuple[int, str], int] = {}
        for guild_id in guilds:
            for eligible, waiting in manager.demand(guild_id).items():
                usable = (backends if eligible is None else eligible & backends) - out
                if not usable:
                    continue  # nothing that may serve them can take work now: ask for nothing
                key = (guild_id, encode_eligible(None if eligible is None and not out else frozenset(usable)))
                rows[key] = rows.get(key, 0) + waiting
        demand = [(g, e, n, manager.guild_limit(g)) for (g, e), n in rows.items()]
        try:
            await self.store.publish_fleet(guilds, demand, freed)
        except StoreError as exc:
            log.debug("could not publish this process's demand: %s", exc.message)
            return False
        self.publishes += 1
        self._changed.difference_update(guilds)
        self._freed.difference_update(freed)
        with_demand = {g for g, _ in rows}
        self._published = (self._published - set(guilds)) | with_demand
        self._held_as_published, self._out_as_published = held, out
        return True

    # -- taking up grants ---------------------------------------------------------------------------------------
    async def _poll_forever(self) -> None:
        while True:
            await self._wait(self._poll_wanted, self.poll_s)
            if not self.connection.connected:
                await self._connect()
            await self.poll()

    async def poll(self) -> bool:
        """Take up grants, renew slots, stop what lost its slot, pass on cancels; False when it failed."""
        manager = self.manager
        believed = set(manager.slots_held())  # before the read: a slot taken up later is never "lost"
        try:
            found = await self.store.poll_fleet()
        except StoreError as exc:
            log.debug("could not poll the fleet's queue: %s", exc.message)
            return False
        self.polls += 1
        for epoch in believed - found.held - self._freed:
            if epoch in manager.slots_held():
                self.lost += 1
                manager.slot_lost(epoch)
        for epoch, guild_id, backend in found.granted:
            if not manager.grant_slot(epoch, guild_id, backend):
                self.slot_freed(epoch)  # nothing here can use it (any more): straight back
        for job_id, by in found.cancels:
            job = manager.get(job_id)
            if job is not None and not job.state.is_terminal:
                task = asyncio.create_task(manager.cancel(job_id, by=by), name=f"fleet-cancel-{job_id}")
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)
        return True

    # -- the dispatcher --------------------------------------------------------------------------------------
    async def _dispatch_forever(self) -> None:
        first = True
        while True:
            if self.connection.holds_lock:
                await self._wait(self._dispatch_wanted, self.poll_s)
            elif not first:
                # Not the dispatcher: wake-ups are not ours to act on (each would cost a lock attempt, a round
                # trip per publish of the whole fleet); try for the lock once per poll instead.
                await asyncio.sleep(self.poll_s)
                self._dispatch_wanted.clear()
            first = False
            try:
                if not self.connection.connected:
                    continue  # the poll loop reconnects
                was = self.connection.holds_lock
                if not await self.connection.try_lock():
                    continue
                if not was:
                    log.info("this process dispatches the fleet's queue")
                    self.planner = FleetPlanner(self.manager.pool.capacities())  # rebuilt from the rows
                await self.dispatch_round()
                await asyncio.sleep(DISPATCH_BATCH_S)  # what arrives meanwhile goes in the next round
            except StoreError as exc:
                if self.connection.holds_lock or not self.connection.connected:
                    log.info("the fleet's dispatcher lost its connection: %s", exc.message)
                await asyncio.sleep(RETRY_S)

    async def dispatch_round(self) -> int:
        """One plan over the rows; returns the slots granted."""
        rows = await self.connection.read_rows(ttl_s=self.ttl_s)
        slots = [Slot(e, o, g, b, decode_eligible(el), pending) for e, o, g, b, el, pending in rows.slots]
        demand = [Demand(o, g, decode_eligible(el), n, lim, first) for o, g, el, n, lim, first in rows.demand]
        grants = self.planner.plan(demand, slots)
        await self.connection.grant(
            [(g.owner, g.guild_id, g.backend, encode_eligible(g.eligible)) for g in grants], ttl_s=self.ttl_s
        )
        self.rounds += 1
        self.granted += len(grants)
        return len(grants)


def _log_if_crashed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("fleet queue task crashed", exc_info=task.exception())
