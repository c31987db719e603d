"""A lost host (powered off, cut off the network) closes none of its connections: PostgreSQL keeps its sessions
open, in the middle of whatever transaction they were in, until TCP keepalive gives up (hours). The fleet's
takeover (bot/service/fleet.py) ends them. Real PostgreSQL; the lost host is a session of the test's own that
never speaks again. (The dispatcher's lock held by a lost host: tests/service/test_dispatch.py.)"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import pytest

from bot.engine.models import ImageRequest, Job
from bot.engine.recovery import RecoveryReport
from bot.engine.store import StoreError
from bot.engine.store_pg import CLAIM_LOCK_KEY, FleetProcess, PgJobStore, session_name
from bot.service.fleet import ProcessLease, Takeover

TTL = 3.0


async def test_a_takeover_round_first_ends_a_lost_hosts_session_holding_the_claim_lock(pg_url: str) -> None:
    """The worst moment to lose a host: inside its claim transaction, holding the lock every claim takes. The
    takeover's next round ends the dead process's sessions first (that statement takes no lock), so it is not
    stuck behind that lock for hours, and the dead process's jobs are taken."""
    survivor = PgJobStore(pg_url, session_name=session_name("survivor"), command_timeout_s=5)
    await survivor.open()
    lease = ProcessLease(survivor, FleetProcess("survivor", "host", 1, 2, (0,)), ttl_s=TTL)
    await lease.start()
    survivor.join_fleet("survivor", ttl_s=TTL)
    lost = await asyncpg.connect(pg_url, server_settings={"application_name": session_name("lost")})
    try:
        # What the lost process had written before: its row and a queued job of its own.
        await lost.execute(
            "INSERT INTO processes (id, host, pid, shard_count, shard_ids) VALUES ('lost', 'h', 2, 2, '{1}')"
        )
        writer = PgJobStore(pg_url)
        await writer.open()
        writer.join_fleet("lost", ttl_s=TTL)
        await writer.save_job(
            Job(id="left-behind", request=ImageRequest("a red fox"), guild_id=1 << 22, user_id=10)
        )
        await writer.close()
        await lost.execute("BEGIN")
        await lost.execute("SELECT pg_advisory_xact_lock($1)", CLAIM_LOCK_KEY)  # and then its host is lost
        await survivor.run(
            lambda conn: conn.execute(
                "UPDATE processes SET heartbeat_at = now() - interval '1 minute' WHERE id = 'lost'"
            ),
            action="age a row in",
        )
        recovered: list[list[str]] = []

        async def recover(jobs: list[Job]) -> RecoveryReport:
            recovered.append([j.id for j in jobs])
            return RecoveryReport(resumed=[j.id for j in jobs])

        taken = await asyncio.wait_for(Takeover(survivor, lease).sweep(recover), timeout=4)
        assert taken == 1 and recovered == [["left-behind"]]
        named = await survivor.run(
            lambda conn: conn.fetch(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = $1", session_name("lost")
            ),
            action="look at",
        )
        assert named == []
    finally:
        lost.terminate()
        await lease.close()
        await survivor.close()


async def test_a_round_that_cannot_end_sessions_still_takes_a_dead_processs_jobs(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Ending sessions is a help, not a gate: should that statement fail, the round goes on and claims."""
    caplog.set_level(logging.INFO, logger="bot.service.fleet")
    survivor = PgJobStore(pg_url, session_name=session_name("survivor"))
    await survivor.open()
    lease = ProcessLease(survivor, FleetProcess("survivor", "host", 1, 2, (0,)), ttl_s=TTL)
    await lease.start()
    survivor.join_fleet("survivor", ttl_s=TTL)
    try:
        writer = PgJobStore(pg_url)
        await writer.open()
        writer.join_fleet("dead", ttl_s=TTL)  # a process whose row is gone already: its job has no live owner
        await writer.save_job(
            Job(id="orphan", request=ImageRequest("a red fox"), guild_id=1 << 22, user_id=10)
        )
        await writer.close()

        async def refused() -> int:
            raise StoreError("permission denied for function pg_terminate_backend")

        survivor.end_dead_sessions = refused  # type: ignore[method-assign]

        async def recover(jobs: list[Job]) -> RecoveryReport:
            return RecoveryReport(resumed=[j.id for j in jobs])

        assert await Takeover(survivor, lease).sweep(recover) == 1
        assert "could not end the sessions of dead processes: permission denied" in caplog.text
    finally:
        await lease.close()
        await survivor.close()
