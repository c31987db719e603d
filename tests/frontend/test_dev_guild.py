"""DEV_GUILD_ID naming a server the bot cannot use: ``check`` finds it, start-up and ``sync`` stop in one line.

Discord answers 403 Missing Access (50001) to a guild the bot is not in, and to guild commands of a server it
was invited to without the ``applications.commands`` scope; the fake answers the same. Each command runs as
an operator runs it: ``python -m bot ...`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.fakes.discord import FakeDiscord
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import TOKEN
from tests.frontend.process import assert_clean, bot_env

#: A guild id the fake has never heard of: a server the bot is not in.
ELSEWHERE = "1180000000000000001"


async def run_cli(fake: FakeDiscord, backend: FakeOpenAI, data_dir: Path, *args: str, **settings: object):
    """``python -m bot *args``; returns (exit status, combined output)."""
    env = bot_env(fake, data_dir, image_backend="openai", image_backend_url=backend.url, **settings)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        cwd=str(data_dir),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def assert_stopped_in_one_line(status: int, out: str, guild_id: str) -> None:
    assert status == 2, out
    mentions = [line for line in out.splitlines() if "DEV_GUILD_ID" in line or "Missing Access" in line]
    assert len(mentions) == 1, out
    line = mentions[0]
    assert line.startswith(f"error: DEV_GUILD_ID: Discord refused access to server {guild_id}"), out
    assert "python -m bot check" in line and "leave DEV_GUILD_ID empty" in line
    assert not [line for line in out.splitlines() if " ERROR " in line], out
    assert_clean(out)


async def test_check_finds_a_dev_guild_the_bot_is_not_in(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        fake.add_guild(name="Somewhere else")
        status, out = await run_cli(fake, backend, tmp_path, "check", dev_guild_id=ELSEWHERE)
        assert status == 1, out
        assert (
            f"dev guild: problem: DEV_GUILD_ID: the bot is not in server {ELSEWHERE} "
            "(Discord: 403 Missing Access); invite it there with the link below, or leave DEV_GUILD_ID "
            "empty to sync commands globally"
        ) in out.splitlines(), out
        assert "all checks passed" not in out and out.splitlines()[-1] == "result: 1 problem found"
        assert [r.status for r in fake.requests_matching("GET", rf"^/guilds/{ELSEWHERE}$")] == [403]
        assert "Traceback" not in out and TOKEN not in out


async def test_check_finds_a_dev_guild_without_the_commands_scope(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        guild = fake.add_guild(name="No scope", applications_commands=False)
        status, out = await run_cli(fake, backend, tmp_path, "check", dev_guild_id=guild.id)
        assert status == 1, out
        problem = next(line for line in out.splitlines() if line.startswith("dev guild: problem:"))
        assert f"the bot is in server 'No scope' ({guild.id}) but may not add commands there" in problem
        assert "applications.commands" in problem
        commands = fake.requests_matching("GET", rf"^/applications/{fake.app_id}/guilds/{guild.id}/commands$")
        assert [r.status for r in commands] == [403]


async def test_check_passes_with_a_dev_guild_the_bot_is_in(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        guild = fake.add_guild(name="Dev")
        status, out = await run_cli(fake, backend, tmp_path, "check", dev_guild_id=guild.id)
        assert status == 0, out
        assert f"dev guild: ok (commands go to server 'Dev' ({guild.id}))" in out.splitlines(), out
        assert out.splitlines()[-1] == "result: all checks passed"


async def test_start_with_a_dev_guild_the_bot_is_not_in_stops_with_one_line(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        fake.add_guild(name="Somewhere else")
        status, out = await run_cli(fake, backend, tmp_path, dev_guild_id=ELSEWHERE)
        assert_stopped_in_one_line(status, out, ELSEWHERE)
        assert [r.status for r in fake.requests_matching("PUT", rf"/guilds/{ELSEWHERE}/commands$")] == [403]
        assert fake.identify_count == 0  # stopped before connecting to the gateway


async def test_sync_with_a_dev_guild_the_bot_is_not_in_stops_with_one_line(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        status, out = await run_cli(fake, backend, tmp_path, "sync", dev_guild_id=ELSEWHERE)
        assert_stopped_in_one_line(status, out, ELSEWHERE)
        assert "commands synced" not in out
