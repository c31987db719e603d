"""Discord benchmark: acknowledgement latency and CPU per job of the real bot under a burst of /imagine.

    python -m bench.discord_bench [--jobs 200] [--guilds 10] [--backend-delay 2] [--repeats 1]

1. The real bot (``python -m bot``, a subprocess) against an in-process fake Discord (REST + gateway) and a fake
   OpenAI images API that takes ``--backend-delay`` seconds per image, so most jobs are queued or running while
   the acknowledgements are measured. A burst of N ``/imagine`` (distinct prompts, distinct members, spread over
   G guilds) is dispatched at once; then ``--probes`` more, spread over the run, measure acks while the queue is
   full and results are being uploaded. Every job must end with an image, or the benchmark fails (exit 1).
2. The same burst against ``bench/bare_bot.py``: a bare discord.py bot whose /imagine only answers "ok".

Ack latency: real seconds from the fake sending INTERACTION_CREATE to the bot's callback reaching the fake
(``FakeInteraction.ack_latency``); the fake's 3 s deadline stays on, so a late ack is a failure, not a number.
CPU: the bot process's user+system time (``/proc/<pid>/stat``, threads included) from just before the burst
until the last job's final message, divided by the jobs. Wall: burst start to the last final message (bot) or
the last ack (bare). The fake Discord runs in this process and shares the machine: both bots pay for it alike.
``--deep N`` (issue 8): N jobs wait behind one slow backend (BACKEND_CONCURRENCY=1, ``--backend-delay`` s per
image, one guild); once every job is acknowledged and queued, the bot's CPU and its message edits are measured
over ``--window`` seconds while the queue moves (target: <= 5 % of a core).
``--profile FILE`` runs the bot under cProfile (slower; the figures are then not comparable) and prints the top
functions.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import (
    TOKEN,
    BenchError,
    CountingOpenAI,
    Process,
    bot_env,
    child,
    cpu_seconds,
    describe_unfinished,
    done_at,
    embed_author,
    job_state,
    percentile,
    tail,
    wait_until_connected,
)
from tests.fakes.discord import FakeDiscord, FakeGuild, FakeInteraction, FakeUser

# ----------------------------------------------------------------------------------------------- the run


@dataclass
class Result:
    label: str
    jobs: int
    acks: list[float]
    cpu_s: float
    wall_s: float
    fake_cpu_s: float
    probe_acks: list[float] = field(default_factory=list)
    peak_running: int | None = None
    peak_queued: int | None = None
    warnings: list[str] = field(default_factory=list)
    dispatch_s: float = 0.0  # how long the fake took to send the whole burst
    edits: int = 0  # PATCH @original (progress and result)
    rest_calls: int = 0  # every REST call the bot made during the burst

    @property
    def cpu_ms_per_job(self) -> float:
        return self.cpu_s * 1000 / self.jobs


@dataclass
class World:
    fake: FakeDiscord
    burst: list[tuple[FakeGuild, FakeUser]]
    probes: list[tuple[FakeGuild, FakeUser]]
    warmup: tuple[FakeGuild, FakeUser]


def make_world(fake: FakeDiscord, jobs: int, guilds: int, probes: int) -> World:
    all_guilds = [fake.add_guild(name=f"bench-{g}") for g in range(guilds)]

    def members(count: int) -> list[tuple[FakeGuild, FakeUser]]:
        return [(g, fake.add_member(g.id)) for g in (all_guilds[i % guilds] for i in range(count))]

    return World(fake, members(jobs), members(probes), members(1)[0])


async def invoke(world: World, who: tuple[FakeGuild, FakeUser], prompt: str) -> FakeInteraction:
    guild, user = who
    return await world.fake.invoke_command(
        guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": prompt}
    )


async def warm_up(world: World, process: Process, *, until_done: bool, timeout: float) -> None:
    """One interaction first: it proves the bot answers, and first-call costs stay out of the figures."""
    inter = await invoke(world, world.warmup, "warm-up: a lighthouse at dusk")
    try:
        await inter.wait_for_callback(timeout=5)
        if until_done:
            await world.fake.wait_for_state(
                lambda: job_state(inter) in {"done", "failed"}, timeout, "warm-up"
            )
    except TimeoutError:
        process.check_alive("warm-up")
        raise BenchError(
            f"warm-up interaction not answered ({job_state(inter)}):\n{tail(process.log_path)}"
        ) from None
    failed = job_state(inter) != "done" if until_done else inter.ephemeral
    if failed:
        raise BenchError(f"warm-up failed ({job_state(inter)}: {embed_author(inter.original)!r})")
    await asyncio.sleep(0.5)  # let the job's last writes settle before the CPU baseline


async def bot_burst(options: argparse.Namespace, tag: str) -> Result:
    jobs, probes, delay = options.jobs, options.probes, options.backend_delay
    concurrency = options.backend_concurrency
    expected = math.ceil((jobs + probes) / concurrency) * delay
    budget = expected * 2 + 30
    with tempfile.TemporaryDirectory(prefix="discord-bench-") as tmp:
        data_dir = Path(tmp)
        async with FakeDiscord(token=TOKEN) as fake, CountingOpenAI(delay=delay) as backend:
            world = make_world(fake, jobs, options.guilds, probes)
            env = bot_env(
                fake,
                data_dir,
                image_backend="openai",
                image_backend_url=backend.url,
                backend_concurrency=concurrency,
                guild_concurrency=options.guild_concurrency,
                guild_concurrency_max=max(8, options.guild_concurrency),
                user_max_jobs=5,
                queue_timeout_s=min(840, budget + 60),
                shutdown_grace_s=5,
            )
            args = ["-m", "bot"]
            if options.profile:
                args = ["-m", "cProfile", "-o", options.profile, *args]
            async with child(args, env, data_dir) as process:
                await wait_until_connected(fake, process)
                await warm_up(world, process, until_done=True, timeout=delay + 30)

                cpu0, fake_cpu0 = cpu_seconds(process.pid), time.process_time()
                started, clock0, requests0 = time.monotonic(), fake.clock(), len(fake.requests)
                inters = [
                    await invoke(world, who, f"bench {tag} job {i}: a fox")
                    for i, who in enumerate(world.burst)
                ]
                dispatch_s = time.monotonic() - started
                probe_inters: list[FakeInteraction] = []
                probe_every = expected / (probes + 1) if probes else math.inf
                peak_running = peak_queued = 0
                deadline = started + budget
                while True:
                    now = time.monotonic()
                    if len(probe_inters) < probes and now - started >= probe_every * (len(probe_inters) + 1):
                        who = world.probes[len(probe_inters)]
                        probe_inters.append(
                            await invoke(world, who, f"bench {tag} probe {len(probe_inters)}")
                        )
                    everything = inters + probe_inters
                    states = [job_state(i) for i in everything]
                    running = backend.in_flight
                    active = states.count("pending")
                    peak_running = max(peak_running, running)
                    if running:  # before the first generation starts, "queued" is only "not yet admitted"
                        peak_queued = max(peak_queued, active - running)
                    stuck = [
                        i
                        for i, s in zip(everything, states, strict=True)
                        if s == "unacked" and now - i.dispatched_monotonic > (fake.ack_deadline_s or 3) + 2
                    ]
                    if stuck or "refused" in states or "failed" in states:
                        raise BenchError(f"bot burst failed: {describe_unfinished(everything)}")
                    if len(probe_inters) == probes and all(s == "done" for s in states):
                        cpu1, fake_cpu1 = cpu_seconds(process.pid), time.process_time()
                        break
                    process.check_alive("bot burst")
                    if now > deadline:
                        raise BenchError(
                            f"bot burst not finished after {budget:.0f}s: {describe_unfinished(everything)}"
                        )
                    await asyncio.sleep(0.05)
                finished = [t for t in (done_at(i) for i in everything) if t is not None]
                result = Result(
                    "bot",
                    jobs + probes,
                    acks=[i.ack_latency for i in inters if i.ack_latency is not None],
                    probe_acks=[i.ack_latency for i in probe_inters if i.ack_latency is not None],
                    cpu_s=cpu1 - cpu0,
                    wall_s=max(finished) - clock0,
                    fake_cpu_s=fake_cpu1 - fake_cpu0,
                    peak_running=peak_running,
                    peak_queued=peak_queued,
                    dispatch_s=dispatch_s,
                    edits=sum(
                        1
                        for r in fake.requests[requests0:]
                        if r.method == "PATCH" and r.path.endswith("/messages/@original")
                    ),
                    rest_calls=len(fake.requests) - requests0,
                )
            output = process.log_path.read_text(errors="replace")
            result.warnings = [line for line in output.splitlines() if "WARNING" in line or "ERROR" in line]
            if "Traceback" in output:
                raise BenchError(f"the bot logged a traceback:\n{tail(process.log_path, 60)}")
    return result


async def bare_burst(options: argparse.Namespace, tag: str) -> Result:
    jobs = options.jobs
    with tempfile.TemporaryDirectory(prefix="discord-bench-bare-") as tmp:
        async with FakeDiscord(token=TOKEN) as fake:
            world = make_world(fake, jobs, options.guilds, 0)
            env = bot_env(fake, Path(tmp))
            async with child(["-m", "bench.bare_bot"], env, Path(tmp)) as process:
                await wait_until_connected(fake, process)
                await warm_up(world, process, until_done=False, timeout=5)
                cpu0, fake_cpu0 = cpu_seconds(process.pid), time.process_time()
                started = time.monotonic()
                inters = [
                    await invoke(world, who, f"bench {tag} job {i}: a fox")
                    for i, who in enumerate(world.burst)
                ]
                dispatch_s = time.monotonic() - started
                try:
                    await fake.wait_for_state(
                        lambda: all(i.callbacks for i in inters), (fake.ack_deadline_s or 3) + 5, "bare acks"
                    )
                except TimeoutError:
                    process.check_alive("bare burst")
                    missing = sum(1 for i in inters if not i.callbacks)
                    raise BenchError(f"bare bot: {missing} of {jobs} interactions not acknowledged") from None
                cpu1, fake_cpu1 = cpu_seconds(process.pid), time.process_time()
                return Result(
                    "bare",
                    jobs,
                    acks=[i.ack_latency for i in inters if i.ack_latency is not None],
                    cpu_s=cpu1 - cpu0,
                    wall_s=max(i.callbacks[0].monotonic for i in inters) - started,
                    fake_cpu_s=fake_cpu1 - fake_cpu0,
                    dispatch_s=dispatch_s,
                )


# ----------------------------------------------------------------------------------------------- report


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def summarise(results: list[Result]) -> dict[str, float]:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    return {
        "p50": med([statistics.median(r.acks) for r in results]),
        "p99": med([percentile(r.acks, 99) for r in results]),
        "max": med([max(r.acks) for r in results]),
        "cpu": med([r.cpu_ms_per_job for r in results]),
        "wall": med([r.wall_s for r in results]),
        "fake": med([r.fake_cpu_s * 1000 / r.jobs for r in results]),
        "probe_p50": med([statistics.median(r.probe_acks) for r in results]) if results[0].probe_acks else 0,
        "probe_max": med([max(r.probe_acks) for r in results]) if results[0].probe_acks else 0,
    }


def report(options: argparse.Namespace, bots: list[Result], bares: list[Result]) -> None:
    runs = f"median of {len(bots)} runs" if len(bots) > 1 else "1 run"
    print(
        f"\n/imagine burst: {options.jobs} jobs over {options.guilds} guilds, backend {options.backend_delay:g} s "
        f"per image, BACKEND_CONCURRENCY={options.backend_concurrency}, "
        f"GUILD_CONCURRENCY={options.guild_concurrency} ({runs})"
    )
    header = (
        f"{'':6} {'p50 ack ms':>10} {'p99 ack ms':>10} {'max ack ms':>10} {'CPU ms/job':>10} {'wall s':>7}"
    )
    print(header)
    print("-" * len(header))
    for label, results in (("bot", bots), ("bare", bares)):
        if not results:
            continue
        s = summarise(results)
        print(
            f"{label:6} {_ms(s['p50']):>10} {_ms(s['p99']):>10} {_ms(s['max']):>10} "
            f"{s['cpu']:>10.2f} {s['wall']:>7.1f}"
        )
    b = summarise(bots)
    if bots[0].probe_acks:
        print(
            f"probes: {len(bots[0].probe_acks)} /imagine spread over the bot's run, acked in "
            f"p50 {_ms(b['probe_p50'])} ms, max {_ms(b['probe_max'])} ms"
        )
    print(
        f"bot peak: {max(r.peak_running or 0 for r in bots)} running, {max(r.peak_queued or 0 for r in bots)} "
        f"queued; CPU/job includes the {options.probes} probes"
    )
    calls = statistics.median(r.rest_calls / r.jobs for r in bots)
    edits = statistics.median(r.edits / r.jobs for r in bots)
    print(
        f"bot REST calls to Discord: {calls:.1f}/job, of which {edits:.1f} message edits (progress + result)"
    )
    warnings = [line.split(" ", 1)[-1][:200] for r in bots for line in r.warnings]
    if warnings:
        print(f"bot log: {len(warnings)} warning/error lines:")
        for line in list(dict.fromkeys(warnings))[:3]:
            print(f"  {line}")
    fake_note = f"fake Discord + driver (this process): {b['fake']:.2f} ms CPU/job with the bot"
    if bares:
        fake_note += f", {summarise(bares)['fake']:.2f} with the bare bot"
    print(fake_note)


def print_profile(path: str, limit: int = 25) -> None:
    stats = pstats.Stats(path)
    stats.strip_dirs()
    for key in ("tottime", "cumulative"):
        print(f"\n--- bot profile (whole process life, start-up included), top {limit} by {key} ---")
        stats.sort_stats(key).print_stats(limit)


async def deep_queue(options: argparse.Namespace) -> int:
    """N jobs waiting behind one slow backend: the bot's CPU and edits per second while the queue moves."""
    jobs, delay, window = options.deep, options.backend_delay, options.window
    with tempfile.TemporaryDirectory(prefix="discord-bench-deep-") as tmp:
        data_dir = Path(tmp)
        async with FakeDiscord(token=TOKEN) as fake, CountingOpenAI(delay=delay) as backend:
            world = make_world(fake, jobs, 1, 0)
            env = bot_env(
                fake,
                data_dir,
                image_backend="openai",
                image_backend_url=backend.url,
                backend_concurrency=1,
                guild_concurrency=1,
                user_max_jobs=5,
                queue_timeout_s=840,
                shutdown_grace_s=0,
            )
            async with child(["-m", "bot"], env, data_dir) as process:
                await wait_until_connected(fake, process)
                inters: list[FakeInteraction] = []
                for first in range(0, jobs, 50):  # in batches: the burst itself is not what is measured here
                    batch = [
                        await invoke(world, who, f"deep {first + i}: a fox")
                        for i, who in enumerate(world.burst[first : first + 50])
                    ]
                    await fake.wait_for_state(
                        lambda batch=batch: all(i.callback is not None for i in batch),
                        30,
                        "a batch acknowledged",
                    )
                    inters += batch
                await asyncio.sleep(5)  # the first positions are posted; the queue settles
                requests0 = len(fake.requests)
                cpu0, started = cpu_seconds(process.pid), time.monotonic()
                await asyncio.sleep(window)
                cpu, elapsed = cpu_seconds(process.pid) - cpu0, time.monotonic() - started
                edits = sum(
                    1
                    for r in fake.requests[requests0:]
                    if r.method == "PATCH" and r.path.endswith("/messages/@original")
                )
                process.check_alive("deep queue")
    print(
        f"{jobs} jobs waiting behind one backend of {delay:.0f} s per image, measured over {elapsed:.0f} s:"
    )
    print(f"bot CPU {cpu / elapsed * 100:.1f} % of a core; {edits / elapsed:.1f} message edits per second")
    return 0


async def main(options: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.ERROR)  # the fakes' INFO/WARNING chatter is not the result
    if options.deep:
        try:
            return await deep_queue(options)
        except BenchError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    bots: list[Result] = []
    bares: list[Result] = []
    try:
        for run in range(options.repeats):
            tag = f"{os.getpid()}-{run}"
            bot = await bot_burst(options, tag)
            bots.append(bot)
            print(
                f"run {run + 1}: bot  p50 {_ms(statistics.median(bot.acks))} ms, p99 "
                f"{_ms(percentile(bot.acks, 99))} ms, {bot.cpu_ms_per_job:.2f} CPU ms/job, {bot.wall_s:.1f} s",
                flush=True,
            )
            if not options.skip_bare:
                bare = await bare_burst(options, tag)
                bares.append(bare)
                print(
                    f"run {run + 1}: bare p50 {_ms(statistics.median(bare.acks))} ms, p99 "
                    f"{_ms(percentile(bare.acks, 99))} ms, {bare.cpu_ms_per_job:.2f} CPU ms/interaction, "
                    f"{bare.wall_s:.2f} s",
                    flush=True,
                )
    except BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    report(options, bots, bares)
    if options.profile:
        print_profile(options.profile)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.discord_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=200, help="interactions in the burst (default 200)")
    parser.add_argument("--guilds", type=int, default=10, help="guilds the burst is spread over (default 10)")
    parser.add_argument(
        "--backend-delay",
        type=float,
        default=2.0,
        help="seconds the fake backend takes per image (default 2)",
    )
    parser.add_argument("--backend-concurrency", type=int, default=8, help="BACKEND_CONCURRENCY (default 8)")
    parser.add_argument("--guild-concurrency", type=int, default=2, help="GUILD_CONCURRENCY (default 2)")
    parser.add_argument(
        "--probes",
        type=int,
        default=10,
        help="extra /imagine sent one by one during the bot's run (default 10)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs; the table shows medians (default 1)")
    parser.add_argument("--skip-bare", action="store_true", help="only run the real bot")
    parser.add_argument(
        "--deep", type=int, default=0, help="N jobs waiting behind one slow backend (issue 8)"
    )
    parser.add_argument("--window", type=float, default=60.0, help="--deep: seconds measured (default 60)")
    parser.add_argument(
        "--profile", metavar="FILE", help="run the bot under cProfile, write FILE, print the top"
    )
    options = parser.parse_args(argv)
    if options.jobs < 1 or options.guilds < 1 or options.repeats < 1 or options.probes < 0:
        parser.error("--jobs, --guilds and --repeats must be >= 1, --probes >= 0")
    if options.profile and options.repeats != 1:
        parser.error("--profile takes one run (--repeats 1)")
    if options.profile:
        options.profile = str(Path(options.profile).resolve())  # the bot runs in another directory
    return options


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
