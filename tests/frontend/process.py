"""Runs ``python -m bot`` as a real subprocess against in-process fakes (for signals, restarts and 429s)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.fakes.discord import FakeDiscord

ROOT = Path(__file__).resolve().parents[2]

#: Lines that must never appear in a clean run's output.
FORBIDDEN = (
    "Task was destroyed but it is pending",
    "Unclosed client session",
    "Unclosed connector",
    "Traceback",
    "was never awaited",
)


@dataclass
class BotProcess:
    proc: asyncio.subprocess.Process
    output: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.output)

    async def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit status."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await self.wait(timeout)

    async def wait(self, timeout: float = 30.0) -> int:
        async with asyncio.timeout(timeout):
            status = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return status

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


#: Settings the bot reads: a developer's own environment must not leak into a test's bot.
_SETTING_PREFIXES = (
    "DISCORD_",
    "IMAGE_",
    "GUILD_",
    "CACHE_",
    "BACKEND_",
    "USER_",
    "QUEUE_",
    "JOB_",
    "SHUTDOWN_",
    "LOG_",
    "SHARD_",
    "LEASE_",
)
_SETTING_NAMES = {
    "DEV_GUILD_ID",
    "DATA_DIR",
    "HTTP_PORT",
    "HTTP_HOST",
    "HISTORY_RETENTION_DAYS",
    "DATABASE_URL",
}
#: Any non-empty PYTHONASYNCIODEBUG (even "0") turns asyncio's debug mode on: runs choose it explicitly.
_DEBUG_KNOBS = {"PYTHONASYNCIODEBUG", "PYTHONDEVMODE", "PYTHONTRACEMALLOC"}


def bot_env(fake: FakeDiscord, data_dir: Path, **settings: object) -> dict[str, str]:
    """The environment for ``python -m bot`` against ``fake``; ``settings`` become upper-cased variables."""
    dropped = _SETTING_NAMES | _DEBUG_KNOBS
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SETTING_PREFIXES) and k not in dropped}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "DISCORD_TOKEN": fake.token,
            "DISCORD_API_BASE": fake.api_base,
            "DISCORD_GATEWAY_URL": fake.gateway_url,
            "DATA_DIR": str(data_dir),
            "HTTP_PORT": "0",
            "LOG_LEVEL": "INFO",
        }
    )
    env.update({key.upper(): str(value) for key, value in settings.items()})
    return env


async def spawn_bot(
    fake: FakeDiscord, data_dir: Path, *, dev_mode: bool = True, **settings: object
) -> BotProcess:
    """Start ``python -m bot`` and collect its output; waits for nothing (the caller reaps it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        # -X dev: asyncio debug warnings and ResourceWarnings become visible, so the checks below see them.
        *(("-X", "dev") if dev_mode else ()),
        "-m",
        "bot",
        cwd=str(data_dir),
        env=bot_env(fake, data_dir, **settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    running = BotProcess(proc)

    async def read() -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            running.output.append(line.decode(errors="replace").rstrip())

    running._reader = asyncio.create_task(read())
    return running


@contextlib.asynccontextmanager
async def bot_process(
    fake: FakeDiscord, data_dir: Path, *, dev_mode: bool = True, **settings: object
) -> AsyncIterator[BotProcess]:
    """Start the bot; wait until it has identified and is ready; always reap it.

    ``dev_mode=False`` runs it as an operator does (no ``-X dev``): asyncio's debug mode slows the loop
    enough to hide timing that a normal run shows.
    """
    before = fake.ready_count
    running = await spawn_bot(fake, data_dir, dev_mode=dev_mode, **settings)
    proc = running.proc
    assert running._reader is not None
    try:
        async with asyncio.timeout(30):
            while fake.ready_count <= before:
                if proc.returncode is not None:
                    await running._reader
                    raise AssertionError(f"bot exited early ({proc.returncode}):\n{running.text}")
                await asyncio.sleep(0.05)
        yield running
    finally:
        running.kill()
        with contextlib.suppress(TimeoutError, ProcessLookupError):
            await running.wait(10)


def assert_clean(output: str) -> None:
    for needle in FORBIDDEN:
        assert needle not in output, f"{needle!r} in bot output:\n{output}"
