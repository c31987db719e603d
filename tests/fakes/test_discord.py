"""The fake Discord, proven against the real discord.py client (not against itself).

Why: every bot test trusts this fake; if it drifts from what discord.py 2.7 sends and expects, the bot's
tests pass for the wrong reasons. Each test here drives a real `commands.Bot` over the wire.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands

from tests.fakes.discord import FakeDiscord, FakeInteraction, point_discord_py_at

TOKEN = "test-token"
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 2048
REPO = Path(__file__).resolve().parents[2]

Handler = Callable[[discord.Interaction, str], Awaitable[None]]


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=r"test:cancel:(?P<job>\w+)"):
    """A restart-proof button: matched by custom_id alone, like the product's job buttons."""

    def __init__(self, job: str) -> None:
        super().__init__(discord.ui.Button(label="Cancel", custom_id=f"test:cancel:{job}"))
        self.job = job

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: Any
    ) -> CancelButton:
        return cls(match["job"])

    async def callback(self, interaction: discord.Interaction) -> None:
        bot = interaction.client
        assert isinstance(bot, ProbeBot)
        bot.clicked.append(self.job)
        await interaction.response.send_message(f"cancelled {self.job}", ephemeral=True)


class ProbeBot(commands.Bot):
    """A minimal bot: one guild slash command whose behaviour each test supplies."""

    def __init__(self, guild_id: str) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=discord.Intents.default(),
            guild_ready_timeout=0.1,
        )
        self.guild_id = int(guild_id)
        self.handler: Handler | None = None
        self.errors: list[BaseException] = []
        self.done = asyncio.Event()
        self.clicked: list[str] = []
        self.cancels: list[tuple[str, discord.Member | None]] = []

    async def setup_hook(self) -> None:
        self.add_dynamic_items(CancelButton)
        guild = discord.Object(self.guild_id)

        @app_commands.command(name="imagine", description="Make a picture")
        async def imagine(interaction: discord.Interaction, prompt: str, steps: int = 20) -> None:
            try:
                assert self.handler is not None
                await self.handler(interaction, prompt)
            except Exception as e:
                self.errors.append(e)
            finally:
                self.done.set()

        @imagine.autocomplete("prompt")
        async def prompt_autocomplete(
            interaction: discord.Interaction, current: str
        ) -> list[app_commands.Choice]:
            return [app_commands.Choice(name=f"{current} cat", value=f"{current} cat")]

        job = app_commands.Group(name="job", description="Manage jobs")

        @job.command(name="cancel", description="Cancel a job")
        async def cancel(
            interaction: discord.Interaction, job_id: str, user: discord.Member | None = None
        ) -> None:
            self.cancels.append((job_id, user))
            await interaction.response.send_message("ok", ephemeral=True)

        self.tree.add_command(imagine, guild=guild)
        self.tree.add_command(job, guild=guild)
        await self.tree.sync(guild=guild)


async def edit_with_file(interaction: discord.Interaction, prompt: str) -> None:
    """The product's happy path: defer, then put the image (and a cancel button) on the original."""
    await interaction.response.defer(thinking=True)
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton("job1"))
    await interaction.edit_original_response(
        content=f"done: {prompt}",
        attachments=[discord.File(io.BytesIO(PNG), "out.png")],
        view=view,
        allowed_mentions=discord.AllowedMentions.none(),
    )


@pytest.fixture
async def fake() -> AsyncIterator[FakeDiscord]:
    saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    async with FakeDiscord(token=TOKEN, heartbeat_interval_ms=200) as f:
        point_discord_py_at(f.api_base, f.gateway_url)
        f.user = f.add_user(username="alice")  # type: ignore[attr-defined]
        f.guild = f.add_guild(name="Test", channels=["general", {"name": "art", "nsfw": True}])  # type: ignore[attr-defined]
        try:
            yield f
        finally:
            discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved


@pytest.fixture
async def bot(fake: FakeDiscord) -> AsyncIterator[ProbeBot]:
    b = ProbeBot(fake.guild.id)  # type: ignore[attr-defined]
    task = asyncio.create_task(b.start(TOKEN))
    try:
        await asyncio.wait_for(b.wait_until_ready(), 5)
        yield b
    finally:
        await b.close()
        await asyncio.wait_for(task, 5)


async def invoke(fake: FakeDiscord, bot: ProbeBot, handler: Handler, **kwargs: Any) -> FakeInteraction:
    bot.handler, bot.done = handler, asyncio.Event()
    g = fake.guild  # type: ignore[attr-defined]
    inter = await fake.invoke_command(
        g.id,
        g.channels[0].id,
        fake.user.id,
        "imagine",
        {"prompt": "a cat"},
        **kwargs,  # type: ignore[attr-defined]
    )
    await asyncio.wait_for(bot.done.wait(), 5)
    return inter


async def test_login_ready_and_guild_sync(fake: FakeDiscord, bot: ProbeBot) -> None:
    assert bot.user is not None and str(bot.user.id) == fake.app_id
    guild = bot.get_guild(int(fake.guild.id))  # type: ignore[attr-defined]
    assert guild is not None and {c.name for c in guild.text_channels} == {"general", "art"}
    assert guild.get_channel(int(fake.guild.channels[1].id)).is_nsfw()  # type: ignore[attr-defined,union-attr]
    assert fake.sync_count == 1 and sorted(fake.commands[fake.guild.id]) == ["imagine", "job"]  # type: ignore[attr-defined]
    assert fake.identify_count == 1 and fake.ready_count == 1
    assert fake.sessions[next(iter(fake.sessions))].identify["intents"] == discord.Intents.default().value
    assert [r.path for r in fake.requests[:2]] == ["/users/@me", "/oauth2/applications/@me"]
    await fake.wait_for_state(lambda: fake.heartbeats, 3, "a heartbeat")  # interval is 200 ms


async def test_slash_command_defer_then_edit_with_file(fake: FakeDiscord, bot: ProbeBot) -> None:
    inter = await invoke(fake, bot, edit_with_file)
    assert bot.errors == []
    cb = await inter.wait_for_callback()
    assert cb.type == 5 and not cb.ephemeral and inter.ack_latency is not None and inter.ack_latency < 3
    msg = await inter.wait_until(lambda m: m.attachments)
    assert msg is inter.original and not msg.loading
    assert msg.content == "done: a cat"
    assert [(a.filename, a.data, a.content_type) for a in msg.attachments] == [("out.png", PNG, "image/png")]
    assert msg.allowed_mentions == {"parse": []}
    assert [r.kind for r in msg.history] == ["create", "edit"] and msg.history[0].flags & 128  # loading first
    assert fake.channel_messages(inter.channel_id) == [msg]
    # the payload discord.py saw was sane: expiry derived from the snowflake, the upload limit carried over
    assert inter.expires_at - inter.created_at == 15 * 60


async def test_dynamic_button_click_reaches_callback(fake: FakeDiscord, bot: ProbeBot) -> None:
    inter = await invoke(fake, bot, edit_with_file)
    msg = await inter.wait_until(lambda m: m.components)
    custom_id = fake.find_component(msg, label="Cancel")
    assert custom_id == "test:cancel:job1"
    click = await fake.click_button(msg, custom_id, fake.user.id)  # type: ignore[attr-defined]
    cb = await click.wait_for_callback()
    assert bot.clicked == ["job1"]
    assert cb.type == 4 and cb.ephemeral and click.original is not None
    assert click.original.content == "cancelled job1"
    with pytest.raises(ValueError, match="no component"):
        await fake.click_button(msg, "test:cancel:nope", fake.user.id)  # type: ignore[attr-defined]


async def test_ephemeral_response_recorded(fake: FakeDiscord, bot: ProbeBot) -> None:
    async def private(interaction: discord.Interaction, prompt: str) -> None:
        await interaction.response.send_message("only you", ephemeral=True)

    inter = await invoke(fake, bot, private)
    cb = await inter.wait_for_callback()
    assert cb.type == 4 and cb.ephemeral and inter.ephemeral
    assert inter.original is not None and inter.original.ephemeral
    assert fake.channel_messages(inter.channel_id) == []
    assert fake.channel_messages(inter.channel_id, include_ephemeral=True) == [inter.original]


async def test_double_ack_is_refused(fake: FakeDiscord, bot: ProbeBot) -> None:
    async def twice(interaction: discord.Interaction, prompt: str) -> None:
        await interaction.response.defer()
        interaction.response._response_type = None  # bypass discord.py's own guard: hit the wire twice
        await interaction.response.defer()

    await invoke(fake, bot, twice)
    assert len(bot.errors) == 1 and isinstance(bot.errors[0], discord.HTTPException)
    assert bot.errors[0].code == 40060


async def test_autocomplete_answer_recorded(fake: FakeDiscord, bot: ProbeBot) -> None:
    g = fake.guild  # type: ignore[attr-defined]
    inter = await fake.autocomplete(
        g.id, g.channels[0].id, fake.user.id, "imagine", {"prompt": "tab"}, "prompt"
    )  # type: ignore[attr-defined]
    cb = await inter.wait_for_callback()
    assert cb.type == 8 and cb.data["choices"] == [{"name": "tab cat", "value": "tab cat"}]


async def test_429_with_via_is_retried(fake: FakeDiscord, bot: ProbeBot) -> None:
    fake.inject_429("PATCH", r"/messages/@original$", retry_after=0.2)
    inter = await invoke(fake, bot, edit_with_file)
    assert bot.errors == []
    assert [r.status for r in fake.requests_matching("PATCH", "@original")] == [429, 200]
    assert inter.original is not None and inter.original.attachments[0].data == PNG


async def test_429_without_via_raises(fake: FakeDiscord, bot: ProbeBot) -> None:
    fake.inject_429("PATCH", r"/messages/@original$", via=False)
    await invoke(fake, bot, edit_with_file)
    assert len(bot.errors) == 1 and isinstance(bot.errors[0], discord.HTTPException)
    assert bot.errors[0].status == 429
    assert len(fake.requests_matching("PATCH", "@original")) == 1  # not retried


async def test_oversized_file_is_413_40005(fake: FakeDiscord, bot: ProbeBot) -> None:
    seen: list[int] = []

    async def big(interaction: discord.Interaction, prompt: str) -> None:
        seen.append(interaction.filesize_limit)
        await edit_with_file(interaction, prompt)

    inter = await invoke(fake, bot, big, attachment_size_limit=1000)
    assert seen == [1000]
    assert len(bot.errors) == 1 and isinstance(bot.errors[0], discord.HTTPException)
    assert (bot.errors[0].status, bot.errors[0].code) == (413, 40005)
    assert inter.original is not None and inter.original.attachments == [] and inter.original.loading


async def test_expired_token_is_401_50027(fake: FakeDiscord, bot: ProbeBot) -> None:
    async def slow(interaction: discord.Interaction, prompt: str) -> None:
        await interaction.response.defer()
        fake.clock.advance(15 * 60 + 1)
        await interaction.edit_original_response(content="too late")

    inter = await invoke(fake, bot, slow)
    assert len(bot.errors) == 1 and isinstance(bot.errors[0], discord.HTTPException)
    assert (bot.errors[0].status, bot.errors[0].code) == (401, 50027)
    assert inter.original is not None and inter.original.content == ""
    # an ordinary channel message still works after the token died
    channel = bot.get_channel(int(inter.channel_id))
    assert isinstance(channel, discord.TextChannel)
    sent = await channel.send("fallback", allowed_mentions=discord.AllowedMentions.none())
    assert fake.messages[str(sent.id)].content == "fallback"


async def test_late_ack_is_unknown_interaction(fake: FakeDiscord, bot: ProbeBot) -> None:
    async def late(interaction: discord.Interaction, prompt: str) -> None:
        fake.clock.advance(3.5)
        await interaction.response.defer()

    await invoke(fake, bot, late)
    assert isinstance(bot.errors[0], discord.NotFound) and bot.errors[0].code == 10062


async def test_gateway_drop_resumes_and_replays_missed_events(fake: FakeDiscord, bot: ProbeBot) -> None:
    fake.ack_deadline_s = None  # discord.py's reconnect backoff is random (up to 2 s)
    fake.set_gateway_available(False)
    await fake.disconnect_gateway()
    await fake.wait_for_state(lambda: fake.refused_connections, 5, "a refused reconnect")
    assert fake.connected_sessions == []
    bot.handler, bot.done = edit_with_file, asyncio.Event()
    g = fake.guild  # type: ignore[attr-defined]
    inter = await fake.invoke_command(g.id, g.channels[0].id, fake.user.id, "imagine", {"prompt": "x"})  # type: ignore[attr-defined]
    fake.set_gateway_available(True)
    await fake.wait_for_state(lambda: fake.resume_count, 8, "RESUME")
    await inter.wait_until(lambda m: m.attachments, timeout=5)
    assert fake.identify_count == 1 and fake.close_codes[0] == 4000


async def test_bad_token_is_login_failure(fake: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.none())
    with pytest.raises(discord.LoginFailure):
        await client.start("wrong-token")
    await client.close()
    assert fake.requests[-1].status == 401 and fake.identify_count == 0


async def test_close_is_clean(fake: FakeDiscord) -> None:
    problems: list[str] = []
    loop = asyncio.get_running_loop()
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: problems.append(str(ctx.get("message"))))
    try:
        b = ProbeBot(fake.guild.id)  # type: ignore[attr-defined]
        task = asyncio.create_task(b.start(TOKEN))
        await asyncio.wait_for(b.wait_until_ready(), 5)
        await invoke(fake, b, edit_with_file)
        await b.close()
        await asyncio.wait_for(task, 5)
        await fake.wait_for_state(lambda: not fake.connected_sessions, 3, "socket closed")
        del b, task
        gc.collect()
        await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(old)
    assert problems == []
    assert fake.last_close_code == 4000  # discord.py closes its side with 4000, not 1000


async def test_standalone_cli_and_control_api(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fakes.discord",
        "--port",
        "0",
        "--token",
        TOKEN,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    try:
        assert proc.stdout is not None
        info = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert info["message"].startswith("ready on http://127.0.0.1:")
        base = info["url"]
        point_discord_py_at(info["api_base"], info["gateway_url"])
        b = ProbeBot(info["guild_id"])
        b.handler = edit_with_file
        task = asyncio.create_task(b.start(TOKEN))
        try:
            await asyncio.wait_for(b.wait_until_ready(), 5)
            async with aiohttp.ClientSession() as http:
                state = await (await http.get(f"{base}/_fake/state")).json()
                assert state["ready_count"] == 1 and state["gateway_sessions"] == 1
                assert state["commands"] == {info["guild_id"]: ["imagine", "job"]}
                body = {k: info[k] for k in ("guild_id", "channel_id", "user_id")}
                resp = await http.post(
                    f"{base}/_fake/invoke", json=body | {"name": "imagine", "options": {"prompt": "p"}}
                )
                ids = await resp.json()
                assert resp.status == 200, ids
                for _ in range(100):
                    summary = await (
                        await http.get(f"{base}/_fake/interactions/{ids['interaction_id']}")
                    ).json()
                    if summary["original"] and summary["original"]["attachments"]:
                        break
                    await asyncio.sleep(0.05)
                assert summary["callback"]["type"] == 5
                assert summary["original"]["attachments"][0]["size"] == len(PNG)
                mid = summary["original"]["id"]
                assert await (await http.get(f"{base}/_fake/attachments/{mid}/0")).read() == PNG
                resp = await http.post(f"{base}/_fake/invoke", json=body | {"name": "nope"})
                assert resp.status == 400 and "not synced" in (await resp.json())["error"]
                await http.post(f"{base}/_fake/gateway", json={"disconnect": True})
                for _ in range(100):
                    state = await (await http.get(f"{base}/_fake/state")).json()
                    if state["resume_count"]:
                        break
                    await asyncio.sleep(0.05)
                assert state["resume_count"] == 1 and state["last_close_code"] == 4000
        finally:
            await b.close()
            await asyncio.wait_for(task, 5)
    finally:
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 5) == 0


async def test_fake_refuses_what_discord_refuses(fake: FakeDiscord, bot: ProbeBot) -> None:
    g = fake.guild  # type: ignore[attr-defined]
    with pytest.raises(LookupError, match="not synced"):
        await fake.invoke_command(g.id, g.channels[0].id, fake.user.id, "unknown")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="required"):
        await fake.invoke_command(g.id, g.channels[0].id, fake.user.id, "imagine", {"steps": 3})  # type: ignore[attr-defined]
    channel = bot.get_channel(int(g.channels[0].id))
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.HTTPException) as exc:
        await channel.send("x" * 2001)
    assert exc.value.code == 50035
    with pytest.raises(discord.HTTPException) as exc:
        await channel.send(file=discord.File(io.BytesIO(b"x" * (g.attachment_size_limit + 1)), "big.bin"))
    assert (exc.value.status, exc.value.code) == (413, 40005)


async def test_attachment_edit_semantics_and_followups(fake: FakeDiscord, bot: ProbeBot) -> None:
    async def flow(interaction: discord.Interaction, prompt: str) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        first = await interaction.edit_original_response(attachments=[discord.File(io.BytesIO(PNG), "a.png")])
        # keep the existing attachment by id and add a new file
        await interaction.edit_original_response(
            attachments=[first.attachments[0], discord.File(io.BytesIO(b"GIF89a"), "b.gif")]
        )
        await interaction.followup.send("more", file=discord.File(io.BytesIO(b"x"), "c.txt"), ephemeral=True)

    inter = await invoke(fake, bot, flow)
    assert bot.errors == []
    assert inter.callback is not None and inter.callback.ephemeral and inter.original is not None
    first_id = inter.original.history[1].attachments[0]["id"]
    assert [(a.id == first_id, a.filename, a.content_type) for a in inter.original.attachments] == [
        (True, "a.png", "image/png"),
        (False, "b.gif", "image/gif"),
    ]
    assert len(inter.edits) == 2
    assert [(m.content, m.ephemeral, m.attachments[0].data) for m in inter.followups] == [
        ("more", True, b"x")
    ]


async def test_raw_gateway_handshake_and_bad_token(fake: FakeDiscord) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.ws_connect(fake.gateway_url + "?v=10&encoding=json") as ws,
    ):
        hello = await ws.receive_json(timeout=2)
        assert hello == {"op": 10, "d": {"heartbeat_interval": 200}}
        await ws.send_json({"op": 1, "d": None})
        assert await ws.receive_json(timeout=2) == {"op": 11}
        await ws.send_json({"op": 2, "d": {"token": "bad", "intents": 0, "properties": {}}})
        msg = await ws.receive(timeout=2)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4004
    await fake.wait_for_state(lambda: fake.close_codes, 2, "close recorded")
    assert fake.last_close_code == 4004 and fake.identify_count == 0


async def test_quirk_outage_at_first_connect_kills_start(fake: FakeDiscord) -> None:
    """discord.py 2.7 quirk: a failed *first* gateway connect raises AttributeError instead of retrying."""
    fake.set_gateway_available(False)
    client = discord.Client(intents=discord.Intents.none(), guild_ready_timeout=0.1)
    try:
        with pytest.raises(AttributeError, match="sequence"):
            await asyncio.wait_for(client.start(TOKEN), 5)
    finally:
        await client.close()
    assert fake.refused_connections == 1


async def test_subcommand_with_resolved_member(fake: FakeDiscord, bot: ProbeBot) -> None:
    g = fake.guild  # type: ignore[attr-defined]
    bob = fake.add_member(g.id, username="bob", permissions=0)
    inter = await fake.invoke_command(
        g.id,
        g.channels[0].id,
        fake.user.id,
        "job",
        {"job_id": "abc", "user": bob.id},
        subcommand="cancel",  # type: ignore[attr-defined]
    )
    await inter.wait_for_callback()
    assert [(job, type(u), u and u.id, u and u.name) for job, u in bot.cancels] == [
        ("abc", discord.Member, int(bob.id), "bob")
    ]
    assert inter.payload["data"]["options"][0]["type"] == 1
    with pytest.raises(ValueError, match="subcommand"):
        await fake.invoke_command(g.id, g.channels[0].id, fake.user.id, "job", {"job_id": "x"})  # type: ignore[attr-defined]


async def test_rest_content_type_ratelimit_headers_and_auth(fake: FakeDiscord) -> None:
    async with aiohttp.ClientSession() as http:
        ok = await http.get(f"{fake.api_base}/users/@me", headers={"Authorization": f"Bot {TOKEN}"})
        assert ok.headers["Content-Type"] == "application/json"  # no charset, or discord.py sees a str
        assert {
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset-After",
            "X-RateLimit-Bucket",
        } <= set(ok.headers)
        bad = await http.get(f"{fake.api_base}/users/@me", headers={"Authorization": "Bot nope"})
        assert (bad.status, await bad.json()) == (401, {"message": "401: Unauthorized", "code": 0})
        missing = await http.post(f"{fake.api_base}/interactions/1/tok/callback", json={"type": 5})
        assert (missing.status, (await missing.json())["code"]) == (404, 10062)


async def test_dms_to_the_owner_and_the_team_owner_and_closed_dms(fake: FakeDiscord) -> None:
    """discord.py's application_info / create_dm / send over REST, as the bot's owner notifier uses them."""
    client = discord.Client(intents=discord.Intents.none())
    async with client:
        await client.login(TOKEN)
        app = await client.application_info()
        owner = fake.app_owner
        assert app.team is None and str(app.owner.id) == owner.id
        dm = await client.create_dm(app.owner)
        await dm.send("hello owner")
        assert [m.content for m in fake.dms_to(owner.id)] == ["hello owner"]
        assert fake.dms_to(owner.id)[0].guild_id is None

        team_owner = fake.make_team_app()
        app = await client.application_info()
        assert app.team is not None and str(app.team.owner_id) == team_owner.id
        team_owner.accepts_dms = False
        dm = await client.create_dm(discord.Object(int(team_owner.id)))
        with pytest.raises(discord.Forbidden) as refused:
            await dm.send("hello team owner")
        assert refused.value.code == 50007
        assert fake.dms_to(team_owner.id) == []
    async with aiohttp.ClientSession() as http:
        dms = await (await http.get(f"{fake.base_url}/_fake/dms/{owner.id}")).json()
        assert [m["content"] for m in dms] == ["hello owner"]
        answer = await (await http.post(f"{fake.base_url}/_fake/owner", json={"accepts_dms": True})).json()
        assert answer == {"owner_id": team_owner.id, "accepts_dms": True, "team_id": fake.team_id}


async def test_a_guild_the_bot_is_not_in_answers_missing_access(fake: FakeDiscord) -> None:
    client = discord.Client(intents=discord.Intents.none())
    async with client:
        await client.login(TOKEN)
        for call in (
            client.fetch_guild(1180000000000000001),
            client.http.get_guild_commands(fake.app_id, 1180000000000000001),
        ):
            with pytest.raises(discord.Forbidden) as refused:
                await call
            assert refused.value.code == 50001
        no_scope = fake.add_guild(name="no scope", applications_commands=False)
        assert (await client.fetch_guild(int(no_scope.id))).name == "no scope"
        with pytest.raises(discord.Forbidden):
            await client.http.get_guild_commands(fake.app_id, no_scope.id)
