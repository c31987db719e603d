"""``python -m bot check`` as operators run it: a subprocess against the fake Discord and a fake backend."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import discord

from bot.service.check import invite_url, required_permissions, run_check
from bot.settings import load_settings
from tests.conftest import TOKEN

ROOT = Path(__file__).resolve().parents[2]

#: View Channel (1<<10) + Send Messages (1<<11) + Embed Links (1<<14) + Attach Files (1<<15)
#: + Read Message History (1<<16), written out so a change to required_permissions() shows up here.
PERMISSIONS = 1024 + 2048 + 16384 + 32768 + 65536


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_cli(cwd: Path, **settings: object) -> tuple[int, str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DISCORD_", "IMAGE_", "DATA_", "LOG_", "HTTP_", "CACHE_"))
    }
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    env.update({key.upper(): str(value) for key, value in settings.items()})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "check",
        cwd=str(cwd),  # no .env there
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_check_passes_on_a_good_setup(fake_discord, fake_openai, tmp_path) -> None:
    data_dir = tmp_path / "new" / "data"  # missing: check creates it
    status, out, err = await run_cli(
        tmp_path,
        discord_token=TOKEN,
        discord_api_base=fake_discord.api_base,
        image_backend="openai",
        image_backend_url=fake_openai.url,
        data_dir=data_dir,
    )
    assert status == 0, out + err
    lines = out.splitlines()
    assert "settings: ok" in lines
    assert any(line.startswith("backend: ok (openai at ") and "3 models" in line for line in lines), out
    assert f"discord: ok (logged in as ImagineBot (id {fake_discord.app_id}))" in lines
    expected = (
        f"invite: https://discord.com/oauth2/authorize?client_id={fake_discord.app_id}"
        f"&scope=bot+applications.commands&permissions={PERMISSIONS}"
    )
    assert expected in lines, out
    assert f"data dir: ok ({data_dir} is writable)" in lines
    assert lines[-1] == "result: all checks passed"
    assert "problem" not in out
    assert data_dir.is_dir() and not list(data_dir.iterdir())  # the probe file is gone
    assert TOKEN not in out + err and "Traceback" not in out + err
    # It really asked Discord, with the token as a bot token.
    me = fake_discord.requests_matching("GET", r"^/users/@me$")
    assert len(me) == 1 and me[0].status == 200
    assert fake_openai.state.model_list_calls == 1


async def test_check_reports_every_problem_without_a_traceback(fake_discord, tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where a directory should be")
    data_dir = blocker / "data"
    wrong_token = "wrong-token-0123456789"
    port = closed_port()
    status, out, err = await run_cli(
        tmp_path,
        discord_token=wrong_token,
        discord_api_base=fake_discord.api_base,
        image_backend="openai",
        image_backend_url=f"http://127.0.0.1:{port}/v1",
        data_dir=data_dir,
    )
    assert status == 1, out + err
    problems = [line for line in out.splitlines() if "problem:" in line]
    assert len(problems) == 3, out
    assert "discord: problem: DISCORD_TOKEN: Discord refused the token (401)" in problems
    backend = next(line for line in problems if line.startswith("backend: problem:"))
    assert f"127.0.0.1:{port}" in backend
    data = next(line for line in problems if line.startswith("data dir: problem:"))
    assert f"DATA_DIR: cannot create or write {data_dir}" in data
    assert out.splitlines()[-1] == "result: 3 problems found"
    assert "invite:" not in out
    assert "settings: ok" in out
    assert wrong_token not in out + err
    assert "Traceback" not in out + err


async def test_missing_token_in_process(fake_openai, tmp_path, capsys) -> None:
    settings = load_settings(
        env_file=None, image_backend="openai", image_backend_url=fake_openai.url, data_dir=tmp_path / "d"
    )
    assert await run_check(settings) == 1
    out = capsys.readouterr().out.splitlines()
    assert "discord: problem: DISCORD_TOKEN: not set (required to run the bot; see .env.example)" in out
    assert out[-1] == "result: 1 problem found"


def test_permissions_are_exactly_what_the_bot_needs() -> None:
    perms = required_permissions()
    assert perms.value == PERMISSIONS
    granted = {name for name, on in perms if on}
    # discord.py iterates View Channel under its old name, read_messages.
    assert granted == {
        "read_messages",
        "send_messages",
        "attach_files",
        "embed_links",
        "read_message_history",
    }
    assert not perms.administrator and not perms.manage_messages
    url = invite_url(123)
    assert url == (
        "https://discord.com/oauth2/authorize?client_id=123&scope=bot+applications.commands"
        f"&permissions={PERMISSIONS}"
    )
    assert discord.Permissions(PERMISSIONS) == perms


async def test_check_says_which_env_file_it_read(fake_openai, tmp_path) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    (here / ".env").write_text(f"IMAGE_BACKEND=openai\nIMAGE_BACKEND_URL={fake_openai.url}\n")
    settings = {"data_dir": tmp_path / "data"}
    _, out, _ = await run_cli(here, **settings)
    assert f".env: read {here / '.env'}" in out.splitlines()
    assert "backend: ok" in out  # the backend settings did come from that file
    _, out, _ = await run_cli(elsewhere, **settings)
    assert (
        f".env: none found at {elsewhere / '.env'} (settings come from the environment only)"
        in out.splitlines()
    )


async def test_check_with_database_url_describes_the_database_and_changes_nothing(
    fake_discord, fake_openai, tmp_path, pg_cluster, pg_url
) -> None:
    from bot.engine.store_pg import PgJobStore, safe_dsn
    from tests.pg import PASSWORD

    common = {
        "discord_token": TOKEN,
        "discord_api_base": fake_discord.api_base,
        "image_backend": "openai",
        "image_backend_url": fake_openai.url,
        "data_dir": tmp_path / "data",
    }
    status, out, err = await run_cli(tmp_path, database_url=pg_url, **common)
    assert status == 0, out + err
    assert f"database: ok ({safe_dsn(pg_url)}, PostgreSQL 1" in out
    assert "empty: the bot creates its tables on the first start" in out
    async with PgJobStore(pg_url):  # a first start creates the tables
        pass
    status, out, err = await run_cli(tmp_path, database_url=pg_url, **common)
    from bot.engine.store_pg import MIGRATIONS

    assert status == 0 and f"schema v{len(MIGRATIONS)})" in out, out + err

    wrong = pg_cluster.url("postgres", password="wrong-" + PASSWORD)
    status, out, err = await run_cli(tmp_path, database_url=wrong, **common)
    assert status == 1
    problems = [line for line in out.splitlines() if "problem:" in line]
    assert len(problems) == 1 and problems[0].startswith("database: problem: PostgreSQL refused the login"), (
        out
    )
    assert PASSWORD not in out + err and "Traceback" not in out + err


async def test_check_reports_a_backend_that_cannot_list_its_models(monkeypatch, tmp_path) -> None:
    import aiohttp

    import bot.backends
    from bot.engine.backend import Backend, Capabilities
    from bot.service.check import Report, check_backend

    class CannotList(Backend):  # e.g. a backend without a model list yet: list_models() keeps its default
        name = "silent"
        capabilities = Capabilities()

        async def generate(self, request, on_progress=None):  # type: ignore[no-untyped-def,override]
            raise AssertionError("check never generates")

    monkeypatch.setattr(bot.backends, "create_backend", lambda *args, **kwargs: CannotList())
    settings = load_settings(env_file=None, image_backend="horde", data_dir=tmp_path)
    report = Report()
    async with aiohttp.ClientSession() as session:
        await check_backend(settings, session, report)
    assert report.problems == [] and report.lines == ["backend: ok (horde; it does not list its models)"]
