"""The job manager: drives the queue model (:mod:`bot.engine.queue`) with tasks, timeouts, backend calls and writes.

Lifecycle of a job::

    submit() -- admission (in memory) -> persisted as QUEUED -> task started
                (a failed first write: no job exists, the caller gets the error to tell the user)
    task:  cache hit? -> SUCCEEDED (from cache)
           admitted into the queue model: joins the live *flight* with the same key, or opens one; waits with
           its own ticket in its own guild's queue until the model grants its flight a slot -> RUNNING
           the flight's generation ends                         -> SUCCEEDED | FAILED | TIMED_OUT
           queue timeout, cancel(), shutdown at any point       -> TIMED_OUT | CANCELLED
           a rolling restart (``hand_back``): still queued, or running on a generation another process can
           follow up by its backend id                          -> no end here (left as it is, for the other)
           then the delivery hook (the Discord layer posts the result) runs inside the same task,
           so shutdown's drain covers posting too; a delivery in progress is never cancelled at grace end.

Who waits, who runs and what each member has in flight live in the model alone; every end (cancel, queue
timeout, backend failure, job timeout, shutdown) goes through the model's ``leave`` / ``flight_ended``. A
generation whose last job left is stopped and keeps its slot until its backend call has wound down.

Every state change is written to the store before listeners hear of it; a write that fails is retried until
the store agrees with memory. A write the store refuses because another process has claimed the job
(:class:`~bot.engine.store.JobTaken`: this process's lease had lapsed) drops the job here: its task is stopped,
listeners hear ``TAKEN`` instead of the rest, nothing is delivered. Nothing here imports discord.

Pools (:mod:`bot.engine.pool`): the model's backends are the pool's entries. A job may go only to the entries
that serve its model, size and count (refused at admission when none ever could); the model grants the least
loaded free one. A generation that fails before its backend accepted it (``GenerationError.not_accepted``: the
submit's connection never came up, or it was answered 429/503) is *bounced*: the flight waits again, never on
that backend. A generation a backend accepted is never submitted anywhere else. Outcomes feed each entry's
circuit breaker; an entry taken out is granted nothing until its probe answers.

A fleet (:meth:`JobManager.use_fleet_slots`, wired by bot/service/dispatch.py): the backends' slots are the
fleet's. The model starts nothing by itself; what waits is published as demand, the fleet's dispatcher grants a
slot (an *epoch*) to a guild, :meth:`JobManager.grant_slot` starts that guild's next job on it, and the slot goes
back to the fleet when its generation ends. A slot the fleet says is lost (its lease lapsed: another process may
hold it now) stops its generation and sends its jobs back to wait: no generation runs on a slot twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from bot.engine.alerts import OperatorAlerts
from bot.engine.backend import Backend, BackendCall, Capabilities, ResumableBackend, backend_call
from bot.engine.cache import cache_key
from bot.engine.catalog import ModelCatalog
from bot.engine.deadlines import Deadline, Deadlines
from bot.engine.errors import EndReason, FailureReason, GenerationError, RequestRejected, ShuttingDown
from bot.engine.models import (
    GeneratedImage,
    GenerationResult,
    ImageRequest,
    Job,
    JobState,
    Progress,
    new_job_id,
    validate_request,
)
from bot.engine.pool import HEALTH_FAILURES, BackendPool, PoolEntry
from bot.engine.queue import (
    Decision,
    FlightState,
    InvariantError,
    JobPhase,
    Moved,
    Position,
    QueueModel,
    Requeued,
    Start,
    Stop,
    estimate_wait,
    mean_generation_s,
)
from bot.engine.store import JobTaken, StoreError
from bot.logs import current_job

if TYPE_CHECKING:
    from bot.engine.cache import ResultCache
    from bot.engine.store import JobStore
    from bot.settings import Settings

log = logging.getLogger(__name__)

#: How long, after a cancel, a job waits for its backend call to wind down (interrupt sent, slot freed).
CANCEL_SETTLE_S = 10.0
#: In a fleet, a job whose identical request another process is generating looks again at least this often
#: (a wake-up, ``NOTIFY bot_fill``, usually comes first).
FILL_POLL_S = 2.0
#: After the grace period, how long cancelled jobs get to record and report that they were stopped.
SHUTDOWN_REPORT_S = 10.0
#: Queue positions are announced at most this often (each announcement costs what changed, never a rescan).
POSITION_INTERVAL_S = 0.25
#: First wait before a failed store write is tried again (doubling up to 30 s).
STORE_RETRY_S = 1.0
#: A delivery (posting the result) that takes longer than this is abandoned and logged.
DELIVERY_TIMEOUT_S = 120.0


class JobEvent(StrEnum):
    QUEUED = "queued"  # accepted, or its queue position changed
    STARTED = "started"
    PROGRESS = "progress"
    FINISHED = "finished"  # reached a terminal state (see job.state)
    TAKEN = "taken"  # another process answers for it now: nothing more is heard of it here


Listener = Callable[[Job, JobEvent], None]
Delivery = Callable[[Job], Awaitable[None]]


class HandBack(Protocol):
    """Where a shutting-down process gives its unfinished jobs (the fleet: other processes on one database)."""

    async def available(self) -> bool:
        """Whether another process is there to run what is handed back (asked once, as shutdown begins)."""

    async def take(self, job: Job) -> bool:
        """Give back ``job``: still queued, or running with its generation's backend id recorded (``backend_ref``,
        on a :class:`ResumableBackend`), asked before its backend call is abandoned. True when it will be run, or
        followed up by that id, elsewhere."""


class FleetSlots(Protocol):
    """The fleet's side of the slots (bot/service/dispatch.py): told when demand changes and when a slot frees."""

    def demand_changed(self) -> None:
        """What waits here changed (read it with :meth:`JobManager.take_demand_changes`)."""

    def slot_freed(self, epoch: int) -> None:
        """The generation on slot ``epoch`` is over: give the slot back."""


class AdmissionContext(NamedTuple):
    """Who asks, and where: what per-guild rules (channels, NSFW, quotas, defaults) need to decide."""

    guild_id: int
    user_id: int
    channel_id: int | None = None
    channel_nsfw: bool = False
    #: Images of this user's requests admitted a moment ago but not submitted yet (quotas count them too).
    pending_images: int = 0


#: Fills in per-guild defaults (size, model) or adjusts the request (NSFW policy) before validation.
RequestDefaults = Callable[[ImageRequest, AdmissionContext], ImageRequest]
#: Refuses a validated request by raising RequestRejected (channel not allowed, blocked words, quota).
AdmissionCheck = Callable[[ImageRequest, AdmissionContext], None]


@dataclass(eq=False, slots=True)
class _Run:
    """One generation on a backend (the model's flight), as the manager runs it."""

    flight: int
    request: ImageRequest
    cache_key: str | None  # None only without a cache (nothing is stored)
    #: The pool entry it runs on (the model's choice).
    backend: str = ""
    task: asyncio.Task[None] | None = None
    progress: Progress | None = None
    #: Follow this already-submitted backend generation instead of submitting (after a restart).
    resume_ref: str | None = None
    #: Once stored in the cache, the images' refs (every job of the flight gets them).
    image_refs: list[str] = field(default_factory=list)
    #: The job timeout cancelled the backend call (as opposed to a stop or a shutdown).
    timed_out: bool = False
    #: The backend's id for this generation once every job of the flight has it recorded (or the id it follows).
    backend_ref: str | None = None
    #: The backend call under way (None before it began and once it returned).
    call: BackendCall | None = None
    #: Handed over at a rolling restart: its call was abandoned, the generation left running for another process.
    handed_over: bool = False
    #: A private generation (one job, never shared) runs inside that job's own task, not a task of its own:
    #: ``task`` is the job's task once it began, None until then.
    inline: bool = False
    #: The fleet took its slot back (the lease lapsed): the call is stopped and its jobs wait again.
    slot_lost: bool = False


@dataclass(eq=False, slots=True)
class _Tracked:
    """A job's live state in this process. Its place in the queue lives in the model, not here."""

    job: Job
    task: asyncio.Task[None] | None = None
    cancel_reason: EndReason | None = None
    resume_ref: str | None = None
    #: Set by the task's first step: a task cancelled before it ever ran would skip all its bookkeeping.
    started: bool = False
    #: Its end is recorded (or it never came to exist): :meth:`JobManager.cancel` returns then.
    recorded: bool = False
    #: Callers waiting for ``recorded`` (created only when someone waits).
    recorded_waiters: list[asyncio.Future[None]] | None = None
    #: What the job's task awaits while the model has nothing for it; resolved by :func:`_wake` when the model
    #: changed its phase (started, sent back to the queue, its flight ended, its queue time ran out).
    waiter: asyncio.Future[None] | None = None
    #: The job is admitted in the queue model (else it holds a reservation there: exactly one of the two).
    in_model: bool = False
    #: What its flight ended with: a result, or the exception to raise in the job's task.
    outcome: GenerationResult | BaseException | None = None
    run: _Run | None = None
    queue_timer: Deadline | None = None
    delivering: bool = False
    #: Stopped counting against its member (its end recorded and heard).
    released: bool = False
    #: Another process claimed it (a write was refused): it is dropped here, never delivered.
    taken: bool = False
    #: Running, handed over at a rolling restart: another process follows its generation up (no end here).
    handed_over: bool = False
    #: In a fleet: the cache key whose fill its lookup claimed (or found claimed here already); let go at its end.
    fill_key: str | None = None


class JobManager:
    """Runs jobs: admission, the queue model's decisions, backend calls, store writes, delivery, shutdown.

    State about *who waits and who runs* lives in :class:`~bot.engine.queue.QueueModel` alone; this class
    reacts to its decisions (start a generation, stop one, announce a position) with tasks and writes.
    """

    def __init__(
        self,
        backend: Backend | BackendPool,
        *,
        store: JobStore | None = None,
        cache: ResultCache | None = None,
        guild_concurrency: int = 2,
        guild_concurrency_max: int = 8,
        backend_concurrency: int = 4,
        user_max_jobs: int = 3,
        queue_timeout_s: float = 600.0,
        job_timeout_s: float = 300.0,
        models: Iterable[str] = (),
        default_model: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        #: The backends (a pool of one for ``IMAGE_BACKEND``); ``backend`` is its first entry's.
        self.pool = (
            backend if isinstance(backend, BackendPool) else BackendPool.single(backend, backend_concurrency)
        )
        self.pool.on_change = self._backend_out
        self.backend = self.pool.primary.backend
        backend = self.backend
        self.store = store
        self.cache = cache
        self.guild_concurrency = guild_concurrency
        self.guild_concurrency_max = guild_concurrency_max
        self.user_max_jobs = user_max_jobs
        self.queue_timeout_s = queue_timeout_s
        self.job_timeout_s = job_timeout_s
        self.default_model = default_model or backend.default_model()
        #: Which models members may choose (the service swaps in one that follows the backend's own list).
        self.catalog = ModelCatalog(
            None,
            configured=models,
            default=self.default_model,
            parts=[entry.catalog for entry in self.pool if entry.catalog is not None],
        )
        self.clock = clock
        #: Hook run inside each job's task once it is finished (the Discord layer posts there).
        self.deliver: Delivery | None = None
        #: With several processes on one database (the fleet wires it): when shutdown begins and another process
        #: is there, no queued job starts here any more; the grace is for running ones, and each job still
        #: queued is then handed back instead of cancelled: it leaves this process with no end of its own (no
        #: terminal state, no delivery, its message left to the process that runs it). A running job whose
        #: generation another process can follow up by its backend id is handed over the same way, its backend
        #: call abandoned without stopping the generation (see :meth:`_drain`).
        self.hand_back: HandBack | None = None
        self._handing_back = False
        #: While the drain waits: resolved when a generation may have become one to hand over.
        self._drain_wake: asyncio.Future[None] | None = None
        #: In a fleet: where slots come from and go back to (see :meth:`use_fleet_slots`).
        self.fleet: FleetSlots | None = None
        self._slot_of: dict[int, int] = {}  # flight -> the fleet slot (epoch) it runs on
        #: In a fleet: jobs here holding each claimed fill (the claim is let go of when the last one ends).
        self._fill_holders: Counter[str] = Counter()
        #: Per-guild rules plugged into the one admission path (see check_admission).
        self.request_defaults: list[RequestDefaults] = []
        self.admission_checks: list[AdmissionCheck] = []

        self._guild_limits: dict[int, int] = {}
        self._user_limits: dict[int, int] = {}
        self.queue = QueueModel(self.pool.capacities(), guild_limit=self.guild_limit)
        self._tracked: dict[str, _Tracked] = {}
        self._runs: dict[int, _Run] = {}
        self._run_tasks: set[asyncio.Task[None]] = set()
        #: Recent generation times (seconds), for the estimated wait shown with a queue position.
        self.recent_generation_s: deque[float] = deque(maxlen=20)
        self._unsaved: dict[str, Job] = {}
        self._retry_task: asyncio.Task[None] | None = None
        self._listeners: list[Listener] = []
        #: Queue timeouts and job timeouts: one loop timer for all of them.
        self._deadlines = Deadlines()
        self._position_flush: asyncio.TimerHandle | None = None
        self._position_flushed_at = float("-inf")
        self._accepting = True
        self._submitting = 0  # submits past admission, still writing their first record
        #: Resolved when the last of them is done, if shutdown waits for that.
        self._submits_done: asyncio.Future[None] | None = None
        self.completed = Counter[JobState]()
        #: Failures the operator must fix: WARNING lines and owner notifications, rate-limited.
        self.alerts = OperatorAlerts(clock=clock)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        backend: Backend | BackendPool,
        *,
        store: JobStore | None = None,
        cache: ResultCache | None = None,
    ) -> JobManager:
        return cls(
            backend,
            store=store,
            cache=cache,
            guild_concurrency=settings.guild_concurrency,
            guild_concurrency_max=settings.guild_concurrency_max,
            backend_concurrency=settings.max_backend_concurrency,
            user_max_jobs=settings.user_max_jobs,
            queue_timeout_s=settings.queue_timeout_s,
            job_timeout_s=settings.job_timeout_s,
            models=settings.image_models,
            default_model=settings.image_model,
        )

    @property
    def models(self) -> tuple[str, ...]:
        return self.catalog.models

    @property
    def capabilities(self) -> Capabilities:
        """What members may ask for: the backend's, or for a pool what at least one entry supports."""
        return self.pool.capabilities

    def backend_load(self, name: str) -> int:
        """Slots held on one pool entry now."""
        return self.queue.running.get(name, 0)

    def can_resume(self, job: Job) -> bool:
        """Whether the entry that ran ``job`` can follow its submitted generation after a restart."""
        entry = self._entry_of(job)
        return entry is not None and isinstance(entry.backend, ResumableBackend)

    def _entry_of(self, job: Job) -> PoolEntry | None:
        """The entry a job ran on; None when the configuration no longer has it (a generation submitted to a
        Horde cannot be followed up on the ComfyUI that replaced it)."""
        if job.backend in self.pool:
            return self.pool[job.backend]  # type: ignore[index]
        return self.pool.primary if job.backend is None and not self.pool.many else None

    # -- limits ---------------------------------------------------------------------------------------------
    def guild_limit(self, guild_id: int) -> int:
        return self._guild_limits.get(guild_id, self.guild_concurrency)

    def set_guild_limit(self, guild_id: int, limit: int | None) -> int:
        """Override a guild's concurrency (clamped to the operator's ceiling); ``None`` restores the default."""
        if limit is None:
            self._guild_limits.pop(guild_id, None)
        else:
            self._guild_limits[guild_id] = max(1, min(int(limit), self.guild_concurrency_max))
        self._apply(self.queue.limits_changed())
        return self.guild_limit(guild_id)

    def user_limit(self, guild_id: int) -> int:
        return self._user_limits.get(guild_id, self.user_max_jobs)

    def set_user_limit(self, guild_id: int, limit: int | None) -> int:
        if limit is None:
            self._user_limits.pop(guild_id, None)
        else:
            self._user_limits[guild_id] = max(1, int(limit))
        return self.user_limit(guild_id)

    # -- listeners --------------------------------------------------------------------------------------------
    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def _emit(self, job: Job, event: JobEvent) -> None:
        for listener in list(self._listeners):
            try:
                listener(job, event)
            except Exception:
                log.exception("job listener failed", extra={"job": job.id, "event": event.value})

    # -- inspection -------------------------------------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return self._accepting

    def get(self, job_id: str) -> Job | None:
        tracked = self._tracked.get(job_id)
        return tracked.job if tracked else None

    def active_jobs(self, *, guild_id: int | None = None, user_id: int | None = None) -> list[Job]:
        jobs = [t.job for t in self._tracked.values() if t.job.is_active]
        if guild_id is not None:
            jobs = [j for j in jobs if j.guild_id == guild_id]
        if user_id is not None:
            jobs = [j for j in jobs if j.user_id == user_id]
        return sorted(jobs, key=lambda j: j.created_at)

    def active_count(self, guild_id: int, user_id: int) -> int:
        """Jobs of this member queued or running, and requests admitted but not submitted yet (the one count)."""
        record = self.queue.member(guild_id, user_id)
        return record.jobs + record.reserved

    def images_in_flight(self, guild_id: int, user_id: int) -> int:
        """Images this member's unfinished jobs (and admitted, unsubmitted requests) will make."""
        record = self.queue.member(guild_id, user_id)
        return record.images + record.reserved_images

    def queue_depth(self) -> int:
        return sum(1 for t in self._tracked.values() if t.job.state is JobState.QUEUED)

    def running_count(self) -> int:
        return sum(1 for t in self._tracked.values() if t.job.state is JobState.RUNNING)

    @property
    def backend_in_flight(self) -> int:
        """Slots held at the backends right now (a generation winding down still holds its slot)."""
        return self.queue.slots_held

    def guild_in_flight(self, guild_id: int) -> int:
        return self.queue.running_in(guild_id)

    def guild_waiting(self, guild_id: int) -> int:
        """Jobs of this guild waiting for a slot."""
        return self.queue.waiting_in(guild_id)

    def task_count(self) -> int:
        """Tasks this manager owns that are not finished (jobs and generations)."""
        return len(self._pending_tasks())

    def check_invariants(self) -> None:
        """The public probe: the queue model's invariants, and that this manager agrees with the model."""
        self.queue.check_invariants()
        for job_id, tracked in self._tracked.items():
            if tracked.in_model != (job_id in self.queue.jobs):
                raise InvariantError(f"job {job_id}: manager and model disagree on whether it is queued")
        for job_id in self.queue.jobs:
            if job_id not in self._tracked:
                raise InvariantError(f"the model holds job {job_id} nobody tracks")
        live = {f.id for f in self.queue.flights.values() if f.state is not FlightState.QUEUED}
        if set(self._runs) != live:
            raise InvariantError(f"generations running {sorted(self._runs)} but the model has {sorted(live)}")

    # -- admission --------------------------------------------------------------------------------------------
    def normalise(self, request: ImageRequest) -> ImageRequest:
        """Fill in what the user left to defaults, so the cache key and the job record say what ran."""
        changes: dict[str, object] = {}
        if request.model is None and self.default_model:
            changes["model"] = self.default_model
        if request.width <= 0 or request.height <= 0:
            changes["width"], changes["height"] = self.capabilities.default_size
        return request.replace(**changes) if changes else request

    def check_admission(
        self,
        request: ImageRequest,
        guild_id: int,
        user_id: int,
        *,
        channel_id: int | None = None,
        channel_nsfw: bool = False,
        pending: int = 0,
        pending_images: int = 0,
    ) -> ImageRequest:
        """The one admission path: in-memory checks only, so callers can answer Discord within its deadline.

        Order: shutting down? -> per-guild defaults -> backend defaults -> validation -> the user's active-job
        limit -> per-guild checks. Returns the request to run or raises :class:`RequestRejected`.
        Requests held with :meth:`holding` count already; ``pending`` / ``pending_images`` add any others.
        """
        if not self._accepting:
            raise ShuttingDown()
        context = AdmissionContext(guild_id, user_id, channel_id, channel_nsfw, pending_images)
        for apply_defaults in self.request_defaults:
            request = apply_defaults(request, context)
        request = self.normalise(request)
        caps = self.capabilities
        validate_request(request, models=self.catalog.allowed, sizes=caps.sizes, max_count=caps.max_count)
        if request.negative_prompt and not caps.negative_prompt:
            raise RequestRejected(f"The {self.backend.name} backend does not take a negative prompt.")
        if self.pool.many and not self.pool.eligible(request, self.default_model):
            raise RequestRejected(_nobody_serves(request), code="no_backend")
        limit = self.user_limit(guild_id)
        if self.active_count(guild_id, user_id) + pending >= limit:
            raise RequestRejected(
                f"You already have {limit} image job{'s' if limit != 1 else ''} queued or running here; "
                "wait for one to finish or cancel one.",
                code="user_limit",
            )
        for check in self.admission_checks:
            check(request, context)
        return request

    @contextlib.contextmanager
    def holding(self, guild_id: int, user_id: int, images: int) -> Iterator[None]:
        """Count an admitted request against the member's limits while the caller acknowledges it.

        The caller submits right after leaving the block (no await in between), so the count never lapses.
        """
        self.queue.reserve(guild_id, user_id, images)
        try:
            yield
        finally:
            self.queue.unreserve(guild_id, user_id, images)

    async def submit(
        self,
        request: ImageRequest,
        *,
        guild_id: int,
        user_id: int,
        channel_id: int | None = None,
        message_ref: dict[str, object] | None = None,
        job_id: str | None = None,
        channel_nsfw: bool = False,
    ) -> Job:
        """Admit, persist and start a job. Raises :class:`RequestRejected` before any job exists.

        If the first write fails the job never existed: the error propagates (the caller tells the user) and a
        cancel waiting on it returns False at once.
        """
        request = self.check_admission(
            request, guild_id, user_id, channel_id=channel_id, channel_nsfw=channel_nsfw
        )
        job = Job(
            id=job_id or new_job_id(),
            request=request,
            guild_id=guild_id,
            user_id=user_id,
            channel_id=channel_id,
            backend=None if self.pool.many else self.pool.primary.name,  # a pool's: the entry it starts on
            message_ref=message_ref,
            created_at=self.clock(),
        )
        tracked = _Tracked(job)
        self._tracked[job.id] = tracked
        self.queue.reserve(guild_id, user_id, request.count)
        self._submitting += 1
        try:
            if self.store is not None:
                await self.store.save_job(job)
        except BaseException:
            self._forget(tracked)
            raise
        else:
            tracked.task = asyncio.create_task(self._run_job(tracked), name=f"job-{job.id}")
        finally:
            self._submitting -= 1
            if not self._submitting and self._submits_done is not None:
                if not self._submits_done.done():
                    self._submits_done.set_result(None)
                self._submits_done = None
        log.info("job queued", extra={"job": job.id, "guild": guild_id, "user": user_id})
        self._emit(job, JobEvent.QUEUED)
        return job

    async def adopt(self, job: Job, *, follow_backend_ref: bool = False) -> Job:
        """Take over a job a dead process left unfinished (same id, same record).

        With ``follow_backend_ref`` the generation it had already submitted (``job.backend_ref``, on a
        :class:`ResumableBackend`) is followed up instead of submitted again.
        """
        if not self._accepting:
            raise ShuttingDown()
        if follow_backend_ref and not (job.backend_ref and self.can_resume(job)):
            raise ValueError("this job has no generation the backend can resume")
        job.state = JobState.QUEUED
        tracked = _Tracked(job, resume_ref=job.backend_ref if follow_backend_ref else None)
        self._tracked[job.id] = tracked
        self.queue.reserve(job.guild_id, job.user_id, job.request.count)
        if not await self._persist(job):
            self._forget(tracked)  # claimed by another process meanwhile: theirs to run
            return job
        tracked.task = asyncio.create_task(self._run_job(tracked), name=f"job-{job.id}")
        self._emit(job, JobEvent.QUEUED)
        return job

    def set_message_ref(self, job_id: str, message_ref: dict[str, object]) -> None:
        """Attach the Discord message reference once known (persisted with the next state change)."""
        tracked = self._tracked.get(job_id)
        if tracked is not None:
            tracked.job.message_ref = message_ref

    # -- cancellation -----------------------------------------------------------------------------------------
    async def cancel(
        self, job_id: str, *, reason: EndReason | str = EndReason.CANCELLED, by: str | None = None
    ) -> bool:
        """Cancel a queued or running job and wait until it is recorded as cancelled (its slot freed).

        Returns False when the job is unknown here, already finished, or never came to exist.
        """
        tracked = self._tracked.get(job_id)
        if tracked is None or tracked.job.state.is_terminal:
            return False
        self._request_cancel(tracked, EndReason(reason), by)
        await _until_recorded(tracked)
        return tracked.job.state is JobState.CANCELLED

    @staticmethod
    def _request_cancel(tracked: _Tracked, reason: EndReason, by: str | None) -> None:
        """Cancel once. A job still being submitted, or whose task has not run yet, sees the reason at its start."""
        if tracked.cancel_reason is not None:
            return
        tracked.cancel_reason = reason
        tracked.job.cancelled_by = by
        if tracked.started and tracked.task is not None:
            tracked.task.cancel()

    async def wait(self, job_id: str) -> Job | None:
        """Wait until a job has finished (delivery included); None when it is not tracked here."""
        tracked = self._tracked.get(job_id)
        if tracked is None:
            return None
        task = tracked.task
        if task is not None and not task.done():
            # asyncio.wait for one task, without its sets: cancelling the waiter never cancels the job.
            finished = asyncio.get_running_loop().create_future()

            def wake(_: object) -> None:
                if not finished.done():
                    finished.set_result(None)

            task.add_done_callback(wake)
            try:
                await finished
            finally:
                task.remove_done_callback(wake)
        return tracked.job

    # -- shutdown ---------------------------------------------------------------------------------------------
    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let work finish for ``grace`` seconds, cancel the rest, and await every task.

        A job whose result is being delivered when the grace ends is never cancelled: deliveries get the report
        window (SHUTDOWN_REPORT_S) after the grace, like the cancelled jobs reporting that they stopped.
        Handing back (``hand_back``), queued jobs are handed back at the grace's end, and running generations
        another process can follow up are handed over as soon as nothing else keeps this process (:meth:`_drain`).
        Idempotent: a second call (the bot drained, then the engine closes) finds nothing to do.
        """
        if not self._accepting and not self._pending_tasks():
            return
        self._accepting = False
        self._handing_back = await self._will_hand_back()
        if self._handing_back:
            self.hold_starts(True)  # queued jobs wait for another process, not for this one's grace
        pending = self._pending_tasks(queued=not self._handing_back)
        log.info(
            "draining jobs",
            extra={"jobs": self._unfinished_jobs(), "grace_s": grace, "handing_back": self._handing_back},
        )
        if pending:
            await self._drain(grace)
        await self._wait_for_submits()
        leftovers = [
            t
            for t in self._tracked.values()
            if t.task is not None and not t.task.done() and not t.job.state.is_terminal and not t.handed_over
        ]
        for tracked in leftovers:
            queued = tracked.job.state is JobState.QUEUED and self._handing_back
            self._request_cancel(tracked, EndReason.HANDED_OVER if queued else EndReason.SHUTDOWN, None)
        delivering = sum(1 for t in self._tracked.values() if t.delivering)
        pending = self._pending_tasks()
        if pending:
            log.info("cancelled unfinished jobs", extra={"jobs": len(leftovers), "delivering": delivering})
            await asyncio.wait(pending, timeout=SHUTDOWN_REPORT_S)
        # Anything still alive now is stuck in a delivery or a backend that ignores cancellation: cancel hard.
        for task in self._pending_tasks():
            task.cancel()
        remaining = self._pending_tasks()
        if remaining:
            await asyncio.gather(*remaining, return_exceptions=True)
        self._settle_never_started()
        await self._flush_unsaved()
        await self.pool.aclose()  # stops probing backends that are out (cancelled and awaited)
        if self._position_flush is not None:
            self._position_flush.cancel()
            self._position_flush = None
        self._deadlines.close()
        await self.alerts.close()
        log.info("job manager stopped")

    async def _drain(self, grace: float) -> None:
        """The grace: wait up to ``grace`` seconds for running work (and queued jobs, unless handing back).

        Handing back, a running generation another process can follow up by its backend id (Horde, ComfyUI:
        :meth:`_followable`) is never what keeps this process here: it is handed over as soon as nothing else
        does (at once when nothing else runs; else when the rest has finished; at the latest at the grace's
        end), and this process exits. The member sees no difference: the generation goes on at the backend,
        and the other process posts its image in the same message. Not always at once: the other process
        claims it only once this process's row is gone (its clean exit), so handing it over while other work
        still keeps us here would leave it watched by nobody, its image waiting at the backend; followed here
        meanwhile, it is posted the moment it is done. Not after the grace either: that would hold the restart
        for generations that lose nothing by moving (a Horde queue can take minutes). A generation not yet
        submitted (no id recorded) waits for its id like any running job; one whose hand-over is refused
        stays to finish within the grace or be stopped.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(grace, 0.0)
        declined: set[_Run] = set()
        while True:
            pending = self._pending_tasks(queued=not self._handing_back)
            remaining = deadline - loop.time()
            if self._handing_back:
                followable = [run for run in self._followable_runs() if run not in declined]
                if followable and (remaining <= 0 or not pending - self._tasks_of(followable)):
                    declined.update(await self._hand_over(followable))
                    continue
            if not pending or remaining <= 0:
                return
            wake = self._drain_wake = loop.create_future()
            try:
                await asyncio.wait({*pending, wake}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._drain_wake = None
                wake.cancel()

    def _wake_drain(self) -> None:
        """A generation may have become one to hand over (its id recorded, a job of it started)."""
        if self._drain_wake is not None and not self._drain_wake.done():
            self._drain_wake.set_result(None)

    def _followable_runs(self) -> list[_Run]:
        return [run for run in self._runs.values() if self._followable(run) is not None]

    def _followable(self, run: _Run) -> list[_Tracked] | None:
        """The jobs of ``run`` if it can be handed over now, else None: its backend call is under way on a
        :class:`ResumableBackend` the configuration still has, with the generation's id recorded; each of its
        jobs is running, its record written, and nothing else (a cancel, a claim, an outcome) has come for it.
        Exactly the jobs recovery follows up by their id in the process that claims them."""
        if (
            run.handed_over
            or run.slot_lost  # the fleet took its slot back: it is being stopped, its jobs wait again
            or run.backend_ref is None
            or run.call is None
            or run.timed_out
            or run.task is None
            or run.task.done()
            or self._runs.get(run.flight) is not run
        ):
            return None
        flight = self.queue.flights.get(run.flight)
        if flight is None or flight.state is not FlightState.RUNNING or not flight.jobs:
            return None
        jobs = [self._tracked[job_id] for job_id in flight.jobs]
        for tracked in jobs:
            job = tracked.job
            if (
                job.state is not JobState.RUNNING
                or tracked.cancel_reason is not None
                or tracked.taken
                or tracked.outcome is not None
                or job.id in self._unsaved
                or not self.can_resume(job)
            ):
                return None
        return jobs

    def _tasks_of(self, runs: Iterable[_Run]) -> set[asyncio.Task[object]]:
        tasks: set[asyncio.Task[object]] = set()
        for run in runs:
            if run.task is not None:
                tasks.add(run.task)
            flight = self.queue.flights.get(run.flight)
            for job_id in flight.jobs if flight is not None else ():
                task = self._tracked[job_id].task
                if task is not None:
                    tasks.add(task)
        return tasks

    async def _hand_over(self, runs: Iterable[_Run]) -> set[_Run]:
        """Hand each of ``runs`` over with all its jobs (a shared generation goes whole, or not at all); returns
        those ``hand_back`` refused. One that changed meanwhile (its image came) is left to go on here."""
        declined: set[_Run] = set()
        for run in runs:
            jobs = self._followable(run)
            if jobs is None:
                continue
            if not await self._offer(run, jobs):
                declined.add(run)
            elif self._followable(run) == jobs:  # nothing came for it while we asked
                self._abandon(run, jobs)
        return declined

    async def _offer(self, run: _Run, jobs: list[_Tracked]) -> bool:
        assert self.hand_back is not None and run.backend_ref is not None
        try:
            for tracked in jobs:
                job = tracked.job
                if job.backend_ref != run.backend_ref:
                    # It joined the flight after the id was recorded: the other process follows it by this id.
                    job.backend_ref = run.backend_ref
                    if not await self._persist(job) or job.id in self._unsaved:
                        return False
                if not await self.hand_back.take(job):
                    return False
        except Exception:
            log.exception(
                "could not hand a running generation over; it stays here", extra={"flight": run.flight}
            )
            return False
        return True

    def _abandon(self, run: _Run, jobs: list[_Tracked]) -> None:
        """Abandon the backend call without stopping the generation remotely; its jobs leave with no end here
        (their records stay RUNNING, with the generation's id, and this process's: another claims them)."""
        assert run.call is not None and run.task is not None
        run.handed_over = True
        for tracked in jobs:
            tracked.handed_over = True
            tracked.cancel_reason = EndReason.HANDED_OVER
        run.call.hand_over()  # first: the backend's cancel path must see it
        run.task.cancel()  # the flight's end reaches each job's task (see _run_job)
        log.info(
            "running generation handed over to another process",
            extra={"flight": run.flight, "jobs": len(jobs), "backend": run.backend or self.backend.name},
        )

    async def _will_hand_back(self) -> bool:
        if self.hand_back is None:
            return False
        try:
            return await self.hand_back.available()
        except Exception:
            log.exception("could not tell whether another process takes queued jobs; cancelling them instead")
            return False

    def _unfinished_jobs(self) -> int:
        return sum(1 for t in self._tracked.values() if t.task is not None and not t.task.done())

    async def _wait_for_submits(self, limit_s: float = 5.0) -> None:
        """Submits admitted before shutdown began may still be writing their first record: let them start."""
        if not self._submitting:
            return
        if self._submits_done is None:
            self._submits_done = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                await asyncio.shield(self._submits_done)

    def _pending_tasks(self, *, queued: bool = True) -> set[asyncio.Task[object]]:
        """Unfinished tasks; ``queued=False`` leaves out those of jobs still waiting for a slot."""
        tasks: set[asyncio.Task[object]] = {
            t.task
            for t in self._tracked.values()
            if t.task is not None and not t.task.done() and (queued or t.job.state is not JobState.QUEUED)
        }
        tasks.update(t for t in self._run_tasks if not t.done())
        if self._retry_task is not None and not self._retry_task.done():
            tasks.add(self._retry_task)
        return tasks

    # -- the queue model's decisions ----------------------------------------------------------------------------
    def _apply(self, decisions: list[Decision]) -> None:
        """Carry out what the model decided. Synchronous: tasks are started, nothing is awaited here."""
        mean_s: float | None = None  # recent generation time, read once per batch of positions
        capacity: int | None = None
        never_began: list[_Run] = []  # private generations stopped before their job's task began them
        for decision in decisions:
            if isinstance(decision, Start):
                run = self._runs.get(decision.flight)
                if run is None:
                    run = self._start_run(decision)
                for job_id in decision.jobs:
                    tracked = self._tracked[job_id]
                    tracked.run = run
                    if self.pool.many:
                        tracked.job.backend = decision.backend
                    self._disarm(tracked)
                    _wake(tracked)
            elif isinstance(decision, Stop):
                run = self._runs.get(decision.flight)
                if run is not None and run.task is not None:
                    run.task.cancel()
                elif run is not None and run.inline:
                    never_began.append(run)
            elif isinstance(decision, Requeued):
                for job_id in decision.jobs:
                    tracked = self._tracked[job_id]
                    tracked.run = None
                    if self.pool.many:
                        tracked.job.backend = None  # on no backend while it waits
                    self._arm(tracked)
                    _wake(tracked)
            elif isinstance(decision, Moved):
                log.info("generation now counts for another guild", extra={"guild": decision.guild_id})
            elif isinstance(decision, Position):
                tracked = self._tracked.get(decision.job)
                if tracked is None:
                    continue
                job = tracked.job
                if job.state is JobState.QUEUED and job.queue_position != decision.position:
                    if capacity is None:
                        mean_s = mean_generation_s(self.recent_generation_s)
                        capacity = sum(self.queue.backends.values())
                    job.queue_position = decision.position
                    job.queue_eta_s = estimate_wait(
                        decision.position, mean_s, min(self.guild_limit(job.guild_id), capacity)
                    )
                    self._emit(job, JobEvent.QUEUED)
        for run in never_began:  # no backend call to wind down: the slot frees at once
            self._end_run(run, asyncio.CancelledError(), "stopped")
        if self.fleet is not None and self.queue.demand_changes_pending:
            self.fleet.demand_changed()
        if self.queue.positions_pending and self._position_flush is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._position_flushed_at + POSITION_INTERVAL_S - loop.time())
            self._position_flush = loop.call_later(delay, self._flush_positions)

    def _flush_positions(self) -> None:
        """Announce the positions whose shown bucket changed since the last flush (coalesced bursts)."""
        self._position_flush = None
        self._position_flushed_at = asyncio.get_running_loop().time()
        self._apply(list(self.queue.positions()))

    def _start_run(self, start: Start) -> _Run:
        first = self._tracked[start.jobs[0]]
        run = _Run(
            start.flight,
            first.job.request,
            first.job.cache_key,
            backend=start.backend,
            resume_ref=first.resume_ref,
        )
        self._runs[start.flight] = run
        if self.queue.flights[start.flight].key is None:
            run.inline = True  # never shared: its job's task makes the backend call (see _obtain)
            return run
        run.task = asyncio.create_task(self._run_flight(run), name=f"flight-{first.job.id}")
        self._run_tasks.add(run.task)
        run.task.add_done_callback(functools.partial(self._run_task_done, run))
        return run

    def _enter_model(
        self, tracked: _Tracked, key: str | None, eligible: frozenset[str] | None = None
    ) -> None:
        """Admit into the queue model; the reservation the job held until now is handed over (no await)."""
        job = tracked.job
        self.queue.unreserve(job.guild_id, job.user_id, job.request.count)
        tracked.in_model = True
        decisions = self.queue.admit(
            job.id, job.guild_id, job.user_id, key=key, images=job.request.count, eligible=eligible
        )
        if self.queue.phase(job.id) is JobPhase.WAITING:
            self._arm(tracked)
        self._apply(decisions)

    def _left_model(self, tracked: _Tracked) -> None:
        """The model ended the job: it holds a reservation until its end is recorded (quotas count it)."""
        job = tracked.job
        tracked.in_model = False
        self._disarm(tracked)
        self.queue.reserve(job.guild_id, job.user_id, job.request.count)

    def _leave_model(self, tracked: _Tracked, reason: str) -> int | None:
        """End a job in the model early; returns the flight it stopped, if it was the last to wait for it."""
        if not tracked.in_model:
            return None
        decisions = self.queue.leave(tracked.job.id, reason)
        self._left_model(tracked)
        self._apply(decisions)
        run = tracked.run
        stopped = next((d.flight for d in decisions if isinstance(d, Stop)), None)
        return stopped if run is not None and stopped == run.flight else None

    def _arm(self, tracked: _Tracked) -> None:
        """Start the queue timeout (counted from the job's creation)."""
        self._disarm(tracked)
        remaining = self.queue_timeout_s - (self.clock() - tracked.job.created_at)
        tracked.queue_timer = self._deadlines.after(remaining, self._queue_expired, tracked)

    @staticmethod
    def _disarm(tracked: _Tracked) -> None:
        if tracked.queue_timer is not None:
            tracked.queue_timer.cancel()
            tracked.queue_timer = None

    def _queue_expired(self, tracked: _Tracked) -> None:
        tracked.queue_timer = None
        if tracked.in_model and self.queue.phase(tracked.job.id) is JobPhase.WAITING:
            self._leave_model(tracked, EndReason.QUEUE_TIMEOUT)
            tracked.outcome = _QueueTimedOut()
            _wake(tracked)

    # -- the job task -----------------------------------------------------------------------------------------
    async def _run_job(self, tracked: _Tracked) -> None:
        tracked.started = True
        job = tracked.job
        current_job.set(job.id)  # this task's context only: its log lines (and its flight's) carry the id
        try:
            try:
                if tracked.cancel_reason is not None:
                    raise asyncio.CancelledError  # cancelled while it was being submitted
                result = await self._obtain(tracked)
            except asyncio.CancelledError:
                self._uncancel()
                reason = tracked.cancel_reason or EndReason.CANCELLED
                await self._stop_waiting(tracked, reason)
                if reason is EndReason.HANDED_OVER:
                    if await self._handed_over(tracked):
                        return
                    reason = EndReason.SHUTDOWN
                await self._finish(
                    tracked,
                    JobState.CANCELLED,
                    error_reason=EndReason.SHUTDOWN if reason is EndReason.SHUTDOWN else EndReason.CANCELLED,
                    error_message=_cancel_message(reason, job.cancelled_by),
                )
            except _QueueTimedOut:
                await self._finish(
                    tracked,
                    JobState.TIMED_OUT,
                    error_reason=EndReason.QUEUE_TIMEOUT,
                    error_message=f"Waited over {self.queue_timeout_s:.0f} s in the queue; try again later.",
                )
            except GenerationError as exc:
                self.alerts.report(exc)
                job.error_advice = exc.advice
                state = JobState.TIMED_OUT if exc.reason is FailureReason.TIMEOUT else JobState.FAILED
                await self._finish(tracked, state, error_reason=exc.reason.value, error_message=exc.message)
            except Exception:
                log.exception("job failed unexpectedly", extra={"job": job.id})
                await self._stop_waiting(tracked, FailureReason.INTERNAL)
                await self._finish(
                    tracked,
                    JobState.FAILED,
                    error_reason=FailureReason.INTERNAL.value,
                    error_message="Something went wrong on our side; the error was logged.",
                )
            else:
                job.result = result
                job.from_cache = result.from_cache
                job.seeds = [image.seed for image in result.images]
                await self._finish(tracked, JobState.SUCCEEDED)
            await self._let_go_of_fill(tracked)  # before posting: another process may be waiting for it
            if not tracked.taken:
                tracked.delivering = True
                try:
                    await self._deliver(job)
                finally:
                    tracked.delivering = False
        except asyncio.CancelledError:
            # A second cancel (the shutdown's hard stop) while recording or delivering: give up quietly.
            self._settle(tracked)
            raise
        except Exception:
            # A bug in the bookkeeping itself: logged, and the job is ended in the books, never left half-way.
            log.error("job task crashed", exc_info=True, extra={"job": job.id})
            self._settle(tracked)
        finally:
            _mark_recorded(tracked)
            self._forget_finished(tracked)
            await self._let_go_of_fill(tracked)

    async def _handed_over(self, tracked: _Tracked) -> bool:
        """Offer a job still queued at the grace's end to ``hand_back``; taken, it stops counting here. A running
        one handed over with its generation (:meth:`_abandon`, taken already) just leaves."""
        job = tracked.job
        if tracked.handed_over:
            log.info(
                "running job handed over to another process; its generation goes on",
                extra={"job": job.id, "backend_ref": job.backend_ref},
            )
            self._emit(job, JobEvent.TAKEN)  # its message is the other process's to edit now
            self._release(tracked)
            return True
        if job.state is not JobState.QUEUED or self.hand_back is None:
            return False  # it started meanwhile: a running job is not handed over
        try:
            taken = await self.hand_back.take(job)
        except Exception:
            log.exception("could not hand a queued job over; cancelling it", extra={"job": job.id})
            return False
        if not taken:
            return False
        log.info("queued job handed over to another process", extra={"job": job.id})
        self._release(tracked)
        return True

    def _forget_finished(self, tracked: _Tracked) -> None:
        """Finished jobs leave memory; their record lives on in the store."""
        job_id = tracked.job.id
        if self._tracked.get(job_id) is tracked:
            del self._tracked[job_id]
            self.queue.forget_ended(job_id)

    async def _obtain(self, tracked: _Tracked) -> GenerationResult:
        job = tracked.job
        request = job.request
        private = request.fresh or tracked.resume_ref is not None
        # The key names the result in the cache and lets identical requests share a flight; a private job with
        # no cache needs neither (hashing the canonical request is a real part of a job's cost).
        key = self._key(request) if self.cache is not None or not private else None
        job.cache_key = key
        if self.cache is not None and key is not None and not request.fresh:
            hit = await self._look_up(tracked, key, claim=self.fleet is not None and not private)
            if hit is not None:
                cached, job.image_refs = hit
                log.info("job served from cache", extra={"job": job.id})
                return cached
        eligible = self._eligible(tracked)
        if eligible is not None and not eligible:  # the entries' model lists changed since admission
            raise GenerationError(FailureReason.UNKNOWN_MODEL, _nobody_serves(request))
        self._enter_model(tracked, None if private else key, eligible)
        if self.queue.phase(job.id) is JobPhase.RUNNING and len(self.queue.flight_of(job.id).jobs) > 1:  # type: ignore[union-attr]
            log.info("job shares a generation in flight", extra={"job": job.id})
        while tracked.outcome is None:
            phase = self.queue.phase(job.id) if tracked.in_model else None
            if phase is JobPhase.RUNNING and job.state is JobState.QUEUED:
                await self._transition(job, JobState.RUNNING, started_at=self.clock())
                run = tracked.run
                if run is not None and run.progress is not None:  # progress from before this job noticed
                    job.progress = run.progress
                    self._emit(job, JobEvent.PROGRESS)
                continue
            if phase is JobPhase.WAITING and job.state is JobState.RUNNING:
                # Its generation stopped under it (the job holding the slot left, no guild had room): waits again.
                job.state = JobState.QUEUED
                job.started_at = None
                await self._persist(job)
                self._emit(job, JobEvent.QUEUED)
                continue
            run = tracked.run
            if phase is JobPhase.RUNNING and run is not None and run.inline and run.task is None:
                run.task = asyncio.current_task()
                await self._run_flight(run)  # ends the flight (an outcome), or it waits again (bounced)
                continue
            waiter = tracked.waiter = asyncio.get_running_loop().create_future()
            await waiter
        outcome = tracked.outcome
        if isinstance(outcome, BaseException):
            raise outcome
        job.image_refs = list(tracked.run.image_refs) if tracked.run is not None else []
        return outcome

    async def _look_up(
        self, tracked: _Tracked, key: str, *, claim: bool
    ) -> tuple[GenerationResult, list[str]] | None:
        """The cache's answer for ``key``. In a fleet (``claim``) a miss claims the key's fill for this process,
        and while another process is generating the very same request the job waits for that generation's
        result (its put wakes us, or we look again every ``FILL_POLL_S``) instead of paying a backend twice."""
        assert self.cache is not None
        told = False
        while True:
            found = await self.cache.lookup(key, claim=claim)
            if found.hit is not None or not found.filling_elsewhere:
                break
            if not told:
                told = True
                log.info(
                    "an identical request is being generated by another process; waiting for it",
                    extra={"job": tracked.job.id},
                )
            await self.cache.wait_for_fill(key, FILL_POLL_S)
        if claim and found.hit is None and tracked.fill_key is None:
            tracked.fill_key = key
            self._fill_holders[key] += 1
        return found.hit

    async def _let_go_of_fill(self, tracked: _Tracked) -> None:
        """The job ended: when it was the last one here on its claimed fill, the claim goes (nothing to do when
        the generation's put ended it), so processes waiting for it generate it themselves."""
        key, tracked.fill_key = tracked.fill_key, None
        if key is None:
            return
        self._fill_holders[key] -= 1
        if self._fill_holders[key] > 0:
            return
        del self._fill_holders[key]
        if self.cache is not None:
            await self.cache.release_fill(key)

    async def _stop_waiting(self, tracked: _Tracked, reason: str) -> None:
        """Leave the queue model; if that stopped the generation, wait for its backend call to wind down."""
        stopped = self._leave_model(tracked, reason)
        run = self._runs.get(stopped) if stopped is not None else None
        if run is None or run.task is None or run.task.done() or run.task is asyncio.current_task():
            return
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(CANCEL_SETTLE_S):
                await asyncio.wait({run.task})

    def _key(self, request: ImageRequest) -> str:
        # Names the kinds and workflows that may serve it, never the entries' names: identical backends share.
        names = self.pool.eligible(request, self.default_model) if self.pool.many else None
        return cache_key(request, backend=self.pool.identity(names), model=request.model)

    def _eligible(self, tracked: _Tracked) -> frozenset[str] | None:
        """The pool entries this job may run on (None: any, a pool of one)."""
        if not self.pool.many:
            return None
        job = tracked.job
        if tracked.resume_ref is not None and job.backend in self.pool:
            return frozenset({job.backend})  # type: ignore[arg-type]  # follows its generation where it runs
        return self.pool.eligible(job.request, self.default_model)

    # -- the fleet's slots ------------------------------------------------------------------------------------------
    def use_fleet_slots(self, fleet: FleetSlots) -> None:
        """From now on slots come from the fleet (before any job exists): the model grants nothing by itself."""
        if self.queue.jobs or self._tracked:
            raise RuntimeError("use_fleet_slots must be called before the first job")
        self.fleet = fleet
        self.queue.external = True

    def grant_slot(self, epoch: int, guild_id: int, backend: str) -> bool:
        """The fleet granted slot ``epoch`` on ``backend`` to ``guild_id``: start that guild's next job on it.
        False when nothing here can use it now (the caller gives it back)."""
        if self.fleet is None:
            return False
        decisions = self.queue.grant(guild_id, backend)
        start = next((d for d in decisions if isinstance(d, Start)), None)
        if start is None:
            return False
        self._slot_of[start.flight] = epoch
        self._apply(decisions)
        return True

    def slots_held(self) -> dict[int, int]:
        """Fleet slots held by generations here: epoch -> flight."""
        return {epoch: flight for flight, epoch in self._slot_of.items()}

    def slot_lost(self, epoch: int) -> None:
        """The fleet no longer counts slot ``epoch`` as ours (our lease lapsed; another process may use it):
        its generation stops and its jobs wait for a new slot."""
        flight = next((f for f, e in self._slot_of.items() if e == epoch), None)
        run = self._runs.get(flight) if flight is not None else None
        if run is None:
            return
        log.warning("the fleet took back a slot in use; its generation waits again", extra={"flight": flight})
        run.slot_lost = True
        if run.task is not None:
            run.task.cancel()
        elif run.inline:  # its job's task has not begun the call: nothing to stop
            self._bounce_run(run, exclude=False)

    def take_demand_changes(self) -> set[int]:
        """Guilds whose waiting jobs changed since the last call."""
        return self.queue.take_demand_changes()

    def demand(self, guild_id: int) -> dict[frozenset[str] | None, int]:
        """Jobs of ``guild_id`` waiting for a slot, per set of backends that may serve them (None: any);
        nothing while starts are held (no slot could be used)."""
        return {} if self.queue.held else self.queue.demand(guild_id)

    def waiting_guilds(self) -> list[int]:
        """Guilds with jobs waiting here."""
        return [g for g, q in self.queue.guilds.items() if q.members]

    def backends_out(self) -> set[str]:
        """Pool entries taken out by their circuit breaker (granted nothing here until back)."""
        return set(self.queue.out)

    def _free_fleet_slot(self, flight: int) -> None:
        epoch = self._slot_of.pop(flight, None)
        if epoch is not None and self.fleet is not None:
            self.fleet.slot_freed(epoch)

    def hold_starts(self, held: bool) -> None:
        """Start no generation while held (running ones carry on, queued jobs keep their places); released,
        queued jobs start at once. The fleet holds starts while this process cannot renew its lease."""
        if held != self.queue.held:
            self._apply(self.queue.hold(held))
            if self.fleet is not None:
                self.fleet.demand_changed()  # held, nothing here can use a slot: no demand is published

    @property
    def starts_held(self) -> bool:
        return self.queue.held

    def _backend_out(self, name: str, out: bool) -> None:
        """The pool's circuit breaker took an entry out or brought it back."""
        self._apply(self.queue.set_out(name, out))
        if self.fleet is not None:
            self.fleet.demand_changed()  # which backends may serve what waits here changed

    # -- generations ----------------------------------------------------------------------------------------------
    async def _run_flight(self, run: _Run) -> None:
        """One backend call; when it ends (result, failure, stopped), the model ends the flight and its jobs."""
        outcome: GenerationResult | BaseException
        reason = "succeeded"
        bounced: str | None = None  # "elsewhere" or "wait" (see _may_fail_over)
        task = asyncio.current_task()
        assert task is not None
        timer = self._deadlines.after(self.job_timeout_s, self._generation_expired, run)
        try:
            started = time.monotonic()
            try:
                images = await self._call_backend(run)
            except asyncio.CancelledError:
                if run.slot_lost and task.uncancel() == 0:
                    raise _SlotLost() from None  # the fleet's cancel alone: the jobs wait again
                if not run.timed_out:
                    raise
                # Our own deadline's cancel: undo it; a stop that came as well still cancels the task.
                if task.uncancel() > 0:
                    raise
                raise GenerationError(
                    FailureReason.TIMEOUT,
                    f"The image took longer than {self.job_timeout_s:.0f} s and was stopped.",
                ) from None
            finally:
                timer.cancel()
            result = GenerationResult(
                images=tuple(images),
                backend=run.backend or self.backend.name,
                model=run.request.model,
                elapsed_s=time.monotonic() - started,
            )
            self.recent_generation_s.append(result.elapsed_s)
            # Stored once per generation, however many jobs share it (without a cache there is nowhere to
            # fetch images back from later, so no references are kept).
            if self.cache is not None and run.cache_key is not None:
                run.image_refs = await self.cache.put(run.cache_key, result)
            outcome = result
        except asyncio.CancelledError as exc:
            outcome, reason = exc, "stopped"
            raise
        except _SlotLost as exc:
            outcome, reason = exc, "stopped"
            flight = self.queue.flights.get(run.flight)
            if self._runs.get(run.flight) is run and flight is not None and flight.jobs:
                bounced = "wait"
        except GenerationError as exc:
            outcome, reason = exc, exc.reason.value
            bounced = self._may_fail_over(run, exc)
            if not exc.not_accepted and self.pool.many and exc.reason is FailureReason.UNAVAILABLE:
                # Accepted (or maybe accepted) there, so never sent elsewhere: the member may Reroll.
                outcome = GenerationError(exc.reason, BACKEND_LOST, advice=exc.advice)
        except Exception as exc:
            log.error("generation crashed", exc_info=exc, extra={"flight": run.flight})
            outcome, reason = exc, FailureReason.INTERNAL.value
        finally:
            if run.backend and not run.slot_lost:  # a lapsed lease says nothing about the backend's health
                self.pool.record(run.backend, _pool_outcome(reason, bounced), outcome)  # type: ignore[arg-type]
            if bounced:
                self._bounce_run(run, exclude=bounced == "elsewhere")
            else:
                self._end_run(run, outcome, reason)

    def _may_fail_over(self, run: _Run, exc: GenerationError) -> str | None:
        """Only a generation its backend certainly never took waits again: for another backend
        (``"elsewhere"``), or, when no other serves it and this one was just taken out, for it to be back
        (``"wait"``). Otherwise (None) the job fails with the backend's message."""
        if not (exc.not_accepted and self.pool.many and run.resume_ref is None):
            return None
        flight = self.queue.flights.get(run.flight)
        if (
            self._runs.get(run.flight) is not run
            or flight is None
            or flight.state is not FlightState.RUNNING
            or not flight.jobs
        ):
            return None
        if self.queue.eligible_after_bounce(flight):
            return "elsewhere"
        will_be_out = self.pool[run.backend].failures + 1 >= self.pool.failures_to_trip
        return "wait" if exc.reason in HEALTH_FAILURES and will_be_out else None

    def _bounce_run(self, run: _Run, *, exclude: bool) -> None:
        """The flight waits again (for another backend, or for this one to be back); its jobs hear it."""
        del self._runs[run.flight]
        if not run.slot_lost:
            log.info("backend did not take the generation; it waits again", extra={"backend": run.backend})
        self._free_fleet_slot(run.flight)
        self._apply(self.queue.bounce(run.flight, exclude=exclude))

    @staticmethod
    def _generation_expired(run: _Run) -> None:
        if run.task is not None and not run.task.done():
            run.timed_out = True
            run.task.cancel()

    def _end_run(self, run: _Run, outcome: GenerationResult | BaseException, reason: str) -> None:
        """The model ends the flight (freeing its slot) and each job still on it hears the outcome."""
        if self._runs.get(run.flight) is not run:
            return  # already ended
        del self._runs[run.flight]
        self._free_fleet_slot(run.flight)
        flight = self.queue.flights.get(run.flight)
        jobs = list(flight.jobs) if flight is not None else []
        decisions = self.queue.flight_ended(run.flight, reason)
        for job_id in jobs:
            tracked = self._tracked[job_id]
            self._left_model(tracked)
            tracked.outcome = outcome
            _wake(tracked)
        self._apply(decisions)

    async def _call_backend(self, run: _Run) -> list[GeneratedImage]:
        on_progress = functools.partial(self._on_progress, run)

        backend = self.pool[run.backend].backend if run.backend in self.pool else self.backend
        if not isinstance(backend, ResumableBackend):
            return await backend.generate(run.request, on_progress)

        async def remember(ref: str) -> None:
            # Stored before the wait begins, so a restart can follow this generation instead of losing it.
            for job in self._jobs_of(run):
                job.backend_ref = ref
                await self._persist(job)
            run.backend_ref = ref
            self._wake_drain()  # shutting down, it may be handed over now

        # The call, seen by the backend's cancel path: handed over (see _abandon), it is not stopped remotely.
        with backend_call() as call:
            run.call = call
            try:
                if run.resume_ref is not None:
                    run.backend_ref = run.resume_ref
                    return await backend.resume(run.resume_ref, on_progress, count=run.request.count)
                return await backend.generate(run.request, on_progress, on_submitted=remember)
            finally:
                run.call = None

    def _jobs_of(self, run: _Run) -> list[Job]:
        flight = self.queue.flights.get(run.flight)
        return [self._tracked[j].job for j in flight.jobs] if flight is not None else []

    def _on_progress(self, run: _Run, progress: Progress) -> None:
        run.progress = progress
        for job in self._jobs_of(run):
            if job.state is JobState.RUNNING:
                job.progress = progress
                self._emit(job, JobEvent.PROGRESS)

    # -- state changes --------------------------------------------------------------------------------------
    async def _persist(self, job: Job) -> bool:
        """Write the job; a failed write is retried in the background until the store agrees with memory.
        False when the store refused it because another process has claimed the job (dropped here)."""
        if self.store is None:
            return True
        try:
            await self.store.save_job(job)
        except JobTaken:
            self._taken(job)
            return False
        except Exception as exc:
            self._write_failed(job, exc)
        else:
            self._unsaved.pop(job.id, None)
        return True

    def _taken(self, job: Job) -> None:
        """Another process claimed the job while this one's lease had lapsed: it answers for the job now. Drop it
        here: nothing more is written, heard or delivered; an unfinished one's task is stopped (its generation
        too, unless another job of ours shares it)."""
        self._unsaved.pop(job.id, None)
        tracked = self._tracked.get(job.id)
        if tracked is None or tracked.taken or tracked.job is not job:
            return
        tracked.taken = True
        log.warning("job claimed by another process; dropped here", extra={"job": job.id})
        self._emit(job, JobEvent.TAKEN)
        if not job.state.is_terminal:
            self._request_cancel(tracked, EndReason.SHUTDOWN, None)

    def _write_failed(self, job: Job, exc: Exception) -> None:
        """Keep the job to write again. A store that says why (StoreError: the database away, the disk full)
        is logged once per spell of failed writes, not per job and per retry; anything else is a bug and
        logged with its traceback each time."""
        first = not self._unsaved
        self._unsaved[job.id] = job
        if not isinstance(exc, StoreError):
            log.error("could not record a job; retrying", exc_info=exc, extra={"job": job.id})
        elif first:
            log.warning(
                "could not record job states; retrying until the store takes them: %s",
                exc.message,
                extra={"job": job.id},
            )
        else:
            log.debug("job record not written yet: %s", exc.message, extra={"job": job.id})
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.create_task(self._retry_unsaved(), name="store-retry")

    async def _retry_unsaved(self) -> None:
        delay = STORE_RETRY_S
        while self._unsaved:
            await asyncio.sleep(delay)
            await self._flush_unsaved()
            delay = min(delay * 2, 30.0)

    async def _flush_unsaved(self) -> None:
        assert self.store is not None or not self._unsaved
        if not self._unsaved:
            return
        for job_id, job in list(self._unsaved.items()):
            try:
                await self.store.save_job(job)  # type: ignore[union-attr]
            except JobTaken:
                self._taken(job)
            except Exception as exc:
                log.debug("job record still not written: %s", _one_line(exc), extra={"job": job_id})
            else:
                self._unsaved.pop(job_id, None)
        if not self._unsaved:
            log.info("job records written again; the store agrees with memory")

    def unsaved_jobs(self) -> list[str]:
        """Jobs whose record in the store is behind memory (a write failed; it is being retried)."""
        return list(self._unsaved)

    async def _transition(self, job: Job, state: JobState, *, started_at: float | None = None) -> None:
        job.state = state
        if started_at is not None:
            job.started_at = started_at
            job.queue_position = None
            job.queue_eta_s = None
        if self.store is not None and not await self._persist(job):
            return  # claimed by another process: its task is being stopped
        log.info("job started", extra={"job": job.id})
        self._emit(job, JobEvent.STARTED)
        self._wake_drain()  # shutting down, its generation may be handed over now

    async def _finish(
        self,
        tracked: _Tracked,
        state: JobState,
        *,
        error_reason: str | None = None,
        error_message: str | None = None,
    ) -> None:
        job = tracked.job
        job.state = state
        job.finished_at = self.clock()
        job.queue_position = None
        job.queue_eta_s = None
        job.error_reason = error_reason
        job.error_message = error_message
        if self.store is not None and not await self._persist(job):
            _mark_recorded(tracked)  # claimed by another process: its record is theirs, and so is the post
            self._release(tracked)
            return
        self.completed[state] += 1
        log.info(
            "job finished",
            extra={"job": job.id, "state": state.value, **({"reason": error_reason} if error_reason else {})},
        )
        _mark_recorded(tracked)
        try:
            self._emit(job, JobEvent.FINISHED)
        finally:
            self._release(tracked)

    async def _deliver(self, job: Job) -> None:
        if self.deliver is None:
            return
        try:
            async with asyncio.timeout(DELIVERY_TIMEOUT_S):
                await self.deliver(job)
        except TimeoutError:
            log.error("delivery timed out", extra={"job": job.id})
        except Exception:
            log.exception("delivery failed", extra={"job": job.id})

    def _release(self, tracked: _Tracked) -> None:
        """The job's end is recorded and heard: it stops counting against its member (once)."""
        if tracked.in_model:
            self._leave_model(tracked, EndReason.CANCELLED)
        job = tracked.job
        if not tracked.released:
            tracked.released = True
            self.queue.unreserve(job.guild_id, job.user_id, job.request.count)

    def _settle(self, tracked: _Tracked) -> None:
        """A job whose task was stopped hard: end it in the books without awaiting anything."""
        if tracked.in_model:
            self._leave_model(tracked, EndReason.SHUTDOWN)
        if not tracked.job.state.is_terminal:
            tracked.job.state = JobState.CANCELLED
            tracked.job.error_reason = EndReason.SHUTDOWN
        self._release(tracked)

    def _forget(self, tracked: _Tracked) -> None:
        """The first write failed: the job never existed. Anyone waiting on it (a cancel) returns at once."""
        self._tracked.pop(tracked.job.id, None)
        self._release(tracked)
        _mark_recorded(tracked)

    @staticmethod
    def _uncancel() -> None:
        """A handled cancel must not leave the task marked as cancelling (it would break later timeouts)."""
        task = asyncio.current_task()
        if task is not None:
            while task.cancelling():
                task.uncancel()

    def _settle_never_started(self) -> None:
        """Jobs whose task was cancelled before its first step (only the shutdown's hard stop can do that):
        their task never ran its own bookkeeping, so the books are settled here."""
        for tracked in [t for t in self._tracked.values() if t.task is not None and t.task.done()]:
            if not tracked.started:
                self._settle(tracked)
                _mark_recorded(tracked)
                self._forget_finished(tracked)

    def _run_task_done(self, run: _Run, task: asyncio.Task[None]) -> None:
        self._run_tasks.discard(task)
        # Cancelled before its first step (stopped at once): its body never ran to free the slot.
        self._end_run(run, asyncio.CancelledError(), "stopped")
        if not task.cancelled():
            task.exception()  # retrieved here so a failure is never "never retrieved" (logged in the run)


def _one_line(exc: BaseException) -> str:
    return exc.message if isinstance(exc, StoreError) else type(exc).__name__


def _wake(tracked: _Tracked) -> None:
    """The model changed something the job's task must act on: resume it if it waits.

    The task checks the job's phase and outcome before each wait without awaiting in between, so a wake while
    it is busy needs no record.
    """
    waiter = tracked.waiter
    if waiter is not None:
        tracked.waiter = None
        if not waiter.done():
            waiter.set_result(None)


def _mark_recorded(tracked: _Tracked) -> None:
    if tracked.recorded:
        return
    tracked.recorded = True
    waiters, tracked.recorded_waiters = tracked.recorded_waiters, None
    for waiter in waiters or ():
        if not waiter.done():
            waiter.set_result(None)


async def _until_recorded(tracked: _Tracked) -> None:
    if tracked.recorded:
        return
    waiter = asyncio.get_running_loop().create_future()
    if tracked.recorded_waiters is None:
        tracked.recorded_waiters = []
    tracked.recorded_waiters.append(waiter)
    await waiter


#: What a member reads when the pool entry that had taken their generation stopped answering.
BACKEND_LOST = "The image server making this image stopped answering before it was done; try again."


def _pool_outcome(reason: str, bounced: str | None) -> str:
    if bounced:
        return "failed_over"
    return reason if reason in ("succeeded", "stopped") else "failed"


def _nobody_serves(request: ImageRequest) -> str:
    """The one sentence a member reads when no configured backend could ever make their request."""
    what = f"{request.width}x{request.height}"
    if request.count > 1:
        what = f"{request.count} images at {what}"
    if request.model:
        what += f" with the model {request.model}"
    if request.negative_prompt:
        what += " and a negative prompt"
    return f"None of the image servers here can make {what}; try another size, count or model."


class _SlotLost(Exception):
    """The fleet took the generation's slot back (our lease lapsed); its jobs wait for another."""


class _QueueTimedOut(Exception):
    """The job waited longer than QUEUE_TIMEOUT_S for a slot."""


def _cancel_message(reason: EndReason, by: str | None) -> str:
    if reason is EndReason.SHUTDOWN:
        return "Stopped by a restart."
    return f"Cancelled by {by}." if by else "Cancelled."


def random_seed() -> int:
    return random.randint(0, 2**32 - 1)
