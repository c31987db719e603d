"""The job store, one suite for both kinds: real SQLite files in a temporary directory and a real PostgreSQL
database (a fresh one per test, on the session's cluster: tests/pg.py).

Tests taking ``kind``/``open_any`` run on both stores; tests about SQLite files (corruption moved aside, a
locked file, old file versions) stay SQLite-only, and PostgreSQL's own faults (concurrent migrations, a
server stopped and started again) are in the PostgreSQL section at the end.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest

from bot.engine import store as store_module
from bot.engine import store_pg as store_pg_module
from bot.engine.models import ImageRequest, Job, JobState
from bot.engine.store import JobStore, ShardFilter, StoreCorrupt, StoreError, StoreLocked
from bot.engine.store_pg import PgJobStore
from tests.pg import PASSWORD, PgCluster

REPO_ROOT = Path(__file__).resolve().parents[2]

OpenStore = Callable[..., Awaitable[JobStore]]
AnyStore = JobStore | PgJobStore


@pytest.fixture
async def open_store(tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Factory that opens SQLite stores (default file in tmp_path) and closes every one it opened."""
    opened: list[JobStore] = []

    async def factory(path: Path | None = None, **kwargs: float) -> JobStore:
        store = JobStore(path or tmp_path / "data" / "bot.sqlite3", **kwargs)
        await store.open()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


@dataclass
class Kind:
    """One kind of store on one (empty) database, and how a test reaches that database from outside."""

    name: str
    module: ModuleType  # holds the kind's MIGRATIONS
    location: str  # a file path or a URL
    raw: Callable[[str], Awaitable[list[tuple[Any, ...]]]]  # SQL run beside the store, not through it

    def make(self) -> AnyStore:
        """A new, unopened store on this kind's database."""
        if self.name == "sqlite":
            return JobStore(Path(self.location))
        return PgJobStore(self.location)

    def constructor(self) -> str:
        """Python source building the same store in another process."""
        if self.name == "sqlite":
            return f"__import__('bot.engine.store').engine.store.JobStore(Path({self.location!r}))"
        return f"__import__('bot.engine.store_pg').engine.store_pg.PgJobStore({self.location!r})"

    async def version(self) -> int:
        if self.name == "sqlite":
            return (await self.raw("PRAGMA user_version"))[0][0]
        return (await self.raw("SELECT COALESCE(MAX(version), 0) FROM schema_version"))[0][0]

    async def columns(self) -> list[str]:
        if self.name == "sqlite":
            return [row[1] for row in await self.raw("PRAGMA table_info(jobs)")]
        rows = await self.raw("SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'")
        return [row[0] for row in rows]


@pytest.fixture(params=["sqlite", "postgres"])
def kind(request: pytest.FixtureRequest, tmp_path: Path) -> Kind:
    if request.param == "sqlite":
        path = tmp_path / "data" / "bot.sqlite3"

        async def raw_sqlite(sql: str) -> list[tuple[Any, ...]]:
            with sqlite3.connect(path, isolation_level=None) as db:
                return list(db.execute(sql).fetchall())

        return Kind("sqlite", store_module, str(path), raw_sqlite)
    url: str = request.getfixturevalue("pg_url")

    async def raw_pg(sql: str) -> list[tuple[Any, ...]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(row) for row in await conn.fetch(sql)]
        finally:
            await conn.close()

    return Kind("postgres", store_pg_module, url, raw_pg)


OpenAny = Callable[[], Awaitable[AnyStore]]


@pytest.fixture
async def open_any(kind: Kind) -> AsyncIterator[OpenAny]:
    """Factory that opens stores of the test's kind on its database and closes every one it opened."""
    opened: list[AnyStore] = []

    async def factory() -> AnyStore:
        store = kind.make()
        await store.open()
        opened.append(store)
        return store

    yield factory
    for store in opened:
        await store.close()


def make_job(job_id: str, **fields: object) -> Job:
    values: dict[str, object] = {"request": ImageRequest("a red fox"), "guild_id": 1, "user_id": 10}
    values.update(fields)
    return Job(id=job_id, **values)  # type: ignore[arg-type]


def full_job() -> Job:
    """A job with every persisted field set to something other than its default."""
    return Job(
        id="job-full",
        request=ImageRequest(
            prompt="a lighthouse at dusk",
            negative_prompt="blurry",
            width=768,
            height=512,
            count=2,
            seed=1234,
            model="sdxl",
            nsfw_allowed=True,
            fresh=True,
        ),
        guild_id=2**62 + 7,  # snowflakes are large
        channel_id=555,
        user_id=2**60 + 3,
        state=JobState.FAILED,
        created_at=1000.25,
        started_at=1001.5,
        finished_at=1002.75,
        backend="horde",
        message_ref={"channel": 555, "message": 777, "token": "abc"},
        cache_key="k" * 64,
        image_refs=["a" * 64, "b" * 64],
        seeds=[7, None],
        from_cache=True,
        error_reason="timeout",
        error_message="The backend took too long.",
        cancelled_by="user:42",
        backend_ref="horde-0f1e2d",
    )


PERSISTED = [
    "id",
    "request",
    "guild_id",
    "channel_id",
    "user_id",
    "state",
    "created_at",
    "started_at",
    "finished_at",
    "backend",
    "message_ref",
    "cache_key",
    "image_refs",
    "seeds",
    "from_cache",
    "error_reason",
    "error_message",
    "cancelled_by",
    "backend_ref",
]


async def test_round_trip_of_every_persisted_field(open_any: OpenAny) -> None:
    store = await open_any()
    job = full_job()
    await store.save_job(job)
    loaded = await store.get_job(job.id)
    assert loaded is not None
    for name in PERSISTED:
        assert getattr(loaded, name) == getattr(job, name), name
    assert loaded.state is JobState.FAILED
    assert loaded.result is None and loaded.progress is None and loaded.queue_position is None


async def test_save_job_updates_in_place(open_any: OpenAny) -> None:
    store = await open_any()
    job = make_job("j1")
    await store.save_job(job)
    job.state = JobState.SUCCEEDED
    job.finished_at = 50.0
    job.image_refs = ["c" * 64]
    await store.save_job(job)
    loaded = await store.get_job("j1")
    assert loaded is not None
    assert (loaded.state, loaded.finished_at, loaded.image_refs) == (JobState.SUCCEEDED, 50.0, ["c" * 64])
    assert len(await store.list_jobs()) == 1
    assert await store.get_job("missing") is None


def run_python(code: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


async def test_a_job_written_here_is_read_by_another_process(open_any: OpenAny, kind: Kind) -> None:
    store = await open_any()
    await store.save_job(full_job())
    # No close(): save_job alone must have made it durable and visible.
    out = run_python(
        f"""
        import asyncio
        from pathlib import Path

        async def main():
            async with {kind.constructor()} as store:
                job = await store.get_job("job-full")
                print(job.request.prompt, job.state.value, job.seeds, job.message_ref["message"])

        asyncio.run(main())
        """
    )
    assert out.strip() == "a lighthouse at dusk failed [7, None] 777"


async def test_a_job_written_by_a_dead_process_is_found_unfinished(open_any: OpenAny, kind: Kind) -> None:
    run_python(
        f"""
        import asyncio, os
        from pathlib import Path
        from bot.engine.models import ImageRequest, Job, JobState

        async def main():
            store = {kind.constructor()}
            await store.open()
            await store.save_job(Job(id="left", request=ImageRequest("cat"), guild_id=1, user_id=2,
                                     state=JobState.RUNNING, created_at=5.0))
            os._exit(0)  # die without closing anything

        asyncio.run(main())
        """
    )
    store = await open_any()
    unfinished = await store.unfinished_jobs()
    assert [(j.id, j.state) for j in unfinished] == [("left", JobState.RUNNING)]


async def test_unfinished_jobs_are_queued_or_running_oldest_first(open_any: OpenAny) -> None:
    store = await open_any()
    await store.save_job(make_job("new-queued", state=JobState.QUEUED, created_at=30.0))
    await store.save_job(make_job("old-running", state=JobState.RUNNING, created_at=10.0))
    await store.save_job(make_job("mid-queued", state=JobState.QUEUED, created_at=20.0))
    for i, state in enumerate(s for s in JobState if s.is_terminal):
        await store.save_job(make_job(f"done-{i}", state=state, created_at=1.0))
    ids = [job.id for job in await store.unfinished_jobs()]
    assert ids == ["old-running", "mid-queued", "new-queued"]


async def test_list_jobs_filters_and_orders_newest_first(open_any: OpenAny) -> None:
    store = await open_any()
    await store.save_job(make_job("a", guild_id=1, user_id=10, state=JobState.SUCCEEDED, created_at=1.0))
    await store.save_job(make_job("b", guild_id=1, user_id=11, state=JobState.FAILED, created_at=2.0))
    await store.save_job(make_job("c", guild_id=2, user_id=10, state=JobState.SUCCEEDED, created_at=3.0))
    await store.save_job(make_job("d", guild_id=1, user_id=10, state=JobState.QUEUED, created_at=4.0))

    async def ids(**kwargs: object) -> list[str]:
        return [job.id for job in await store.list_jobs(**kwargs)]  # type: ignore[arg-type]

    assert await ids() == ["d", "c", "b", "a"]
    assert await ids(guild_id=1) == ["d", "b", "a"]
    assert await ids(user_id=10) == ["d", "c", "a"]
    assert await ids(guild_id=1, user_id=10) == ["d", "a"]
    assert await ids(states=[JobState.SUCCEEDED]) == ["c", "a"]
    assert await ids(guild_id=1, states={JobState.FAILED, JobState.QUEUED}) == ["d", "b"]
    assert await ids(states=[]) == []
    assert await ids(limit=2) == ["d", "c"]


async def test_count_images_since_counts_only_fresh_successes_in_range(open_any: OpenAny) -> None:
    store = await open_any()
    # Images are counted by their seeds (one per image, None when unknown): image refs exist only with a cache.
    two, three = [1, None], [5, 6, 7]

    def done(job_id: str, **fields: object) -> Job:
        values: dict[str, object] = {"state": JobState.SUCCEEDED, "finished_at": 200.0, "seeds": two}
        values.update(fields)
        return make_job(job_id, **values)

    await store.save_job(done("counted-2"))
    await store.save_job(done("counted-3", seeds=three, finished_at=100.0))  # exactly at `since`
    await store.save_job(done("cache-hit", from_cache=True))
    await store.save_job(done("failed", state=JobState.FAILED))
    await store.save_job(done("too-old", finished_at=99.0))
    await store.save_job(done("other-user", user_id=99))
    await store.save_job(done("other-guild", guild_id=99))
    assert await store.count_images_since(guild_id=1, user_id=10, since=100.0) == 5
    assert await store.count_images_since(guild_id=1, user_id=10, since=150.0) == 2
    assert await store.count_images_since(guild_id=5, user_id=5, since=0.0) == 0


async def test_guild_settings_and_meta(open_any: OpenAny) -> None:
    store = await open_any()
    assert await store.get_guild_settings(1) == {}
    await store.set_guild_settings(1, {"nsfw": True, "max_count": 2, "models": ["a", "b"]})
    await store.set_guild_settings(2, {"nsfw": False})
    assert await store.get_guild_settings(1) == {"nsfw": True, "max_count": 2, "models": ["a", "b"]}
    await store.set_guild_settings(1, {"max_count": 4})  # replaces the whole document
    assert await store.get_guild_settings(1) == {"max_count": 4}
    assert await store.get_guild_settings(2) == {"nsfw": False}

    assert await store.get_meta("commands_hash") is None
    await store.set_meta("commands_hash", "abc")
    await store.set_meta("commands_hash", "def")
    assert await store.get_meta("commands_hash") == "def"


async def test_ping_and_closed_store(kind: Kind) -> None:
    store = kind.make()
    assert await store.ping() is False
    async with store:
        assert await store.ping() is True
    assert await store.ping() is False
    with pytest.raises(StoreError, match="not open"):
        await store.get_job("x")


def user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("PRAGMA user_version").fetchone()[0]


async def test_empty_v0_file_is_migrated_and_the_setup_is_applied(
    tmp_path: Path, open_store: OpenStore
) -> None:
    path = tmp_path / "bot.sqlite3"
    path.touch()
    store = await open_store(path)
    await store.save_job(make_job("j"))
    assert user_version(path) == len(store_module.MIGRATIONS) == 3
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"jobs_guild_user_state", "jobs_state", "jobs_finished_at"} <= indexes


async def test_older_schema_is_migrated_forward(
    open_any: OpenAny, kind: Kind, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_any()
    await store.save_job(make_job("kept"))
    await store.close()
    shipped = len(kind.module.MIGRATIONS)
    later = ["ALTER TABLE jobs ADD COLUMN note TEXT", "UPDATE jobs SET note = 'migrated'"]
    monkeypatch.setattr(kind.module, "MIGRATIONS", [*kind.module.MIGRATIONS, later])
    store = await open_any()
    assert await store.get_job("kept") is not None
    assert await kind.version() == shipped + 1
    assert await kind.raw("SELECT note FROM jobs") == [("migrated",)]


async def test_a_version_1_database_gains_backend_ref(tmp_path: Path, open_store: OpenStore) -> None:
    """A file written by the first release: its jobs survive the upgrade, with no backend reference."""
    path = tmp_path / "bot.sqlite3"
    with sqlite3.connect(path) as db:
        for statement in store_module.MIGRATIONS[0]:
            db.execute(statement)
        db.execute(
            "INSERT INTO jobs (id, request, guild_id, user_id, state, created_at) VALUES (?, ?, ?, ?, ?, ?)",
            ("old", '{"prompt": "from v1"}', 1, 2, "queued", 10.0),
        )
        db.execute("PRAGMA user_version = 1")
    store = await open_store(path)
    job = await store.get_job("old")
    assert job is not None and job.request.prompt == "from v1" and job.backend_ref is None
    job.backend_ref = "abc"
    await store.save_job(job)
    assert (await store.get_job("old")).backend_ref == "abc"  # type: ignore[union-attr]
    assert user_version(path) == len(store_module.MIGRATIONS)


async def test_a_failing_migration_rolls_back(
    open_any: OpenAny, kind: Kind, monkeypatch: pytest.MonkeyPatch
) -> None:
    await (await open_any()).close()
    shipped = len(kind.module.MIGRATIONS)
    broken = ["ALTER TABLE jobs ADD COLUMN note TEXT", "THIS IS NOT SQL"]
    monkeypatch.setattr(kind.module, "MIGRATIONS", [*kind.module.MIGRATIONS, broken])
    with pytest.raises(StoreError) as info:
        await kind.make().open()
    assert "\n" not in info.value.message
    assert await kind.version() == shipped
    assert "note" not in await kind.columns()


async def test_a_newer_schema_refuses_to_open(open_any: OpenAny, kind: Kind) -> None:
    await (await open_any()).close()
    if kind.name == "sqlite":
        await kind.raw("PRAGMA user_version = 99")
    else:
        await kind.raw("INSERT INTO schema_version (version) VALUES (99)")
    store = kind.make()
    understood = len(kind.module.MIGRATIONS)
    with pytest.raises(
        StoreError, match=rf"schema version 99, newer than this bot understands \({understood}\)"
    ) as info:
        await store.open()
    assert type(info.value) is StoreError
    assert "\n" not in info.value.message
    assert await store.ping() is False
    assert await kind.version() == 99  # left untouched


@pytest.mark.parametrize("garbage", [b"this is not a database" * 200, b"x"], ids=["long", "one-byte"])
async def test_a_corrupt_file_is_moved_aside_not_deleted(tmp_path: Path, garbage: bytes) -> None:
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(garbage)
    (tmp_path / "bot.sqlite3-wal").write_bytes(b"wal bytes")
    with pytest.raises(StoreCorrupt) as info:
        await JobStore(path).open()
    error = info.value
    assert error.path == path
    assert error.moved_to.name.startswith("bot.sqlite3.corrupt-")
    assert error.moved_to.read_bytes() == garbage
    assert Path(f"{error.moved_to}-wal").read_bytes() == b"wal bytes"  # noqa: ASYNC240 (test setup)
    assert not path.exists() and not (tmp_path / "bot.sqlite3-wal").exists()
    assert "\n" not in error.message and str(path) in error.message and str(error.moved_to) in error.message
    # The next start gets a fresh store.
    async with JobStore(path) as store:
        assert await store.list_jobs() == []


async def test_a_damaged_page_fails_quick_check_and_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with JobStore(path) as store:
        for i in range(300):
            await store.save_job(make_job(f"job-{i}", request=ImageRequest("p" * 500)))
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    data[4096 * 3 : 4096 * 6] = b"\xa5" * (4096 * 3)  # valid header, broken b-tree pages
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt) as info:
        await JobStore(path).open()
    assert info.value.moved_to.read_bytes() == bytes(data)


async def test_a_locked_database_fails_fast_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("CREATE TABLE t (x)")
        holder.execute("BEGIN EXCLUSIVE")
        started = time.monotonic()
        with pytest.raises(
            StoreLocked, match="locked by another process; is another copy of the bot running"
        ):
            await JobStore(path, busy_timeout_s=0.2).open()
        assert time.monotonic() - started < 3
    finally:
        holder.close()
    assert path.exists()  # a locked file is not corrupt: never moved
    async with JobStore(path) as store:
        assert await store.ping()


async def test_an_unusable_directory_is_named(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file where the data directory should be")
    with pytest.raises(StoreError, match="data directory") as info:
        await JobStore(not_a_dir / "sub" / "bot.sqlite3").open()
    assert str(not_a_dir / "sub") in info.value.message


async def test_an_unreadable_row_is_skipped_not_fatal(open_any: OpenAny, kind: Kind) -> None:
    store = await open_any()
    await store.save_job(make_job("good", created_at=1.0))
    await store.save_job(make_job("bad", created_at=2.0))
    await kind.raw(f"UPDATE jobs SET state = 'exploded', request = '{json.dumps({})}' WHERE id = 'bad'")
    assert [job.id for job in await store.list_jobs()] == ["good"]
    assert await store.get_job("bad") is None


async def test_grouped_image_counts_and_all_guild_settings_for_start_up(
    open_any: OpenAny, kind: Kind
) -> None:
    """What the guild policy loads at start-up: today's counts per (guild, user) and every settings document."""
    store = await open_any()

    def done(job_id: str, **fields: object) -> Job:
        values: dict[str, object] = {
            "state": JobState.SUCCEEDED,
            "finished_at": 200.0,
            "seeds": [None] * 2,
        }
        values.update(fields)
        return make_job(job_id, **values)

    await store.save_job(done("a"))
    await store.save_job(done("b", seeds=[1, 2, 3]))
    await store.save_job(done("other-user", user_id=11))
    await store.save_job(done("other-guild", guild_id=2))
    await store.save_job(done("cache-hit", from_cache=True))
    await store.save_job(done("failed", state=JobState.FAILED))
    await store.save_job(done("too-old", finished_at=50.0))
    assert await store.count_images_by_user_since(100.0) == {(1, 10): 5, (1, 11): 2, (2, 10): 2}
    assert await store.count_images_by_user_since(300.0) == {}

    assert await store.all_guild_settings() == {}
    await store.set_guild_settings(1, {"daily_images": 5})
    await store.set_guild_settings(2, {"nsfw": "never"})
    await kind.raw("INSERT INTO guild_settings (guild_id, settings, updated_at) VALUES (3, 'not json', 0)")
    assert await store.all_guild_settings() == {1: {"daily_images": 5}, 2: {"nsfw": "never"}}
    assert await store.get_guild_settings(3) == {}  # unreadable: defaults
    await kind.raw("INSERT INTO guild_settings (guild_id, settings, updated_at) VALUES (4, '[1, 2]', 0)")
    assert await store.get_guild_settings(4) == {}  # not a document: defaults
    assert await store.get_guild_settings(1) == {"daily_images": 5}
    assert 4 not in await store.all_guild_settings()


async def test_a_version_2_database_gains_delivery_columns_and_its_history_counts_as_delivered(
    tmp_path: Path, open_store: OpenStore
) -> None:
    """Upgrading must not make a restart post every job the old release ever finished."""
    path = tmp_path / "bot.sqlite3"
    with sqlite3.connect(path) as db:
        for migration in store_module.MIGRATIONS[:2]:
            for statement in migration:
                db.execute(statement)
        insert = (
            "INSERT INTO jobs (id, request, guild_id, user_id, state, created_at, finished_at, message_ref) "
            "VALUES (?, '{\"prompt\": \"p\"}', 1, 2, ?, 10.0, ?, '{}')"
        )
        db.execute(insert, ("old-done", "succeeded", 11.0))
        db.execute(insert, ("old-queued", "queued", None))
        db.execute("PRAGMA user_version = 2")
    store = await open_store(path)
    assert user_version(path) == 3
    done = await store.get_job("old-done")
    assert done is not None and done.delivered_at == 11.0 and done.delivery_error is None
    queued = await store.get_job("old-queued")
    assert queued is not None and queued.delivered_at is None
    assert await store.undelivered_jobs() == []


async def test_a_finished_job_is_undelivered_until_marked(open_any: OpenAny) -> None:
    store = await open_any()
    posted = make_job("posted", state=JobState.SUCCEEDED, message_ref={"token": "t"}, created_at=1.0)
    failed_post = make_job("refused", state=JobState.FAILED, message_ref={"token": "t"}, created_at=2.0)
    pending = make_job("pending", state=JobState.SUCCEEDED, message_ref={"token": "t"}, created_at=3.0)
    silent = make_job("silent", state=JobState.SUCCEEDED, created_at=4.0)  # no message: nothing to post
    running = make_job("running", state=JobState.RUNNING, message_ref={"token": "t"}, created_at=5.0)
    for job in (posted, failed_post, pending, silent, running):
        await store.save_job(job)
    assert [j.id for j in await store.undelivered_jobs()] == ["posted", "refused", "pending"]

    await store.mark_delivered("posted", at=100.0)
    await store.mark_delivered("refused", at=101.0, error="the bot may not post in this channel")
    assert [j.id for j in await store.undelivered_jobs()] == ["pending"]
    loaded = await store.get_job("posted")
    assert loaded is not None and loaded.delivered_at == 100.0 and loaded.state is JobState.SUCCEEDED
    refused = await store.get_job("refused")
    assert refused is not None and refused.delivered_at is None
    assert refused.delivery_error == "the bot may not post in this channel"


async def test_a_state_write_after_delivery_keeps_the_delivery_record(open_any: OpenAny) -> None:
    """save_job writes the state only: a late write of a stale in-memory job cannot undo a delivery."""
    store = await open_any()
    job = make_job("j", state=JobState.SUCCEEDED, message_ref={"token": "t"}, finished_at=5.0)
    await store.save_job(job)
    await store.mark_delivered("j", at=6.0)
    job.error_message = "written again"
    await store.save_job(job)  # job.delivered_at is still None in memory
    loaded = await store.get_job("j")
    assert loaded is not None and loaded.delivered_at == 6.0 and loaded.error_message == "written again"


async def test_claim_jobs_hands_back_what_is_left_to_answer_for_in_our_guilds(open_any: OpenAny) -> None:
    """Start-up recovery's one call on either store: queued, running and finished-but-never-posted jobs of the
    shards asked for, oldest first (nobody else runs this store: on PostgreSQL outside a fleet, every job is
    unowned). Settled jobs, and other shards' guilds, are left."""
    store = await open_any()
    ours, theirs = 0 << 22, 1 << 22  # shards 0 and 1 of 2
    message = {"token": "t"}
    await store.save_job(make_job("queued", guild_id=ours, created_at=1.0))
    await store.save_job(make_job("running", guild_id=ours, state=JobState.RUNNING, created_at=2.0))
    await store.save_job(
        make_job("unposted", guild_id=ours, state=JobState.SUCCEEDED, message_ref=message, created_at=3.0)
    )
    await store.save_job(
        make_job("posted", guild_id=ours, state=JobState.SUCCEEDED, message_ref=message, created_at=4.0)
    )
    await store.mark_delivered("posted", at=5.0)
    await store.save_job(make_job("silent", guild_id=ours, state=JobState.FAILED, created_at=6.0))
    await store.save_job(make_job("elsewhere", guild_id=theirs, created_at=7.0))
    claimed = await store.claim_jobs(shards=ShardFilter(2, (0,)))
    assert [job.id for job in claimed] == ["queued", "running", "unposted"]
    assert [job.id for job in await store.claim_jobs(shards=ShardFilter(2, (1,)))] == ["elsewhere"]
    assert await store.take_over_jobs() == {}  # no dead process's jobs: unowned ones are left alone


# -- PostgreSQL only ---------------------------------------------------------------------------------------


async def test_pruning_takes_old_finished_jobs_oldest_first_and_references_are_found(
    open_any: OpenAny,
) -> None:
    """What retention and Delete ask of either store: old finished rows go in batches, oldest first, live
    ones never; which image hashes some remaining job still lists."""
    store = await open_any()
    done = {"state": JobState.SUCCEEDED}
    await store.save_job(make_job("old-1", finished_at=100.0, image_refs=["a", "b"], **done))
    await store.save_job(make_job("old-2", finished_at=200.0, image_refs=["b"], **done))
    await store.save_job(make_job("queued-long-ago", created_at=1.0))
    await store.save_job(make_job("new", finished_at=1000.0, image_refs=["c"], **done))

    first = await store.prune_finished_before(500.0, limit=1)
    assert [job.id for job in first] == ["old-1"] and first[0].image_refs == ["a", "b"]
    assert await store.referenced_image_refs(["a", "b", "c", "zzz"]) == {"b", "c"}
    assert await store.referenced_image_refs([]) == set()

    rest = await store.prune_finished_before(500.0, limit=10)
    assert [job.id for job in rest] == ["old-2"]
    assert await store.prune_finished_before(500.0) == []
    remaining = {job.id for job in await store.list_jobs(limit=10)}
    assert remaining == {"queued-long-ago", "new"}
    assert await store.referenced_image_refs(["a", "b", "c"]) == {"c"}


async def test_postgres_processes_starting_together_migrate_once(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five stores opened at once on an empty database, then five more at once onto a new version."""
    # Not idempotent on purpose: a migration that ran twice leaves two rows.
    counted = ["INSERT INTO meta (key, value) VALUES ('ran-' || gen_random_uuid(), 'next')"]

    async def open_many() -> list[PgJobStore]:
        stores = [PgJobStore(pg_url) for _ in range(5)]
        await asyncio.gather(*(store.open() for store in stores))
        return stores

    for store in await open_many():
        assert await store.ping()
        await store.close()
    monkeypatch.setattr(store_pg_module, "MIGRATIONS", [*store_pg_module.MIGRATIONS, counted])
    stores = await open_many()
    try:
        conn = await asyncpg.connect(pg_url)
        try:
            versions = [row[0] for row in await conn.fetch("SELECT version FROM schema_version ORDER BY 1")]
            runs = await conn.fetchval("SELECT count(*) FROM meta WHERE key LIKE 'ran-%'")
        finally:
            await conn.close()
        assert versions == list(range(1, len(store_pg_module.MIGRATIONS) + 1))  # the counted one included
        assert runs == 1
    finally:
        for store in stores:
            await store.close()


def assert_readable(error: StoreError, store: PgJobStore) -> None:
    """One line, names the database without its password, says what to check."""
    assert "\n" not in error.message and "Traceback" not in error.message
    assert PASSWORD not in error.message and PASSWORD not in str(error)
    assert store.name in error.message and "DATABASE_URL" in error.message


async def test_postgres_stopped_then_started_again_fails_readably_then_recovers(
    pg_cluster: PgCluster, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While the server is down every call raises StoreError (from writers busy at the time too); once it is
    back the store finds it by itself (its reconnect task) and works again without being reopened."""
    caplog.set_level("DEBUG")
    store = PgJobStore(pg_url, min_size=2, max_size=4, connect_timeout_s=2)
    await store.open()
    stop_writing = asyncio.Event()
    outcomes: list[str] = []

    async def writer(n: int) -> None:
        i = 0
        while not stop_writing.is_set():
            i += 1
            try:
                await store.save_job(make_job(f"w{n}-{i}"))
                outcomes.append("ok")
            except StoreError as exc:
                assert_readable(exc, store)
                outcomes.append("StoreError")
            await asyncio.sleep(0.01)

    writers = [asyncio.create_task(writer(n)) for n in range(4)]
    try:
        await store.save_job(make_job("before"))
        await asyncio.sleep(0.2)
        await asyncio.to_thread(pg_cluster.stop)
        try:
            for call in (store.get_job("before"), store.list_jobs(), store.set_meta("k", "v")):
                with pytest.raises(StoreError, match="Cannot reach the PostgreSQL database") as info:
                    await call
                assert_readable(info.value, store)
            assert await store.ping() is False
            with pytest.raises(StoreError, match="Cannot connect to the PostgreSQL database") as info:
                await PgJobStore(pg_url, connect_timeout_s=2).open()
            assert_readable(info.value, store)
        finally:
            await asyncio.to_thread(pg_cluster.start)
        # Back: the reconnect task finds it (no call needed), and the pool replaces the dropped connections.
        async with asyncio.timeout(30):
            while not store.reachable:
                await asyncio.sleep(0.05)
        job = await store.get_job("before")
        assert job is not None and job.id == "before"
        await store.save_job(make_job("after"))
        assert await store.get_job("after") is not None
        assert await store.ping() is True
        await asyncio.sleep(0.2)
    finally:
        stop_writing.set()
        await asyncio.gather(*writers)
        await store.close()
    assert "StoreError" in outcomes and outcomes[-4:] == ["ok"] * 4
    assert PASSWORD not in caplog.text


async def test_postgres_bad_login_and_missing_database_are_named_without_the_password(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    wrong = PgJobStore(pg_cluster.url("postgres", password="not-the-" + PASSWORD))
    with pytest.raises(StoreError, match="refused the login") as info:
        await wrong.open()
    assert "not-the-" not in info.value.message and PASSWORD not in info.value.message
    assert await wrong.ping() is False

    missing = PgJobStore(pg_cluster.url("no_such_database"))
    with pytest.raises(StoreError, match="does not exist") as info:
        await missing.open()
    assert_readable(info.value, missing)


def test_safe_dsn_and_secrets_never_show_the_password() -> None:
    from bot.engine.store_pg import dsn_secrets, safe_dsn

    url = "postgresql://bot:p%40ss:w0rd@db.example:5433/imagine?sslmode=require"
    assert safe_dsn(url) == "postgresql://bot@db.example:5433/imagine"
    assert dsn_secrets(url) == ["p%40ss:w0rd", "p@ss:w0rd"]
    assert repr(PgJobStore(url)) == "PgJobStore('postgresql://bot@db.example:5433/imagine')"
    assert dsn_secrets("postgresql://bot@db/imagine") == []


@pytest.mark.parametrize(
    "url", ["postgresql://u:pw-secret@127.0.0.1:notaport/db", "postgresql://u:pw-secret@[::1/db"]
)
async def test_a_malformed_database_url_is_named_as_such(url: str) -> None:
    with pytest.raises(
        StoreError, match=r"DATABASE_URL is not a valid URL .*; expected postgresql://"
    ) as info:
        await PgJobStore(url).open()
    assert "pw-secret" not in info.value.message


async def test_postgres_a_connection_back_in_the_pool_has_no_transaction_and_costs_no_reset_query(
    pg_url: str,
) -> None:
    """The pool's release undoes a transaction a cancel interrupted, and sends nothing when there is none
    (asyncpg's default reset is a round trip per store call: half of a job's round trips)."""
    async with PgJobStore(pg_url, min_size=1, max_size=1) as store:
        pool = store._pool
        assert pool is not None
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMP TABLE interrupted (x int)")
            assert conn.is_in_transaction()
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SELECT to_regclass('pg_temp.interrupted')") is None  # rolled back
            sent: list[str] = []
            conn.add_query_logger(lambda record: sent.append(record.query))
        await store.save_job(make_job("counted"))  # one statement, and no reset query after it
        assert not any("RESET ALL" in q or "UNLISTEN" in q for q in sent)
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda record: sent.append(record.query))
            await conn.execute("SELECT 1")
        assert not any("pg_advisory_unlock_all" in q or "RESET ALL" in q for q in sent)


async def test_postgres_a_connection_dropped_unseen_is_replaced_by_the_first_call(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    """A restart the pool has not noticed yet (no chance to read the socket's EOF): the first call finds its
    connection dead, and the store retries it once on a new one instead of failing it."""
    async with PgJobStore(pg_url, min_size=1, max_size=1) as store:
        await store.save_job(make_job("kept"))
        # Blocking on purpose: the event loop must not run between stop and start.
        pg_cluster.stop()
        pg_cluster.start()
        job = await store.get_job("kept")
        assert job is not None and job.id == "kept"
