"""The fake Discord's REST API (everything but interaction responses): identity, commands, channels,
guilds, members, messages, the CDN; plus the middleware every ``/api/`` request passes through.

The middleware records each request (``fake.requests``), answers injected errors and 429s before any
handler runs, checks ``Authorization: Bot <token>`` (interaction webhooks authenticate by the token in the
path) and adds per-route ``X-RateLimit-*`` headers, as Discord does.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .model import (
    ADMINISTRATOR,
    ATTACH_FILES,
    DEFAULT_ATTACHMENT_LIMIT,
    IS_COMPONENTS_V2,
    SEND_MESSAGES,
    SUPPRESS_EMBEDS,
    VIEW_CHANNEL,
    FakeGuild,
    RecordedRequest,
    bot_member_payload,
    guild_create_payload,
    member_payload,
)
from .wire import BODY_KEY, ApiError, Body, Injection, form_error, json_response, read_body

if TYPE_CHECKING:
    from .fake import FakeDiscord


class RestApi:
    """REST routes and middleware; owns the injected answers and the rate-limit buckets."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake
        self._injections: list[Injection] = []
        self._buckets: dict[str, tuple[float, int]] = {}

    def add_routes(self, app: web.Application) -> None:
        api = "/api/v{version:\\d+}"
        r = app.router
        r.add_get(f"{api}/users/@me", self.h_me)
        r.add_get(f"{api}/oauth2/applications/@me", self.h_app)
        r.add_get(f"{api}/applications/@me", self.h_app)
        for scope in ("", "/guilds/{guild_id}"):
            r.add_put(f"{api}/applications/{{app_id}}{scope}/commands", self.h_put_commands)
            r.add_get(f"{api}/applications/{{app_id}}{scope}/commands", self.h_get_commands)
        r.add_post(f"{api}/users/@me/channels", self.h_open_dm)
        r.add_get(f"{api}/channels/{{channel_id}}", self.h_get_channel)
        r.add_post(f"{api}/channels/{{channel_id}}/messages", self.h_channel_post)
        r.add_post(f"{api}/channels/{{channel_id}}/typing", self.h_typing)
        for method in ("GET", "PATCH", "DELETE"):
            r.add_route(
                method, f"{api}/channels/{{channel_id}}/messages/{{message_id}}", self.h_channel_message
            )
        r.add_get(f"{api}/guilds/{{guild_id}}", self.h_get_guild)
        r.add_get(f"{api}/guilds/{{guild_id}}/members/{{user_id}}", self.h_get_member)
        r.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self.h_cdn)

    # ------------------------------------------------------------------ injection

    def inject_429(
        self,
        method: str,
        path_pattern: str,
        count: int = 1,
        retry_after: float = 0.3,
        via: bool = True,
        global_: bool = False,
    ) -> None:
        """Answer the next `count` matching requests with 429 (path_pattern: regex searched in the path)."""
        headers = {
            "Retry-After": str(max(1, int(retry_after + 0.999))),
            "X-RateLimit-Limit": str(self.fake.rate_limit[0]),
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset-After": f"{retry_after:.3f}",
            "X-RateLimit-Scope": "global" if global_ else "user",
        }
        if global_:
            headers["X-RateLimit-Global"] = "true"
        if via:
            headers["Via"] = "1.1 google"
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": global_}
        self._injections.append(
            Injection(method.upper(), re.compile(path_pattern), count, 429, body, headers)
        )

    def inject_error(
        self,
        method: str,
        path_pattern: str,
        status: int,
        body: Any = None,
        count: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `count` matching requests with status/body (str body = text/plain)."""
        if body is None:
            body = {"message": f"{status}: injected error", "code": 0}
        self._injections.append(
            Injection(method.upper(), re.compile(path_pattern), count, status, body, headers or {})
        )

    @property
    def pending_injections(self) -> int:
        return sum(i.count for i in self._injections)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[..., Awaitable[Any]]) -> Any:
        if not request.path.startswith("/api/"):
            return await handler(request)
        rel = re.sub(r"^/api/v\d+", "", request.path) or "/"
        record = RecordedRequest(request.method, rel, dict(request.query), self.fake.clock())
        self.fake.requests.append(record)
        try:
            body = await read_body(request)
            request[BODY_KEY] = body
            record.json = body.json
            record.files = [
                {
                    "index": u.index,
                    "filename": u.filename,
                    "size": len(u.data),
                    "content_type": u.content_type,
                }
                for u in body.uploads
            ]
            injection = next((i for i in self._injections if i.matches(request.method, rel)), None)
            if injection is not None:
                injection.count -= 1
                record.injected = True
                if isinstance(injection.body, str):
                    resp = web.Response(
                        text=injection.body, status=injection.status, headers=injection.headers
                    )
                else:
                    resp = json_response(injection.body, injection.status, injection.headers)
            else:
                self.check_auth(request, rel)
                resp = await handler(request)
        except ApiError as e:
            resp = json_response(e.body(), e.status)
        except web.HTTPException as e:
            resp = json_response({"message": f"{e.status}: {e.reason}", "code": 0}, e.status)
        if not record.injected:
            resp.headers.update(self.ratelimit_headers(request))
        record.status = resp.status
        self.fake.notify()
        return resp

    def check_auth(self, request: web.Request, rel: str) -> None:
        if rel.startswith(("/webhooks/", "/interactions/")):
            return  # interaction webhooks authenticate by token in the path
        if request.headers.get("Authorization") != f"Bot {self.fake.token}":
            raise ApiError(401, "401: Unauthorized", 0)

    def ratelimit_headers(self, request: web.Request) -> dict[str, str]:
        route = request.match_info.route.resource
        template = route.canonical if route is not None else request.path
        bucket = hashlib.sha1(f"{request.method} {template}".encode()).hexdigest()[:16]
        major = ":".join(
            request.match_info.get(k, "") for k in ("channel_id", "guild_id", "webhook_id", "token")
        )
        key = f"{bucket}:{major}"
        limit, window = self.fake.rate_limit
        now = time.monotonic()
        reset_at, used = self._buckets.get(key, (now + window, 0))
        if now >= reset_at:
            reset_at, used = now + window, 0
        used += 1
        self._buckets[key] = (reset_at, used)
        return {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(limit - used, 0)),
            "X-RateLimit-Reset": f"{time.time() + (reset_at - now):.3f}",
            "X-RateLimit-Reset-After": f"{reset_at - now:.3f}",
            "X-RateLimit-Bucket": bucket,
        }

    # ------------------------------------------------------------------ REST handlers: identity

    async def h_me(self, request: web.Request) -> web.Response:
        return json_response({**self.fake.bot_user.payload(), "verified": True, "mfa_enabled": False})

    async def h_app(self, request: web.Request) -> web.Response:
        fake = self.fake
        team = None
        if fake.team_id is not None and fake.team_owner is not None:
            member = {
                "user": fake.team_owner.payload(),
                "team_id": fake.team_id,
                "membership_state": 2,
                "permissions": ["*"],
                "role": "admin",
            }
            team = {
                "id": fake.team_id,
                "name": "The Team",
                "icon": None,
                "owner_user_id": fake.team_owner.id,
                "members": [member],
            }
        owner = {**fake.app_owner.payload(), "flags": 1024 if team else 0}
        return json_response(
            {
                "id": self.fake.app_id,
                "name": self.fake.bot_user.username,
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": owner,
                "verify_key": "0" * 64,
                "flags": 0,
                "team": team,
                "bot": self.fake.bot_user.payload(),
            }
        )

    def _guild_or_403(self, guild_id: str) -> FakeGuild:
        """Discord answers 403 Missing Access (50001) for a guild the bot is not in, whether or not it exists."""
        guild = self.fake.guilds.get(guild_id)
        if guild is None:
            raise ApiError(403, "Missing Access", 50001)
        return guild

    def _command_scope(self, request: web.Request) -> str | None:
        """The guild of a guild-command route (None = global), or 50001 as Discord answers it: for another
        application, a guild the bot is not in, or one it was invited to without applications.commands."""
        if request.match_info["app_id"] != self.fake.app_id:
            raise ApiError(403, "Missing Access", 50001)
        scope = request.match_info.get("guild_id")
        if scope is not None and not self._guild_or_403(scope).applications_commands:
            raise ApiError(403, "Missing Access", 50001)
        return scope

    async def h_put_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        if self.fake.hold_command_sync is not None:
            await self.fake.hold_command_sync()
        body = request[BODY_KEY].json
        if not isinstance(body, list):
            raise form_error("_root", "LIST_TYPE_CONVERT", "Must be a list.")
        if len([c for c in body if c.get("type", 1) == 1]) > 100:
            raise form_error("_root", "BASE_TYPE_MAX_LENGTH", "Must be 100 or fewer in length.")
        old = self.fake.commands.get(scope, {})
        stored: dict[str, dict[str, Any]] = {}
        for cmd in body:
            if not re.fullmatch(r"[-_\w]{1,32}", cmd.get("name", "")) or cmd["name"] != cmd["name"].lower():
                raise form_error("0.name", "APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
            if cmd.get("type", 1) == 1 and not 1 <= len(cmd.get("description", "")) <= 100:
                raise form_error(
                    "0.description", "BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length."
                )
            prev = old.get(cmd["name"])
            entry = {
                "default_member_permissions": None,
                "dm_permission": True,
                "nsfw": False,
                "options": [],
                "type": 1,
                **cmd,
                "id": prev["id"] if prev else self.fake.snowflake(),
                "application_id": self.fake.app_id,
                "version": self.fake.snowflake(),
            }
            if scope is not None:
                entry["guild_id"] = scope
            stored[cmd["name"]] = entry
        self.fake.commands[scope] = stored
        self.fake.sync_calls.append((scope, self.fake.clock()))
        return json_response(list(stored.values()))

    async def h_get_commands(self, request: web.Request) -> web.Response:
        return json_response(list(self.fake.commands.get(self._command_scope(request), {}).values()))

    async def h_get_channel(self, request: web.Request) -> web.Response:
        ch = self.fake.message_store.channel_or_404(request.match_info["channel_id"])
        return json_response(ch.payload())

    async def h_get_guild(self, request: web.Request) -> web.Response:
        guild = self._guild_or_403(request.match_info["guild_id"])
        payload = guild_create_payload(guild, self.fake.bot_user)
        for key in ("channels", "members", "member_count", "unavailable", "joined_at", "large"):
            payload.pop(key, None)
        return json_response(payload)

    async def h_get_member(self, request: web.Request) -> web.Response:
        guild = self._guild_or_403(request.match_info["guild_id"])
        uid = request.match_info["user_id"]
        if uid == self.fake.app_id:
            return json_response(bot_member_payload(guild, self.fake.bot_user))
        if uid not in guild.members:
            raise ApiError(404, "Unknown Member", 10007)
        return json_response(
            member_payload(guild, self.fake.users[uid], guild.members[uid].permissions, with_user=True)
        )

    async def h_typing(self, request: web.Request) -> web.Response:
        self.fake.message_store.channel_or_404(request.match_info["channel_id"])
        return web.Response(status=204)

    async def h_cdn(self, request: web.Request) -> web.Response:
        aid = request.match_info["attachment_id"]
        for m in self.fake.messages.values():
            for a in m.attachments:
                if a.id == aid:
                    return web.Response(body=a.data, content_type=a.content_type)
        raise web.HTTPNotFound()

    # ------------------------------------------------------------------ messages

    async def h_open_dm(self, request: web.Request) -> web.Response:
        """POST /users/@me/channels {recipient_id}: always succeeds for a known user (refusal comes later)."""
        recipient = str((request[BODY_KEY].json or {}).get("recipient_id") or "")
        if recipient not in self.fake.users:
            raise ApiError(400, "Unknown User", 10013)
        return json_response(self.fake.open_dm(recipient).payload())

    async def h_channel_post(self, request: web.Request) -> web.Response:
        channel = self.fake.message_store.channel_or_404(request.match_info["channel_id"])
        body: Body = request[BODY_KEY]
        payload = body.json or {}
        if channel.recipient is not None:
            if not channel.recipient.accepts_dms:
                raise ApiError(403, "Cannot send messages to this user", 50007)
            self.fake.message_store.validate(payload, body.uploads, DEFAULT_ATTACHMENT_LIMIT, creating=True)
            msg = self.fake.message_store.create(channel, payload, body.uploads)
            return json_response(msg.payload(self.fake.base_url))
        guild = self.fake.guilds[channel.guild_id]
        perms = guild.bot_permissions
        if not perms & ADMINISTRATOR and (perms & (VIEW_CHANNEL | SEND_MESSAGES)) != (
            VIEW_CHANNEL | SEND_MESSAGES
        ):
            raise ApiError(403, "Missing Permissions", 50013)
        if body.uploads and not perms & (ATTACH_FILES | ADMINISTRATOR):
            raise ApiError(403, "Missing Permissions", 50013)
        self.fake.message_store.validate(payload, body.uploads, guild.attachment_size_limit, creating=True)
        flags = int(payload.get("flags") or 0) & (SUPPRESS_EMBEDS | IS_COMPONENTS_V2 | (1 << 12))
        mtype = 19 if payload.get("message_reference") else 0
        msg = self.fake.message_store.create(channel, payload, body.uploads, mtype=mtype, flags=flags)
        return json_response(msg.payload(self.fake.base_url))

    async def h_channel_message(self, request: web.Request) -> web.Response:
        channel = self.fake.message_store.channel_or_404(request.match_info["channel_id"])
        msg = self.fake.messages.get(request.match_info["message_id"])
        if msg is None or msg.deleted or msg.channel_id != channel.id or msg.ephemeral:
            raise ApiError(404, "Unknown Message", 10008)
        if request.method == "GET":
            return json_response(msg.payload(self.fake.base_url))
        if request.method == "DELETE":
            self.fake.message_store.delete(msg)
            return web.Response(status=204)
        if msg.author["id"] != self.fake.app_id:
            raise ApiError(403, "Cannot edit a message authored by another user", 50005)
        body: Body = request[BODY_KEY]
        payload = body.json or {}
        self.fake.message_store.validate(
            payload, body.uploads, self.fake.guilds[channel.guild_id].attachment_size_limit, creating=False
        )
        self.fake.message_store.edit(msg, payload, body.uploads)
        return json_response(msg.payload(self.fake.base_url))
