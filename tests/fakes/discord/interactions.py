"""Interactions, both halves: dispatching them as Discord's client would, and the REST answers to them.

Driving: slash commands, autocomplete, button clicks and selects are built from the *synced* command
definitions and the components really on the message (an unsynced command, a missing required option, a
disabled or absent button is refused here, as a Discord client would not send it), then dispatched as
INTERACTION_CREATE through the gateway.

Answering: the callback (the "ack", within ``ack_deadline_s`` and once), follow-ups and ``@original``
GET/PATCH/DELETE through the interaction webhook, valid while the token lives (15 minutes, or until a test
expires it).
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .model import (
    ADMINISTRATOR,
    EPHEMERAL,
    IS_COMPONENTS_V2,
    LOADING,
    SUPPRESS_EMBEDS,
    CallbackRecord,
    FakeChannel,
    FakeGuild,
    FakeInteraction,
    FakeMessage,
    FakeUser,
    member_payload,
    walk_components,
)
from .wire import BODY_KEY, ApiError, Body, form_error, json_response

if TYPE_CHECKING:
    from .fake import FakeDiscord


class InteractionApi:
    """Dispatches interactions and answers their callback and webhook routes; owns the token index."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake
        self.by_token: dict[str, FakeInteraction] = {}

    def add_routes(self, app: web.Application) -> None:
        api = "/api/v{version:\\d+}"
        r = app.router
        r.add_post(f"{api}/interactions/{{interaction_id}}/{{token}}/callback", self.h_callback)
        wh = f"{api}/webhooks/{{webhook_id}}/{{token}}"
        r.add_post(wh, self.h_followup)
        r.add_get(f"{wh}/messages/{{message_id}}", self.h_webhook_message)
        r.add_patch(f"{wh}/messages/{{message_id}}", self.h_webhook_message)
        r.add_delete(f"{wh}/messages/{{message_id}}", self.h_webhook_message)

    # ------------------------------------------------------------------ driving interactions

    def _find_command(self, name: str, guild_id: str | None) -> dict[str, Any]:
        for scope in (guild_id, None):
            cmd = self.fake.commands.get(scope, {}).get(name)
            if cmd is not None and cmd.get("type", 1) == 1:
                return cmd
        raise LookupError(
            f"command /{name} is not synced (guild {guild_id} or global): Discord would not show it"
        )

    def _permissions_for(self, guild: FakeGuild, user_id: str, override: int | None) -> int:
        if override is not None:
            return override
        member = guild.members.get(user_id)
        return member.permissions if member else guild.everyone_permissions

    def _build_options(
        self,
        defs: list[dict[str, Any]],
        values: dict[str, Any] | list[dict[str, Any]],
        guild: FakeGuild,
        resolved: dict[str, dict[str, Any]],
        *,
        focused: str | None = None,
    ) -> list[dict[str, Any]]:
        """Typed options as Discord's client would send them, validated against the synced definition."""
        if isinstance(values, list):
            return values
        by_name = {d["name"]: d for d in defs}
        out: list[dict[str, Any]] = []
        for name, value in values.items():
            d = by_name.get(name)
            if d is None:
                raise ValueError(f"option {name!r} is not in the synced command ({sorted(by_name)})")
            otype = d["type"]
            opt: dict[str, Any] = {"name": name, "type": otype}
            if name == focused:
                opt["value"] = str(value)
                opt["focused"] = True
                out.append(opt)
                continue
            if otype == 3:
                value = str(value)
                if not d.get("min_length", 0) <= len(value) <= d.get("max_length", 6000):
                    raise ValueError(f"option {name!r}: length {len(value)} outside the command's bounds")
            elif otype in (4, 10):
                value = int(value) if otype == 4 else float(value)
                if ("min_value" in d and value < d["min_value"]) or (
                    "max_value" in d and value > d["max_value"]
                ):
                    raise ValueError(f"option {name!r}: {value} outside the command's bounds")
            elif otype == 5:
                value = bool(value)
            elif otype == 6:
                uid = str(value.id if isinstance(value, FakeUser) else value)
                user = self.fake.add_user(uid)
                resolved.setdefault("users", {})[uid] = user.payload()
                if uid in guild.members:
                    resolved.setdefault("members", {})[uid] = member_payload(
                        guild, user, self._permissions_for(guild, uid, None), with_user=False
                    )
                value = uid
            elif otype == 7:
                ch = guild.channel(value.id if isinstance(value, FakeChannel) else value)
                resolved.setdefault("channels", {})[ch.id] = {
                    **ch.payload(),
                    "permissions": str(ADMINISTRATOR),
                }
                value = ch.id
            if d.get("choices") and value not in [c["value"] for c in d["choices"]]:
                raise ValueError(f"option {name!r}: {value!r} is not one of the command's choices")
            opt["value"] = value
            out.append(opt)
        if focused is None:
            missing = [d["name"] for d in defs if d.get("required") and d["name"] not in values]
            if missing:
                raise ValueError(f"required options missing: {missing}")
        return out

    def _command_data(
        self,
        guild: FakeGuild,
        name: str,
        options: dict[str, Any] | list[dict[str, Any]] | None,
        subcommand: str | None,
        focused: str | None = None,
    ) -> dict[str, Any]:
        cmd = self._find_command(name, guild.id)
        resolved: dict[str, dict[str, Any]] = {}
        defs = cmd.get("options", [])
        path = subcommand.split() if subcommand else []
        if not path and any(o["type"] in (1, 2) for o in defs):
            raise ValueError(f"/{name} has subcommands: pass subcommand=")
        chain: list[dict[str, Any]] = []
        for part in path:
            sub = next((o for o in defs if o["name"] == part and o["type"] in (1, 2)), None)
            if sub is None:
                raise ValueError(f"/{name} has no subcommand {part!r}")
            chain.append(sub)
            defs = sub.get("options", [])
        leaf_opts = self._build_options(defs, options or {}, guild, resolved, focused=focused)
        for sub in reversed(chain):
            leaf_opts = [{"name": sub["name"], "type": sub["type"], "options": leaf_opts}]
        data: dict[str, Any] = {"id": cmd["id"], "name": name, "type": 1, "options": leaf_opts}
        if cmd.get("guild_id"):
            data["guild_id"] = cmd["guild_id"]
        if resolved:
            data["resolved"] = resolved
        return data

    def _interaction_payload(
        self,
        itype: int,
        guild: FakeGuild,
        channel: FakeChannel,
        user: FakeUser,
        permissions: int,
        data: dict[str, Any],
        attachment_size_limit: int | None,
        locale: str,
    ) -> dict[str, Any]:
        app_perms = ADMINISTRATOR if guild.bot_permissions & ADMINISTRATOR else guild.bot_permissions
        return {
            "id": self.fake.snowflake(),
            "application_id": self.fake.app_id,
            "type": itype,
            "token": "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48),
            "version": 1,
            "attachment_size_limit": attachment_size_limit or guild.attachment_size_limit,
            "guild_id": guild.id,
            "guild": {"id": guild.id, "locale": guild.locale, "features": list(guild.features)},
            "guild_locale": guild.locale,
            "locale": locale,
            "channel_id": channel.id,
            "channel": {**channel.payload(), "permissions": str(permissions)},
            "app_permissions": str(app_perms),
            "entitlements": [],
            "entitlement_sku_ids": [],
            "authorizing_integration_owners": {"0": guild.id},
            "context": 0,
            "member": member_payload(guild, user, permissions, with_user=True),
            "data": data,
        }

    async def _send_interaction(self, payload: dict[str, Any], user_id: str) -> FakeInteraction:
        inter = FakeInteraction(self.fake, payload, user_id)
        self.fake.interactions[inter.id] = inter
        self.by_token[inter.token] = inter
        inter.dispatched_monotonic = time.monotonic()
        await self.fake.dispatch("INTERACTION_CREATE", payload)
        self.fake.notify()
        return inter

    async def invoke_command(
        self,
        guild_id: int | str,
        channel_id: int | str,
        user_id: int | str,
        name: str,
        options: dict[str, Any] | list[dict[str, Any]] | None = None,
        *,
        subcommand: str | None = None,
        permissions: int | None = None,
        attachment_size_limit: int | None = None,
        locale: str = "en-US",
    ) -> FakeInteraction:
        """Dispatch a slash command (type 2) exactly as Discord would for a synced command."""
        guild = self.fake.guilds[str(guild_id)]
        channel = guild.channel(channel_id)
        user = self.fake.add_user(user_id)
        perms = self._permissions_for(guild, user.id, permissions)
        data = self._command_data(guild, name, options, subcommand)
        payload = self._interaction_payload(
            2, guild, channel, user, perms, data, attachment_size_limit, locale
        )
        return await self._send_interaction(payload, user.id)

    async def autocomplete(
        self,
        guild_id: int | str,
        channel_id: int | str,
        user_id: int | str,
        name: str,
        options: dict[str, Any],
        focused: str,
        *,
        subcommand: str | None = None,
        permissions: int | None = None,
    ) -> FakeInteraction:
        """Dispatch an autocomplete (type 4); the answer is callback type 8 with data.choices."""
        guild = self.fake.guilds[str(guild_id)]
        channel = guild.channel(channel_id)
        user = self.fake.add_user(user_id)
        perms = self._permissions_for(guild, user.id, permissions)
        data = self._command_data(guild, name, options, subcommand, focused=focused)
        payload = self._interaction_payload(4, guild, channel, user, perms, data, None, "en-US")
        return await self._send_interaction(payload, user.id)

    async def click_button(
        self,
        message_or_id: FakeMessage | str | int,
        custom_id: str,
        user_id: int | str,
        *,
        permissions: int | None = None,
        attachment_size_limit: int | None = None,
    ) -> FakeInteraction:
        """Click a button that is really on the message (disabled/absent buttons are refused)."""
        return await self._component_interaction(
            message_or_id, custom_id, user_id, 2, None, permissions, attachment_size_limit
        )

    async def select(
        self,
        message_or_id: FakeMessage | str | int,
        custom_id: str,
        values: list[str],
        user_id: int | str,
        *,
        permissions: int | None = None,
    ) -> FakeInteraction:
        """Pick values in a string select menu on the message."""
        return await self._component_interaction(
            message_or_id, custom_id, user_id, 3, values, permissions, None
        )

    async def _component_interaction(
        self,
        message_or_id: FakeMessage | str | int,
        custom_id: str,
        user_id: int | str,
        component_type: int,
        values: list[str] | None,
        permissions: int | None,
        attachment_size_limit: int | None,
    ) -> FakeInteraction:
        msg = (
            message_or_id
            if isinstance(message_or_id, FakeMessage)
            else self.fake.messages[str(message_or_id)]
        )
        if msg.deleted:
            raise ValueError(f"message {msg.id} was deleted")
        comp = next((c for c in walk_components(msg.components) if c.get("custom_id") == custom_id), None)
        if comp is None or comp.get("type") != component_type:
            raise ValueError(f"message {msg.id} has no component type {component_type} with id {custom_id!r}")
        if comp.get("disabled"):
            raise ValueError(f"component {custom_id!r} is disabled")
        uid = str(user_id)
        if msg.ephemeral and msg.owner_user_id and msg.owner_user_id != uid:
            raise ValueError("only the recipient can see (and click) an ephemeral message")
        channel = self.fake.channel(msg.channel_id)
        guild = self.fake.guilds[channel.guild_id]
        user = self.fake.add_user(uid)
        perms = self._permissions_for(guild, uid, permissions)
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component_type}
        if values is not None:
            data["values"] = values
        payload = self._interaction_payload(
            3, guild, channel, user, perms, data, attachment_size_limit, "en-US"
        )
        payload["message"] = msg.payload(self.fake.base_url)
        return await self._send_interaction(payload, uid)

    # ------------------------------------------------------------------ interactions REST

    def inter_by_webhook(self, request: web.Request) -> FakeInteraction:
        token = request.match_info["token"]
        inter = self.by_token.get(token)
        if request.match_info["webhook_id"] != self.fake.app_id:
            raise ApiError(404, "Unknown Webhook", 10015)
        if inter is None or inter.expired():
            raise ApiError(401, "Invalid Webhook Token", 50027)
        return inter

    async def h_callback(self, request: web.Request) -> web.Response:
        inter = self.fake.interactions.get(request.match_info["interaction_id"])
        if inter is None or request.match_info["token"] != inter.token:
            raise ApiError(404, "Unknown interaction", 10062)
        if inter.callbacks:
            raise ApiError(400, "Interaction has already been acknowledged.", 40060)
        if inter.expired() or (
            self.fake.ack_deadline_s is not None
            and self.fake.clock() - inter.created_at > self.fake.ack_deadline_s
        ):
            raise ApiError(404, "Unknown interaction", 10062)
        body: Body = request[BODY_KEY]
        cb = body.json or {}
        ctype = cb.get("type")
        data = cb.get("data") or {}
        allowed = {2: {4, 5, 9}, 3: {4, 5, 6, 7, 9}, 4: {8}, 5: {4, 5, 6, 7}}.get(inter.type, set())
        if ctype not in allowed:
            raise form_error("type", "INTERACTION_RESPONSE_TYPE_INVALID", f"Invalid response type {ctype}")
        message: FakeMessage | None = None
        channel = self.fake.channel(inter.channel_id)
        if ctype == 4:
            self.fake.message_store.validate(data, body.uploads, inter.attachment_size_limit, creating=True)
            flags = int(data.get("flags") or 0) & (EPHEMERAL | SUPPRESS_EMBEDS | IS_COMPONENTS_V2 | (1 << 12))
            message = self.fake.message_store.create(
                channel, data, body.uploads, mtype=20 if inter.type == 2 else 19, flags=flags, inter=inter
            )
        elif ctype == 5:
            flags = (int(data.get("flags") or 0) & EPHEMERAL) | LOADING
            message = self.fake.message_store.create(
                channel, {}, [], mtype=20 if inter.type == 2 else 19, flags=flags, inter=inter
            )
        elif ctype in (6, 7):
            if inter.component_message_id not in self.fake.messages:
                raise form_error("type", "INTERACTION_RESPONSE_TYPE_INVALID", "No message to update")
            message = self.fake.messages[inter.component_message_id]
            if ctype == 7:
                self.fake.message_store.validate(
                    data, body.uploads, inter.attachment_size_limit, creating=False
                )
                self.fake.message_store.edit(message, data, body.uploads)
        elif ctype == 8:
            if len(data.get("choices") or []) > 25:
                raise form_error("data.choices", "BASE_TYPE_MAX_LENGTH", "Must be 25 or fewer in length.")
        elif ctype == 9 and not (data.get("custom_id") and data.get("title") and data.get("components")):
            raise form_error("data", "BASE_TYPE_REQUIRED", "A modal needs custom_id, title and components.")
        now = self.fake.clock()
        inter.callbacks.append(
            CallbackRecord(
                type=ctype,
                time=now,
                monotonic=time.monotonic(),
                data=data,
                files=[{"filename": u.filename, "size": len(u.data)} for u in body.uploads],
            )
        )
        inter.original = message
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        resource: dict[str, Any] = {"type": ctype}
        if message is not None and ctype in (4, 5, 7):
            resource["message"] = message.payload(self.fake.base_url)
        return json_response(
            {
                "interaction": {
                    "id": inter.id,
                    "type": inter.type,
                    "response_message_id": message.id if message else None,
                    "response_message_loading": bool(message and message.loading),
                    "response_message_ephemeral": bool(message and message.ephemeral),
                },
                "resource": resource,
            }
        )

    async def h_followup(self, request: web.Request) -> web.Response:
        inter = self.inter_by_webhook(request)
        if not inter.acknowledged:
            raise ApiError(404, "Unknown Webhook", 10015)
        body: Body = request[BODY_KEY]
        payload = body.json or {}
        self.fake.message_store.validate(payload, body.uploads, inter.attachment_size_limit, creating=True)
        flags = int(payload.get("flags") or 0) & (EPHEMERAL | SUPPRESS_EMBEDS | IS_COMPONENTS_V2)
        msg = self.fake.message_store.create(
            self.fake.channel(inter.channel_id), payload, body.uploads, flags=flags, inter=inter
        )
        inter.followups.append(msg)
        if request.query.get("wait") not in ("1", "true", "True"):
            return web.Response(status=204)
        return json_response(msg.payload(self.fake.base_url))

    async def h_webhook_message(self, request: web.Request) -> web.Response:
        inter = self.inter_by_webhook(request)
        mid = request.match_info["message_id"]
        if mid == "@original":
            msg = inter.original
        else:
            msg = next((m for m in [inter.original, *inter.followups] if m is not None and m.id == mid), None)
        if msg is None or msg.deleted:
            raise ApiError(404, "Unknown Message", 10008)
        if request.method == "GET":
            return json_response(msg.payload(self.fake.base_url))
        if request.method == "DELETE":
            self.fake.message_store.delete(msg)
            return web.Response(status=204)
        body: Body = request[BODY_KEY]
        self.fake.message_store.validate(
            body.json or {}, body.uploads, inter.attachment_size_limit, creating=False
        )
        self.fake.message_store.edit(msg, body.json or {}, body.uploads)
        return json_response(msg.payload(self.fake.base_url))
