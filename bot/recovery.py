"""After a crash: find the jobs a dead process left unfinished, resume what can be, and tell the rest.

- Queued jobs whose interaction token is still usable are resumed under their own id and message.
- Running jobs whose generation lives on at the backend under its own id (AI Horde) are followed up by that
  id: nothing is submitted twice, and the result still reaches the requester (in the channel, past the token).
- Other running jobs (their generation died with the process), and queued jobs whose token has expired,
  are marked ``interrupted``; their message says so with a Reroll button, or, past the token, a reply in the
  channel tells the requester.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bot.backends.base import ResumableBackend
from bot.engine.errors import RequestRejected
from bot.engine.models import Job, JobState

if TYPE_CHECKING:
    from bot.client import ImagineBot

log = logging.getLogger(__name__)


@dataclass
class RecoveryReport:
    resumed: list[str] = field(default_factory=list)
    interrupted: list[str] = field(default_factory=list)


async def recover_unfinished_jobs(bot: ImagineBot) -> RecoveryReport:
    """Run once at start-up, before the gateway connects (REST works: we are logged in)."""
    store, manager = bot.engine.store, bot.manager
    report = RecoveryReport()
    for job in await store.unfinished_jobs():
        if (
            job.state is JobState.RUNNING
            and job.backend_ref
            and isinstance(manager.backend, ResumableBackend)
        ):
            try:
                await manager.adopt(job, follow_backend_ref=True)
                report.resumed.append(job.id)
                log.info("following up a running job after restart", extra={"job": job.id})
                continue
            except RequestRejected:
                pass
        if job.state is JobState.QUEUED and bot.messenger.token_usable(job):
            try:
                await manager.adopt(job)
                report.resumed.append(job.id)
                log.info("resumed queued job after restart", extra={"job": job.id})
                continue
            except RequestRejected:
                pass  # shutting down already: fall through and record it as interrupted
        await _mark_interrupted(bot, job)
        report.interrupted.append(job.id)
    if report.resumed or report.interrupted:
        log.info(
            "recovered unfinished jobs",
            extra={"resumed": len(report.resumed), "interrupted": len(report.interrupted)},
        )
    return report


async def _mark_interrupted(bot: ImagineBot, job: Job) -> None:
    was = job.state
    job.state = JobState.INTERRUPTED
    job.finished_at = bot.clock()
    job.error_reason = "interrupted"
    job.error_message = "Interrupted by a restart."
    await bot.engine.store.save_job(job)  # recorded before anyone is told
    log.info("job interrupted by a restart", extra={"job": job.id, "was": was.value})
    try:
        async with asyncio.timeout(30):
            await bot.messenger.post_final(job)
    except Exception:
        log.exception("could not tell about an interrupted job", extra={"job": job.id})
