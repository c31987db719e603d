"""``python -m bot check``: diagnose a set-up before running the bot, one line per check.

Checks, in order: the settings (loading them validated them), the image backend, or each ``IMAGE_BACKENDS`` entry
on a line of its own (``backend <name>: ...``) (lists its models; for ComfyUI
also the workflow against ``/object_info``, one line per problem, and whether previews are on), the Discord token
(``GET /users/@me``) and the application id (for the invite link), ``DEV_GUILD_ID`` when set (``GET /guilds/{id}``
and the application's commands there: the bot must be in that server, invited with the ``applications.commands``
scope), and ``DATA_DIR`` (created if missing, then a file is written and removed). Each prints ``<check>: ok ...``
or ``<check>: problem: ...``;
the exit status is 0 when every check passed, 1 otherwise. Never a traceback, never the token.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import aiohttp
import discord

from bot import __version__
from bot.logs import redact
from bot.settings import BackendEntry, Settings, SettingsError

if TYPE_CHECKING:
    from bot.backends.comfyui import ComfyUIBackend

DISCORD_API = "https://discord.com/api/v10"
INVITE_BASE = "https://discord.com/oauth2/authorize"
#: Discord asks bots to identify themselves this way (``DiscordBot ($url, $version)``).
USER_AGENT = f"DiscordBot (https://github.com/imagine-bot, {__version__}) imagine-bot-check"
REQUEST_TIMEOUT_S = 15.0
MODELS_SHOWN = 5


def required_permissions() -> discord.Permissions:
    """Exactly what the bot needs in a channel, no more.

    Answering a slash command needs no channel permission at all (interaction responses and their edits go
    through the interaction's webhook). These are for the moments the bot must use the channel itself:
    """
    return discord.Permissions(
        # See the channel: without it Discord refuses every channel message, and the bot cannot tell its users.
        view_channel=True,
        # Post the result as a normal message when the 15-minute interaction token has expired.
        send_messages=True,
        # The images themselves in that message.
        attach_files=True,
        # The result card (prompt, seed, backend, timing) in that message is an embed.
        embed_links=True,
        # Find and edit the bot's own earlier job messages in the channel (after a restart, once the
        # interaction token is dead): fetching a channel message needs it.
        read_message_history=True,
    )


def invite_url(client_id: int | str, permissions: discord.Permissions | None = None) -> str:
    perms = required_permissions() if permissions is None else permissions
    query = urlencode(
        {"client_id": str(client_id), "scope": "bot applications.commands", "permissions": str(perms.value)}
    )
    return f"{INVITE_BASE}?{query}"


@dataclass
class Report:
    """Collects one line per check; secrets are scrubbed from every line before it is printed."""

    secrets: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    def _say(self, line: str) -> None:
        line = redact(line, self.secrets)
        self.lines.append(line)
        print(line, flush=True)

    def ok(self, name: str, detail: str = "") -> None:
        self._say(f"{name}: ok" + (f" ({detail})" if detail else ""))

    def info(self, name: str, detail: str) -> None:
        self._say(f"{name}: {detail}")

    def problem(self, name: str, detail: str) -> None:
        self.problems.append(detail)
        self._say(f"{name}: problem: {detail}")


def _secrets(settings: Settings) -> list[str]:
    values = (settings.discord_token,)
    secrets = [s.get_secret_value().strip() for s in values if s and len(s.get_secret_value().strip()) >= 4]
    secrets += [key for key in settings.backend_keys() if len(key) >= 4]
    if settings.database_url is not None:
        from bot.engine.store_pg import dsn_secrets

        secrets.extend(dsn_secrets(settings.database_url.get_secret_value()))
    return secrets


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def check_backends(settings: Settings, session: aiohttp.ClientSession, report: Report) -> None:
    """``IMAGE_BACKEND``'s backend, or each ``IMAGE_BACKENDS`` entry on a line of its own."""
    if not settings.image_backends:
        await check_backend(settings, session, report)
        return
    for entry in settings.backend_entries():
        await check_backend(settings, session, report, entry=entry)


async def check_backend(
    settings: Settings, session: aiohttp.ClientSession, report: Report, *, entry: BackendEntry | None = None
) -> None:
    from bot.backends import create_backend
    from bot.backends.http import RetryPolicy, safe_url
    from bot.engine.errors import GenerationError

    name = "backend" if entry is None else f"backend {entry.name}"
    entry = entry or settings.backend_entries()[0]
    where = entry.kind
    if entry.url:
        where += f" at {safe_url(entry.url)}"
    try:
        # One attempt: a diagnosis should answer quickly and say what it saw, not retry for half a minute.
        backend = create_backend(settings, session, retry=RetryPolicy(attempts=1), entry=entry)
        async with asyncio.timeout(REQUEST_TIMEOUT_S * 2):
            models = await backend.list_models()
    except GenerationError as exc:
        report.problem(name, f"{where}: {exc.advice or exc.message}")
        return
    except SettingsError as exc:
        report.problem(name, str(exc))
        return
    except TimeoutError:
        report.problem(name, f"{where}: no answer within {REQUEST_TIMEOUT_S * 2:.0f} s")
        return
    except Exception as exc:
        report.problem(name, f"{where}: {_short(exc)}")
        return
    if models is None:  # a backend that cannot list its models is still reachable
        report.ok(name, f"{where}; it does not list its models")
        return
    shown = ", ".join(models[:MODELS_SHOWN]) + (", ..." if len(models) > MODELS_SHOWN else "")
    detail = f"{where}, {len(models)} model{'s' if len(models) != 1 else ''}" + (
        f": {shown}" if models else ""
    )
    report.ok(name, detail)
    missing = [m for m in entry.models if models and m not in models]
    if missing:
        report.info(name, f"note: {', '.join(missing)} listed in its models but not by the backend")
    if settings.image_model and models and settings.image_model not in models:
        report.info(name, f"note: IMAGE_MODEL {settings.image_model!r} is not in the backend's list")
    from bot.backends.comfyui import ComfyUIBackend

    if isinstance(backend, ComfyUIBackend):
        await check_workflow(backend, report, name=name)


async def check_workflow(backend: ComfyUIBackend, report: Report, *, name: str = "backend") -> None:
    """The ComfyUI workflow against the server's /object_info: one line per problem; previews on or off."""
    from bot.engine.errors import GenerationError

    label = "workflow" if name == "backend" else f"workflow {name.removeprefix('backend ')}"
    source = backend.workflow.source
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S * 2):
            problems = await backend.validate()
            hint = await backend.preview_hint()
    except GenerationError as exc:
        report.problem(label, f"{source}: cannot check it: {exc.message}")
        return
    except TimeoutError:
        report.problem(label, f"{source}: no answer from /object_info within {REQUEST_TIMEOUT_S * 2:.0f} s")
        return
    for problem in problems:
        report.problem(label, f"{source}: {problem}")
    if not problems:
        found = sorted(backend.workflow.placeholders())
        report.ok(label, f"{source}: every node exists; placeholders {', '.join(found)}")
    if hint:
        report.info(label, f"note: {hint}")


async def _discord_get(session: aiohttp.ClientSession, base: str, path: str, token: str) -> tuple[int, Any]:
    async with session.get(
        f"{base}{path}",
        headers={"Authorization": f"Bot {token}", "User-Agent": USER_AGENT},
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
    ) as response:
        try:
            data = await response.json(content_type=None)
        except (ValueError, aiohttp.ContentTypeError):
            data = None
        return response.status, data


async def check_discord(settings: Settings, session: aiohttp.ClientSession, report: Report) -> None:
    try:
        token = settings.token()
    except SettingsError:
        report.problem("discord", "DISCORD_TOKEN: not set (required to run the bot; see .env.example)")
        return
    base = (settings.discord_api_base or DISCORD_API).rstrip("/")
    try:
        status, me = await _discord_get(session, base, "/users/@me", token)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        report.problem("discord", f"cannot reach {base}: {_short(exc)}")
        return
    if status == 401:
        report.problem("discord", "DISCORD_TOKEN: Discord refused the token (401)")
        return
    if status != 200 or not isinstance(me, dict) or "id" not in me:
        report.problem("discord", f"GET /users/@me answered HTTP {status}")
        return
    report.ok("discord", f"logged in as {me.get('username', '?')} (id {me['id']})")
    # The application id is the client id in the invite; for bots made since 2019 it equals the user id.
    client_id: Any = me["id"]
    try:
        status, app = await _discord_get(session, base, "/oauth2/applications/@me", token)
        if status == 200 and isinstance(app, dict) and app.get("id"):
            client_id = app["id"]
            if app.get("bot_require_code_grant"):
                report.info(
                    "invite", "note: 'Requires OAuth2 Code Grant' is on; the link below will not work"
                )
    except (aiohttp.ClientError, TimeoutError, OSError):
        pass  # the user id is a fine fallback
    await check_dev_guild(settings, session, report, base, token, client_id)
    report.info("invite", invite_url(client_id))


def _discord_says(status: int, body: Any) -> str:
    message = body.get("message") if isinstance(body, dict) else None
    return f"{status} {message}" if message else f"HTTP {status}"


async def check_dev_guild(
    settings: Settings,
    session: aiohttp.ClientSession,
    report: Report,
    base: str,
    token: str,
    client_id: Any,
) -> None:
    """DEV_GUILD_ID names a server the bot is in and may create commands in (else start-up would stop)."""
    guild_id = settings.dev_guild_id
    if not guild_id:
        return
    name = "dev guild"
    try:
        status, guild = await _discord_get(session, base, f"/guilds/{guild_id}", token)
        if status in (403, 404):
            report.problem(
                name,
                f"DEV_GUILD_ID: the bot is not in server {guild_id} (Discord: {_discord_says(status, guild)}); "
                "invite it there with the link below, or leave DEV_GUILD_ID empty to sync commands globally",
            )
            return
        if status != 200 or not isinstance(guild, dict):
            report.problem(name, f"DEV_GUILD_ID: GET /guilds/{guild_id} answered HTTP {status}")
            return
        where = f"server {guild.get('name', '?')!r} ({guild_id})"
        path = f"/applications/{client_id}/guilds/{guild_id}/commands"
        status, body = await _discord_get(session, base, path, token)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        report.problem(name, f"DEV_GUILD_ID: cannot ask Discord about server {guild_id}: {_short(exc)}")
        return
    if status == 403:
        report.problem(
            name,
            f"DEV_GUILD_ID: the bot is in {where} but may not add commands there "
            f"(Discord: {_discord_says(status, body)}); invite it again with the link below, which asks for "
            "the applications.commands scope",
        )
    elif status != 200:
        report.problem(name, f"DEV_GUILD_ID: GET {path} answered HTTP {status}")
    else:
        report.ok(name, f"commands go to {where}")


def _probe_dir_sync(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".check-", dir=directory)
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(name)


async def check_data_dir(settings: Settings, report: Report) -> None:
    directory = settings.data_dir.expanduser().absolute()
    try:
        await asyncio.to_thread(_probe_dir_sync, directory)
    except OSError as exc:
        report.problem(
            "data dir", f"DATA_DIR: cannot create or write {directory}: {exc.strerror or _short(exc)}"
        )
        return
    report.ok("data dir", f"{directory} is writable")


async def check_database(settings: Settings, report: Report) -> None:
    """With DATABASE_URL: PostgreSQL answers, the login works and the schema is one this bot can use."""
    if settings.database_url is None:
        return
    from bot.engine.store import StoreError
    from bot.engine.store_pg import PgJobStore

    try:
        detail = await PgJobStore(settings.database_url.get_secret_value()).probe()
    except StoreError as exc:
        report.problem("database", exc.message)
        return
    report.ok("database", detail)


async def run_check(settings: Settings) -> int:
    """Runs every check (one failing does not stop the others); 0 when all passed, 1 otherwise."""
    report = Report(secrets=_secrets(settings))
    report.ok("settings")
    report.info(".env", settings.env_file_note())
    from bot.service.runtime import make_session

    try:
        async with make_session() as session:
            await check_backends(settings, session, report)
            await check_discord(settings, session, report)
        await check_data_dir(settings, report)
        await check_database(settings, report)
    except Exception as exc:  # a bug in a check must still end in a line, not a traceback
        report.problem("check", f"unexpected error: {_short(exc)}")
    return _summary(report, report.problems)


def _summary(report: Report, problems: Iterable[str]) -> int:
    count = len(list(problems))
    if count == 0:
        report.info("result", "all checks passed")
        return 0
    report.info("result", f"{count} problem{'s' if count != 1 else ''} found")
    return 1
