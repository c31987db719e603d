"""Two result caches on one directory stand for two processes of a fleet (one DATA_DIR volume); with
PostgreSQL they also share one database, each with a pool of its own (bot/engine/cache.py's invariants).

The races are made to happen, not hoped for: one process is held inside its index's critical section (a
callback the index runs there waits on an event) while the other tries to act on the same blob.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bot.engine.cache import ResultCache
from bot.engine.cache_index import BlobRow, EntryRow, Index, UnlinkFiles, WriteFiles
from bot.engine.cache_pg import PgIndex
from bot.engine.models import ImageRequest, Job, JobState
from bot.engine.store_pg import FILL_CHANNEL, FleetProcess, PgJobStore
from tests.engine.test_cache import INDEXES, Clock, blob_files, image, result, sha
from tests.fakes.tcp_proxy import TcpProxy
from tests.helpers import until
from tests.pg import PgCluster

Fleet = Callable[..., Any]


class Held:
    """A gate a worker thread waits at (inside an index's critical section) until the test lets it go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.go = threading.Event()

    def wait_here(self) -> None:
        self.entered.set()
        assert self.go.wait(20), "never released"

    async def reached(self) -> None:
        await until(self.entered.is_set, timeout=10)


class HoldingIndex:
    """An index whose ``add`` waits at ``held`` after writing the entry's files, before indexing them."""

    def __init__(self, inner: Index, held: Held) -> None:
        self.inner = inner
        self.held = held

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def add(
        self, entry: EntryRow, blobs: Sequence[BlobRow], write: WriteFiles, unlink: UnlinkFiles
    ) -> None:
        def write_then_wait(indexed: set[str]) -> None:
            write(indexed)
            if not self.held.entered.is_set():  # the first write only (PostgreSQL's put looks again after)
                self.held.wait_here()

        await self.inner.add(entry, blobs, write_then_wait, unlink)


@pytest.fixture(params=INDEXES)
def index_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def process(request: pytest.FixtureRequest, index_kind: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    """``await process(hold=None, **options)``: a cache on the shared directory (and database), as a process."""
    url = request.getfixturevalue("pg_url") if index_kind == "postgres" else None
    clock = Clock()
    opened: list[ResultCache] = []
    stores: list[PgJobStore] = []

    async def factory(hold: Held | None = None, **kwargs: Any) -> ResultCache:
        options: dict[str, Any] = {"ttl_s": 3600.0, "max_bytes": 10 * 1024 * 1024, "clock": clock}
        options.update(kwargs)
        index: Any = None
        if url is not None:
            store = PgJobStore(url)
            await store.open()
            stores.append(store)
            index = PgIndex(store)
        cache = ResultCache(tmp_path / "cache", index=index, **options)
        if hold is not None:
            cache.index = HoldingIndex(cache.index, hold)
        await cache.open()
        opened.append(cache)
        return cache

    yield factory
    for cache in opened:
        await cache.close()
    for store in stores:
        await store.close()


async def test_a_put_in_one_process_is_a_hit_in_the_other(process: Fleet) -> None:
    a, b = await process(), await process()
    original = result(image((1, 2, 3), seed=4), image((5, 6, 7), seed=8))
    refs = await a.put("k", original)
    hit = await b.get_with_refs("k")
    assert hit is not None and hit[0].images == original.images and hit[1] == refs
    assert (b.hits, b.misses) == (1, 0)
    # B's use moved the entry in the shared LRU order: A's size eviction now takes A's own older entry first.
    assert await b.get_images(refs) is not None


def names(cache: ResultCache) -> set[str]:
    return {p.name.split(".")[0] for p in blob_files(cache)}


async def test_a_size_eviction_in_one_process_keeps_the_images_the_other_pins(process: Fleet) -> None:
    pinned, older, newer = image((9, 0, 0), size=48), image((0, 9, 0), size=48), image((0, 0, 9), size=48)
    room = max(len(i.data) for i in (pinned, older, newer))
    a = await process(max_bytes=room * 2 + 1, memory_bytes=0)
    b = await process(memory_bytes=0)
    refs = await b.put("b", result(pinned))
    await b.pin("job-b", refs)
    await a.put("a-older", result(older))
    await a.put("a-newer", result(newer))  # over A's bound: B's entry (least recently used) goes first
    assert (
        a.evictions == 2 and await b.get("b") is None
    )  # the entry went, then A's older one (B's blob stays)
    kept = await b.get_images(refs)
    assert kept is not None and kept[0].data == pinned.data
    assert names(a) == {refs[0], sha(newer.data)}
    assert await a.pinned_jobs() == {"job-b"}
    await b.unpin("job-b")  # posted: nothing references it any more
    assert names(a) == {sha(newer.data)}


async def test_dropping_an_entry_in_one_process_keeps_a_blob_the_others_entry_uses(process: Fleet) -> None:
    a, b = await process(memory_bytes=0), await process(memory_bytes=0)
    refs = await b.put("b", result(image((0, 9, 0))))
    assert await a.put("a", result(image((0, 9, 0)))) == refs  # the same bytes: one blob, two entries
    assert await a.discard(["a"], refs) == 0
    hit = await b.get("b")
    assert hit is not None and hit.images[0].data == image((0, 9, 0)).data
    assert await b.discard(["b"], refs) == 1  # the last one lets it go
    assert names(a) == set()


async def test_a_blob_being_indexed_elsewhere_keeps_its_file_when_an_eviction_here_takes_it(
    process: Fleet, index_kind: str
) -> None:
    """B puts an image A's entry already has; while B is between writing and indexing, A drops its entry (the
    blob's last reference, as far as the index knows). SQLite: A waits for B's critical section (``flock``).
    PostgreSQL: B holds no lock while it writes, so A unlinks the file; B's put, indexing it after, finds it
    missing and writes it again. Either way B's entry ends with its file."""
    held = Held()
    a = await process(memory_bytes=0)
    b = await process(hold=held, memory_bytes=0)
    same = image((3, 1, 4), size=40)
    refs = await a.put("a", result(same))
    putting = asyncio.create_task(b.put("b", result(image((3, 1, 4), size=40))))
    try:
        await held.reached()
        dropping = asyncio.create_task(a.discard(["a"], refs))
        if index_kind == "sqlite":
            await asyncio.sleep(0.3)
            assert not dropping.done()  # waits for B's critical section
        else:
            assert await dropping == 1  # nothing references it yet: its row and file go
            assert names(a) == set()
    finally:
        held.go.set()
    assert await putting == refs
    if index_kind == "sqlite":
        assert await dropping == 0  # B's entry references the blob now: nothing to delete
    hit = await b.get("b")  # from disk
    assert hit is not None and hit.images[0].data == same.data
    assert [p.name.split(".")[0] for p in blob_files(a)] == refs
    assert await a.get_images(refs) is not None  # its blob row is back too


async def test_a_put_elsewhere_waits_for_an_eviction_here_and_writes_the_blob_again(
    process: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A has decided a blob is unreferenced and is about to unlink it; B puts the same image meanwhile. B must
    wait for A, then find the blob gone from the index and write it again."""
    held = Held()
    a = await process(memory_bytes=0)
    b = await process(memory_bytes=0)
    same = image((2, 7, 1), size=40)
    refs = await a.put("a", result(same))
    unlink = a._unlink_sync

    def wait_then_unlink(blobs: list[tuple[str, str]]) -> None:
        if blobs:
            held.wait_here()
        unlink(blobs)

    monkeypatch.setattr(a, "_unlink_sync", wait_then_unlink)
    dropping = asyncio.create_task(a.discard(["a"], refs))
    try:
        await held.reached()
        putting = asyncio.create_task(b.put("b", result(image((2, 7, 1), size=40))))
        await asyncio.sleep(0.3)
        assert not putting.done()
    finally:
        held.go.set()
    assert await dropping == 1
    assert await putting == refs
    hit = await b.get("b")  # from disk: the file was written again after A's unlink
    assert hit is not None and hit.images[0].data == same.data
    assert await a.get_images(refs) is not None


# -- the database going away ----------------------------------------------------------------------------------


async def test_while_the_database_is_away_gets_are_misses_with_one_warning_and_nothing_on_disk_is_lost(
    pg_cluster: PgCluster, pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bot.engine.cache")
    async with TcpProxy(pg_cluster.host, pg_cluster.port) as proxy:
        store = PgJobStore(
            proxy.url(pg_url), connect_timeout_s=2, reconnect_first_s=0.05, reconnect_max_s=0.2
        )
        await store.open()
        cache = ResultCache(tmp_path / "cache", ttl_s=3600, max_bytes=10**7, index=PgIndex(store))
        await cache.open()
        try:
            refs = await cache.put("in-memory", result(image((1, 1, 1))))
            await cache.put("on-disk", result(image((2, 2, 2))))
            cache._forget("on-disk")
            before = {p: p.read_bytes() for p in blob_files(cache)}

            proxy.cut()
            assert await cache.get("in-memory") is None  # the index cannot vouch for it: not served
            assert await cache.get("on-disk") is None
            late = image((3, 3, 3))
            assert await cache.put("late", result(late)) == [sha(late.data)]  # refs, but nothing stored
            assert await cache.get_images(refs) is None
            await cache.pin("job", refs)
            await cache.unpin("job")
            assert await cache.discard(["in-memory"], refs) == 0
            assert await cache.refs_of(["on-disk"]) == set()
            assert cache.misses == 2
            # One warning for the operator, the store's: the cache says it only at DEBUG, once per call.
            warnings = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
            assert [name for name, _ in warnings] == ["bot.engine.store_pg"], warnings
            quiet = [
                r.getMessage()
                for r in caplog.records
                if r.name == "bot.engine.cache" and "unavailable" in r.getMessage()
            ]
            assert quiet and all(m.startswith("result cache index unavailable") for m in quiet)
            assert {p: p.read_bytes() for p in blob_files(cache)} == before  # nothing written, nothing lost

            proxy.mend()
            await until(lambda: store.reachable, timeout=15)
            hit = await cache.get("in-memory")  # the same cache, not reopened
            assert hit is not None and hit.images[0].data == image((1, 1, 1)).data
            assert await cache.get("on-disk") is not None
            await cache.put("late", result(late))
            assert await cache.get("late") is not None
            assert "result cache index usable again" in caplog.text
        finally:
            await cache.close()
            await store.close()


async def test_a_cache_opened_while_the_database_is_away_works_once_it_is_back(
    pg_cluster: PgCluster, pg_url: str, tmp_path: Path
) -> None:
    async with TcpProxy(pg_cluster.host, pg_cluster.port) as proxy:
        store = PgJobStore(
            proxy.url(pg_url), connect_timeout_s=2, reconnect_first_s=0.05, reconnect_max_s=0.2
        )
        await store.open()
        try:
            proxy.cut()
            async with ResultCache(
                tmp_path / "cache", ttl_s=3600, max_bytes=10**7, index=PgIndex(store)
            ) as cache:
                assert await cache.get("k") is None
                proxy.mend()
                await until(lambda: store.reachable, timeout=15)
                await cache.put("k", result(image((4, 4, 4))))
                assert await cache.get("k") is not None
        finally:
            await store.close()


# -- fills: identical requests in two processes, one generation ------------------------------------------------


class Member:
    """A fleet process's cache: its own store (a pool) joined to the fleet as a live ``processes`` row."""

    def __init__(self, name: str, store: PgJobStore, cache: ResultCache) -> None:
        self.name = name
        self.store = store
        self.cache = cache


@pytest.fixture
async def member(pg_url: str, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    opened: list[Member] = []

    async def factory(name: str, shard: int, **kwargs: Any) -> Member:
        store = PgJobStore(pg_url)
        await store.open()
        me = FleetProcess(f"{name}-process", "host", shard, 2, (shard,))
        assert await store.register_process(me, ttl_s=FILL_TTL) is None
        store.join_fleet(me.id, ttl_s=FILL_TTL)
        options: dict[str, Any] = {"ttl_s": 3600.0, "max_bytes": 10 * 1024 * 1024, "memory_bytes": 0}
        options.update(kwargs)
        cache = ResultCache(tmp_path / "cache", index=PgIndex(store), **options)
        await cache.open()
        opened.append(Member(name, store, cache))
        return opened[-1]

    yield factory
    for one in opened:
        await one.cache.close()
        await one.store.close()


FILL_TTL = 30.0


class Heard:
    """``LISTEN bot_fill`` on a connection of the test's own: the keys the fleet was told about."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def listen(self, url: str) -> Heard:
        self.conn = await asyncpg.connect(url)
        await self.conn.add_listener(FILL_CHANNEL, lambda _c, _p, _ch, payload: self.keys.append(payload))
        return self

    async def close(self) -> None:
        await self.conn.close()


@pytest.fixture
async def heard(pg_url: str) -> AsyncIterator[Heard]:
    listening = await Heard().listen(pg_url)
    yield listening
    await listening.close()


async def test_a_miss_claims_the_fill_and_the_same_request_elsewhere_waits_for_its_put(
    member: Callable[..., Any], heard: Heard
) -> None:
    a, b = await member("a", 0), await member("b", 1)
    first = await a.cache.lookup("k", claim=True)
    assert first.hit is None and not first.filling_elsewhere  # A generates it
    again = await a.cache.lookup("k", claim=True)
    assert again.hit is None and not again.filling_elsewhere  # A's own second job joins A's own generation
    waiting = await b.cache.lookup("k", claim=True)
    assert waiting.hit is None and waiting.filling_elsewhere  # B waits instead of generating it again
    assert heard.keys == []

    made = result(image((8, 1, 8), seed=3))
    await a.cache.put("k", made)
    await until(lambda: heard.keys == ["k"], timeout=5)  # B is woken (someone waited: the put says so)
    served = await b.cache.lookup("k", claim=True)
    assert served.hit is not None and served.hit[0].images == made.images and served.hit[0].from_cache
    # The claim ended with the put: the next miss of the key (after a fresh reroll dropped it) claims again.
    await a.cache.discard(["k"], served.hit[1])
    assert not (await b.cache.lookup("k", claim=True)).filling_elsewhere


async def test_a_put_nobody_waited_for_wakes_nobody(member: Callable[..., Any], heard: Heard) -> None:
    a = await member("a", 0)
    assert not (await a.cache.lookup("k", claim=True)).filling_elsewhere
    await a.cache.put("k", result(image((1, 8, 1))))
    await a.cache.lookup("other", claim=True)
    await a.cache.release_fill("other")
    await asyncio.sleep(0.3)
    assert heard.keys == []


async def test_a_released_fill_wakes_the_waiters_and_the_next_look_claims_it(
    member: Callable[..., Any], heard: Heard
) -> None:
    a, b = await member("a", 0), await member("b", 1)
    await a.cache.lookup("k", claim=True)
    assert (await b.cache.lookup("k", claim=True)).filling_elsewhere
    await a.cache.release_fill("k")  # A's generation failed: B must not wait for a put that never comes
    await until(lambda: heard.keys == ["k"], timeout=5)
    assert not (await b.cache.lookup("k", claim=True)).filling_elsewhere  # B generates it now
    assert (await a.cache.lookup("k", claim=True)).filling_elsewhere  # and A's next identical job waits for B


async def test_the_fill_of_a_dead_process_is_taken_over(member: Callable[..., Any], pg_url: str) -> None:
    a, b = await member("a", 0), await member("b", 1)
    await a.cache.lookup("k", claim=True)
    assert (await b.cache.lookup("k", claim=True)).filling_elsewhere
    conn = await asyncpg.connect(pg_url)
    try:  # A stops heartbeating (SIGKILL): its row goes stale
        await conn.execute(
            "UPDATE processes SET heartbeat_at = now() - interval '1 hour' WHERE id = $1", a.store.owner
        )
    finally:
        await conn.close()
    taken = await b.cache.lookup("k", claim=True)
    assert taken.hit is None and not taken.filling_elsewhere


@pytest.mark.parametrize("backend_ref", ["horde-id-1", None], ids=["followed-up", "interrupted"])
async def test_a_dead_processs_fill_holds_while_its_generation_is_followed_up_elsewhere(
    member: Callable[..., Any], heard: Heard, pg_url: str, backend_ref: str | None
) -> None:
    """A's generation of "k" is on AI Horde under its id when A dies (or hands it over): the process that
    follows it up will put it, so a request for "k" keeps waiting instead of generating it a second time. A generation with no
    id to follow (an OpenAI-compatible server) died with A: B takes the claim."""
    a, b = await member("a", 0), await member("b", 1)
    await a.cache.lookup("k", claim=True)
    running = Job(
        id="a-job", request=ImageRequest("k"), guild_id=0, user_id=1, state=JobState.RUNNING, cache_key="k"
    )
    running.backend_ref = backend_ref
    await a.store.save_job(running)
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(  # A stops heartbeating: its row goes stale
            "UPDATE processes SET heartbeat_at = now() - interval '1 hour' WHERE id = $1", a.store.owner
        )
        looked = await b.cache.lookup("k", claim=True)
        if backend_ref is None:
            assert not looked.filling_elsewhere  # B generates it
            return
        assert looked.filling_elsewhere  # still A's claim: its generation goes on
        # B took A's job over and follows it up: a request of its own for "k" waits for that too, and the
        # follow-up's put ends the claim and wakes whoever waits.
        await conn.execute("UPDATE jobs SET owner = $1 WHERE id = 'a-job'", b.store.owner)
        assert (await b.cache.lookup("k", claim=True)).filling_elsewhere
        await b.cache.put("k", result(image((5, 5, 5))))
        await until(lambda: heard.keys == ["k"], timeout=5)
        hit = await b.cache.lookup("k", claim=True)
        assert hit.hit is not None
        # Once no generation of it is under way any more, a dead holder's claim is anyone's again.
        await conn.execute("UPDATE jobs SET state = 'succeeded' WHERE id = 'a-job'")
        await a.cache.lookup("k2", claim=True)
        await conn.execute(
            "UPDATE processes SET heartbeat_at = now() - interval '1 hour' WHERE id = $1", a.store.owner
        )
        assert not (await b.cache.lookup("k2", claim=True)).filling_elsewhere
    finally:
        await conn.close()


async def test_without_a_fleet_or_without_claim_nothing_is_claimed(
    member: Callable[..., Any], pg_url: str, tmp_path: Path
) -> None:
    a = await member("a", 0)
    await a.cache.lookup("k")  # no claim asked (a fresh reroll, a followed-up generation)
    store = PgJobStore(pg_url)  # a store that joined no fleet (the command line)
    await store.open()
    try:
        async with ResultCache(tmp_path / "cache", ttl_s=3600, max_bytes=10**7, index=PgIndex(store)) as solo:
            assert not (await solo.lookup("k", claim=True)).filling_elsewhere
    finally:
        await store.close()
    b = await member("b", 1)
    assert not (await b.cache.lookup("k", claim=True)).filling_elsewhere


class Counted:
    """What an index's own totals say, and a count of its rows, read on a connection of the test's own."""

    def __init__(self, cache: ResultCache, url: str | None) -> None:
        self.cache, self.url = cache, url
        self.tables = (
            ("cache_entries", "cache_blobs", "cache_totals") if url else ("entries", "blobs", "totals")
        )

    async def __aenter__(self) -> Counted:
        if self.url is not None:
            self.pg = await asyncpg.connect(self.url)
        else:
            self.lite = sqlite3.connect(self.cache.index.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.url is not None:
            await self.pg.close()
        else:
            self.lite.close()

    async def rows(self, query: str) -> list[tuple[Any, ...]]:
        if self.url is not None:
            return [tuple(r) for r in await self.pg.fetch(query)]
        return list(self.lite.execute(query))

    async def totals_and_recount(self) -> tuple[tuple[int, int], tuple[int, int]]:
        entries, blobs, totals = self.tables
        [row] = await self.rows(f"SELECT entries, bytes FROM {totals}")
        [recount] = await self.rows(
            f"SELECT (SELECT count(*) FROM {entries}), (SELECT COALESCE(sum(size), 0) FROM {blobs})"
        )
        return (int(row[0]), int(row[1])), (int(recount[0]), int(recount[1]))

    async def indexed_refs(self) -> set[str]:
        return {r[0] for r in await self.rows(f"SELECT ref FROM {self.tables[1]}")}


async def test_the_totals_stay_exact_across_two_processes(
    process: Fleet, index_kind: str, request: pytest.FixtureRequest
) -> None:
    """Every write keeps the totals row by what it changed (PostgreSQL: in its statement; SQLite: by triggers);
    it must always equal a recount, and no write counts the cache to get there."""
    rng = random.Random(11)
    a = await process(max_bytes=400, memory_bytes=0)
    b = await process(max_bytes=400, memory_bytes=0)
    colours = [(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(12)]
    url = request.getfixturevalue("pg_url") if index_kind == "postgres" else None
    async with Counted(a, url) as counted:
        for step in range(80):
            one = rng.choice([a, b])
            key = f"k{rng.randrange(16)}"
            action = rng.randrange(5)
            if action <= 1:
                await one.put(key, result(image(rng.choice(colours), size=24)))
            elif action == 2:
                refs = await one.refs_of([key])
                await one.discard([key], refs)
            elif action == 3:
                hit = await one.get_with_refs(key)
                if hit is not None:
                    await one.pin(f"job{step}", hit[1])
            else:
                for job in await one.pinned_jobs():
                    await one.unpin(job)
            totals, recount = await counted.totals_and_recount()
            assert totals == recount, step
            if action <= 2:  # a write: the writer's totals are the directory's (the fleet's) as of its write
                assert (one.index.totals.entries, one.index.totals.bytes) == totals, step
            assert names(one) == await counted.indexed_refs(), step  # no hole, no orphan
        assert a.evictions + b.evictions > 0  # the size bound was met along the way
