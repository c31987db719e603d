"""What the bot keeps about a job, and for how long: "Delete means gone", and history is not kept forever.

Two ways a job's data goes, through one rule for its images:

- **Delete** (the button on a result): :func:`delete_job` scrubs the job's row down to what today's quota
  needs (guild, user, state, created/finished times, whether it came from the cache, its seeds -- one per image)
  and drops everything else: the prompt and negative prompt, the channel and message ids, the cache key, the
  image refs. The job's cache entry goes too, so the next identical request is generated afresh.
- **Retention** (``HISTORY_RETENTION_DAYS``, default 90; 0 keeps history forever): :class:`RetentionTask`, a
  background task of the engine, deletes whole rows of jobs that finished longer ago than that, in batches,
  once at start and then every ``interval_s`` (an hour), with their cache entries.

In both, :func:`release_images` decides about each image file: it is unlinked unless an undeleted job still
lists it (another server may have been served the same images from the cache; its ``/show`` must keep working)
or another cache entry uses it. The store is asked first, the cache then drops what nobody references, under
its own lock. (A job saved in between with the same images, an instant cache hit on an entry being deleted,
would find them gone: ``/show`` then says the images are no longer kept. Nothing else is lost.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable

from bot.engine.cache import ResultCache
from bot.engine.models import ImageRequest, Job
from bot.engine.store import JobStore, StoreError

log = logging.getLogger(__name__)

DAY_S = 24 * 3600
#: How often the background task looks for jobs past retention.
PRUNE_INTERVAL_S = 3600.0
#: Jobs deleted per step, and the pause between steps: a backlog (the first start after an upgrade) is worked
#: off in steps that never hold the store for long. Checking a step's images against the remaining jobs is one
#: scan of the table: 0.3 s for a step of 200 four-image jobs with 200,000 jobs kept (measured on the 2-core
#: CI machine), on the store's worker thread.
PRUNE_BATCH = 200
PRUNE_PAUSE_S = 0.2


def is_deleted(job: Job) -> bool:
    """A job whose owner (or a manager) pressed Delete: its prompt is gone (no live job has an empty one)."""
    return job.state.is_terminal and not job.request.prompt.strip()


def scrub(job: Job) -> None:
    """Reduce ``job`` (in place) to what quotas read; see the module docstring."""
    job.request = ImageRequest(prompt="", count=max(1, len(job.seeds)))
    job.channel_id = None
    job.message_ref = None
    job.cache_key = None
    job.image_refs = []
    job.error_message = None
    job.cancelled_by = None
    job.backend_ref = None
    job.result = None
    job.progress = None


async def release_images(
    store: JobStore, cache: ResultCache, *, keys: Iterable[str | None], refs: Iterable[str]
) -> int:
    """Drop the cache entries ``keys``; unlink each image of ``refs`` (and of those entries) unless a job
    still in the store lists it or another cache entry uses it. Returns how many image files went."""
    keys = [key for key in keys if key]
    candidates = set(refs) | await cache.refs_of(keys)
    keep = await store.referenced_image_refs(candidates) if candidates else set()
    return await cache.discard(keys, candidates, keep=keep)


async def delete_job(store: JobStore, cache: ResultCache, job: Job) -> None:
    """Delete means gone: scrub the job's row, drop its cache entry and the images nobody else lists.

    Only a finished job can be deleted (a running one would write its result back); the row is saved first,
    so that its images are no longer "referenced" by it when the cache is asked to let them go.
    """
    if job.is_active:
        raise ValueError(f"job {job.id} is still {job.state.value}; cancel it first")
    key, refs = job.cache_key, list(job.image_refs)
    scrub(job)
    # Whichever process answers for it: a finished job's owner no longer matters, a member's Delete does.
    await store.save_job(job, any_owner=True)
    removed = await release_images(store, cache, keys=[key], refs=refs)
    log.info("job deleted", extra={"job": job.id, "files_removed": removed})


async def prune(
    store: JobStore,
    cache: ResultCache,
    *,
    before: float,
    batch: int = PRUNE_BATCH,
    pause_s: float = PRUNE_PAUSE_S,
) -> int:
    """Delete every finished job that finished before ``before`` (whole rows), its cache entry and the images
    no remaining job lists. Returns how many jobs went."""
    total = 0
    while True:
        jobs = await store.prune_finished_before(before, limit=batch)
        if not jobs:
            return total
        total += len(jobs)
        refs = [ref for job in jobs for ref in job.image_refs]
        await release_images(store, cache, keys=[job.cache_key for job in jobs], refs=refs)
        if len(jobs) < batch:
            return total
        await asyncio.sleep(pause_s)  # let the bot's own store work in between steps


class RetentionTask:
    """Prunes jobs older than ``retention_days`` at start and every ``interval_s``; 0 days disables it.

    One tracked task: :meth:`start` creates it (idempotent), :meth:`stop` cancels and awaits it. A failed run
    (the store briefly unavailable) is logged and retried at the next interval; it never ends the task.
    """

    def __init__(
        self,
        store: JobStore,
        cache: ResultCache,
        *,
        retention_days: int,
        interval_s: float = PRUNE_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cache = cache
        self.retention_days = retention_days
        self.interval_s = interval_s
        self.clock = clock
        self.runs = 0
        self.pruned = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.retention_days > 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run_once(self) -> int:
        """One pruning pass now; returns how many jobs it deleted."""
        before = self.clock() - self.retention_days * DAY_S
        pruned = await prune(self.store, self.cache, before=before)
        self.runs += 1
        self.pruned += pruned
        if pruned:
            log.info("pruned old jobs", extra={"jobs": pruned, "retention_days": self.retention_days})
        return pruned

    def start(self) -> None:
        if not self.enabled or self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="history-retention")
        self._task.add_done_callback(self._done)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_once()
            except StoreError as exc:
                log.warning("pruning old jobs failed; retrying in %.0f s: %s", self.interval_s, exc.message)
            await asyncio.sleep(self.interval_s)

    @staticmethod
    def _done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the history retention task died", exc_info=task.exception())
