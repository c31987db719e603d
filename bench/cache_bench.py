"""Result cache benchmark: what one job's cache work costs as the cache grows, on both indexes.

    python -m bench.cache_bench [--sizes 1000,10000,100000] [--jobs 300]

For each index (SQLite in a temporary directory; PostgreSQL on a throw-away local cluster, ``tests/pg.py``)
and each size, the index is first filled with that many entries (one image each), written as rows straight
into its tables: no measured operation reads their files, so they are not written. The cache is then opened
(which counts it once) and ``--jobs`` jobs each make the calls a generated job makes: the lookup that misses,
the put of its two images (real files), the pin until it is posted and the unpin. Printed: p50 and p99 of one
job's four calls, and the cache's totals at the end (which must be the seeded entries plus the jobs').

A job's cache work must cost the same in a cache of a hundred thousand entries as in one of a thousand: no
call counts or scans the cache (the totals are one row, kept by each write), only the indexes' B-trees grow.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
from contextlib import closing
from pathlib import Path

import asyncpg

from bot.engine.cache import ResultCache
from bot.engine.cache_index import INDEX_NAME
from bot.engine.cache_pg import PgIndex
from bot.engine.images import make_test_png
from bot.engine.models import GeneratedImage, GenerationResult
from bot.engine.store_pg import PgJobStore
from tests.pg import start_cluster

SEEDED_SIZE = 1000  # bytes per seeded blob: the totals grow, no file is written


def p(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def job_result(i: int) -> GenerationResult:
    images = tuple(
        GeneratedImage(make_test_png(16, 16, (i % 256, (i // 256) % 256, k)), "PNG", 16, 16, seed=i)
        for k in range(2)
    )
    return GenerationResult(images=images, backend="bench", model="m", elapsed_s=1.0)


def seed_sqlite(directory: Path, entries: int) -> None:
    now = time.time()
    with closing(sqlite3.connect(directory / INDEX_NAME)) as db, db:
        db.executemany(
            "INSERT INTO entries VALUES (?, ?, ?, 'bench', 'm', 1.0, '[]', ?)",
            ((f"seed{i}", now, now, SEEDED_SIZE) for i in range(entries)),
        )
        db.executemany(
            "INSERT INTO blobs VALUES (?, 'png', 'PNG', 16, 16, ?)",
            ((f"seedref{i}", SEEDED_SIZE) for i in range(entries)),
        )
        db.executemany(
            "INSERT INTO entry_blobs VALUES (?, ?)", ((f"seed{i}", f"seedref{i}") for i in range(entries))
        )


async def seed_postgres(url: str, entries: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO cache_entries "
            "(key, created_at, last_used_at, backend, model, elapsed_s, images, total_bytes) "
            "SELECT 'seed' || i, $3, $3, 'bench', 'm', 1.0, '[]', $2 FROM generate_series(1, $1) AS i",
            entries,
            SEEDED_SIZE,
            time.time(),
        )
        await conn.execute(
            "INSERT INTO cache_blobs SELECT 'seedref' || i, 'png', 'PNG', 16, 16, $2 "
            "FROM generate_series(1, $1) AS i",
            entries,
            SEEDED_SIZE,
        )
        await conn.execute(
            "INSERT INTO cache_entry_blobs SELECT 'seed' || i, 'seedref' || i FROM generate_series(1, $1) AS i",
            entries,
        )
    finally:
        await conn.close()


async def clear_postgres(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("TRUNCATE cache_entries, cache_blobs, cache_entry_blobs, cache_pins, cache_fills")
    finally:
        await conn.close()


async def one_size(kind: str, entries: int, jobs: int, url: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "cache"
        store = None
        if url is not None:
            store = PgJobStore(url)
            await store.open()
            await clear_postgres(url)

        def cache() -> ResultCache:
            index = PgIndex(store) if store is not None else None
            return ResultCache(directory, ttl_s=10**9, max_bytes=10**12, memory_bytes=0, index=index)

        first = cache()
        await first.open()  # creates the schema
        await first.close()
        if url is not None:
            await seed_postgres(url, entries)
        else:
            await asyncio.to_thread(seed_sqlite, directory, entries)
        measured = cache()
        started = time.perf_counter()
        await measured.open()  # counts the cache once
        opened_s = time.perf_counter() - started
        costs = []
        for i in range(jobs):
            key, job_id = f"job-key-{i}", f"job-{i}"
            started = time.perf_counter()
            found = await measured.lookup(key)
            assert found.hit is None
            refs = await measured.put(key, job_result(i))
            await measured.pin(job_id, refs)
            await measured.unpin(job_id)
            costs.append((time.perf_counter() - started) * 1000)
        totals = measured.stats()
        await measured.close()
        if store is not None:
            await store.close()
    expected = entries + jobs
    ok = "ok" if totals["entries"] == expected else f"WRONG (expected {expected})"
    print(
        f"{kind:8} {entries:>7} entries: one job's lookup+put+pin+unpin p50 {p(costs, 50):5.2f} ms "
        f"p99 {p(costs, 99):5.2f} ms; open {opened_s * 1000:6.0f} ms; totals {totals['entries']} entries {ok}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--indexes", default="sqlite,postgres")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = args.indexes.split(",")
    if "sqlite" in kinds:
        for size in sizes:
            await one_size("sqlite", size, args.jobs, None)
    if "postgres" in kinds:
        cluster = await asyncio.to_thread(start_cluster)
        try:
            url = await asyncio.to_thread(cluster.create_database, "bench")
            for size in sizes:
                await one_size("postgres", size, args.jobs, url)
        finally:
            await asyncio.to_thread(cluster.destroy)


if __name__ == "__main__":
    asyncio.run(main())
