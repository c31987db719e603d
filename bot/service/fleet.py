"""This process's place in the fleet (``DATABASE_URL`` set): a heartbeated row in the ``processes`` table.

It replaces ``DATA_DIR/bot.lock`` when the job store is PostgreSQL, so several processes may share one
``DATA_DIR`` volume, yet no two run the same gateway shard (each would answer the same guild, and take the
other's running jobs for a dead process's leftovers)::

    open: register (a live process with overlapping shards -> SettingsError, one line, exit 2)
       -> heartbeat every LEASE_TTL_S / 3 (a tracked task)
    close: cancel and await the heartbeat -> delete the row

A process is alive while its heartbeat is younger than ``LEASE_TTL_S`` by PostgreSQL's ``now()``; the rows of
dead ones (SIGKILL, a lost host) stop counting then and are deleted by the next process that registers.

The lease talks to the database through a small pool of its own, so a job pool busy to its limit never delays
a heartbeat. When the heartbeat cannot be written (the database is gone) the bot carries on; /healthz turns
503 once the last good write is older than its grace (30 s, bot/service/web.py), and heals with the
next write. If the row was removed meanwhile (the outage outlived the lease), the process registers again; if
another process has taken its shards by then, it is the one to go: ``on_lost`` is called (the bot closes).

While the database is away (:class:`OutageGuard`, installed by bot/service/app.py)::

    job store away, or lease not renewed -> a new /imagine is refused with UNAVAILABLE (no job, no defer)
    lease not renewed                    -> no new generation starts (the manager holds starts): running ones finish,
                                            queued ones keep their places, their queue timeout still runs
    lease renewed again                  -> the queued jobs start, each backend as its breaker says

A process whose lease has lapsed may find its shards taken and its queued jobs recovered by a successor:
starting nothing while it cannot renew is what keeps a job from running in two processes.

When a process dies (:class:`Takeover`, every LEASE_TTL_S / 3 in each live process)::

    a job's owner has no live row (SIGKILL, a lost host: silent past LEASE_TTL_S)
        -> one live process claims its jobs (one UPDATE, exclusive: bot/engine/store_pg.py)
        -> start-up recovery's decisions, here (bot/engine/recovery.py): queued ones run here, running ones are
           followed up by their backend id (AI Horde, ComfyUI) or reported interrupted with a Reroll button,
           finished ones never posted are posted
        -> its dead row is deleted; one INFO line per dead process: which, how many jobs

So a dead process's jobs are answered for within about LEASE_TTL_S * 4 / 3, by a survivor, not at its restart
(the restarted process starts with a new id and finds them taken). A lapsed process that comes back finds its
claimed jobs' writes refused (``JobTaken``) and drops them without posting (bot/engine/manager.py).

A rolling restart (SIGTERM beside a live process, :class:`HandBackToFleet`) goes through the same claim: the
stopping process leaves its queued jobs queued, and its running jobs on AI Horde / ComfyUI RUNNING with their
backend id (their generation left running, not cancelled), all still its own; its row goes with its clean exit,
and the next sweep of a survivor claims them, runs the queued ones and follows the running ones up by that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from bot.engine.errors import RequestRejected
from bot.engine.models import JobState
from bot.engine.store import StoreError
from bot.engine.store_pg import FleetProcess, PgJobStore, session_name
from bot.settings import Settings, SettingsError

if TYPE_CHECKING:
    from bot.engine.manager import AdmissionContext, JobManager
    from bot.engine.models import ImageRequest, Job
    from bot.engine.recovery import RecoveryReport

log = logging.getLogger(__name__)


def this_process(settings: Settings) -> FleetProcess:
    """A new row for this process: a random id per start, and the shards it runs (None: every shard)."""
    shard_ids = tuple(settings.shard_ids) if settings.shard_ids is not None else None
    return FleetProcess(uuid.uuid4().hex, socket.gethostname(), os.getpid(), settings.shard_count, shard_ids)


def overlap_problem(me: FleetProcess, other: FleetProcess) -> str:
    """The one line start-up stops with when another live process runs our shards."""
    ours = "every shard" if me.shard_ids is None else f"shards {','.join(map(str, me.shard_ids))}"
    return (
        f"SHARD_IDS: another bot process runs overlapping shards ({other.describe()}) on the same "
        f"DATABASE_URL; this one would run {ours}. Give each process its own SHARD_IDS (with one SHARD_COUNT), "
        "or stop the other first"
    )


class ProcessLease:
    """Registers ``me`` in ``store``, heartbeats it, and deletes it on :meth:`close`."""

    def __init__(
        self,
        store: PgJobStore,
        me: FleetProcess,
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.me = me
        self.ttl_s = ttl_s
        self.interval_s = ttl_s / 3
        self.clock = clock
        #: Called (once) when another process has taken our shards while our heartbeat was failing.
        self.on_lost: Callable[[], None] | None = None
        self.lost_to: FleetProcess | None = None
        self.last_ok = clock()
        self.last_error: str | None = None
        self.beats = 0
        #: Told ``renewing`` each time it changes (the outage guard listens).
        self.on_renewal: list[Callable[[bool], None]] = []
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Register, or raise SettingsError naming the live process whose shards overlap ours."""
        other = await self.store.register_process(self.me, ttl_s=self.ttl_s)
        if other is not None:
            raise SettingsError(overlap_problem(self.me, other))
        self.last_ok = self.clock()
        log.info(
            "registered in the fleet",
            extra={"process_id": self.me.id[:12], "shards": self.me.describe(), "lease_ttl_s": self.ttl_s},
        )
        self._task = asyncio.create_task(self._beat_forever(), name="process-heartbeat")
        self._task.add_done_callback(_log_if_crashed)

    async def close(self) -> None:
        """Stop the heartbeat, then delete our row (a clean exit frees the shards at once)."""
        task, self._task = self._task, None
        await _stop(task)
        if self.lost_to is not None:
            return  # the row is not ours any more
        try:
            await self.store.deregister_process(self.me.id)
        except StoreError as exc:  # it expires by itself after LEASE_TTL_S
            log.warning("could not remove this process's row: %s", exc.message)

    # -- health -----------------------------------------------------------------------------------------

    @property
    def renewing(self) -> bool:
        """Whether the last heartbeat was written and the shards are still ours: while not, this process
        starts no new work (it may have lapsed, and a successor may take its jobs)."""
        return self.lost_to is None and self.last_error is None

    def problem(self, grace_s: float) -> str | None:
        """Why /healthz should say 503 (None: healthy): our shards were taken, or the heartbeat has failed
        and the last good one is older than ``grace_s``."""
        if self.lost_to is not None:
            return f"another process took this process's shards ({self.lost_to.describe()})"
        if self.last_error is None:
            return None
        silent = self.clock() - self.last_ok
        if silent <= grace_s:
            return None
        return f"heartbeat failing for {silent:.0f}s: {self.last_error}"

    # -- the heartbeat ----------------------------------------------------------------------------------

    async def _beat_forever(self) -> None:
        while self.lost_to is None:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def beat(self) -> None:
        """One heartbeat: renew the row (or register again if it was removed); failures are remembered."""
        was = self.renewing
        try:
            await self._renew()
        finally:
            if self.renewing != was:
                self._tell_renewal()

    async def _renew(self) -> None:
        try:
            if not await self.store.heartbeat_process(self.me.id):
                await self._register_again()
                if self.lost_to is not None:
                    return
        except StoreError as exc:
            if self.last_error is None:
                # INFO: the job store's own line (one WARNING per outage) says the database is away.
                log.info(
                    "process heartbeat failed; no new generation starts until it is written again",
                    extra={"error": exc.message},
                )
            self.last_error = exc.message
            return
        except (
            Exception
        ) as exc:  # not the database's answer but our bug: keep beating, and say so on /healthz
            log.exception("process heartbeat crashed; retrying")
            self.last_error = f"the heartbeat crashed ({type(exc).__name__})"
            return
        if self.last_error is not None:
            log.info("process heartbeat restored", extra={"silent_s": round(self.clock() - self.last_ok, 1)})
        self.last_error = None
        self.last_ok = self.clock()
        self.beats += 1

    def _tell_renewal(self) -> None:
        for listener in list(self.on_renewal):
            try:
                listener(self.renewing)
            except Exception:
                log.exception("lease listener failed")

    async def _register_again(self) -> None:
        log.warning("this process's row had expired (heartbeat silent past LEASE_TTL_S); registering again")
        other = await self.store.register_process(self.me, ttl_s=self.ttl_s)
        if other is None:
            return
        self.lost_to = other
        log.error("shutting down: %s", overlap_problem(self.me, other))
        if self.on_lost is not None:
            self.on_lost()


# -- while the database is away --------------------------------------------------------------------------------

#: What a member reads when their /imagine arrives while this process could not record or schedule it.
UNAVAILABLE = "The bot cannot take new image requests right now; try again in a few minutes."


class OutageGuard:
    """What this process does while its database is away (see the module docstring): refuses new jobs
    while the job store is away or the lease is not renewed, and starts no generation while the lease is not
    renewed (the manager's :meth:`~bot.engine.manager.JobManager.hold_starts`)."""

    def __init__(self, manager: JobManager, store: PgJobStore, lease: ProcessLease) -> None:
        self.manager = manager
        self.store = store
        self.lease = lease
        self.refused = 0

    def install(self) -> OutageGuard:
        self.manager.admission_checks.append(self.check_admission)
        self.lease.on_renewal.append(self._renewal_changed)
        self._renewal_changed(self.lease.renewing)
        return self

    def check_admission(self, request: ImageRequest, context: AdmissionContext) -> None:
        """An admission check (the manager's hook): no job this process could not record or run."""
        if self.store.reachable and self.lease.renewing:
            return
        self.refused += 1
        raise RequestRejected(UNAVAILABLE, code="database_away")

    def _renewal_changed(self, renewing: bool) -> None:
        if renewing and self.manager.starts_held:
            log.info("lease renewed; queued jobs may start again")
        self.manager.hold_starts(not renewing)


# -- when another process dies ---------------------------------------------------------------------------------


class HandBackToFleet:
    """A rolling restart's unfinished jobs (the manager's :class:`~bot.engine.manager.HandBack`): when this
    process shuts down beside a live one, its queued jobs are not cancelled but left queued in the database,
    still ours; our row goes with the clean exit, and a survivor's :class:`Takeover` (or our own next start)
    claims and runs them, editing the same messages. Running jobs whose generation lives on at the backend under
    its id (AI Horde, ComfyUI) are left the same way, RUNNING with that id: the survivor follows them up by it
    (recovery's decision for a dead process's running jobs), nothing is submitted twice. Alone in the fleet,
    they are cancelled as before."""

    def __init__(self, store: PgJobStore, lease: ProcessLease) -> None:
        self.store = store
        self.lease = lease

    async def available(self) -> bool:
        """Another process alive (by the database's clock) and our lease renewed: it can take what we leave."""
        if not self.lease.renewing:
            return False
        try:
            others = await self.store.live_processes(ttl_s=self.lease.ttl_s)
        except StoreError as exc:
            log.info(
                "cannot see the other processes; queued jobs are cancelled, not handed back: %s", exc.message
            )
            return False
        return any(process.id != self.lease.me.id for process in others)

    async def take(self, job: Job) -> bool:
        # Its row already says so (queued, or running with its backend id), and ours: nothing to write. The claim
        # happens once our row is gone.
        return job.state is JobState.QUEUED or (job.state is JobState.RUNNING and bool(job.backend_ref))


class Takeover:
    """Claims the jobs of dead processes every ``lease.interval_s`` and hands them to ``recover`` (the bot's:
    start-up recovery's decisions). Started by the bot once its own start-up recovery is done (see the module
    docstring); :meth:`close` cancels and awaits it (a claim cut short leaves its jobs owned by this process,
    whose row goes with a clean exit: the next survivor takes them)."""

    def __init__(self, store: PgJobStore, lease: ProcessLease) -> None:
        self.store = store
        self.lease = lease
        self.interval_s = lease.interval_s
        #: Jobs taken over from dead processes so far.
        self.taken = 0
        self._task: asyncio.Task[None] | None = None

    def start(self, recover: Callable[[list[Job]], Awaitable[RecoveryReport]]) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._watch_forever(recover), name="job-takeover")
            self._task.add_done_callback(_log_if_crashed)

    async def close(self) -> None:
        task, self._task = self._task, None
        await _stop(task)

    async def _watch_forever(self, recover: Callable[[list[Job]], Awaitable[RecoveryReport]]) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.sweep(recover)
            except StoreError as exc:  # the database is away: the store says so (one WARNING); next round
                log.debug("could not look for dead processes' jobs: %s", exc.message)
            except Exception:  # our bug: say so, and keep watching (a dead process's jobs must not wait)
                log.exception("taking over a dead process's jobs failed; trying again next round")

    async def sweep(self, recover: Callable[[list[Job]], Awaitable[RecoveryReport]]) -> int:
        """One round: claim what dead processes left and recover it; returns how many jobs were taken."""
        if not self.lease.renewing:
            return 0  # our own lease may have lapsed: claiming now would only hand the jobs on again
        # A lost host's sessions are still open in PostgreSQL: ended first, so that no lock one of them holds
        # (the claim's among them) keeps this round, or the fleet's cache writes, waiting for hours.
        try:
            ended = await self.store.end_dead_sessions()
        except StoreError as exc:  # never a reason to leave a dead process's jobs where they are
            log.info("could not end the sessions of dead processes: %s", exc.message)
        else:
            if ended:
                log.warning("ended %d database sessions of dead processes (a lost host's)", ended)
        taken = await self.store.take_over_jobs()
        if not taken:
            return 0
        rows = {process.id: process for process in await self.store.forget_dead_processes(list(taken))}
        count = 0
        for dead, jobs in taken.items():
            outcome = await recover(jobs)
            count += len(jobs)
            process = rows.get(dead)
            log.info(
                "took over the jobs of a dead process",
                extra={
                    "dead_process_id": dead[:12],
                    "dead_process": process.describe() if process is not None else "its row was gone already",
                    "jobs": len(jobs),
                    "resumed": len(outcome.resumed),
                    "interrupted": len(outcome.interrupted),
                    "redelivered": len(outcome.redelivered),
                },
            )
        self.taken += count
        return count


async def _stop(task: asyncio.Task[None] | None) -> None:
    """Cancel one of this module's background tasks and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _log_if_crashed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped", task.get_name(), exc_info=task.exception())


@contextlib.asynccontextmanager
async def process_lease(settings: Settings) -> AsyncIterator[ProcessLease]:
    """Open a small pool of the lease's own, register this process, and clean up on the way out."""
    assert settings.database_url is not None
    me = this_process(settings)
    # The job store reports an outage (one WARNING line); this second pool on the same database stays quiet.
    store = PgJobStore(
        settings.database_url.get_secret_value(),
        max_size=2,
        report_outages=False,
        session_name=session_name(me.id),
    )
    await store.open()  # migrates (the processes table included) under its advisory lock
    try:
        lease = ProcessLease(store, me, ttl_s=settings.lease_ttl_s)
        try:
            await lease.start()
            yield lease
        finally:  # also after a failed start: whatever got registered under our (unique) id goes
            await lease.close()
    finally:
        await store.close()
