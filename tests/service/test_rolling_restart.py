"""Issue 11: rolling restarts lose nothing. SIGTERM to one process of the fleet: its running jobs finish and
post within the grace, its queued jobs are handed back (not cancelled) and the other process runs them; then
the same for the other one. Two real ``python -m bot`` processes (A runs shard 0, B shard 1) on one real
PostgreSQL, the fake Discord and a fake backend of 1 s per image, one at a time per process.
"""

from __future__ import annotations

from collections import Counter

from tests.fakes.discord import FakeInteraction
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import embed_author, image_attachments, is_done
from tests.frontend.process import assert_clean, bot_process
from tests.service.conftest import TTL

JOBS_PER_GUILD = 4


async def test_restarting_both_processes_one_by_one_during_a_burst_completes_every_job(
    fake, data_dir, pg_url
) -> None:
    a_guild = fake.add_guild(fake.guild_id_on_shard(0, 2), name="a")
    b_guild = fake.add_guild(fake.guild_id_on_shard(1, 2), name="b")
    async with FakeOpenAI(delay=1.0) as backend:
        common = {
            "image_backend": "openai",
            "image_backend_url": backend.url,
            "database_url": pg_url,
            "lease_ttl_s": TTL,
            "shard_count": 2,
            "guild_concurrency": 1,
            "backend_concurrency": 1,
            "shutdown_grace_s": 2,  # one image of 1 s fits; without the hand-back the queued ones would be cut
        }

        async def burst(guild) -> list[FakeInteraction]:  # type: ignore[no-untyped-def]
            sent = []
            for i in range(JOBS_PER_GUILD):
                user = fake.add_member(guild.id)
                prompt = f"{guild.name} picture {i}"
                sent.append(
                    await fake.invoke_command(
                        guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": prompt}
                    )
                )
            return sent

        def queued(inter: FakeInteraction) -> bool:
            return bool(inter.original) and "Queued" in embed_author(inter.original)

        async with bot_process(fake, data_dir, shard_ids=1, **common) as b:
            async with bot_process(fake, data_dir, shard_ids=0, **common) as a:
                a_jobs = await burst(a_guild)
                b_jobs = await burst(b_guild)
                await fake.wait_for_state(lambda: all(queued(i) for i in a_jobs[1:]), 20, "A's jobs queued")
                # SIGTERM to A with one job generating and three queued: exit 0 after the drain.
                assert await a.terminate() == 0
            assert "handing_back=True" in a.text, a.text
            # Restart A (a new incarnation), then SIGTERM to B in the middle of its own (and A's) jobs.
            async with bot_process(fake, data_dir, shard_ids=0, **common) as a2:
                await fake.wait_for_state(
                    lambda: sum(is_done(i.original) for i in a_jobs + b_jobs if i.original) >= 3,
                    60,
                    "progress",
                )
                assert await b.terminate() == 0
                assert "handing_back=True" in b.text, b.text
                finals = []
                for inter in a_jobs + b_jobs:
                    await fake.wait_for_state(
                        lambda i=inter: i.original and is_done(i.original), 90, "an image"
                    )
                    finals.append(inter.original)
                assert await a2.terminate() == 0
    # Every job of the burst ended with its image, none cancelled, none generated twice.
    assert all(image_attachments(message) for message in finals)
    assert not any("Stopped by a restart" in str(message.embeds) for message in finals)
    prompts = [f"{g} picture {i}" for g in ("a", "b") for i in range(JOBS_PER_GUILD)]
    assert Counter(payload["prompt"] for payload in backend.state.payloads) == Counter(prompts)
    for process in (a, b, a2):
        assert_clean(process.text)
