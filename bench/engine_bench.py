"""Engine benchmark: the manager's per-job overhead, and the event loop's worst stall during image checks.

    python -m bench.engine_bench [--jobs 10000]

1. Overhead: N jobs through JobManager.submit with an instant backend (no store, no cache: the manager's own
   bookkeeping, scheduler and tasks) next to a bare ``asyncio.gather`` of the same backend coroutines.
2. Stall: a 1 ms ticker measures the longest gap between ticks while 4 images of 2048x2048 are verified
   (decoded) the way backends do it — off the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import time

from PIL import Image

from bot.engine.backend import Backend, Capabilities, ProgressCallback
from bot.engine.images import verify_image
from bot.engine.manager import JobManager
from bot.engine.models import GeneratedImage, ImageRequest

_IMAGE = GeneratedImage(data=b"", format="PNG", width=1, height=1)


class InstantBackend(Backend):
    name = "instant"
    capabilities = Capabilities(sizes=((512, 512),))

    async def generate(
        self, request: ImageRequest, on_progress: ProgressCallback = lambda _: None
    ) -> list[GeneratedImage]:
        return [_IMAGE]

    async def list_models(self) -> list[str]:
        return []


async def bare(jobs: int) -> float:
    backend = InstantBackend()
    requests = [ImageRequest(prompt=f"p{i}", fresh=True) for i in range(jobs)]
    started = time.perf_counter()
    await asyncio.gather(*(backend.generate(r) for r in requests))
    return time.perf_counter() - started


async def managed(jobs: int, guilds: int = 10) -> float:
    backend = InstantBackend()
    manager = JobManager(
        backend,
        guild_concurrency=4,
        guild_concurrency_max=8,
        backend_concurrency=16,
        user_max_jobs=jobs,
        queue_timeout_s=600,
        job_timeout_s=60,
    )
    requests = [ImageRequest(prompt=f"p{i}", fresh=True) for i in range(jobs)]
    started = time.perf_counter()
    submitted = [await manager.submit(r, guild_id=i % guilds, user_id=i % 97) for i, r in enumerate(requests)]
    await asyncio.gather(*(manager.wait(job.id) for job in submitted))
    elapsed = time.perf_counter() - started
    await manager.shutdown(0)
    assert all(job.state.value == "succeeded" for job in submitted), "benchmark jobs failed"
    return elapsed


def _big_png(seed: int) -> bytes:
    # Noise compresses badly, so decoding is as costly as a real generation's PNG.
    image = Image.frombytes(
        "RGB", (2048, 2048), os.urandom(2048 * 2048 * 3) if seed else bytes(2048 * 2048 * 3)
    )
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


async def worst_stall_during_verify(count: int = 4) -> tuple[float, float, float]:
    blobs = await asyncio.to_thread(lambda: [_big_png(i + 1) for i in range(count)])
    stop = asyncio.Event()
    gaps: list[float] = []

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await asyncio.gather(*(verify_image(blob) for blob in blobs))
    elapsed = time.perf_counter() - started
    stop.set()
    await tick
    # The same decode run on the loop, for contrast: what a careless bot would do.
    inline_started = time.perf_counter()
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as image:
            image.load()
    inline = time.perf_counter() - inline_started
    return max(gaps), elapsed, inline


async def main(jobs: int, repeats: int) -> None:
    bare_times = [await bare(jobs) for _ in range(repeats)]
    managed_times = [await managed(jobs) for _ in range(repeats)]
    b, m = statistics.median(bare_times), statistics.median(managed_times)
    print(f"jobs: {jobs} (median of {repeats} runs)")
    print(f"bare asyncio.gather:    {b * 1000:8.1f} ms  ({b / jobs * 1e6:7.1f} us/job)")
    print(f"JobManager.submit+wait: {m * 1000:8.1f} ms  ({m / jobs * 1e6:7.1f} us/job)")
    print(f"manager overhead:       {(m - b) / jobs * 1e6:7.1f} us/job  (ratio {m / b:.1f}x)")
    stall, verify_s, inline_s = await worst_stall_during_verify()
    print(
        f"verify 4 x 2048x2048 PNG off-loop: {verify_s * 1000:.0f} ms; worst event loop stall {stall * 1000:.1f} ms"
    )
    print(f"(the same decode on the loop would block it for {inline_s * 1000:.0f} ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main(options.jobs, options.repeats))
