"""The job manager: every generation is a tracked task, fairly scheduled, timed out, cancellable, awaited.

Lifecycle of a job::

    submit() -- admission (in memory) -> persisted as QUEUED -> task started
    task:  cache hit? -> SUCCEEDED (from cache)
           join or lead a *flight* (one generation shared by identical requests)
           wait for the flight to get a slot (queue timeout) -> RUNNING
           wait for the flight's result                     -> SUCCEEDED | FAILED | TIMED_OUT
           cancel() at any point                            -> CANCELLED
           then the delivery hook (the Discord layer posts the result) runs inside the same task,
           so shutdown's drain covers posting too.

A flight holds the scheduler slot and calls the backend. Jobs wait on it through ``asyncio.shield`` with a
reference count: one waiter leaving does not stop a generation others still wait for; the last one does.

Every state change is written to the store before listeners hear of it. Nothing here imports discord.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from bot.engine.backend import Backend, ResumableBackend
from bot.engine.cache import cache_key
from bot.engine.errors import FailureReason, GenerationError, RequestRejected, ShuttingDown
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
from bot.engine.scheduler import FairScheduler, Ticket
from bot.logs import current_job

if TYPE_CHECKING:
    from bot.engine.cache import ResultCache
    from bot.engine.store import JobStore
    from bot.settings import Settings

log = logging.getLogger(__name__)

#: How long, after a cancel, a job waits for its backend call to wind down (interrupt sent, slot freed).
CANCEL_SETTLE_S = 10.0
#: After the grace period, how long cancelled jobs get to record and report that they were stopped.
SHUTDOWN_REPORT_S = 10.0
#: Queue positions are recomputed at most this often per change burst (cost: one pass over a guild's queue).
POSITION_INTERVAL_S = 0.25
#: A delivery (posting the result) that takes longer than this is abandoned and logged.
DELIVERY_TIMEOUT_S = 120.0


class JobEvent(StrEnum):
    QUEUED = "queued"  # accepted, or its queue position changed
    STARTED = "started"
    PROGRESS = "progress"
    FINISHED = "finished"  # reached a terminal state (see job.state)


Listener = Callable[[Job, JobEvent], None]
Delivery = Callable[[Job], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class AdmissionContext:
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


@dataclass(eq=False)
class _Flight:
    """One backend generation, possibly awaited by several identical jobs."""

    key: str
    request: ImageRequest
    ticket: Ticket
    jobs: set[str] = field(default_factory=set)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[GenerationResult] | None = None
    progress: Progress | None = None
    #: Follow this already-submitted backend generation instead of submitting (after a restart).
    resume_ref: str | None = None
    #: The request's cache key (``key`` differs for private flights) and, once stored, the images' refs.
    cache_key: str = ""
    image_refs: list[str] = field(default_factory=list)


@dataclass(eq=False)
class _Tracked:
    job: Job
    task: asyncio.Task[None] | None = None
    flight: _Flight | None = None
    cancel_reason: str | None = None
    resume_ref: str | None = None
    #: Set by the task's first step: a task cancelled before it ever ran would skip all its bookkeeping.
    started: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)


class JobManager:
    def __init__(
        self,
        backend: Backend,
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
        self.backend = backend
        self.store = store
        self.cache = cache
        self.guild_concurrency = guild_concurrency
        self.guild_concurrency_max = guild_concurrency_max
        self.user_max_jobs = user_max_jobs
        self.queue_timeout_s = queue_timeout_s
        self.job_timeout_s = job_timeout_s
        self.models = list(models)
        self.default_model = default_model or backend.default_model()
        self.clock = clock
        #: Hook run inside each job's task once it is finished (the Discord layer posts there).
        self.deliver: Delivery | None = None
        #: Per-guild rules plugged into the one admission path (see check_admission).
        self.request_defaults: list[RequestDefaults] = []
        self.admission_checks: list[AdmissionCheck] = []

        self._guild_limits: dict[int, int] = {}
        self._user_limits: dict[int, int] = {}
        self._scheduler = FairScheduler(backend_concurrency, self.guild_limit)
        self._scheduler.on_queue_change = self._announce_positions
        self._tracked: dict[str, _Tracked] = {}
        self._flights: dict[str, _Flight] = {}
        self._flight_tasks: set[asyncio.Task[GenerationResult]] = set()
        self._ticket_flights: dict[Ticket, _Flight] = {}
        self._position_dirty: set[int] = set()
        self._position_flush: asyncio.TimerHandle | None = None
        self._position_flushed_at = float("-inf")
        self._active_per_user: Counter[tuple[int, int]] = Counter()
        self._listeners: list[Listener] = []
        self._accepting = True
        self._submitting = 0  # submits past admission, still writing their first record
        self._no_submits = asyncio.Event()
        self._no_submits.set()
        self.completed = Counter[JobState]()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        backend: Backend,
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

    # -- limits ---------------------------------------------------------------------------------------------
    def guild_limit(self, guild_id: int) -> int:
        return self._guild_limits.get(guild_id, self.guild_concurrency)

    def set_guild_limit(self, guild_id: int, limit: int | None) -> int:
        """Override a guild's concurrency (clamped to the operator's ceiling); ``None`` restores the default."""
        if limit is None:
            self._guild_limits.pop(guild_id, None)
        else:
            self._guild_limits[guild_id] = max(1, min(int(limit), self.guild_concurrency_max))
        self._scheduler.limits_changed()
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
        return self._active_per_user[(guild_id, user_id)]

    def queue_depth(self) -> int:
        return sum(1 for t in self._tracked.values() if t.job.state is JobState.QUEUED)

    def running_count(self) -> int:
        return sum(1 for t in self._tracked.values() if t.job.state is JobState.RUNNING)

    @property
    def backend_in_flight(self) -> int:
        """Slots held at the backend gate right now."""
        return self._scheduler.running

    def guild_in_flight(self, guild_id: int) -> int:
        return self._scheduler.running_in(guild_id)

    def guild_waiting(self, guild_id: int) -> int:
        """Generations of this guild waiting for a slot."""
        return self._scheduler.waiting_in(guild_id)

    def task_count(self) -> int:
        """Tasks this manager owns that are not finished (jobs and flights)."""
        jobs = sum(1 for t in self._tracked.values() if t.task is not None and not t.task.done())
        return jobs + sum(1 for t in self._flight_tasks if not t.done())

    # -- admission --------------------------------------------------------------------------------------------
    def normalise(self, request: ImageRequest) -> ImageRequest:
        """Fill in what the user left to defaults, so the cache key and the job record say what ran."""
        changes: dict[str, object] = {}
        if request.model is None and self.default_model:
            changes["model"] = self.default_model
        if request.width <= 0 or request.height <= 0:
            changes["width"], changes["height"] = self.backend.capabilities.default_size
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
        ``pending`` / ``pending_images``: this user's requests (and their images) the caller admitted but has
        not submitted yet; they count against the limits too.
        """
        if not self._accepting:
            raise ShuttingDown()
        context = AdmissionContext(guild_id, user_id, channel_id, channel_nsfw, pending_images)
        for apply_defaults in self.request_defaults:
            request = apply_defaults(request, context)
        request = self.normalise(request)
        caps = self.backend.capabilities
        validate_request(request, models=self.models, sizes=caps.sizes, max_count=caps.max_count)
        if request.negative_prompt and not caps.negative_prompt:
            raise RequestRejected(f"The {self.backend.name} backend does not take a negative prompt.")
        limit = self.user_limit(guild_id)
        if self._active_per_user[(guild_id, user_id)] + pending >= limit:
            raise RequestRejected(
                f"You already have {limit} image job{'s' if limit != 1 else ''} queued or running here; "
                "wait for one to finish or cancel one.",
                code="user_limit",
            )
        for check in self.admission_checks:
            check(request, context)
        return request

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
        """Admit, persist and start a job. Raises :class:`RequestRejected` before any job exists."""
        request = self.check_admission(
            request, guild_id, user_id, channel_id=channel_id, channel_nsfw=channel_nsfw
        )
        job = Job(
            id=job_id or new_job_id(),
            request=request,
            guild_id=guild_id,
            user_id=user_id,
            channel_id=channel_id,
            backend=self.backend.name,
            message_ref=message_ref,
            created_at=self.clock(),
        )
        tracked = _Tracked(job)
        self._tracked[job.id] = tracked
        self._active_per_user[(guild_id, user_id)] += 1
        self._submitting += 1
        self._no_submits.clear()
        try:
            await self._persist(job)
        except BaseException:
            self._forget(tracked)
            raise
        else:
            tracked.task = asyncio.create_task(self._run_job(tracked), name=f"job-{job.id}")
            tracked.task.add_done_callback(self._job_task_done)
        finally:
            self._submitting -= 1
            if not self._submitting:
                self._no_submits.set()
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
        if follow_backend_ref and not (job.backend_ref and isinstance(self.backend, ResumableBackend)):
            raise ValueError("this job has no generation the backend can resume")
        job.state = JobState.QUEUED
        tracked = _Tracked(job, resume_ref=job.backend_ref if follow_backend_ref else None)
        self._tracked[job.id] = tracked
        self._active_per_user[(job.guild_id, job.user_id)] += 1
        await self._persist(job)
        tracked.task = asyncio.create_task(self._run_job(tracked), name=f"job-{job.id}")
        tracked.task.add_done_callback(self._job_task_done)
        self._emit(job, JobEvent.QUEUED)
        return job

    def set_message_ref(self, job_id: str, message_ref: dict[str, object]) -> None:
        """Attach the Discord message reference once known (persisted with the next state change)."""
        tracked = self._tracked.get(job_id)
        if tracked is not None:
            tracked.job.message_ref = message_ref

    # -- cancellation -----------------------------------------------------------------------------------------
    async def cancel(self, job_id: str, *, reason: str = "cancelled", by: str | None = None) -> bool:
        """Cancel a queued or running job and wait until it is recorded as cancelled (its slot freed).

        Returns False when the job is unknown here or already finished.
        """
        tracked = self._tracked.get(job_id)
        if tracked is None or tracked.job.state.is_terminal:
            return False
        self._request_cancel(tracked, reason, by)
        await tracked.done.wait()
        return tracked.job.state is JobState.CANCELLED

    @staticmethod
    def _request_cancel(tracked: _Tracked, reason: str, by: str | None) -> None:
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
        if tracked.task is not None:
            await asyncio.wait({tracked.task})
        return tracked.job

    # -- shutdown ---------------------------------------------------------------------------------------------
    async def shutdown(self, grace: float) -> None:
        """Stop accepting, let work finish for ``grace`` seconds, cancel the rest, and await every task.

        Idempotent: a second call (the bot drained, then the engine closes) finds nothing to do.
        """
        if not self._accepting and not self._pending_tasks():
            return
        self._accepting = False
        pending = self._pending_tasks()
        log.info("draining jobs", extra={"jobs": len(pending), "grace_s": grace})
        if pending and grace > 0:
            await asyncio.wait(pending, timeout=grace)
        await self._wait_for_submits()
        # A finished job is delivering its result: never cancelled here, it gets the report window below.
        leftovers = [
            t for t in self._tracked.values() if t.task is not None and not t.task.done() and t.job.is_active
        ]
        for tracked in leftovers:
            self._request_cancel(tracked, "shutdown", None)
        pending = self._pending_tasks()
        if pending:
            log.info("cancelled unfinished jobs", extra={"jobs": len(leftovers)})
            await asyncio.wait(pending, timeout=SHUTDOWN_REPORT_S)
        # Anything still alive now is stuck in a delivery or a backend that ignores cancellation: cancel hard.
        for task in self._pending_tasks():
            task.cancel()
        remaining = self._pending_tasks()
        if remaining:
            await asyncio.gather(*remaining, return_exceptions=True)
        for task in list(self._flight_tasks):
            task.cancel()
        if self._flight_tasks:
            await asyncio.gather(*self._flight_tasks, return_exceptions=True)
        if self._position_flush is not None:
            self._position_flush.cancel()
            self._position_flush = None
        log.info("job manager stopped")

    async def _wait_for_submits(self, limit_s: float = 5.0) -> None:
        """Submits admitted before shutdown began may still be writing their first record: let them start."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_s):
                await self._no_submits.wait()

    def _pending_tasks(self) -> set[asyncio.Task[object]]:
        tasks: set[asyncio.Task[object]] = {
            t.task for t in self._tracked.values() if t.task is not None and not t.task.done()
        }
        tasks.update(t for t in self._flight_tasks if not t.done())
        return tasks

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
                await self._leave_flight(tracked)
                reason = tracked.cancel_reason or "cancelled"
                await self._finish(
                    tracked,
                    JobState.CANCELLED,
                    error_reason="shutdown" if reason == "shutdown" else "cancelled",
                    error_message=_cancel_message(reason, job.cancelled_by),
                )
            except _QueueTimedOut:
                await self._leave_flight(tracked)
                await self._finish(
                    tracked,
                    JobState.TIMED_OUT,
                    error_reason=FailureReason.TIMEOUT.value,
                    error_message=f"Waited over {self.queue_timeout_s:.0f} s in the queue; try again later.",
                )
            except GenerationError as exc:
                self._leave(tracked)
                state = JobState.TIMED_OUT if exc.reason is FailureReason.TIMEOUT else JobState.FAILED
                await self._finish(tracked, state, error_reason=exc.reason.value, error_message=exc.message)
            except Exception:
                log.exception("job failed unexpectedly", extra={"job": job.id})
                await self._leave_flight(tracked)
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
            await self._deliver(job)
        except asyncio.CancelledError:
            # A second cancel (the shutdown's hard stop) while recording or delivering: give up quietly.
            if not job.state.is_terminal:
                job.state = JobState.CANCELLED
                self._release_user(job)
            raise
        finally:
            tracked.done.set()

    async def _obtain(self, tracked: _Tracked) -> GenerationResult:
        job = tracked.job
        request = job.request
        key = self._key(request)
        job.cache_key = key
        if self.cache is not None and not request.fresh:
            hit = await self.cache.get_with_refs(key)
            if hit is not None:
                cached, job.image_refs = hit
                log.info("job served from cache", extra={"job": job.id})
                return cached
        flight = self._join_flight(tracked, key)
        remaining = self.queue_timeout_s - (self.clock() - job.created_at)
        try:
            async with asyncio.timeout(max(0.0, remaining)):
                await flight.started.wait()
        except TimeoutError:
            raise _QueueTimedOut from None
        await self._transition(job, JobState.RUNNING, started_at=self.clock())
        if flight.progress is not None:  # progress that came before this job noticed the start
            job.progress = flight.progress
            self._emit(job, JobEvent.PROGRESS)
        assert flight.task is not None
        result = await asyncio.shield(flight.task)
        self._leave(tracked)
        job.image_refs = list(flight.image_refs)
        return result

    def _key(self, request: ImageRequest) -> str:
        return cache_key(request, backend=self.backend.name, model=request.model)

    # -- flights ----------------------------------------------------------------------------------------------
    def _join_flight(self, tracked: _Tracked, key: str) -> _Flight:
        job = tracked.job
        private = job.request.fresh or tracked.resume_ref is not None
        flight = None if private else self._flights.get(key)
        if flight is None:
            flight = _Flight(
                key=f"{key}:{job.id}" if private else key,
                request=job.request,
                ticket=self._scheduler.new_ticket(job.guild_id, job.user_id),
                resume_ref=tracked.resume_ref,
                cache_key=key,
            )
            self._flights[flight.key] = flight
            self._ticket_flights[flight.ticket] = flight
            flight.task = asyncio.create_task(self._run_flight(flight), name=f"flight-{job.id}")
            self._flight_tasks.add(flight.task)
            flight.task.add_done_callback(self._flight_task_done)
        else:
            log.info("job shares a generation in flight", extra={"job": job.id})
        flight.jobs.add(job.id)
        tracked.flight = flight
        return flight

    def _leave(self, tracked: _Tracked) -> _Flight | None:
        flight, tracked.flight = tracked.flight, None
        if flight is None:
            return None
        flight.jobs.discard(tracked.job.id)
        return flight

    async def _leave_flight(self, tracked: _Tracked) -> None:
        """Detach from the flight; the last waiter to leave stops the generation and waits for it to wind down."""
        flight = self._leave(tracked)
        if flight is None or flight.jobs or flight.task is None or flight.task.done():
            return
        flight.task.cancel()
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(CANCEL_SETTLE_S):
                await asyncio.wait({flight.task})

    async def _run_flight(self, flight: _Flight) -> GenerationResult:
        try:
            await self._scheduler.acquire(flight.ticket)
            try:
                flight.started.set()
                started = time.monotonic()
                try:
                    async with asyncio.timeout(self.job_timeout_s):
                        images = await self._call_backend(flight)
                except TimeoutError:
                    raise GenerationError(
                        FailureReason.TIMEOUT,
                        f"The image took longer than {self.job_timeout_s:.0f} s and was stopped.",
                    ) from None
                result = GenerationResult(
                    images=tuple(images),
                    backend=self.backend.name,
                    model=flight.request.model,
                    elapsed_s=time.monotonic() - started,
                )
            finally:
                self._scheduler.release(flight.ticket)
            # Stored once per generation, however many jobs share it (without a cache there is nowhere to
            # fetch images back from later, so no references are kept).
            if self.cache is not None:
                flight.image_refs = await self.cache.put(flight.cache_key, result)
            return result
        finally:
            self._ticket_flights.pop(flight.ticket, None)
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]

    async def _call_backend(self, flight: _Flight) -> list[GeneratedImage]:
        def on_progress(progress: Progress) -> None:
            self._on_progress(flight, progress)

        backend = self.backend
        if not isinstance(backend, ResumableBackend):
            return await backend.generate(flight.request, on_progress)
        if flight.resume_ref is not None:
            return await backend.resume(flight.resume_ref, on_progress, count=flight.request.count)

        async def remember(ref: str) -> None:
            # Stored before the wait begins, so a restart can follow this generation instead of losing it.
            for job_id in list(flight.jobs):
                tracked = self._tracked.get(job_id)
                if tracked is not None:
                    tracked.job.backend_ref = ref
                    await self._persist(tracked.job)

        return await backend.generate(flight.request, on_progress, on_submitted=remember)

    def _on_progress(self, flight: _Flight, progress: Progress) -> None:
        flight.progress = progress
        for job_id in list(flight.jobs):
            tracked = self._tracked.get(job_id)
            if tracked is not None and tracked.job.state is JobState.RUNNING:
                tracked.job.progress = progress
                self._emit(tracked.job, JobEvent.PROGRESS)

    def _announce_positions(self, guild_id: int) -> None:
        """Queue order changed in a guild: recompute its positions soon, at most every POSITION_INTERVAL_S.

        Coalesced because a long queue moves on every start; listeners (Discord edits) are coalesced anyway.
        """
        self._position_dirty.add(guild_id)
        if self._position_flush is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._position_flushed_at + POSITION_INTERVAL_S - loop.time())
            self._position_flush = loop.call_later(delay, self._flush_positions)

    def _flush_positions(self) -> None:
        self._position_flush = None
        self._position_flushed_at = asyncio.get_running_loop().time()
        dirty, self._position_dirty = self._position_dirty, set()
        for guild_id in dirty:
            positions = self._scheduler.positions(guild_id)
            for ticket, position in positions.items():
                flight = self._ticket_flights.get(ticket)
                if flight is None:
                    continue
                for job_id in flight.jobs:
                    tracked = self._tracked.get(job_id)
                    if tracked is None or tracked.job.state is not JobState.QUEUED:
                        continue
                    if tracked.job.queue_position != position:
                        tracked.job.queue_position = position
                        self._emit(tracked.job, JobEvent.QUEUED)

    # -- state changes --------------------------------------------------------------------------------------
    async def _persist(self, job: Job) -> None:
        if self.store is not None:
            await self.store.save_job(job)

    async def _transition(self, job: Job, state: JobState, *, started_at: float | None = None) -> None:
        job.state = state
        if started_at is not None:
            job.started_at = started_at
            job.queue_position = None
        await self._persist(job)
        log.info("job started", extra={"job": job.id})
        self._emit(job, JobEvent.STARTED)

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
        job.error_reason = error_reason
        job.error_message = error_message
        self._release_user(job)
        self.completed[state] += 1
        try:
            await self._persist(job)
        except Exception:
            log.exception("could not record the end of a job", extra={"job": job.id})
        log.info(
            "job finished",
            extra={"job": job.id, "state": state.value, **({"reason": error_reason} if error_reason else {})},
        )
        tracked.done.set()
        self._emit(job, JobEvent.FINISHED)

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

    def _release_user(self, job: Job) -> None:
        key = (job.guild_id, job.user_id)
        if self._active_per_user[key] > 0:
            self._active_per_user[key] -= 1
        if self._active_per_user[key] == 0:
            del self._active_per_user[key]

    def _forget(self, tracked: _Tracked) -> None:
        self._tracked.pop(tracked.job.id, None)
        self._release_user(tracked.job)

    @staticmethod
    def _uncancel() -> None:
        """A handled cancel must not leave the task marked as cancelling (it would break later timeouts)."""
        task = asyncio.current_task()
        if task is not None:
            while task.cancelling():
                task.uncancel()

    def _job_task_done(self, task: asyncio.Task[None]) -> None:
        job_id = task.get_name().removeprefix("job-")
        tracked = self._tracked.get(job_id)
        if tracked is not None and not tracked.done.is_set():
            # Cancelled before its first step (only a shutdown's hard stop can do that): settle the books.
            if not tracked.job.state.is_terminal:
                tracked.job.state = JobState.CANCELLED
                self._release_user(tracked.job)
            tracked.done.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("job task crashed", exc_info=task.exception(), extra={"job": job_id})
        if tracked is not None and tracked.task is task:
            # Finished jobs leave memory; their record lives on in the store.
            del self._tracked[job_id]

    def _flight_task_done(self, task: asyncio.Task[GenerationResult]) -> None:
        self._flight_tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here so an unawaited failure is never "never retrieved"
        if exc is not None and not isinstance(exc, GenerationError):
            log.error("generation crashed", exc_info=exc, extra={"flight": task.get_name()})


class _QueueTimedOut(Exception):
    """The job waited longer than QUEUE_TIMEOUT_S for a slot."""


def _cancel_message(reason: str, by: str | None) -> str:
    if reason == "shutdown":
        return "Stopped by a restart."
    return f"Cancelled by {by}." if by else "Cancelled."


def random_seed() -> int:
    return random.randint(0, 2**32 - 1)
