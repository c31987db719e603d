"""After a crash: claim the jobs a dead process left unfinished, decide what becomes of each, and tell the rest.

Two ways in, one set of decisions (:func:`recover_jobs`): at start-up (:func:`recover_unfinished_jobs`, the jobs of
this process's guilds that nobody alive answers for), and in a fleet while running (bot/service/fleet.py's
watcher hands over the jobs of a process that died, whatever their guild). The store's claim makes each job this
process's before anything is decided, so no job is taken by two processes.

- Queued jobs whose reply can still be posted (``can_reply``) are resumed under their own id and message.
- Running jobs whose generation lives on at the backend under its own id (AI Horde) are followed up by that
  id: nothing is submitted twice, and the result still reaches the requester (in the channel, past the token).
- Other running jobs (their generation died with the process), and queued jobs that can no longer be answered,
  are marked ``interrupted``: recorded first, then ``report`` tells the requester (a Reroll button, or a reply
  in the channel past the token).
- Finished jobs whose outcome was never posted (the process died while posting: no ``delivered_at`` nor
  ``delivery_error``) are posted again through ``report`` (an edit of ``@original`` is safe to repeat; past the
  token, in the channel). A success whose images are gone from the cache is marked ``interrupted`` instead.

The decisions are the engine's; how a job is reported is the frontend's, passed in as callbacks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bot.engine.errors import RequestRejected
from bot.engine.models import GenerationResult, Job, JobState

if TYPE_CHECKING:
    from bot.engine.cache import ResultCache
    from bot.engine.manager import JobManager
    from bot.engine.store import JobStore, ShardFilter

log = logging.getLogger(__name__)

#: How long telling the requester about one interrupted job may take.
REPORT_TIMEOUT_S = 30.0


@dataclass
class RecoveryReport:
    resumed: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)
    redelivered: list[str] = field(default_factory=list)


async def recover_unfinished_jobs(
    store: JobStore,
    manager: JobManager,
    *,
    can_reply: Callable[[Job], bool],
    report: Callable[[Job], Awaitable[None]],
    clock: Callable[[], float],
    cache: ResultCache | None = None,
    shards: ShardFilter | None = None,
) -> RecoveryReport:
    """Run once at start-up, before new work is admitted: claim what is left in ``shards``' guilds (None: every
    guild) and recover it.

    ``report`` posts a job's outcome as it stands and records the delivery (the frontend's messenger).
    Processes sharing one database each claim only their own guilds' jobs, and only those no live process
    answers for: another guild's unfinished job may be running in a live process, never in this one.
    """
    jobs = await store.claim_jobs(shards=shards)
    outcome = await recover_jobs(
        jobs, store, manager, can_reply=can_reply, report=report, clock=clock, cache=cache
    )
    if outcome.resumed or outcome.interrupted or outcome.redelivered:
        log.info(
            "recovered unfinished jobs",
            extra={
                "resumed": len(outcome.resumed),
                "interrupted": len(outcome.interrupted),
                "redelivered": len(outcome.redelivered),
            },
        )
    return outcome


async def recover_jobs(
    jobs: Iterable[Job],
    store: JobStore,
    manager: JobManager,
    *,
    can_reply: Callable[[Job], bool],
    report: Callable[[Job], Awaitable[None]],
    clock: Callable[[], float],
    cache: ResultCache | None = None,
) -> RecoveryReport:
    """Decide for each of ``jobs`` (claimed by this process already): follow up, resume, report interrupted, or
    post again (see the module docstring). Finished ones are posted first, then the unfinished, oldest first."""
    outcome = RecoveryReport()
    jobs = list(jobs)
    for job in jobs:
        if job.state.is_terminal:
            await _redeliver(store, job, cache=cache, report=report, clock=clock, outcome=outcome)
    for job in jobs:
        if job.state.is_terminal:
            continue
        if job.state is JobState.RUNNING and job.backend_ref and manager.can_resume(job):
            try:
                await manager.adopt(job, follow_backend_ref=True)
                outcome.resumed.append(job.id)
                log.info("following up a running job left by a dead process", extra={"job": job.id})
                continue
            except RequestRejected:
                pass
        if job.state is JobState.QUEUED and can_reply(job):
            try:
                await manager.adopt(job)
                outcome.resumed.append(job.id)
                log.info("resumed a queued job left by a dead process", extra={"job": job.id})
                continue
            except RequestRejected:
                pass  # shutting down already: fall through and record it as interrupted
        await _mark_interrupted(store, job, report=report, clock=clock)
        outcome.interrupted.append(job.id)
    return outcome


async def _redeliver(
    store: JobStore,
    job: Job,
    *,
    cache: ResultCache | None,
    report: Callable[[Job], Awaitable[None]],
    clock: Callable[[], float],
    outcome: RecoveryReport,
) -> None:
    """A finished job nobody was told about: post it again, with its images when they are still cached."""
    if job.state is JobState.SUCCEEDED:
        images = await cache.get_images(job.image_refs) if cache is not None and job.image_refs else None
        if not images:
            # Generated, but nothing is left to show: say so honestly, with a Reroll button.
            await _mark_interrupted(store, job, report=report, clock=clock)
            outcome.interrupted.append(job.id)
            return
        elapsed = (job.finished_at or 0.0) - (job.started_at or job.finished_at or 0.0)
        job.result = GenerationResult(
            images=tuple(images),
            backend=job.backend or "",
            model=job.request.model,
            elapsed_s=max(0.0, elapsed),
            from_cache=job.from_cache,
        )
    log.info("posting a finished job a dead process did not deliver", extra={"job": job.id})
    try:
        async with asyncio.timeout(REPORT_TIMEOUT_S):
            await report(job)
        outcome.redelivered.append(job.id)
    except Exception:
        log.exception("could not post a finished job after restart", extra={"job": job.id})


async def _mark_interrupted(
    store: JobStore, job: Job, *, report: Callable[[Job], Awaitable[None]], clock: Callable[[], float]
) -> None:
    was = job.state
    job.state = JobState.INTERRUPTED
    job.finished_at = clock()
    job.error_reason = "interrupted"
    job.error_message = "Interrupted by a restart."
    await store.save_job(job)  # recorded before anyone is told
    log.info("job interrupted by a restart", extra={"job": job.id, "was": was.value})
    try:
        async with asyncio.timeout(REPORT_TIMEOUT_S):
            await report(job)
    except Exception:
        log.exception("could not tell about an interrupted job", extra={"job": job.id})
