"""Deep queue with churn: the engine's CPU and queue-position events while N jobs wait.

    python -m bench.deep_queue_bench [--seconds 20] [--sizes 1000,10000,100000]

Eight generations of one second each run at once, so 8 start per second; 8 new jobs arrive per second; N jobs
wait, in one guild or spread over 1,000 guilds. Time is virtual (the event loop's clock jumps to its next timer
instead of sleeping), so the process's CPU time (``time.process_time``) over the simulated seconds is what the
engine itself costs: the JobManager, its queue model, its tasks, and a listener counting QUEUED events.
Target (issue 8): at 10,000 waiting in one guild, <= 2 % of a core and <= 500 position events per second.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import selectors
import time

from bot.engine.backend import Backend, Capabilities, ProgressCallback
from bot.engine.manager import JobEvent, JobManager
from bot.engine.models import GeneratedImage, ImageRequest, Job

SLOTS = 8
GENERATION_S = 1.0
ARRIVALS_PER_S = 8
MEMBER_JOBS = 3  # jobs per member: members take turns, so the round-robin order is exercised
_IMAGE = GeneratedImage(data=b"", format="PNG", width=1, height=1)


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0


class VirtualSelector(selectors.DefaultSelector):
    """Never sleeps: a wait for the next timer moves the virtual clock there instead."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None):  # type: ignore[override]
        if timeout is not None and timeout > 0:
            self.clock.now += timeout
        return super().select(0)


class TimedBackend(Backend):
    name = "timed"
    capabilities = Capabilities(sizes=((512, 512),))

    async def generate(
        self, request: ImageRequest, on_progress: ProgressCallback = lambda _: None
    ) -> list[GeneratedImage]:
        await asyncio.sleep(GENERATION_S)
        return [_IMAGE]

    async def list_models(self) -> list[str]:
        return []


async def scenario(waiting: int, guilds: int, seconds: float, clock: VirtualClock) -> tuple[float, float]:
    manager = JobManager(
        TimedBackend(),
        guild_concurrency=SLOTS,
        guild_concurrency_max=SLOTS,
        backend_concurrency=SLOTS,
        user_max_jobs=MEMBER_JOBS,
        queue_timeout_s=1e9,
        job_timeout_s=1e9,
        clock=lambda: clock.now,
    )
    events = 0

    def count(job: Job, event: JobEvent) -> None:
        nonlocal events
        if event is JobEvent.QUEUED:
            events += 1

    serial = 0

    async def submit_one() -> None:
        nonlocal serial
        serial += 1
        guild = serial % guilds
        member = serial // (MEMBER_JOBS * guilds)
        await manager.submit(ImageRequest(prompt=f"p{serial}", fresh=True), guild_id=guild, user_id=member)

    for _ in range(waiting + SLOTS):
        await submit_one()
    await asyncio.sleep(5)  # let every job reach the queue and the first positions be announced
    gc.collect()
    manager.add_listener(count)
    started_cpu, started_at = time.process_time(), clock.now
    interval = 1 / ARRIVALS_PER_S
    while clock.now - started_at < seconds:
        await submit_one()
        await asyncio.sleep(interval)
    cpu = time.process_time() - started_cpu
    simulated = clock.now - started_at
    manager.remove_listener(count)
    await manager.shutdown(0)
    return cpu / simulated, events / simulated


def run(waiting: int, guilds: int, seconds: float) -> tuple[float, float]:
    clock = VirtualClock()
    loop = asyncio.SelectorEventLoop(VirtualSelector(clock))
    loop.time = lambda: clock.now  # type: ignore[method-assign]
    try:
        return loop.run_until_complete(scenario(waiting, guilds, seconds, clock))
    finally:
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="simulated seconds of churn per case")
    parser.add_argument("--sizes", default="1000,10000,100000")
    options = parser.parse_args()
    print(
        f"{SLOTS} generations start and {ARRIVALS_PER_S} jobs arrive per second; {options.seconds:.0f} s simulated"
    )
    print(f"{'waiting':>8} {'guilds':>7} {'CPU (% of a core)':>18} {'position events/s':>18}")
    for size in (int(s) for s in options.sizes.split(",")):
        for guilds in (1, 1000):
            cpu, events = run(size, guilds, options.seconds)
            print(f"{size:>8} {guilds:>7} {cpu * 100:>17.2f}% {events:>18.1f}")


if __name__ == "__main__":
    main()
