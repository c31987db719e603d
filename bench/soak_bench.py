"""Soak benchmark: does the bot's memory stay flat as jobs go by? (issue 8, defect 11)

    python -m bench.soak_bench [--jobs 3000] [--warmup 200] [--guilds 20] [--wave 50] [--cache]

The real bot (``python -m bot``, a subprocess) against the in-process fake Discord and fake OpenAI images API.
Jobs go in waves of ``--wave`` over ``--guilds`` servers (a few members each, reused, as in a real server);
one in ten fails at the backend and one in ten is cancelled by its owner while it waits. After ``--warmup``
jobs the bot's RSS (``VmRSS`` in ``/proc/<pid>/status``) is sampled after every wave, once the wave's messages
are final and a short pause has let the bot settle. Reported: RSS after the warm-up, at the half and at the
end, and the growth per job over the second half. Target: <= 0.5 KB per job (flat).

By default the result cache is off (``CACHE_TTL_S=0``): its in-memory LRU holds up to 64 MB of recent images by
design, which would read as growth here. ``--cache`` turns it on to see the whole bot as shipped.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import (
    TOKEN,
    BenchError,
    CountingOpenAI,
    bot_env,
    child,
    job_state,
    wait_until_connected,
)
from tests.fakes.discord import FakeDiscord, FakeInteraction

TARGET_KB_PER_JOB = 0.5
MEMBERS_PER_GUILD = 5


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError("no VmRSS in /proc status")


def settled(inter: FakeInteraction) -> bool:
    """The job's message is final (done, failed or cancelled), or it was refused."""
    state = job_state(inter)
    return state in {"done", "failed", "refused"}


async def run(options: argparse.Namespace) -> dict[str, float]:
    total = options.warmup + options.jobs
    with tempfile.TemporaryDirectory(prefix="soak-bench-") as tmp:
        data_dir = Path(tmp)
        async with FakeDiscord(token=TOKEN) as fake, CountingOpenAI(delay=options.backend_delay) as backend:
            guilds = [fake.add_guild(name=f"soak-{g}") for g in range(options.guilds)]
            members = {g.id: [fake.add_member(g.id) for _ in range(MEMBERS_PER_GUILD)] for g in guilds}
            settings: dict[str, object] = {
                "image_backend": "openai",
                "image_backend_url": backend.url,
                "backend_concurrency": 8,
                "user_max_jobs": options.wave,
                "shutdown_grace_s": 5,
            }
            if not options.cache:
                settings["cache_ttl_s"] = 0
            async with child(["-m", "bot"], bot_env(fake, data_dir, **settings), data_dir) as process:
                await wait_until_connected(fake, process)
                samples: list[tuple[int, int]] = []  # (jobs done, RSS KB)
                done = 0
                started = time.monotonic()
                while done < total:
                    inters = []
                    for n in range(min(options.wave, total - done)):
                        index = done + n
                        guild = guilds[index % len(guilds)]
                        member = members[guild.id][(index // len(guilds)) % MEMBERS_PER_GUILD]
                        if index % 10 == 3:
                            backend.state.fail_next.append((500, {"error": {"message": "soak failure"}}))
                        inter = await fake.invoke_command(
                            guild.id,
                            guild.channels[0].id,
                            member.id,
                            "imagine",
                            {"prompt": f"soak job {index}"},
                        )
                        if index % 10 == 7:
                            with_button = await inter.wait_until(lambda m: m.components, timeout=10)
                            cancel = fake.find_component(with_button, label="Cancel")
                            await fake.click_button(with_button, cancel, member.id)
                        inters.append(inter)
                    try:
                        await fake.wait_for_state(
                            lambda w=inters: all(settled(i) for i in w), 60, "soak wave"
                        )
                    except TimeoutError:
                        process.check_alive("soak")
                        raise BenchError("a wave did not finish within 60 s") from None
                    done += len(inters)
                    await asyncio.sleep(0.2)  # the last edits and writes settle before sampling
                    if done >= options.warmup:
                        samples.append((done, rss_kb(process.pid)))
                    if options.verbose:
                        print(f"{done:5d} jobs  RSS {rss_kb(process.pid) / 1024:.1f} MB", file=sys.stderr)
                wall = time.monotonic() - started
    start, end = samples[0], samples[-1]
    middle = min(samples, key=lambda s: abs(s[0] - (start[0] + end[0]) / 2))
    second_half = (end[1] - middle[1]) / max(1, end[0] - middle[0])
    whole = (end[1] - start[1]) / max(1, end[0] - start[0])
    return {
        "jobs": float(options.jobs),
        "rss_after_warmup_mb": start[1] / 1024,
        "rss_middle_mb": middle[1] / 1024,
        "rss_end_mb": end[1] / 1024,
        "kb_per_job_whole": whole,
        "kb_per_job_second_half": second_half,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--guilds", type=int, default=20)
    parser.add_argument("--wave", type=int, default=50)
    parser.add_argument("--backend-delay", type=float, default=0.0)
    parser.add_argument(
        "--cache", action="store_true", help="keep the result cache on (its LRU grows by design)"
    )
    parser.add_argument("--verbose", action="store_true")
    options = parser.parse_args(argv)
    figures = asyncio.run(run(options))
    print(
        f"soak: {int(figures['jobs'])} jobs after {options.warmup} warm-up over {options.guilds} servers "
        f"(cache {'on' if options.cache else 'off'}), {figures['wall_s']:.0f} s\n"
        f"  RSS after warm-up {figures['rss_after_warmup_mb']:.1f} MB, middle {figures['rss_middle_mb']:.1f} MB, "
        f"end {figures['rss_end_mb']:.1f} MB\n"
        f"  growth {figures['kb_per_job_whole']:.2f} KB/job overall, "
        f"{figures['kb_per_job_second_half']:.2f} KB/job in the second half (target <= {TARGET_KB_PER_JOB})"
    )
    return 0 if figures["kb_per_job_second_half"] <= TARGET_KB_PER_JOB else 1


if __name__ == "__main__":
    sys.exit(main())
