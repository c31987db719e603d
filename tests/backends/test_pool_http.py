"""A pool of three real fake A1111 servers over HTTP, scheduled by the real JobManager: one dies mid-burst
(its server killed with generations in progress), one is slow. Per-backend limits hold at the servers,
nothing reaches a server twice, jobs move only before a server accepted them, and the dead one is probed back
in once it restarts."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import aiohttp

from bot.backends import create_pool
from bot.backends.http import RetryPolicy
from bot.engine.manager import BACKEND_LOST, JobManager
from bot.engine.models import ImageRequest, Job, JobState
from bot.settings import load_settings
from tests.fakes.a1111 import FakeA1111

CONCURRENCY = {"steady": 2, "slow": 1, "doomed": 2}


async def until(predicate, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def settle(manager: JobManager, jobs: list[Job]) -> None:
    for job in jobs:
        await manager.wait(job.id)


async def test_three_backends_one_dies_one_is_slow(session: aiohttp.ClientSession, tmp_path) -> None:
    fakes = {
        "steady": FakeA1111(delay=0.15),
        "slow": FakeA1111(delay=0.6),
        "doomed": FakeA1111(delay=30.0),  # its generations are still running when it dies
    }
    for fake in fakes.values():
        await fake.start()
    try:
        entries = [
            {"name": name, "kind": "a1111", "url": fake.url, "concurrency": CONCURRENCY[name]}
            for name, fake in fakes.items()
        ]
        settings = load_settings(env_file=None, image_backends=json.dumps(entries), data_dir=tmp_path)
        pool = create_pool(
            settings, session, retry=RetryPolicy(attempts=1), poll_interval_s=0.05, probe_interval_s=0.05
        )
        manager = JobManager.from_settings(settings, pool)
        for entry in pool:
            assert entry.catalog is not None
            await entry.catalog.refresh()  # each entry serves what it lists (the service starts these)
        try:
            burst = [
                await manager.submit(ImageRequest(prompt=f"burst {i}", fresh=True), guild_id=i % 3, user_id=i)
                for i in range(14)
            ]
            doomed = fakes["doomed"]
            await until(lambda: doomed.state.active == CONCURRENCY["doomed"])
            await doomed.kill()  # crashes with two generations it accepted
            await until(lambda: not pool["doomed"].up)  # taken out after failures in a row
            doomed.configure(delay=0.1)
            await settle(manager, burst)

            # Nothing reached a server twice; every generation reached exactly one.
            seen = Counter(p for fake in fakes.values() for p in fake.state.prompts)
            assert all(count == 1 for count in seen.values()), seen
            lost = [job for job in burst if job.state is JobState.FAILED]
            done = [job for job in burst if job.state is JobState.SUCCEEDED]
            assert len(lost) + len(done) == len(burst)
            # The two it had accepted failed with a clear message (never resubmitted); the rest succeeded,
            # some after being refused at "doomed"'s closed port (moved before acceptance).
            assert len(lost) == 2
            assert all(job.error_message == BACKEND_LOST for job in lost)
            assert {p for p in doomed.state.prompts} == {job.request.prompt for job in lost}
            assert all(job.backend in ("steady", "slow") for job in done)
            assert pool["doomed"].outcomes["failed_over"] >= 1
            assert pool["doomed"].outcomes["failed"] == 2
            assert sum(1 for job in done if job.backend == "slow") >= 1  # the slow one did its share
            # Limits held at the servers themselves.
            for name, fake in fakes.items():
                assert fake.state.max_active <= CONCURRENCY[name], name

            # It comes back: its health request answers, it is back in the pool, and it serves again.
            await doomed.start()
            await until(lambda: pool["doomed"].up)
            assert doomed.state.options_calls >= 1
            again = [
                await manager.submit(ImageRequest(prompt=f"again {i}", fresh=True), guild_id=i, user_id=i)
                for i in range(6)
            ]
            await settle(manager, again)
            assert all(job.state is JobState.SUCCEEDED for job in again)
            assert any(job.backend == "doomed" for job in again)
            for name, fake in fakes.items():
                assert fake.state.max_active <= CONCURRENCY[name], name
            manager.check_invariants()
        finally:
            await manager.shutdown(0)
            assert not pool.probing
    finally:
        for fake in fakes.values():
            await fake.close()
