"""The IdentifyGate's decisions (which shard waits before its IDENTIFY, and how long), on a manual clock.

Sleeping is injected: the test's sleep records the delay and moves the clock by it, so a 5 s wait takes no
time and is seen exactly.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.frontend.identify import IDENTIFY_INTERVAL_S, IdentifyGate, max_concurrency_of

#: What the gate keeps between two IDENTIFYs of one key: Discord's 5 s and a margin for the wire.
W = IDENTIFY_INTERVAL_S


class ManualTime:
    """A clock that moves only by ``advance`` and by the sleeps it records."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # a real sleep yields too


def gate(time: ManualTime, max_concurrency: int | None) -> IdentifyGate:
    g = IdentifyGate(clock=time.clock, sleep=time.sleep)
    g.configure(max_concurrency)
    return g


async def launch(g: IdentifyGate, time: ManualTime, shard_ids: list[int]) -> list[tuple[int, float]]:
    """Shards identified one after another, as discord.py launches them: (shard, when its IDENTIFY went)."""
    went = []
    for index, shard in enumerate(shard_ids):
        await g.wait(shard, initial=index == 0)
        went.append((shard, time.now - 100.0))
    return went


async def test_unknown_max_concurrency_keeps_discord_pys_rule_5_s_before_all_but_the_initial() -> None:
    t = ManualTime()
    g = gate(t, None)
    assert await launch(g, t, [0, 1, 2]) == [(0, 0.0), (1, 5.0), (2, 10.0)]
    assert t.sleeps == [5.0, 5.0]
    await g.wait(1)  # a re-identify, however late: discord.py sleeps 5 s
    assert t.sleeps == [5.0, 5.0, 5.0]


async def test_max_concurrency_1_spaces_every_identify_by_the_interval() -> None:
    assert W > 5.0  # Discord's window is 5 s between arrivals; the gate keeps a margin over it
    t = ManualTime()
    assert await launch(gate(t, 1), t, [0, 1, 2, 3]) == [(0, 0.0), (1, W), (2, 2 * W), (3, 3 * W)]
    assert t.sleeps == [W, W, W]


async def test_max_concurrency_4_lets_4_shards_identify_at_once() -> None:
    t = ManualTime()
    g = gate(t, 4)
    assert await launch(g, t, [0, 1, 2, 3]) == [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0)]
    assert t.sleeps == []
    assert dict(g.last_identify) == {0: 100.0, 1: 100.0, 2: 100.0, 3: 100.0}


async def test_max_concurrency_2_holds_back_only_the_shard_whose_key_went_less_than_5_s_ago() -> None:
    t = ManualTime()
    g = gate(t, 2)
    # Shard 2 shares key 0 with shard 0 and waits; shard 3 (key 1) comes after that wait, when key 1's
    # window (opened by shard 1 at 0 s) has passed too.
    assert await launch(g, t, [0, 1, 2, 3]) == [(0, 0.0), (1, 0.0), (2, W), (3, W)]
    assert t.sleeps == [W]
    assert [g.key(shard) for shard in range(4)] == [0, 1, 0, 1]


async def test_a_process_running_shards_5_to_7_groups_them_by_their_own_keys() -> None:
    t = ManualTime()  # SHARD_IDS=5,6,7 of 8 with max_concurrency 2: keys 1, 0, 1
    assert await launch(gate(t, 2), t, [5, 6, 7]) == [(5, 0.0), (6, 0.0), (7, W)]


async def test_a_re_identify_waits_only_for_what_is_left_of_its_keys_window() -> None:
    t = ManualTime()
    g = gate(t, 2)
    await launch(g, t, [0, 1])
    t.advance(2.0)
    await g.wait(0)  # shard 0 lost its session 2 s after identifying
    assert t.sleeps == [pytest.approx(W - 2.0)]
    t.advance(60.0)
    await g.wait(1)  # a minute later: the window is long over
    assert len(t.sleeps) == 1


async def test_two_shards_of_one_key_waiting_together_go_in_turn_not_both_when_the_window_ends() -> None:
    t = ManualTime()
    g = gate(t, 2)
    await launch(g, t, [0])  # key 0 opens its window at 0 s
    t.advance(1.0)
    went: dict[int, float] = {}

    async def shard(shard_id: int) -> None:
        await g.wait(shard_id)
        went[shard_id] = t.now - 100.0

    await asyncio.gather(shard(2), shard(4))  # both key 0, both asking at 1 s
    assert went == {2: pytest.approx(W), 4: pytest.approx(2 * W)}
    assert t.sleeps == [pytest.approx(W - 1.0), W]


async def test_reconfiguring_regroups_the_keys() -> None:
    t = ManualTime()
    g = gate(t, 1)
    await launch(g, t, [0])
    g.configure(1)  # the same answer again: what it knows stays
    await g.wait(1)
    assert t.sleeps == [W]
    g.configure(4)  # keys mean something else now
    await g.wait(1)
    assert t.sleeps == [W]


def test_max_concurrency_is_read_from_session_start_limit_and_anything_odd_is_unknown() -> None:
    limits = {"total": 1000, "remaining": 999, "reset_after": 1, "max_concurrency": 16}
    assert max_concurrency_of(limits) == 16
    for odd in (None, {}, {"max_concurrency": 0}, {"max_concurrency": "4"}, {"max_concurrency": True}):
        assert max_concurrency_of(odd) is None
    g = IdentifyGate()
    g.configure(0)
    assert g.max_concurrency is None and g.key(3) is None


@settings(max_examples=200, deadline=None)
@given(
    max_concurrency=st.integers(min_value=1, max_value=5),
    steps=st.lists(
        st.tuples(st.integers(min_value=0, max_value=9), st.floats(min_value=0, max_value=12)),
        min_size=1,
        max_size=25,
    ),
)
def test_identifies_of_one_key_are_never_closer_than_5_s_and_never_held_longer_than_needed(
    max_concurrency: int, steps: list[tuple[int, float]]
) -> None:
    """Any order of shards and pauses: each IDENTIFY goes at max(now, its key's last + the interval)."""

    async def run() -> None:
        t = ManualTime()
        g = gate(t, max_concurrency)
        last: dict[int, float] = {}
        for shard, pause in steps:
            t.advance(pause)
            key = shard % max_concurrency
            expected = max(t.now, last.get(key, float("-inf")) + IDENTIFY_INTERVAL_S)
            await g.wait(shard)
            assert t.now == pytest.approx(expected)
            last[key] = t.now

    asyncio.run(run())
