"""One loop timer for many deadlines: order, cancellation, compaction, and no timer left behind after close."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot.engine.deadlines import Deadlines


def _timers(loop: asyncio.AbstractEventLoop) -> int:
    return sum(1 for handle in loop._scheduled if not handle.cancelled())  # type: ignore[attr-defined]


async def test_deadlines_fire_in_time_order_through_one_loop_timer() -> None:
    deadlines = Deadlines()
    fired: list[str] = []
    loop = asyncio.get_running_loop()
    before = _timers(loop)
    for name, delay in (("c", 0.03), ("a", 0.01), ("b", 0.02), ("a2", 0.01)):
        deadlines.after(delay, lambda name=name: fired.append(name))
    assert _timers(loop) - before == 1
    assert len(deadlines) == 4
    await asyncio.sleep(0.08)
    assert fired == ["a", "a2", "b", "c"]  # ties keep arming order
    assert len(deadlines) == 0
    assert _timers(loop) == before


async def test_a_cancelled_deadline_never_fires_and_its_idle_timer_fires_once_then_nothing() -> None:
    deadlines = Deadlines()
    fired: list[int] = []
    loop = asyncio.get_running_loop()
    before = _timers(loop)
    first = deadlines.after(0.01, lambda: fired.append(1))
    second = deadlines.after(0.02, lambda: fired.append(2))
    first.cancel()
    first.cancel()  # idempotent
    assert len(deadlines) == 1
    second.cancel()
    assert len(deadlines) == 0
    assert _timers(loop) - before <= 1  # the loop timer may stay armed, idle
    await asyncio.sleep(0.04)
    assert fired == []
    assert not first.active and not second.active
    assert _timers(loop) == before  # it fired once, found nothing and armed nothing


async def test_arming_and_cancelling_one_deadline_after_another_arms_the_loop_timer_once() -> None:
    """A job arms its timeout and cancels it a moment later, thousands of times: one loop timer serves them all
    rather than one armed and cancelled per job."""
    deadlines = Deadlines()
    loop = asyncio.get_running_loop()
    before = _timers(loop)
    armed = 0
    real_call_at = loop.call_at

    def counting_call_at(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal armed
        armed += 1
        return real_call_at(*args, **kwargs)

    loop.call_at = counting_call_at  # type: ignore[method-assign]
    try:
        for _ in range(100):
            deadlines.after(60.0, lambda: None).cancel()
    finally:
        del loop.call_at  # type: ignore[method-assign]
    assert armed == 1
    assert _timers(loop) - before == 1
    deadlines.close()
    assert _timers(loop) == before


async def test_many_cancelled_deadlines_are_compacted_and_the_live_ones_still_fire() -> None:
    deadlines = Deadlines()
    fired: list[int] = []
    handles = [deadlines.after(0.02, lambda i=i: fired.append(i)) for i in range(300)]
    for handle in handles[:250]:
        handle.cancel()
    assert len(deadlines) == 50
    assert len(deadlines._heap) < 300  # compacted, not 250 dead entries kept
    await asyncio.sleep(0.05)
    assert fired == list(range(250, 300))


async def test_a_deadline_armed_earlier_than_the_pending_timer_reschedules_it() -> None:
    deadlines = Deadlines()
    fired: list[str] = []
    deadlines.after(10.0, lambda: fired.append("late"))
    deadlines.after(0.0, lambda: fired.append("now"))
    await asyncio.sleep(0.02)
    assert fired == ["now"]
    assert len(deadlines) == 1
    deadlines.close()
    assert len(deadlines) == 0


async def test_a_failing_callback_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deadlines = Deadlines()
    fired: list[str] = []

    def boom() -> None:
        raise RuntimeError("boom")

    deadlines.after(0.0, boom)
    deadlines.after(0.0, lambda: fired.append("after"))
    with caplog.at_level(logging.ERROR, logger="bot.engine.deadlines"):
        await asyncio.sleep(0.02)
    assert fired == ["after"]
    assert "deadline callback failed" in caplog.text


async def test_a_deadline_may_carry_the_one_argument_its_callback_takes() -> None:
    deadlines = Deadlines()
    fired: list[object] = []
    marker = object()
    deadlines.after(0.01, fired.append, marker)
    deadlines.after(0.01, fired.append, None)  # None is an argument like any other
    deadlines.after(0.02, lambda: fired.append("no argument"))
    await asyncio.sleep(0.05)
    assert fired == [marker, None, "no argument"]
