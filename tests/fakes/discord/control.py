"""The fake Discord's control API under ``/_fake/``: drive and inspect the fake from another process.

Used when the bot runs as a subprocess (``python -m bot``) or in Docker: a test adds guilds and members,
invokes commands, clicks buttons, reads messages and wire requests, injects errors, moves the clock and
drops the gateway over plain HTTP. A bad control request is answered 400 with the error, never a crash.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .wire import json_response

if TYPE_CHECKING:
    from .fake import FakeDiscord


class ControlApi:
    """Routes under /_fake/, each a thin wrapper over FakeDiscord's public methods."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/_fake/guilds", self._c_add_guild)
        r.add_post("/_fake/members", self._c_add_member)
        r.add_post("/_fake/invoke", self._c_invoke)
        r.add_post("/_fake/click", self._c_click)
        r.add_get("/_fake/interactions/{id}", self._c_interaction)
        r.add_get("/_fake/attachments/{message_id}/{index}", self._c_attachment)
        r.add_get("/_fake/channels/{channel_id}/messages", self._c_channel_messages)
        r.add_get("/_fake/state", self._c_state)
        r.add_get("/_fake/requests", self._c_requests)
        r.add_post("/_fake/gateway", self._c_gateway)
        r.add_post("/_fake/inject", self._c_inject)
        r.add_post("/_fake/clock", self._c_clock)
        r.add_post("/_fake/expire", self._c_expire)
        r.add_post("/_fake/owner", self._c_owner)
        r.add_get("/_fake/dms/{user_id}", self._c_dms)

    @staticmethod
    async def _control(request: web.Request, fn: Callable[[dict[str, Any]], Awaitable[Any]]) -> web.Response:
        try:
            body = await request.json() if request.body_exists else {}
            return json_response(await fn(body))
        except (KeyError, ValueError, LookupError, RuntimeError, TypeError) as e:
            return json_response({"error": f"{type(e).__name__}: {e}"}, 400)

    async def _c_add_guild(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            kwargs = {
                k: b[k]
                for k in (
                    "name",
                    "channels",
                    "owner_id",
                    "attachment_size_limit",
                    "bot_permissions",
                    "locale",
                    "applications_commands",
                )
                if k in b
            }
            return self.fake.add_guild(b.get("guild_id"), **kwargs).summary()

        return await self._control(request, go)

    async def _c_add_member(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            perms = b.get("permissions")
            u = self.fake.add_member(
                b["guild_id"], b.get("user_id"), permissions=None if perms is None else int(perms)
            )
            return {"user_id": u.id}

        return await self._control(request, go)

    async def _c_invoke(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            perms = b.get("permissions")
            inter = await self.fake.invoke_command(
                b["guild_id"],
                b["channel_id"],
                b["user_id"],
                b["name"],
                b.get("options") or {},
                subcommand=b.get("subcommand"),
                permissions=None if perms is None else int(perms),
                attachment_size_limit=b.get("attachment_size_limit"),
            )
            return {"interaction_id": inter.id, "token": inter.token}

        return await self._control(request, go)

    async def _c_click(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            msg = self.fake.messages[str(b["message_id"])]
            custom_id = b.get("custom_id") or self.fake.find_component(msg, label=b["label"])
            perms = b.get("permissions")
            inter = await self.fake.click_button(
                msg, custom_id, b["user_id"], permissions=None if perms is None else int(perms)
            )
            return {"interaction_id": inter.id, "token": inter.token}

        return await self._control(request, go)

    async def _c_interaction(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            inter = self.fake.interaction(request.match_info["id"])
            return inter.summary() | {"messages": [m.summary() for m in inter.messages()]}

        return await self._control(request, go)

    async def _c_attachment(self, request: web.Request) -> web.Response:
        msg = self.fake.messages.get(request.match_info["message_id"])
        try:
            att = msg.attachments[int(request.match_info["index"])] if msg else None
        except (IndexError, ValueError):
            att = None
        if att is None:
            return json_response({"error": "no such attachment"}, 404)
        return web.Response(body=att.data, content_type=att.content_type)

    async def _c_channel_messages(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            incl = request.query.get("include_ephemeral") == "1"
            return [
                m.summary()
                for m in self.fake.channel_messages(request.match_info["channel_id"], include_ephemeral=incl)
            ]

        return await self._control(request, go)

    async def _c_state(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            return self.fake.state()

        return await self._control(request, go)

    async def _c_requests(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            return [dataclasses.asdict(r) for r in self.fake.requests]

        return await self._control(request, go)

    async def _c_gateway(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            if "available" in b:
                self.fake.set_gateway_available(bool(b["available"]))
            if "recommended_shards" in b:
                self.fake.recommended_shards = int(b["recommended_shards"])
            if "max_concurrency" in b:
                value = b["max_concurrency"]
                self.fake.max_concurrency = None if value is None else int(value)
            if "enforce_identify_limit" in b:
                self.fake.enforce_identify_limit = bool(b["enforce_identify_limit"])
            if b.get("disconnect"):
                shard = b.get("shard")
                await self.fake.disconnect_gateway(b.get("code"), shard=None if shard is None else int(shard))
            return self.fake.state()

        return await self._control(request, go)

    async def _c_inject(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            if b.get("status", 429) == 429 and "body" not in b:
                self.fake.inject_429(
                    b["method"],
                    b["path"],
                    int(b.get("count", 1)),
                    float(b.get("retry_after", 0.3)),
                    bool(b.get("via", True)),
                    bool(b.get("global", False)),
                )
            else:
                self.fake.inject_error(
                    b["method"], b["path"], int(b["status"]), b.get("body"), int(b.get("count", 1))
                )
            return {"pending_injections": self.fake.pending_injections}

        return await self._control(request, go)

    async def _c_clock(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            self.fake.clock.advance(float(b.get("advance", 0)))
            return {"offset": self.fake.clock.offset, "now": self.fake.clock()}

        return await self._control(request, go)

    async def _c_expire(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            self.fake.expire_token(b.get("token") or b["interaction_id"])
            return {"expired": True}

        return await self._control(request, go)

    async def _c_owner(self, request: web.Request) -> web.Response:
        """{"team": true} makes the application a team's; {"accepts_dms": false} closes the owner's DMs."""

        async def go(b: dict[str, Any]) -> Any:
            if b.get("team") and self.fake.team_owner is None:
                self.fake.make_team_app(b.get("user_id"))
            owner = self.fake.team_owner or self.fake.app_owner
            if "accepts_dms" in b:
                owner.accepts_dms = bool(b["accepts_dms"])
            return {"owner_id": owner.id, "accepts_dms": owner.accepts_dms, "team_id": self.fake.team_id}

        return await self._control(request, go)

    async def _c_dms(self, request: web.Request) -> web.Response:
        async def go(b: dict[str, Any]) -> Any:
            return [m.summary() for m in self.fake.dms_to(request.match_info["user_id"])]

        return await self._control(request, go)
