"""Pool benchmark: the makespan of a burst on three uneven backends, scheduled by the real JobManager.

    python -m bench.pool_bench [--jobs 300]

Three in-process backends differ in slots and speed (``BACKENDS``: name -> (concurrency, seconds per job)).
A burst of N jobs from many guilds and members arrives at once; the makespan (first submit to last finish) is
measured on a virtual clock (the event loop's time jumps to the next timer whenever nothing is ready), so the
figures are exact and the run takes a second, whatever the machine's load.

- **least-loaded**: the pool as it ships: every job may go to any backend; a free slot goes to the next job, on
  the least loaded free backend (running / concurrency).
- **round-robin**: the same manager, each job pinned to backend ``i mod 3`` (as a naive balancer would send it,
  whatever the backend's load or speed); the pinning is done through per-backend models.
- **bound**: the capacity bound, sum of work over total throughput: ``N / sum(concurrency / seconds)``.
  No schedule finishes sooner (up to the last job's own length). Target: least-loaded <= 1.1 x bound.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Coroutine
from typing import Any

from bot.engine.backend import Backend, Capabilities, ProgressCallback
from bot.engine.catalog import ModelCatalog
from bot.engine.manager import JobManager
from bot.engine.models import GeneratedImage, ImageRequest, JobState
from bot.engine.pool import BackendPool, PoolEntry

#: name -> (concurrency, seconds per job): a fast GPU box, a slower one, and a slow single-slot card.
BACKENDS = {"fast": (4, 1.0), "medium": (2, 1.5), "slow": (1, 3.0)}
_IMAGE = GeneratedImage(data=b"", format="PNG", width=1, height=1)


class TimedBackend(Backend):
    """Each generation takes ``seconds`` of (virtual) time."""

    capabilities = Capabilities(sizes=((512, 512),))

    def __init__(self, name: str, seconds: float) -> None:
        self.name = name
        self.seconds = seconds
        self.done = 0

    async def generate(
        self, request: ImageRequest, on_progress: ProgressCallback = lambda _: None
    ) -> list[GeneratedImage]:
        await asyncio.sleep(self.seconds)
        self.done += 1
        return [_IMAGE]


def run_virtual(coro: Coroutine[Any, Any, float]) -> float:
    """Run ``coro`` on a loop whose clock jumps to the next timer whenever nothing is ready."""
    loop = asyncio.new_event_loop()
    now = [0.0]
    loop.time = lambda: now[0]  # type: ignore[method-assign]
    try:
        task = loop.create_task(coro)

        async def drain() -> None:
            for _ in range(50):
                await asyncio.sleep(0)

        while not task.done():
            loop.run_until_complete(drain())
            if task.done() or loop._ready:  # type: ignore[attr-defined]
                continue
            timers = [h.when() for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
            if timers:
                now[0] = max(now[0], min(timers))
        return task.result()
    finally:
        loop.close()


async def burst(jobs: int, *, pinned: bool) -> float:
    backends = {name: TimedBackend(name, seconds) for name, (_, seconds) in BACKENDS.items()}
    entries = [
        PoolEntry(
            name,
            backends[name],
            capacity,
            catalog=ModelCatalog(None, configured=(f"on-{name}",)) if pinned else None,
        )
        for name, (capacity, _) in BACKENDS.items()
    ]
    manager = JobManager(
        BackendPool(entries),
        guild_concurrency=8,
        guild_concurrency_max=8,
        user_max_jobs=100,
        queue_timeout_s=1e9,
        job_timeout_s=1e9,
    )
    names = list(BACKENDS)
    loop = asyncio.get_running_loop()
    started = loop.time()
    submitted = []
    for i in range(jobs):
        model = f"on-{names[i % len(names)]}" if pinned else None
        request = ImageRequest(prompt=f"job {i}", fresh=True, model=model)
        submitted.append(await manager.submit(request, guild_id=i % 12, user_id=i % 40))
    for job in submitted:
        await manager.wait(job.id)
    makespan = loop.time() - started
    assert all(job.state is JobState.SUCCEEDED for job in submitted), "a job failed"
    assert sum(b.done for b in backends.values()) == jobs
    await manager.shutdown(0)
    return makespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()
    throughput = sum(capacity / seconds for capacity, seconds in BACKENDS.values())
    bound = args.jobs / throughput
    least = run_virtual(burst(args.jobs, pinned=False))
    robin = run_virtual(burst(args.jobs, pinned=True))
    print(
        f"pool: {', '.join(f'{n} {c} slots x {s:g} s' for n, (c, s) in BACKENDS.items())}; {args.jobs} jobs"
    )
    print(f"{'schedule':<14} {'makespan (s)':>13} {'x bound':>8}")
    for label, value in (("capacity bound", bound), ("least-loaded", least), ("round-robin", robin)):
        print(f"{label:<14} {value:>13.1f} {value / bound:>8.3f}")
    verdict = "meets" if least <= 1.1 * bound else "MISSES"
    print(f"least-loaded {verdict} the target (<= 1.1 x bound)")


if __name__ == "__main__":
    main()
