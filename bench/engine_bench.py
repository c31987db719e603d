"""Engine benchmark: the manager's per-job overhead, and the event loop's worst stall during image checks.

    python -m bench.engine_bench [--jobs 10000]

1. Overhead: N jobs through JobManager.submit with an instant backend (no store, no cache: the manager's own
   bookkeeping, queue model and tasks) next to the seed's approach, ``asyncio.gather`` of the same backend
   coroutines under an ``asyncio.Semaphore`` of the same backend concurrency; then again with the SQLite store.
2. Stall: a 1 ms ticker measures the longest gap between ticks while 4 images of 2048x2048 are verified
   (decoded) the way backends do it — off the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from bot.engine.backend import Backend, Capabilities, ProgressCallback
from bot.engine.images import verify_image
from bot.engine.manager import JobManager
from bot.engine.models import GeneratedImage, ImageRequest
from bot.engine.store import JobStore

BACKEND_CONCURRENCY = 16

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


async def seed(jobs: int) -> float:
    """The seed's approach: every request gathered, the backend gated by a semaphore."""
    backend = InstantBackend()
    gate = asyncio.Semaphore(BACKEND_CONCURRENCY)
    requests = [ImageRequest(prompt=f"p{i}", fresh=True) for i in range(jobs)]

    async def one(request: ImageRequest) -> list[GeneratedImage]:
        async with gate:
            return await backend.generate(request)

    started = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    return time.perf_counter() - started


async def managed(jobs: int, guilds: int = 10, *, with_store: bool = False) -> float:
    if with_store:
        with tempfile.TemporaryDirectory() as folder:
            store = JobStore(Path(folder) / "bench.sqlite3")
            await store.open()
            try:
                return await _managed(jobs, guilds, store)
            finally:
                await store.close()
    return await _managed(jobs, guilds, None)


async def _managed(jobs: int, guilds: int, store: JobStore | None) -> float:
    backend = InstantBackend()
    manager = JobManager(
        backend,
        store=store,
        guild_concurrency=4,
        guild_concurrency_max=8,
        backend_concurrency=BACKEND_CONCURRENCY,
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
    seed_times = [await seed(jobs) for _ in range(repeats)]
    managed_times = [await managed(jobs) for _ in range(repeats)]
    stored_jobs = max(1, jobs // 5)  # SQLite writes dominate: fewer jobs for the same confidence
    seed_small = min([await seed(stored_jobs) for _ in range(repeats)])
    stored_times = [await managed(stored_jobs, with_store=True) for _ in range(repeats)]
    # Best of the runs, as timeit reports: the run least disturbed by the rest of the machine.
    b, m = min(seed_times), min(managed_times)
    st = min(stored_times)
    print(f"jobs: {jobs} (best of {repeats} runs); backend concurrency {BACKEND_CONCURRENCY}")
    print(f"seed (gather under a Semaphore): {b * 1000:8.1f} ms  ({b / jobs * 1e6:7.1f} us/job)")
    print(f"JobManager.submit+wait:          {m * 1000:8.1f} ms  ({m / jobs * 1e6:7.1f} us/job)")
    print(f"manager overhead, no store:      {(m - b) / jobs * 1e6:7.1f} us/job  (ratio {m / b:.1f}x)")
    print(
        f"with the SQLite store ({stored_jobs} jobs): {st / stored_jobs * 1e6:7.1f} us/job; "
        f"overhead {(st - seed_small) / stored_jobs * 1e6:7.1f} us/job (ratio {st / seed_small:.1f}x)"
    )
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
