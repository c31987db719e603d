"""What the Discord benchmarks share: the real bot as a subprocess, the fake backend, reading /proc, job states.

Used by ``discord_bench``, ``soak_bench`` and ``fleet_bench``. A job's state is read from what the fake Discord
saw (the acknowledgement, then the edits of the original message), never from the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.fakes.discord import FakeDiscord, FakeInteraction, FakeMessage
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.process import bot_env as test_bot_env

TOKEN = "bench-token-0123456789abcdef"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The run did not measure what it should (a missed ack, a job without an image, a dead process)."""


class CountingOpenAI(FakeOpenAI):
    """The fake image API, counting generations in flight: that is how many jobs the bot is running."""

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        self.in_flight = 0

    async def generate(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        try:
            return await super().generate(request)
        finally:
            self.in_flight -= 1


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its reaped children (all threads), from /proc."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])  # fields 14-17 of proc(5)
    return (utime + stime + cutime + cstime) / CLK_TCK


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 200 samples is the 198th)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def embed_author(message: FakeMessage | None) -> str:
    if message is None or not message.embeds:
        return ""
    return str((message.embeds[0].get("author") or {}).get("name", ""))


def has_image(attachments: list[Any]) -> bool:
    names = [a["filename"] if isinstance(a, dict) else a.filename for a in attachments]
    return any(n.rsplit(".", 1)[-1] in {"png", "jpg", "jpeg", "webp"} for n in names)


def job_state(inter: FakeInteraction) -> str:
    """'unacked', 'refused', 'pending', 'done' or 'failed' (a final message without an image)."""
    if not inter.callbacks:
        return "unacked"
    if inter.ephemeral:
        return "refused"
    message = inter.original
    author = embed_author(message)
    if message is None or message.loading or author.startswith(("Queued", "Generating")):
        return "pending"
    if author.startswith("Done") and has_image(message.attachments):
        return "done"
    return "failed"


def done_at(inter: FakeInteraction) -> float | None:
    """Fake-clock time of the edit that showed the image."""
    for revision in inter.original.history if inter.original else []:
        embeds = revision.embeds
        author = str((embeds[0].get("author") or {}).get("name", "")) if embeds else ""
        if author.startswith("Done") and has_image(revision.attachments):
            return revision.time
    return None


def bot_env(fake: FakeDiscord, data_dir: Path, **settings: object) -> dict[str, str]:
    """The tests' environment for ``python -m bot``, with warnings-only logs as in a quiet production run."""
    return test_bot_env(fake, data_dir, **{"log_level": "WARNING", **settings})


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no output)"
    return "\n".join(text[-lines:]) or "(no output)"


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self, what: str) -> None:
        if self.proc.returncode is not None:
            raise BenchError(f"{what}: process exited ({self.proc.returncode}):\n{tail(self.log_path)}")

    async def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (the bot drains and exits; cProfile writes its file), then SIGKILL after ``timeout``."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()


def _open_log(path: Path) -> Any:
    return open(path, "wb")  # the child writes to it; we only read it back at the end


@contextlib.asynccontextmanager
async def child(
    args: list[str], env: dict[str, str], cwd: Path, *, log_name: str = "process.log"
) -> AsyncIterator[Process]:
    """``python <args>`` in ``cwd`` with its output in ``cwd/log_name``; stopped (SIGTERM, then SIGKILL) after."""
    log_path = cwd / log_name
    with _open_log(log_path) as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *args, cwd=str(cwd), env=env, stdout=log_file, stderr=asyncio.subprocess.STDOUT
        )
    running = Process(proc, log_path)
    try:
        yield running
    finally:
        await running.stop()


async def wait_until_connected(fake: FakeDiscord, process: Process, timeout: float = 30.0) -> None:
    """READY sent, gateway still up, and /imagine synced (both bots sync in setup_hook, before the gateway)."""
    deadline = time.monotonic() + timeout
    while not (fake.ready_count and fake.connected_sessions and "imagine" in fake.commands.get(None, {})):
        process.check_alive("starting")
        if time.monotonic() > deadline:
            raise BenchError(
                f"not connected after {timeout:.0f}s (ready={fake.ready_count}, "
                f"commands={sorted(fake.commands.get(None, {}))}):\n{tail(process.log_path)}"
            )
        await asyncio.sleep(0.05)


def describe_unfinished(inters: list[FakeInteraction]) -> str:
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    for inter in inters:
        state = job_state(inter)
        counts[state] = counts.get(state, 0) + 1
        if state != "done" and state not in examples:
            detail = (inter.callback.data.get("content") if inter.callback else None) or embed_author(
                inter.original
            )
            examples[state] = f"{state}: {detail!r}"
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) + "".join(
        f"\n  e.g. {e}" for e in examples.values()
    )
