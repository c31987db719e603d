"""``python -m bot backup FILE`` on a real job store while another connection keeps writing to it."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from pathlib import Path

from bot.engine.models import ImageRequest, Job, JobState
from bot.engine.store import JobStore
from tests.service.test_main import ROOT


async def run_backup_process(
    data_dir: Path, target: Path, extra_env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "backup",
        str(target),
        env={
            "PYTHONPATH": str(ROOT),
            "DATA_DIR": str(data_dir),
            "PATH": "/usr/bin:/bin",
            **(extra_env or {}),
        },
        cwd=str(data_dir.parent),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def job(number: int) -> Job:
    return Job(
        id=f"{number:012x}",
        request=ImageRequest(prompt=f"prompt number {number} " + "x" * 200),
        guild_id=1 + number % 7,
        user_id=100 + number % 13,
        state=JobState.SUCCEEDED,
        finished_at=time.time(),
        seeds=[number],
    )


async def test_backup_while_a_writer_runs_is_a_consistent_restorable_copy(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    store = JobStore(data_dir / "bot.sqlite3")
    await store.open()
    written = 0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal written
        while not stop.is_set():
            await store.save_job(job(written))
            written += 1
            await asyncio.sleep(0)

    for _ in range(500):
        await store.save_job(job(written))
        written += 1
    writing = asyncio.create_task(writer())
    try:
        before = written
        status, out, err = await run_backup_process(data_dir, tmp_path / "backup.sqlite3")
        during = written - before
    finally:
        stop.set()
        await writing
        await store.close()
    assert status == 0, err
    assert during > 0, "the writer never wrote while the backup ran"
    assert out.startswith(f"backed up {data_dir / 'bot.sqlite3'} to {tmp_path / 'backup.sqlite3'} (")

    # A snapshot of one moment: every row whole, between what existed before and after.
    with sqlite3.connect(tmp_path / "backup.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        (count,) = db.execute("SELECT COUNT(*) FROM jobs").fetchone()
    assert before <= count <= written
    assert f"({count} jobs," in out or (count == 1 and "(1 job," in out)

    # Restore = copy it back as DATA_DIR/bot.sqlite3: the store opens it and reads every job.
    restored = tmp_path / "restored" / "bot.sqlite3"
    restored.parent.mkdir()
    restored.write_bytes((tmp_path / "backup.sqlite3").read_bytes())
    async with JobStore(restored) as again:
        jobs = await again.list_jobs(limit=count + 10)
        assert len(jobs) == count
        first = await again.get_job(job(0).id)
        assert first is not None and first.request == job(0).request and first.seeds == [0]


async def test_backup_failures_are_one_line(tmp_path: Path) -> None:
    status, out, err = await run_backup_process(tmp_path / "no-data", tmp_path / "b.sqlite3")
    assert status == 2 and out == ""
    assert err.strip().splitlines() == [
        f"error: backup: no job store at {tmp_path / 'no-data' / 'bot.sqlite3'}: check DATA_DIR "
        "(the bot creates it on first start)"
    ]
    async with JobStore(tmp_path / "data" / "bot.sqlite3"):
        pass
    status, _, err = await run_backup_process(tmp_path / "data", tmp_path / "missing" / "b.sqlite3")
    assert status == 2
    assert err.strip().splitlines() == [f"error: backup: {tmp_path / 'missing'} does not exist"]
    assert not (tmp_path / "missing").exists()


async def test_backup_with_database_url_points_to_pg_dump_and_copies_no_stale_sqlite(tmp_path: Path) -> None:
    # A bot.sqlite3 left over from before the switch to PostgreSQL must not be "backed up" as the data.
    async with JobStore(tmp_path / "data" / "bot.sqlite3") as store:
        await store.save_job(job(1))
    status, out, err = await run_backup_process(
        tmp_path / "data",
        tmp_path / "b.sqlite3",
        {"DATABASE_URL": "postgresql://bot:s3cret-pass@127.0.0.1:1/bot"},
    )
    assert status == 2 and out == ""
    assert "pg_dump" in err and "s3cret-pass" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b.sqlite3").exists()
