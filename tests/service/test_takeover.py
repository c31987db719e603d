"""Issue 11: a process that dies (SIGKILL) has its jobs answered for by a surviving process within the lease,
not at its own restart (bot/service/fleet.py's Takeover, bot/engine/recovery.py's decisions).

Two real ``python -m bot`` processes (SHARD_COUNT=2: A runs shard 0, B shard 1) on one real PostgreSQL, the
fake Discord, and a fake backend slow enough that A has jobs running and queued when it is killed.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.fakes.discord import FakeDiscord, FakeInteraction
from tests.fakes.horde import FakeHorde
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import embed_author, image_attachments, is_done
from tests.frontend.process import assert_clean, bot_process
from tests.service.conftest import TTL, two_shard_fleet

#: What "within the lease" allows: LEASE_TTL_S, plus the watcher's period (TTL / 3) and slack for a loaded host.
TAKEOVER_BOUND_S = TTL + 10


def labels(message: Any) -> list[str]:
    return [c.get("label") for row in message.components for c in row.get("components", [])]


def is_final(message: Any) -> bool:
    """What a member may be left with: the image, or "interrupted" with a Reroll button."""
    return is_done(message) or ("Interrupted" in embed_author(message) and "Reroll" in labels(message))


class Slow:
    """The backend, slowed so that jobs are running (and others queued) when the process dies, then sped up
    for whoever finishes them; it counts generations per prompt."""

    def __init__(self, kind: str, server: FakeOpenAI | FakeHorde) -> None:
        self.kind = kind
        self.server = server

    def running(self) -> int:
        """Generations under way at the backend whose id, if it hands one out, the bot has stored."""
        if isinstance(self.server, FakeHorde):
            # A Horde id is stored before the first status poll (the bot's on_submitted).
            return sum(1 for req in self.server.requests.values() if req.checks >= 1)
        return self.server.state.generations

    def speed_up(self) -> None:
        if isinstance(self.server, FakeHorde):
            self.server.configure(checks_until_done=0)
        else:
            self.server.configure(delay=0.2)

    def per_prompt(self) -> Counter[str]:
        """Generations submitted, by prompt (a follow-up by id submits nothing)."""
        if isinstance(self.server, FakeHorde):
            return Counter(
                req.payload["prompt"].split("###")[0].strip() for req in self.server.requests.values()
            )
        return Counter(payload["prompt"] for payload in self.server.state.payloads)


@pytest.fixture(params=["openai", "horde"], ids=["openai-interrupted", "horde-followed-up"])
async def slow(request: pytest.FixtureRequest) -> AsyncIterator[Slow]:
    if request.param == "openai":
        async with FakeOpenAI(delay=60) as server:
            yield Slow("openai", server)
    else:
        async with FakeHorde(checks_until_done=10_000) as server:
            yield Slow("horde", server)


async def final_of(fake: FakeDiscord, inter: FakeInteraction, timeout: float) -> Any:
    """The interaction's own message once final (its ``@original``: other jobs post in the same channel)."""
    await fake.wait_for_state(lambda: inter.original and is_final(inter.original), timeout, "a final message")
    return inter.original


def took_over(text: str) -> list[str]:
    return [line for line in text.splitlines() if "took over the jobs of a dead process" in line]


async def test_a_sigkilled_processs_running_and_queued_jobs_are_finished_or_reported_by_the_survivor(
    fake, slow, data_dir, pg_url
) -> None:
    a_guild = fake.add_guild(fake.guild_id_on_shard(0, 2), name="a")
    fake.add_guild(fake.guild_id_on_shard(1, 2), name="b")
    common = two_shard_fleet(slow.kind, slow.server.url, pg_url, guild_concurrency=2, backend_concurrency=4)
    prompts = [f"picture number {i}" for i in range(4)]
    async with bot_process(fake, data_dir, shard_ids=1, **common) as b:
        async with bot_process(fake, data_dir, shard_ids=0, **common) as a:
            interactions: list[FakeInteraction] = []
            for prompt in prompts:
                user = fake.add_member(a_guild.id)
                interactions.append(
                    await fake.invoke_command(
                        a_guild.id, a_guild.channels[0].id, user.id, "imagine", {"prompt": prompt}
                    )
                )
            # Two generating (the guild's concurrency), two queued behind them: whichever two reached the
            # queue first (four interactions are handled at once), not necessarily the first two sent.
            await fake.wait_for_state(lambda: slow.running() == 2, 20, "two generations under way")

            def queued() -> list[bool]:
                return [bool(i.original and "Queued" in embed_author(i.original)) for i in interactions]

            await fake.wait_for_state(lambda: sum(queued()) == 2, 20, "two queued")
            was_queued = queued()
            a.kill()  # SIGKILL, mid-burst: no drain, the row and the jobs stay
            assert await a.wait(10) == -9
        killed_at = asyncio.get_running_loop().time()
        assert not any(is_final(inter.original) for inter in interactions)
        slow.speed_up()

        try:
            async with asyncio.timeout(TAKEOVER_BOUND_S):
                while not took_over(b.text):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"B took nothing over in {TAKEOVER_BOUND_S} s:\n{b.text}") from None
        claimed_after_s = asyncio.get_running_loop().time() - killed_at
        (line,) = took_over(b.text)
        assert "jobs=4" in line and f"pid {a.proc.pid}" in line, line
        # Every job of A's ends final, posted by B (A is dead): queued ones ran in B; running ones were
        # followed up by their Horde id, or (OpenAI keeps no id) reported interrupted with a Reroll button.
        finals = [await final_of(fake, inter, timeout=30) for inter in interactions]
        if slow.kind == "horde":
            assert all(image_attachments(message) for message in finals)
            assert "resumed=4" in line and "interrupted=0" in line
        else:
            assert [is_done(message) for message in finals] == was_queued  # the queued ones ran in B
            assert "resumed=2" in line and "interrupted=2" in line
        assert slow.per_prompt() == Counter(prompts)  # none ran twice (nor was submitted again)
        assert claimed_after_s <= TAKEOVER_BOUND_S

        # A restarted (a new incarnation with a new id) finds nothing of its old jobs to take.
        edits = len(fake.requests_matching("PATCH", r"/messages/@original$"))
        async with bot_process(fake, data_dir, shard_ids=0, **common) as restarted:
            assert await restarted.terminate() == 0
        assert not re.search(r"recovered unfinished jobs|left by a dead process|interrupted", restarted.text)
        assert len(fake.requests_matching("PATCH", r"/messages/@original$")) == edits
        assert slow.per_prompt() == Counter(prompts)
        assert await b.terminate() == 0
    assert_clean(b.text)
    assert_clean(restarted.text)


async def test_a_request_waiting_for_a_killed_processs_generation_is_answered_by_the_survivor(
    fake, slow, data_dir, pg_url
) -> None:
    """B waits for A's generation of the very same request (one generation for both); A is SIGKILLed
    mid-generation. On AI Horde the generation lives on: B takes A's job over, follows it up by its id, and
    both members get that one generation. On an OpenAI-compatible server it died with A: A's claim dies with
    its lease, A's member is told it was interrupted, and B generates the image itself, within the lease time."""
    a_guild = fake.add_guild(fake.guild_id_on_shard(0, 2), name="a")
    b_guild = fake.add_guild(fake.guild_id_on_shard(1, 2), name="b")
    common = two_shard_fleet(slow.kind, slow.server.url, pg_url)
    ask = {"prompt": "a kite over the dunes"}
    async with bot_process(fake, data_dir, shard_ids=1, **common) as b:
        async with bot_process(fake, data_dir, shard_ids=0, **common) as a:
            first = await fake.invoke_command(
                a_guild.id, a_guild.channels[0].id, fake.add_member(a_guild.id).id, "imagine", ask
            )
            await fake.wait_for_state(lambda: slow.running() == 1, 20, "A generating")
            second = await fake.invoke_command(
                b_guild.id, b_guild.channels[0].id, fake.add_member(b_guild.id).id, "imagine", ask
            )
            await fake.wait_for_state(
                lambda: second.original and "Queued" in embed_author(second.original), 20, "B waiting"
            )
            await asyncio.sleep(1.0)
            assert slow.per_prompt() == Counter({ask["prompt"]: 1})  # B waits for A's, asks nothing
            a.kill()
            assert await a.wait(10) == -9
        slow.speed_up()
        done = await final_of(fake, second, timeout=TAKEOVER_BOUND_S)
        assert is_done(done)  # not left waiting
        theirs = await final_of(fake, first, timeout=30)  # A's, answered by B
        if slow.kind == "horde":
            assert is_done(theirs)
            assert slow.per_prompt() == Counter({ask["prompt"]: 1})  # followed up, generated once
        else:
            assert "Interrupted" in embed_author(theirs)
            assert slow.per_prompt() == Counter({ask["prompt"]: 2})
        assert await b.terminate() == 0
    assert_clean(b.text)
