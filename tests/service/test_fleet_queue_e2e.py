"""The fleet's one queue end to end: two real bot processes (``python -m bot``, shards 0 and 1 of 2) on one
real PostgreSQL, one fake OpenAI images API they share, a burst of /imagine across eight servers (four on each
shard). The backend's capacity holds for the fleet, each server's limit holds, and the servers take turns across
both processes as one process would make them."""

from __future__ import annotations

from collections import Counter

from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import image_attachments, is_done
from tests.frontend.process import assert_clean, bot_process
from tests.service.conftest import two_shard_fleet

CAPACITY = 2
GUILDS_PER_SHARD = 4
JOBS_PER_GUILD = 4


async def test_two_processes_share_the_backend_capacity_and_take_turns_between_servers(
    fake, data_dir, pg_url
) -> None:
    guilds = [
        fake.add_guild(fake.guild_id_on_shard(shard, 2), name=f"s{shard}-{index}")
        for index in range(GUILDS_PER_SHARD)
        for shard in (0, 1)
    ]
    tag = {guild.id: f"guild{n}" for n, guild in enumerate(guilds)}
    async with FakeOpenAI(delay=0.3) as backend:
        common = two_shard_fleet(
            "openai",
            backend.url,
            pg_url,
            backend_concurrency=CAPACITY,  # each process's setting; the fleet's total
            guild_concurrency=1,
        )
        async with (
            bot_process(fake, data_dir, shard_ids=0, **common) as zero,
            bot_process(fake, data_dir, shard_ids=1, **common) as one,
        ):
            interactions = []
            for round_ in range(JOBS_PER_GUILD):  # interleaved, as a burst over many servers arrives
                for guild in guilds:
                    member = fake.add_member(guild.id)
                    interactions.append(
                        await fake.invoke_command(
                            guild.id,
                            guild.channels[0].id,
                            member.id,
                            "imagine",
                            {"prompt": f"{tag[guild.id]} picture {round_}"},
                        )
                    )
            for inter in interactions:
                await fake.wait_for_state(
                    lambda i=inter: i.original and is_done(i.original), 60, "every image"
                )
                assert image_attachments(inter.original)
            assert await zero.terminate() == 0 and await one.terminate() == 0
        starts = [payload["prompt"].split()[0] for payload in backend.state.payloads]
    assert len(starts) == len(interactions)
    # Each process alone would allow CAPACITY at once: together they get CAPACITY, not twice that.
    assert backend.state.max_in_flight <= CAPACITY
    # Turns across the fleet: in every 20 starts each server gets its 20 / 8 = 2.5 starts (2 or 3, as one
    # process gives), within one. A queue per process, or first-come turns, lets some servers run all four
    # while others wait.
    window = min(20, len(starts))
    for begin in range(len(starts) - window + 1):
        counts = Counter(starts[begin : begin + window])
        share = window / len(guilds)
        for name in tag.values():
            assert int(share) - 1 <= counts[name] <= int(share) + 2, (begin, counts, starts)
    assert Counter(starts) == Counter({name: JOBS_PER_GUILD for name in tag.values()})
    for process in (zero, one):
        assert_clean(process.text)


async def test_the_same_prompt_in_servers_on_both_shards_is_generated_once(fake, data_dir, pg_url) -> None:
    """Two real processes, one shared DATA_DIR and database: /imagine with one prompt in a server of each
    shard, the second while the first is being generated. The backend is asked once; both get the image."""
    here = fake.add_guild(fake.guild_id_on_shard(0, 2), name="shard-0")
    there = fake.add_guild(fake.guild_id_on_shard(1, 2), name="shard-1")
    async with FakeOpenAI(delay=2.0) as backend:
        common = two_shard_fleet("openai", backend.url, pg_url)
        async with (
            bot_process(fake, data_dir, shard_ids=0, **common) as zero,
            bot_process(fake, data_dir, shard_ids=1, **common) as one,
        ):
            ask = {"prompt": "a paper boat on a puddle"}
            first = await fake.invoke_command(
                here.id, here.channels[0].id, fake.add_member(here.id).id, "imagine", ask
            )
            await fake.wait_for_state(lambda: len(backend.state.payloads) == 1, 30, "the first generation")
            second = await fake.invoke_command(
                there.id, there.channels[0].id, fake.add_member(there.id).id, "imagine", ask
            )
            for inter in (first, second):
                await fake.wait_for_state(
                    lambda i=inter: i.original and is_done(i.original), 60, "both images"
                )
            assert len(backend.state.payloads) == 1  # without the shared fill: two generations
            assert [a.data for a in image_attachments(first.original)] == [
                a.data for a in image_attachments(second.original)
            ]
            assert await zero.terminate() == 0 and await one.terminate() == 0
    for process in (zero, one):
        assert_clean(process.text)
