"""Problems only the operator can fix: WARNING in the log, advice to the owner by DM, never to members.

Through the fake Discord and a failing backend fake: the bot as a subprocess at LOG_LEVEL=WARNING (an
outage must leave a line), and in process for what members read and what the owner is sent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys

import pytest

from bot.engine.errors import NOT_SET_UP
from tests.fakes.a1111 import FakeA1111
from tests.fakes.discord import FakeDiscord, FakeInteraction
from tests.fakes.openai_api import FakeOpenAI
from tests.frontend.conftest import TOKEN, embed_author, running_bot
from tests.frontend.process import assert_clean, bot_env, bot_process

#: Words of operator advice: setting names and server flags a member can do nothing with.
ADVICE_WORDS = ("IMAGE_BACKEND", "--api", "user:password", "check the", "DATA_DIR", ".env")
WRONG_KEY = "wrong-key-0123456789"


def labels(message) -> list[str]:
    return [c.get("label", "") for row in message.components for c in row.get("components", [])]


def finished(message) -> bool:
    return "Reroll" in labels(message)


def unescaped(markdown: str) -> str:
    """The text as Discord renders it (the DM escapes Markdown, so IMAGE_BACKEND_API_KEY stays whole)."""
    return markdown.replace("\\", "")


def member_visible(inter: FakeInteraction) -> str:
    """Everything members can read about this interaction: every message, every revision."""
    return json.dumps(
        [[r.content, r.embeds] for m in inter.messages() for r in m.history], ensure_ascii=False
    )


async def test_a_backend_refusing_the_key_is_a_warning_at_log_level_warning(tmp_path) -> None:
    async with (
        FakeDiscord(token=TOKEN) as fake,
        FakeOpenAI(require_key="the-right-key-123") as backend,
    ):
        guild = fake.add_guild(name="G")
        async with bot_process(
            fake,
            tmp_path,
            image_backend="openai",
            image_backend_url=backend.url,
            image_backend_api_key=WRONG_KEY,
            log_level="WARNING",
        ) as bot:
            for n in range(3):
                user = fake.add_member(guild.id)
                inter = await fake.invoke_command(
                    guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": f"p{n}"}
                )
                await inter.wait_until(finished, timeout=15)
            assert await bot.terminate() == 0
    lines = [line for line in bot.output if "image backend problem" in line]
    # The first failure at once; the two inside the same 5 minutes are counted and logged at shutdown.
    assert len(lines) == 2, bot.text
    assert all(" WARNING bot.engine.alerts " in line and "reason=auth" in line for line in lines)
    assert "IMAGE_BACKEND_API_KEY" in lines[0] and "jobs=1" in lines[0]
    assert "jobs=2" in lines[1]
    assert not [line for line in bot.output if " INFO " in line], bot.text  # the level is honoured
    assert WRONG_KEY not in bot.text
    assert_clean(bot.text)
    # The owner was told once, for three failed jobs.
    dms = fake.dms_to(fake.app_owner.id)
    assert len(dms) == 1 and "IMAGE_BACKEND_API_KEY" in unescaped(dms[0].content)


async def test_members_read_what_happened_and_the_owner_gets_the_advice_once_an_hour(tmp_path) -> None:
    async with (
        FakeDiscord(token=TOKEN) as fake,
        FakeA1111(require_auth="alice:right") as backend,
        running_bot(
            fake, tmp_path, backend="a1111", backend_url=backend.url, image_backend_api_key="alice:wrong"
        ) as h,
    ):
        alerts = h.bot.manager.alerts
        alerts.clock = fake.clock  # the hour passes on the fake clock
        user = fake.add_member(h.guild.id)
        seen: list[str] = []
        for n in range(3):
            inter = await h.imagine(user.id, f"prompt {n}")
            message = await inter.wait_until(finished, timeout=10)
            assert NOT_SET_UP in embed_author(message), embed_author(message)
            seen.append(member_visible(inter))
        await fake.wait_for_state(lambda: fake.dms_to(fake.app_owner.id), 5, "the owner's DM")
        assert len(fake.dms_to(fake.app_owner.id)) == 1  # three failures, one problem: one DM
        fake.clock.advance(3600)
        inter = await h.imagine(user.id, "an hour later")
        await inter.wait_until(finished, timeout=10)
        seen.append(member_visible(inter))
        await fake.wait_for_state(lambda: len(fake.dms_to(fake.app_owner.id)) == 2, 5, "a second DM")
    for text in seen:
        for word in ADVICE_WORDS:
            assert word not in text, f"{word!r} reached members: {text}"
    dm = unescaped(fake.dms_to(fake.app_owner.id)[0].content)
    assert "IMAGE_BACKEND_API_KEY" in dm and "--api-auth" in dm and NOT_SET_UP in dm
    assert "alice:wrong" not in dm


async def test_a_team_owner_with_closed_dms_is_tried_and_logged_once(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI(require_key="the-right-key-123") as backend:
        team_owner = fake.make_team_app()
        team_owner.accepts_dms = False
        with caplog.at_level(logging.WARNING):
            async with running_bot(
                fake, tmp_path, backend_url=backend.url, image_backend_api_key=WRONG_KEY
            ) as h:
                h.bot.manager.alerts.clock = fake.clock
                user = fake.add_member(h.guild.id)
                for _ in range(2):
                    inter = await h.imagine(user.id, "x")
                    await inter.wait_until(finished, timeout=10)
                    fake.clock.advance(3600)  # so the second failure is told again
                sends = lambda: fake.requests_matching("POST", r"^/channels/\d+/messages$")  # noqa: E731
                await fake.wait_for_state(lambda: len(sends()) == 2, 5, "two DM attempts")
    opened = fake.requests_matching("POST", r"^/users/@me/channels$")
    assert opened and all(str(r.json["recipient_id"]) == team_owner.id for r in opened)
    assert [r.status for r in sends()] == [403, 403]  # Discord's 50007, as the team owner's DMs are closed
    closed = [r for r in caplog.records if "cannot DM the bot owner" in r.getMessage()]
    assert len(closed) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("outage", ["unreachable", "http 500"])
async def test_an_outage_is_a_warning_at_log_level_warning(tmp_path, outage: str) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeOpenAI() as backend:
        if outage == "unreachable":
            url = f"http://127.0.0.1:{closed_port()}/v1"
        else:
            url = backend.url
            backend.configure(fail_next=[(500, {"error": {"message": "boom", "type": "server_error"}})])
        guild = fake.add_guild(name="G")
        async with bot_process(
            fake, tmp_path, image_backend="openai", image_backend_url=url, log_level="WARNING"
        ) as bot:
            user = fake.add_member(guild.id)
            inter = await fake.invoke_command(
                guild.id, guild.channels[0].id, user.id, "imagine", {"prompt": "x"}
            )
            await inter.wait_until(finished, timeout=20)
            assert await bot.terminate() == 0
    lines = [line for line in bot.output if "image backend problem" in line]
    assert len(lines) == 1, bot.text
    assert " WARNING " in lines[0] and "reason=unavailable" in lines[0] and "jobs=1" in lines[0]
    expected = "cannot connect to http://127.0.0.1:" if outage == "unreachable" else "HTTP 500"
    assert expected in lines[0], lines[0]
    assert_clean(bot.text)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_check_gives_the_operator_the_advice(tmp_path) -> None:
    async with FakeDiscord(token=TOKEN) as fake, FakeA1111(require_auth="alice:right") as backend:
        env = bot_env(
            fake,
            tmp_path,
            image_backend="a1111",
            image_backend_url=backend.url,
            image_backend_api_key="alice:wrong",
        )
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "check", cwd=str(tmp_path), env=env, stdout=asyncio.subprocess.PIPE
        )
        async with asyncio.timeout(60):
            out, _ = await proc.communicate()
    assert proc.returncode == 1
    lines = out.decode().splitlines()
    backend_line = next(line for line in lines if line.startswith("backend: problem:"))
    assert "set IMAGE_BACKEND_API_KEY to user:password as given to --api-auth" in backend_line
    assert "alice:wrong" not in out.decode()
