"""Delete and retention pruning on a real job store file and a real cache directory."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from bot.engine.cache import ResultCache
from bot.engine.cache_pg import PgIndex
from bot.engine.models import GenerationResult, ImageRequest, Job, JobState
from bot.engine.retention import DAY_S, RetentionTask, delete_job, is_deleted, prune
from bot.engine.store import JobStore
from bot.engine.store_pg import PgJobStore
from bot.service.runtime import open_engine
from bot.settings import load_settings
from tests.engine.test_cache import image, result

NOW = 2_000_000_000.0


@dataclass
class Data:
    store: JobStore | PgJobStore
    cache: ResultCache
    #: The job store's file, or its database's URL: where :meth:`rows` reads with a connection of its own.
    location: str

    async def rows(self) -> dict[str, tuple[str, str]]:
        """What is really in the store: id -> (request JSON, image refs)."""
        if isinstance(self.store, PgJobStore):
            conn = await asyncpg.connect(self.location)
            try:
                found = await conn.fetch("SELECT id, request, image_refs FROM jobs")
            finally:
                await conn.close()
            return {row[0]: (row[1], row[2]) for row in found}
        with sqlite3.connect(self.location) as db:
            return {i: (r, refs) for i, r, refs in db.execute("SELECT id, request, image_refs FROM jobs")}

    def blob_files(self) -> set[Path]:
        return {p for p in self.cache.blob_dir.glob("*/*") if p.is_file()}

    async def finished(
        self, job_id: str, prompt: str, generated: GenerationResult, *, age_days: float, guild: int = 1
    ) -> Job:
        """A succeeded job whose images were put in the cache under its key, as the manager does."""
        key = f"key-{prompt}"
        refs = await self.cache.put(key, generated)
        job = Job(
            id=job_id,
            request=ImageRequest(prompt=prompt, negative_prompt="no people"),
            guild_id=guild,
            user_id=7,
            channel_id=99,
            state=JobState.SUCCEEDED,
            created_at=NOW - age_days * DAY_S - 5,
            finished_at=NOW - age_days * DAY_S,
            message_ref={"token": "t", "message_id": 5},
            cache_key=key,
            image_refs=refs,
            seeds=[image.seed for image in generated.images],
        )
        await self.store.save_job(job)
        return job


@pytest.fixture(params=["sqlite", "postgres"])
async def data(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Data]:
    """A job store and a cache as the engine pairs them: SQLite and its index file, or PostgreSQL for both."""
    store: JobStore | PgJobStore
    index = None
    if request.param == "postgres":
        location = request.getfixturevalue("pg_url")
        store = PgJobStore(location)
        index = PgIndex(store)
    else:
        store = JobStore(tmp_path / "data" / "bot.sqlite3")
        location = str(store.path)
    # The cache's clock is "now" too, so entries made for 100-day-old jobs have not expired by TTL.
    cache = ResultCache(
        tmp_path / "data" / "cache", ttl_s=10**9, max_bytes=10**9, clock=lambda: NOW, index=index
    )
    await store.open()
    await cache.open()
    try:
        yield Data(store, cache, location)
    finally:
        await cache.close()
        await store.close()


async def test_delete_keeps_only_what_the_quota_needs_and_drops_the_cache_entry(data: Data) -> None:
    job = await data.finished("aaaaaaaaaaaa", "a red door", result(image((255, 0, 0), seed=11)), age_days=0)
    since = NOW - DAY_S
    quota_before = await data.store.count_images_since(guild_id=1, user_id=7, since=since)
    assert quota_before == 1 and len(data.blob_files()) == 1

    await delete_job(data.store, data.cache, job)

    stored = await data.store.get_job(job.id)
    assert stored is not None and is_deleted(stored)
    request_json, refs_json = (await data.rows())[job.id]
    assert "a red door" not in request_json and "no people" not in request_json and refs_json == "[]"
    assert (stored.message_ref, stored.channel_id, stored.cache_key) == (None, None, None)
    # A deleted image still counts against today's quota: deleting is not a way around it.
    assert await data.store.count_images_since(guild_id=1, user_id=7, since=since) == quota_before
    assert await data.cache.get("key-a red door") is None
    assert data.blob_files() == set()


async def test_an_image_another_job_lists_is_kept(data: Data) -> None:
    shared = result(image((0, 255, 0), seed=3))
    mine = await data.finished("bbbbbbbbbbbb", "green", shared, age_days=0)
    theirs = Job(
        id="cccccccccccc",
        request=ImageRequest(prompt="green"),
        guild_id=2,
        user_id=8,
        state=JobState.SUCCEEDED,
        finished_at=NOW,
        cache_key=mine.cache_key,
        image_refs=list(mine.image_refs),
        seeds=[3],
        from_cache=True,
    )
    await data.store.save_job(theirs)
    await delete_job(data.store, data.cache, mine)
    assert await data.cache.get("key-green") is None  # the next identical request generates afresh
    images = await data.cache.get_images(theirs.image_refs)  # ... but the other server's /show still works
    assert images is not None and images[0].data == shared.images[0].data


async def test_prune_deletes_old_rows_and_their_unshared_images(data: Data) -> None:
    old = await data.finished("dddddddddddd", "old", result(image((1, 2, 3), seed=1)), age_days=100)
    old_shared = await data.finished("eeeeeeeeeeee", "shared", result(image((4, 5, 6), seed=2)), age_days=95)
    recent = await data.finished("ffffffffffff", "recent", result(image((7, 8, 9), seed=3)), age_days=10)
    # A recent job served the old shared images from the cache: they must survive the old job's pruning.
    reuse = Job(
        id="111111111111",
        request=ImageRequest(prompt="shared"),
        guild_id=3,
        user_id=9,
        state=JobState.SUCCEEDED,
        finished_at=NOW - DAY_S,
        image_refs=list(old_shared.image_refs),
        seeds=[2],
        from_cache=True,
    )
    await data.store.save_job(reuse)
    waiting = Job(id="222222222222", request=ImageRequest(prompt="still queued"), guild_id=1, user_id=7)
    waiting.created_at = NOW - 200 * DAY_S  # queued jobs are never pruned, however old
    await data.store.save_job(waiting)

    pruned = await prune(data.store, data.cache, before=NOW - 90 * DAY_S, batch=1, pause_s=0)  # steps of one

    assert pruned == 2
    assert set(await data.rows()) == {recent.id, reuse.id, waiting.id}
    assert await data.cache.get_images(old.image_refs) is None
    assert await data.cache.get_images(reuse.image_refs) is not None
    assert await data.cache.get_images(recent.image_refs) is not None
    assert len(data.blob_files()) == 2
    assert await prune(data.store, data.cache, before=NOW - 90 * DAY_S) == 0


async def test_the_retention_task_prunes_at_start_and_then_periodically(data: Data) -> None:
    now = [NOW]
    task = RetentionTask(data.store, data.cache, retention_days=90, interval_s=0.05, clock=lambda: now[0])
    await data.finished("333333333333", "a", result(image((10, 10, 10), seed=1)), age_days=91)
    await data.finished("444444444444", "b", result(image((20, 20, 20), seed=2)), age_days=80)
    task.start()
    task.start()  # idempotent: still one task
    try:
        async with asyncio.timeout(10):
            while task.pruned < 1:
                await asyncio.sleep(0.01)
        assert set(await data.rows()) == {"444444444444"}
        now[0] += 11 * DAY_S  # time passes: the next periodic pass finds the other one
        async with asyncio.timeout(10):
            while task.pruned < 2:
                await asyncio.sleep(0.01)
        assert await data.rows() == {}
        assert task.running
    finally:
        await task.stop()
    assert not task.running
    await task.stop()  # idempotent


async def test_zero_days_keeps_history_forever(data: Data) -> None:
    await data.finished("555555555555", "ancient", result(image((30, 30, 30), seed=1)), age_days=3000)
    task = RetentionTask(data.store, data.cache, retention_days=0)
    task.start()
    assert not task.running
    assert len(await data.rows()) == 1


async def test_the_engine_runs_the_retention_task_and_stops_it(tmp_path: Path) -> None:
    settings = load_settings(
        env_file=None, image_backend="openai", image_backend_url="http://127.0.0.1:9", data_dir=tmp_path
    )
    assert settings.history_retention_days == 90
    async with open_engine(settings) as engine:
        assert engine.retention is not None and engine.retention.running
        retention = engine.retention
        old = Job(
            id="666666666666",
            request=ImageRequest(prompt="from last year"),
            guild_id=1,
            user_id=2,
            state=JobState.FAILED,
            finished_at=time.time() - 365 * DAY_S,
        )
        await engine.store.save_job(old)
        await retention.run_once()
        assert await engine.store.get_job(old.id) is None
    assert not retention.running
