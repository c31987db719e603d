"""The result cache against a real directory, with an injected clock."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from bot.engine import cache as cache_module
from bot.engine.cache import ResultCache, cache_key
from bot.engine.cache_index import SqliteIndex
from bot.engine.cache_pg import PgIndex
from bot.engine.images import make_test_png
from bot.engine.models import GeneratedImage, GenerationResult, ImageRequest
from bot.engine.store_pg import PgJobStore


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


OpenCache = Callable[..., Awaitable[ResultCache]]

#: The cache's behaviour is the same on either index: every test that does not name one runs on both.
INDEXES = ["sqlite", "postgres"]
sqlite_only = pytest.mark.parametrize("index_kind", ["sqlite"])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=INDEXES)
def index_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def open_cache(
    request: pytest.FixtureRequest, index_kind: str, tmp_path: Path, clock: Clock
) -> AsyncIterator[OpenCache]:
    """Factory for caches on tmp_path/cache (by default) that closes every cache it opened.

    With PostgreSQL each cache has a store (a pool) of its own on the test's database, as a process would.
    """
    url = request.getfixturevalue("pg_url") if index_kind == "postgres" else None
    opened: list[ResultCache] = []
    stores: list[PgJobStore] = []

    async def factory(**kwargs: Any) -> ResultCache:
        options: dict[str, Any] = {"ttl_s": 3600.0, "max_bytes": 10 * 1024 * 1024, "clock": clock}
        options.update(kwargs)
        directory = options.pop("directory", tmp_path / "cache")
        if url is not None:
            store = PgJobStore(url)
            await store.open()
            stores.append(store)
            options["index"] = PgIndex(store)
        cache = ResultCache(directory, **options)
        await cache.open()
        opened.append(cache)
        return cache

    yield factory
    for cache in opened:
        await cache.close()
    for store in stores:
        await store.close()


def image(color: tuple[int, int, int], size: int = 32, seed: int | None = None) -> GeneratedImage:
    return GeneratedImage(make_test_png(size, size, color), "PNG", size, size, seed)


def result(*images: GeneratedImage, backend: str = "horde", model: str | None = "sdxl") -> GenerationResult:
    return GenerationResult(images=images, backend=backend, model=model, elapsed_s=4.5)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_files(cache: ResultCache) -> list[Path]:
    return sorted(p for p in cache.blob_dir.glob("*/*") if p.is_file())


# -- cache_key --------------------------------------------------------------------------------------------------


def key(request: ImageRequest, backend: str = "horde", model: str | None = "sdxl") -> str:
    return cache_key(request, backend=backend, model=model)


def test_key_is_sha256_hex() -> None:
    value = key(ImageRequest("a fox"))
    assert len(value) == 64 and int(value, 16) >= 0


def test_key_normalises_whitespace_but_keeps_case() -> None:
    base = key(ImageRequest("a red  fox", negative_prompt="blurry text"))
    assert key(ImageRequest("  a red\n\tfox ", negative_prompt=" blurry   text\n")) == base
    assert key(ImageRequest("A red fox", negative_prompt="blurry text")) != base
    assert key(ImageRequest("a redfox", negative_prompt="blurry text")) != base


def test_key_includes_seed_only_when_fixed_and_never_fresh() -> None:
    random_seed = key(ImageRequest("fox"))
    assert key(ImageRequest("fox", fresh=True)) == random_seed
    assert key(ImageRequest("fox", seed=5)) != random_seed
    assert key(ImageRequest("fox", seed=5)) == key(ImageRequest("fox", seed=5, fresh=True))
    assert key(ImageRequest("fox", seed=0)) not in (random_seed, key(ImageRequest("fox", seed=5)))


@pytest.mark.parametrize(
    ("request_changes", "backend", "model"),
    [
        ({"prompt": "wolf"}, "horde", "sdxl"),
        ({"negative_prompt": "dark"}, "horde", "sdxl"),
        ({"width": 768}, "horde", "sdxl"),
        ({"height": 768}, "horde", "sdxl"),
        ({"count": 2}, "horde", "sdxl"),
        ({"nsfw_allowed": True}, "horde", "sdxl"),
        ({"seed": 1}, "horde", "sdxl"),
        ({}, "openai", "sdxl"),
        ({}, "horde", "flux"),
        ({}, "horde", None),
    ],
)
def test_every_key_field_changes_the_key(
    request_changes: dict[str, Any], backend: str, model: str | None
) -> None:
    base = ImageRequest("fox")
    assert key(base.replace(**request_changes), backend, model) != key(base)


# -- get / put --------------------------------------------------------------------------------------------------


async def test_miss_then_hit_returns_the_original_result(open_cache: OpenCache) -> None:
    cache = await open_cache()
    original = result(image((255, 0, 0), seed=11), image((0, 255, 0), seed=None))
    assert await cache.get("k1") is None
    refs = await cache.put("k1", original)
    assert refs == [sha(img.data) for img in original.images]
    hit = await cache.get("k1")
    assert hit is not None
    assert hit.from_cache is True
    assert (hit.backend, hit.model, hit.elapsed_s) == ("horde", "sdxl", 4.5)
    assert hit.images == original.images  # bytes, format, size and seeds
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.stats() == {
        "entries": 1,
        "bytes": sum(len(i.data) for i in original.images),
        "hits": 1,
        "misses": 1,
        "evictions": 0,
    }


async def test_memory_lru_keeps_recent_entries_within_its_budget(open_cache: OpenCache) -> None:
    one = image((1, 1, 1))
    cache = await open_cache(memory_bytes=len(one.data) * 2 + 10)
    await cache.put("a", result(image((1, 1, 1))))
    await cache.put("b", result(image((2, 2, 2))))
    assert list(cache._memory) == ["a", "b"]
    assert await cache.get("a") is not None  # a becomes most recent
    await cache.put("c", result(image((3, 3, 3))))
    assert list(cache._memory) == ["a", "c"]  # b was least recently used
    assert cache._memory_used <= cache.memory_bytes
    # b is still on disk: a hit read from disk, which brings it back into memory.
    assert await cache.get("b") is not None
    assert "b" in cache._memory


async def test_a_memory_hit_does_not_read_disk(open_cache: OpenCache) -> None:
    cache = await open_cache()
    await cache.put("k", result(image((9, 9, 9))))
    for path in blob_files(cache):
        path.unlink()
    assert await cache.get("k") is not None  # served from memory
    cache._memory.clear()
    assert await cache.get("k") is None  # from disk: blob missing -> miss


async def test_entries_expire_after_ttl(open_cache: OpenCache, clock: Clock) -> None:
    cache = await open_cache(ttl_s=100)
    await cache.put("k", result(image((5, 5, 5))))
    clock.now += 99
    assert await cache.get("k") is not None  # using it does not extend its life
    clock.now += 1
    assert await cache.get("k") is None
    assert cache.stats()["entries"] == 0
    assert blob_files(cache) == []
    assert cache.evictions == 1


async def test_expired_entries_on_disk_are_misses_and_purged_on_put(
    open_cache: OpenCache, clock: Clock
) -> None:
    cache = await open_cache(ttl_s=100, memory_bytes=0)
    await cache.put("old", result(image((5, 5, 5))))
    clock.now += 150
    await cache.put("new", result(image((6, 6, 6))))
    assert cache.stats()["entries"] == 1
    assert await cache.get("old") is None
    assert await cache.get("new") is not None


@pytest.mark.parametrize("memory_bytes", [0, 1024 * 1024], ids=["disk-hits", "memory-hits"])
async def test_disk_bound_evicts_least_recently_used_and_their_blobs(
    open_cache: OpenCache, clock: Clock, memory_bytes: int
) -> None:
    images = {
        name: image(color, size=48) for name, color in [("a", (1, 0, 0)), ("b", (0, 1, 0)), ("c", (0, 0, 1))]
    }
    size = max(len(i.data) for i in images.values())
    cache = await open_cache(max_bytes=size * 2 + 1, memory_bytes=memory_bytes)
    await cache.put("a", result(images["a"]))
    clock.now += 1
    await cache.put("b", result(images["b"]))
    clock.now += 1
    assert await cache.get("a") is not None  # a is now more recent than b
    clock.now += 1
    await cache.put("c", result(images["c"]))
    assert "b" not in cache._memory  # evicted from disk means gone from memory too
    assert await cache.get("b") is None
    assert await cache.get("a") is not None and await cache.get("c") is not None
    names = {p.name.split(".")[0] for p in blob_files(cache)}
    assert names == {sha(images["a"].data), sha(images["c"].data)}
    stats = cache.stats()
    assert stats["evictions"] == 1 and stats["entries"] == 2
    assert stats["bytes"] == sum(p.stat().st_size for p in blob_files(cache)) <= cache.max_bytes


async def test_an_entry_larger_than_the_disk_bound_is_not_kept(open_cache: OpenCache) -> None:
    big = image((1, 2, 3), size=64)
    cache = await open_cache(max_bytes=len(big.data) - 1)
    refs = await cache.put("big", result(big))
    assert refs == [sha(big.data)]
    assert await cache.get("big") is None
    assert blob_files(cache) == []


async def test_identical_images_are_stored_once_and_kept_while_referenced(open_cache: OpenCache) -> None:
    cache = await open_cache(memory_bytes=0)
    shared = image((7, 7, 7))
    refs_1 = await cache.put("k1", result(shared, image((8, 8, 8))))
    refs_2 = await cache.put("k2", result(image((7, 7, 7), seed=3)))
    assert refs_1[0] == refs_2[0]
    assert len(blob_files(cache)) == 2
    assert cache.stats()["bytes"] == len(shared.data) + len(image((8, 8, 8)).data)
    # Dropping k1 keeps the shared blob for k2 and deletes the one only k1 used.
    await cache.discard(["k1"], [])
    assert [p.name.split(".")[0] for p in blob_files(cache)] == [refs_2[0]]
    hit = await cache.get("k2")
    assert hit is not None and hit.images[0].seed == 3


async def test_putting_the_same_key_again_replaces_it(open_cache: OpenCache) -> None:
    cache = await open_cache(memory_bytes=0)
    await cache.put("k", result(image((1, 1, 1))))
    await cache.put("k", result(image((2, 2, 2)), backend="openai"))
    hit = await cache.get("k")
    assert hit is not None and hit.backend == "openai"
    assert [p.name.split(".")[0] for p in blob_files(cache)] == [sha(image((2, 2, 2)).data)]
    assert cache.stats()["entries"] == 1


async def test_entries_survive_a_restart(open_cache: OpenCache, tmp_path: Path) -> None:
    first = await open_cache()
    original = result(image((10, 20, 30), seed=99))
    await first.put("k", original)
    await first.close()
    second = await open_cache()
    assert second.stats()["entries"] == 1
    hit = await second.get("k")
    assert hit is not None and hit.images == original.images and hit.from_cache


async def test_a_corrupt_blob_is_a_miss_and_is_dropped(
    open_cache: OpenCache, caplog: pytest.LogCaptureFixture
) -> None:
    cache = await open_cache(memory_bytes=0)
    refs = await cache.put("k", result(image((40, 40, 40))))
    [path] = blob_files(cache)
    path.write_bytes(b"\x89PNG but not the bytes we stored")
    assert await cache.get("k") is None
    assert "does not match its hash" in caplog.text
    assert cache.stats()["entries"] == 0 and not path.exists()
    assert await cache.get_images(refs) is None
    # The same image can be cached again afterwards.
    await cache.put("k", result(image((40, 40, 40))))
    assert await cache.get("k") is not None


async def test_a_missing_blob_is_a_miss(open_cache: OpenCache) -> None:
    cache = await open_cache(memory_bytes=0)
    await cache.put("k", result(image((50, 50, 50)), image((60, 60, 60))))
    blob_files(cache)[0].unlink()
    assert await cache.get("k") is None
    assert cache.misses == 1
    assert cache.stats()["entries"] == 0


@sqlite_only
async def test_a_corrupt_index_is_moved_aside_and_the_cache_starts_empty(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    first = await open_cache()
    await first.put("k", result(image((70, 70, 70))))
    await first.close()
    index = tmp_path / "cache" / "index.sqlite3"
    garbage = b"definitely not sqlite" * 50
    index.write_bytes(garbage)
    second = await open_cache()
    assert await second.get("k") is None
    [moved] = list(index.parent.glob("index.sqlite3.corrupt-*"))
    assert moved.read_bytes() == garbage
    await second.put("k2", result(image((71, 71, 71))))
    assert await second.get("k2") is not None


@sqlite_only
async def test_an_index_of_version_1_keeps_its_entries_and_gains_exact_totals(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    """Version 2 added the totals row and its triggers: an index written by version 1 is migrated in place
    (an upgrade keeps the cache), counted once at open, and kept by the triggers from then on."""
    first = await open_cache()
    kept = result(image((80, 1, 1)), image((80, 2, 2)))
    await first.put("k", kept)
    await first.close()
    index = tmp_path / "cache" / "index.sqlite3"
    with closing(sqlite3.connect(index)) as db, db:  # back to what version 1 wrote
        for trigger in ("entry_added", "entry_removed", "blob_added", "blob_removed"):
            db.execute(f"DROP TRIGGER {trigger}")
        db.execute("DROP TABLE totals")
        db.execute("PRAGMA user_version = 1")
    second = await open_cache()
    hit = await second.get("k")
    assert hit is not None and [i.data for i in hit.images] == [i.data for i in kept.images]
    assert list(index.parent.glob("index.sqlite3.*")) == []  # nothing was set aside
    size = sum(len(i.data) for i in kept.images)
    assert (second.stats()["entries"], second.stats()["bytes"]) == (1, size)
    await second.put("k2", result(image((81, 1, 1))))
    assert second.stats()["entries"] == 2
    with closing(sqlite3.connect(index)) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (2,)
        assert db.execute("SELECT entries FROM totals").fetchone() == (2,)


@sqlite_only
async def test_an_index_corrupted_at_runtime_is_a_miss_not_a_crash(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    cache = await open_cache(memory_bytes=0)
    await cache.put("k", result(image((80, 80, 80))))

    def broken(*args: object) -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    index = cache.index
    assert isinstance(index, SqliteIndex)
    index._load_sync = broken  # type: ignore[method-assign]
    assert await cache.get("k") is None
    assert list((tmp_path / "cache").glob("index.sqlite3.corrupt-*"))
    del index._load_sync
    assert await cache.get("k") is None  # the fresh index is empty
    await cache.put("k", result(image((80, 80, 80))))
    assert await cache.get("k") is not None


@pytest.mark.parametrize(("ttl_s", "max_bytes"), [(0, 10_000_000), (3600, 0)])
async def test_a_disabled_cache_stores_nothing(
    open_cache: OpenCache, tmp_path: Path, ttl_s: float, max_bytes: int
) -> None:
    cache = await open_cache(ttl_s=ttl_s, max_bytes=max_bytes)
    img = image((90, 90, 90))
    assert await cache.put("k", result(img)) == [sha(img.data)]
    assert await cache.get("k") is None
    assert await cache.get_images([sha(img.data)]) is None
    assert cache.misses == 1 and cache.hits == 0
    assert not (tmp_path / "cache").exists()


async def test_get_images_by_content_ref(open_cache: OpenCache) -> None:
    cache = await open_cache()
    images = (image((1, 100, 1), seed=1), image((100, 1, 1), seed=2))
    refs = await cache.put("k", result(*images))
    fetched = await cache.get_images(list(reversed(refs)))
    assert fetched is not None
    assert [i.data for i in fetched] == [images[1].data, images[0].data]
    assert [(i.format, i.width, i.height) for i in fetched] == [("PNG", 32, 32)] * 2
    assert await cache.get_images([refs[0], "f" * 64]) is None
    assert await cache.get_images(["../../etc/passwd"]) is None
    assert await cache.get_images([]) == []


async def test_jpeg_blobs_use_their_extension(open_cache: OpenCache) -> None:
    cache = await open_cache(memory_bytes=0)
    data = b"pretend jpeg bytes"
    await cache.put("k", result(GeneratedImage(data, "JPEG", 8, 8)))
    [path] = blob_files(cache)
    assert path == cache.blob_dir / sha(data)[:2] / f"{sha(data)}.jpg"
    hit = await cache.get("k")
    assert hit is not None and hit.images[0].format == "JPEG"


async def test_orphan_and_temporary_blob_files_are_swept_at_open(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    first = await open_cache()
    await first.put("k", result(image((3, 3, 3))))
    await first.close()
    orphan = first.blob_dir / "ab" / f"{'ab' * 32}.png"
    temporary = first.blob_dir / "ab" / ".half-written.tmp"
    young = first.blob_dir / "cd" / f"{'cd' * 32}.png"
    for path in (orphan, temporary, young):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    os.utime(orphan, (1, 1))
    os.utime(temporary, (1, 1))
    second = await open_cache()
    assert not orphan.exists() and not temporary.exists()
    assert young.exists()  # maybe another writer's, about to be indexed
    assert await second.get("k") is not None


async def test_blob_io_and_hashing_run_off_the_event_loop(
    open_cache: OpenCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            seen[name] = threading.get_ident()
            return real(*args)

        return wrapper

    monkeypatch.setattr(
        cache_module, "_write_file_atomic_sync", spy("write", cache_module._write_file_atomic_sync)
    )
    monkeypatch.setattr(cache_module, "_hash_all_sync", spy("hash", cache_module._hash_all_sync))
    cache = await open_cache(memory_bytes=0)
    monkeypatch.setattr(cache, "_read_blob_sync", spy("read", cache._read_blob_sync))
    await cache.put("k", result(image((4, 4, 4), size=256)))
    assert await cache.get("k") is not None
    assert set(seen) == {"write", "hash", "read"}
    assert loop_thread not in seen.values()


async def test_concurrent_puts_and_gets_stay_consistent(open_cache: OpenCache) -> None:
    cache = await open_cache(memory_bytes=0)
    imgs = [image((i, i, i)) for i in range(8)]
    await asyncio.gather(*(cache.put(f"k{i}", result(img)) for i, img in enumerate(imgs)))
    hits = await asyncio.gather(*(cache.get(f"k{i}") for i in range(8)))
    assert all(hit is not None and hit.images[0].data == imgs[i].data for i, hit in enumerate(hits))
    assert cache.stats()["entries"] == 8 and len(blob_files(cache)) == 8


async def test_the_totals_of_a_put_whose_answer_comes_after_a_newer_ones_are_not_kept(
    pg_url: str, tmp_path: Path
) -> None:
    """Two puts at once on the pool: A updates the totals first, but its answer is read after B's (the event
    loop reads whichever connection it reads first). The cache keeps B's totals, the newer ones."""
    store = PgJobStore(pg_url)
    await store.open()
    index = PgIndex(store)
    cache = ResultCache(tmp_path / "cache", ttl_s=3600.0, max_bytes=10**8, memory_bytes=0, index=index)
    await cache.open()
    answered, read_on = asyncio.Event(), asyncio.Event()
    real_fetchrow = index._fetchrow

    async def first_answer_read_late(sql: str, *args: Any) -> Any:
        row = await real_fetchrow(sql, *args)
        if "INSERT INTO cache_entries" in sql and not answered.is_set():
            answered.set()  # A's statement committed; its answer waits
            await read_on.wait()
        return row

    index._fetchrow = first_answer_read_late  # type: ignore[method-assign]
    try:
        first = asyncio.create_task(cache.put("a", result(image((1, 2, 3)))))
        await asyncio.wait_for(answered.wait(), timeout=10)
        await cache.put("b", result(image((4, 5, 6))))
        assert cache.stats()["entries"] == 2
        read_on.set()
        await first
        assert cache.stats()["entries"] == 2  # not A's older "1"
    finally:
        await cache.close()
        await store.close()


async def test_a_hit_returns_the_refs_put_returned(open_cache: OpenCache) -> None:
    """The refs are known when stored: a hit hands them back instead of hashing the images again."""
    images = tuple(GeneratedImage(make_test_png(8, 8, (i, 0, 0)), "PNG", 8, 8, seed=i) for i in range(2))
    generated = GenerationResult(images, backend="b", model=None, elapsed_s=1.0)
    cache = await open_cache(ttl_s=60, max_bytes=10**7)
    refs = await cache.put("k", generated)
    hit = await cache.get_with_refs("k")
    assert hit is not None and hit[1] == refs and hit[0].from_cache
    await cache.close()
    reopened = await open_cache(ttl_s=60, max_bytes=10**7)  # from disk, not memory
    hit = await reopened.get_with_refs("k")
    assert hit is not None and hit[1] == refs


# -- pins: images of results not posted yet -----------------------------------------------------------------


async def test_pinned_images_outlive_ttl_and_size_eviction_until_unpinned(
    open_cache: OpenCache, clock: Clock, tmp_path: Path
) -> None:
    first, second = image((9, 1, 1), size=48), image((1, 9, 1), size=48)
    cache = await open_cache(ttl_s=100, max_bytes=len(first.data) + len(second.data) - 1)
    refs = await cache.put("undelivered", result(first))
    await cache.pin("job-1", refs)
    clock.now += 150  # past the TTL, and the next put is over the size bound
    await cache.put("newer", result(second))
    assert await cache.get("undelivered") is None  # the entry expired: no more cache hits for it
    assert await cache.pinned_jobs() == {"job-1"}
    kept = await cache.get_images(refs)  # but its images are still there to post
    assert kept is not None and kept[0].data == first.data
    await cache.close()

    reopened = await open_cache(ttl_s=100)  # pins are on disk: a restart still finds the images
    assert (await reopened.get_images(refs)) is not None
    await reopened.unpin("job-1")
    assert await reopened.pinned_jobs() == set()
    assert await reopened.get_images(refs) is None
    assert sha(first.data) not in {p.name.split(".")[0] for p in blob_files(reopened)}


async def test_unpinning_keeps_images_a_live_entry_still_uses(open_cache: OpenCache) -> None:
    cache = await open_cache()
    refs = await cache.put("k", result(image((3, 3, 3))))
    await cache.pin("job", refs)
    await cache.unpin("job")
    assert await cache.get_images(refs) is not None
    assert await cache.get("k") is not None


# -- one directory shared by several processes (a fleet on one DATA_DIR volume) --------------------------------


async def test_an_entry_another_process_evicted_is_a_miss_even_from_memory(open_cache: OpenCache) -> None:
    """Two caches on one directory stand for two processes: B remembers an entry A then discards."""
    a, b = await open_cache(), await open_cache()
    k = "k" * 64
    await a.put(k, result(image((10, 20, 30))))
    assert await b.get(k) is not None  # from disk, now in B's memory too
    await a.discard([k], [])
    assert await b.get(k) is None
    assert b.stats()["misses"] == 1


@sqlite_only
async def test_each_operation_waits_for_another_process_holding_the_index_lock(
    open_cache: OpenCache, tmp_path: Path
) -> None:
    cache = await open_cache()
    other = os.open(
        tmp_path / "cache" / cache_module.LOCK_NAME, os.O_RDWR
    )  # another open file: another process
    try:
        import fcntl

        fcntl.flock(other, fcntl.LOCK_EX)
        put = asyncio.create_task(cache.put("p" * 64, result(image((1, 2, 3)))))
        await asyncio.sleep(0.3)
        assert not put.done()  # blocked on the other's lock (in its worker thread)
        fcntl.flock(other, fcntl.LOCK_UN)
        await put
    finally:
        os.close(other)
    assert await cache.get("p" * 64) is not None


async def test_a_fill_changed_wakes_every_waiter_for_its_key_and_only_them(tmp_path: Path) -> None:
    cache = ResultCache(tmp_path / "cache", ttl_s=3600, max_bytes=10**6)
    waiters = [asyncio.create_task(cache.wait_for_fill("k", 30)) for _ in range(2)]
    other = asyncio.create_task(cache.wait_for_fill("other", 30))
    await asyncio.sleep(0.05)
    cache.fill_changed("k")
    async with asyncio.timeout(5):
        await asyncio.gather(*waiters)
    await asyncio.sleep(0.05)
    assert not other.done()
    other.cancel()
    # Nothing heard: the wait ends by itself (a wake-up can be lost), and starts from a clear event.
    began = time.monotonic()
    async with asyncio.timeout(5):
        await cache.wait_for_fill("k", 0.2)
    assert time.monotonic() - began >= 0.15  # not woken by the earlier fill_changed
