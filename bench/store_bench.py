"""Job store benchmark: what one store call costs on SQLite and on PostgreSQL (``DATABASE_URL``).

    python -m bench.store_bench [--jobs 500] [--concurrency 20]

Both stores run on this machine: SQLite in a temporary directory, PostgreSQL as a throw-away cluster started
by the test harness (``tests/pg.py``: initdb + pg_ctl on 127.0.0.1, fsync off like the tests; a production
server with fsync on pays the disk flush on every commit, as SQLite does with WAL). For each store:

1. Sequential: ``--jobs`` ``save_job`` (insert), the same jobs saved again (update), ``get_job`` of each,
   then 100 ``list_jobs`` (a member's history) and 100 ``count_images_since`` (quota): p50 and p99 of each call.
2. Concurrent: ``--jobs`` more inserts issued ``--concurrency`` at a time, as a burst of admissions would:
   wall time and calls per second.

One job's life in the bot is about four store calls (save on admit, start and finish; mark_delivered), so the
per-call figures times four bound the store's share of a job.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bot.engine.models import ImageRequest, Job, JobState
from bot.engine.store import JobStore
from bot.engine.store_pg import PgJobStore
from tests.pg import start_cluster

Store = JobStore | PgJobStore


def job(i: int, prefix: str) -> Job:
    return Job(
        id=f"{prefix}-{i}",
        request=ImageRequest(f"prompt number {i}", count=2),
        guild_id=1000 + i % 100,
        channel_id=5,
        user_id=i % 500,
        message_ref={"channel": 5, "message": i, "token": "t" * 60},
    )


async def timed(calls: list[Callable[[], Awaitable[object]]]) -> list[float]:
    out = []
    for call in calls:
        started = time.perf_counter()
        await call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def p(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]
    )


async def measure(name: str, store: Store, jobs: int, concurrency: int) -> None:
    batch = [job(i, "seq") for i in range(jobs)]
    results: dict[str, list[float]] = {}
    results["save_job (insert)"] = await timed([lambda j=j: store.save_job(j) for j in batch])
    for j in batch:
        j.state, j.finished_at, j.seeds = JobState.SUCCEEDED, time.time(), [1, 2]
    results["save_job (update)"] = await timed([lambda j=j: store.save_job(j) for j in batch])
    results["get_job"] = await timed([lambda j=j: store.get_job(j.id) for j in batch])
    results["list_jobs (history)"] = await timed(
        [lambda i=i: store.list_jobs(guild_id=1000 + i, user_id=i, limit=10) for i in range(100)]
    )
    results["count_images_since"] = await timed(
        [lambda i=i: store.count_images_since(guild_id=1000 + i, user_id=i, since=0.0) for i in range(100)]
    )
    for label, values in results.items():
        print(f"{name:10} {label:22} p50 {p(values, 50):6.2f} ms  p99 {p(values, 99):6.2f} ms")

    burst = [job(i, "burst") for i in range(jobs)]
    gate = asyncio.Semaphore(concurrency)

    async def save(j: Job) -> None:
        async with gate:
            await store.save_job(j)

    started = time.perf_counter()
    await asyncio.gather(*(save(j) for j in burst))
    wall = time.perf_counter() - started
    print(f"{name:10} {jobs} inserts, {concurrency} at a time: {wall:.2f} s, {jobs / wall:.0f} calls/s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        async with JobStore(Path(tmp) / "bot.sqlite3") as sqlite_store:
            await measure("sqlite", sqlite_store, args.jobs, args.concurrency)
    cluster = await asyncio.to_thread(start_cluster)
    try:
        url = await asyncio.to_thread(cluster.create_database, "bench")
        async with PgJobStore(url, max_size=args.concurrency) as pg_store:
            await measure("postgres", pg_store, args.jobs, args.concurrency)
    finally:
        await asyncio.to_thread(cluster.destroy)


if __name__ == "__main__":
    asyncio.run(main())
