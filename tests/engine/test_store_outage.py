"""The PostgreSQL store while its database is away (bot/engine/store_pg.py, "A database that goes away"):
calls fail at once without opening sockets, one reconnect task tries at a bounded, doubling cadence, the
operator hears of it once, and the store heals by itself.

The outage is a TCP proxy in front of the session's real PostgreSQL (tests/fakes/tcp_proxy.py) that the test
cuts and mends: connection attempts are counted on the wire, and the reconnect task's waits go through an
injected ``sleep`` the test steps by hand, so the cadence is checked by counting, never by timing.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot.engine.store import StoreError
from bot.engine.store_pg import PgJobStore
from tests.engine.test_store import make_job
from tests.fakes.tcp_proxy import TcpProxy
from tests.helpers import until
from tests.pg import PASSWORD, PgCluster

OUTAGE_LINE = "PostgreSQL unreachable; calls fail at once until it answers again (retrying every 5 s at most)"


class Steps:
    """An injected ``sleep``: records each wait and returns only when the test calls :meth:`go`."""

    def __init__(self) -> None:
        self.waits: list[float] = []
        self._go: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        await self._go.get()

    def go(self) -> None:
        self._go.put_nowait(None)


async def test_while_postgresql_is_away_calls_fail_at_once_and_one_task_reconnects_at_a_bounded_cadence(
    pg_cluster: PgCluster, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bot.engine.store_pg")
    steps = Steps()
    now = [1000.0]
    async with TcpProxy(pg_cluster.host, pg_cluster.port) as proxy:
        store = PgJobStore(proxy.url(pg_url), connect_timeout_s=2, sleep=steps.sleep, clock=lambda: now[0])
        await store.open()
        try:
            await store.save_job(make_job("before"))
            assert store.reachable and store.outage is None
            proxy.cut()
            with pytest.raises(StoreError, match="Cannot reach the PostgreSQL database") as info:
                await store.get_job("before")
            assert PASSWORD not in info.value.message
            assert store.outage is not None and not store.reachable
            await until(lambda: steps.waits == [0.5])  # the reconnect task waits before its first try
            tried = proxy.accepted

            # Callers while it is away fail at once with the same sentence, and none opens a socket.
            for i in range(50):
                with pytest.raises(StoreError, match="Cannot reach the PostgreSQL database"):
                    await store.save_job(make_job(f"during-{i}"))
            assert await store.ping() is False
            assert proxy.accepted == tried

            # One connection attempt per try, after a wait that doubles up to reconnect_max_s.
            for n in range(1, 7):
                steps.go()
                await until(lambda n=n: len(steps.waits) == n + 1)
                assert proxy.accepted == tried + n
            assert steps.waits == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
            assert store.outage.tries == 6

            now[0] += 42.0
            proxy.mend()
            steps.go()
            await until(lambda: store.reachable)
            assert proxy.accepted == tried + 7
            job = await store.get_job("before")  # the same store, not reopened
            assert job is not None and job.id == "before"
            await store.save_job(make_job("after"))
            assert await store.ping() is True
            assert len(steps.waits) == 7  # no try once it answers
        finally:
            await store.close()

    lines = [
        (r.levelname, r.getMessage(), getattr(r, "tries", None), getattr(r, "away_s", None))
        for r in caplog.records
        if r.levelno >= logging.INFO
    ]
    assert [line for line in lines if "reachable" in line[1]] == [
        ("WARNING", OUTAGE_LINE, None, None),
        ("INFO", "PostgreSQL reachable again", 7, 42.0),
    ]
    assert PASSWORD not in caplog.text


async def test_an_outage_seen_by_many_callers_at_once_is_one_outage_with_bounded_attempts(
    pg_cluster: PgCluster, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Twenty writers busy when the database goes: each call tries at most twice (its connection, then a
    fresh one), the operator reads one line, and one reconnect task runs."""
    caplog.set_level(logging.INFO, logger="bot.engine.store_pg")
    steps = Steps()
    async with TcpProxy(pg_cluster.host, pg_cluster.port) as proxy:
        store = PgJobStore(proxy.url(pg_url), max_size=20, connect_timeout_s=2, sleep=steps.sleep)
        await store.open()
        try:
            await asyncio.gather(*(store.save_job(make_job(f"warm-{i}")) for i in range(20)))
            proxy.cut()
            tried = proxy.accepted
            results = await asyncio.gather(
                *(store.save_job(make_job(f"busy-{i}")) for i in range(20)), return_exceptions=True
            )
            assert all(isinstance(result, StoreError) for result in results)
            assert proxy.accepted - tried <= 2 * 20
            await until(lambda: steps.waits == [0.5])
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [OUTAGE_LINE]
        finally:
            await store.close()


async def test_a_store_that_the_lease_uses_reports_an_outage_at_debug_only(
    pg_cluster: PgCluster, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A second pool on the same database (the fleet lease's) must not say again what the job store says."""
    caplog.set_level(logging.DEBUG, logger="bot.engine.store_pg")
    steps = Steps()
    async with TcpProxy(pg_cluster.host, pg_cluster.port) as proxy:
        store = PgJobStore(proxy.url(pg_url), report_outages=False, connect_timeout_s=2, sleep=steps.sleep)
        await store.open()
        try:
            proxy.cut()
            with pytest.raises(StoreError):
                await store.get_meta("k")
            proxy.mend()
            steps.go()
            await until(lambda: store.reachable)
        finally:
            await store.close()
    outage = [r for r in caplog.records if "reachable" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in outage] == [
        (logging.DEBUG, OUTAGE_LINE),
        (logging.DEBUG, "PostgreSQL reachable again"),
    ]


async def test_closing_a_store_while_the_database_is_away_stops_its_reconnect_task(
    pg_cluster: PgCluster, pg_url: str
) -> None:
    steps = Steps()
    async with TcpProxy(pg_cluster.host, pg_cluster.port) as proxy:
        store = PgJobStore(proxy.url(pg_url), connect_timeout_s=2, sleep=steps.sleep)
        await store.open()
        proxy.cut()
        with pytest.raises(StoreError):
            await store.get_meta("k")
        await until(lambda: steps.waits == [0.5])
        tasks = {t.get_name() for t in asyncio.all_tasks()}
        assert "pg-reconnect" in tasks
        await store.close()
        assert "pg-reconnect" not in {t.get_name() for t in asyncio.all_tasks()}
        assert store.outage is None and not store.reachable
        with pytest.raises(StoreError, match="not open"):
            await store.get_meta("k")
