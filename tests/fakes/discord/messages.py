"""Messages as Discord stores them: creation, edits, deletion, and the limits Discord enforces on them.

Shared by channel REST routes and interaction responses (callbacks, follow-ups, ``@original`` edits), which
is why it is neither: both validate the same way (413/40005 before 400/50035) and apply Discord's
``attachments`` semantics.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .model import (
    IS_COMPONENTS_V2,
    LOADING,
    SUPPRESS_EMBEDS,
    FakeAttachment,
    FakeChannel,
    FakeInteraction,
    FakeMessage,
    walk_components,
)
from .wire import ApiError, Upload, form_error

if TYPE_CHECKING:
    from .fake import FakeDiscord


class MessageStore:
    """Creates, edits and deletes messages in the fake's world (``fake.messages``)."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake

    def channel_or_404(self, channel_id: str) -> FakeChannel:
        try:
            return self.fake.channel(channel_id)
        except KeyError:
            raise ApiError(404, "Unknown Channel", 10003) from None

    def validate(self, payload: dict[str, Any], uploads: list[Upload], limit: int, *, creating: bool) -> None:
        """Discord's checks: upload size (413/40005) first, then form-body limits (400/50035)."""
        for up in uploads:
            if len(up.data) > limit:
                raise ApiError(413, "Request entity too large", 40005)
        if len(uploads) > 10:
            raise form_error("files", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        content = payload.get("content")
        if content is not None and len(str(content)) > 2000:
            raise form_error("content", "BASE_TYPE_MAX_LENGTH", "Must be 2000 or fewer in length.")
        embeds = payload.get("embeds") or []
        if len(embeds) > 10:
            raise form_error("embeds", "BASE_TYPE_MAX_LENGTH", "Must be 10 or fewer in length.")
        total = sum(
            len(e.get("title") or "")
            + len(e.get("description") or "")
            + len((e.get("footer") or {}).get("text") or "")
            + len((e.get("author") or {}).get("name") or "")
            + sum(len(f.get("name", "")) + len(f.get("value", "")) for f in e.get("fields") or [])
            for e in embeds
        )
        if total > 6000:
            raise form_error("embeds", "MAX_EMBED_SIZE_EXCEEDED", "Embed size exceeds maximum size of 6000")
        components = payload.get("components") or []
        if not int(payload.get("flags") or 0) & IS_COMPONENTS_V2:
            if len(components) > 5:
                raise form_error("components", "BASE_TYPE_MAX_LENGTH", "Must be 5 or fewer in length.")
            for i, row in enumerate(components):
                if row.get("type") != 1 or not 1 <= len(row.get("components", [])) <= 5:
                    raise form_error(
                        f"components.{i}", "COMPONENT_LAYOUT_WIDTH_EXCEEDED", "Invalid action row"
                    )
        seen: set[str] = set()
        for comp in walk_components(components):
            cid = comp.get("custom_id")
            if cid is None:
                continue
            if not 1 <= len(cid) <= 100:
                raise form_error("components", "BASE_TYPE_BAD_LENGTH", "custom_id must be 1-100 in length.")
            if cid in seen:
                raise form_error(
                    "components", "COMPONENT_CUSTOM_ID_DUPLICATED", "Component custom id duplicated"
                )
            seen.add(cid)
        if creating and not (content or embeds or uploads or components or payload.get("sticker_ids")):
            raise ApiError(400, "Cannot send an empty message", 50006)

    def apply_attachments(
        self, existing: list[FakeAttachment], spec: list[dict[str, Any]] | None, uploads: list[Upload]
    ) -> list[FakeAttachment]:
        """Discord's `attachments` semantics: listed ids of existing ones are kept, index ids are new files."""
        by_index = {u.index: u for u in uploads}
        used: set[int] = set()
        out: list[FakeAttachment] = []
        if spec is None:
            out.extend(existing)
        else:
            old = {a.id: a for a in existing}
            for i, item in enumerate(spec):
                sid = str(item.get("id"))
                if sid in old:
                    out.append(old[sid])
                    continue
                try:
                    up = by_index[int(sid)]
                except (KeyError, ValueError):
                    raise form_error(
                        f"attachments.{i}.id", "ATTACHMENT_NOT_FOUND", f"Unknown attachment {sid}"
                    ) from None
                used.add(up.index)
                out.append(
                    FakeAttachment(
                        self.fake.snowflake(),
                        item.get("filename") or up.filename,
                        up.content_type,
                        up.data,
                        item.get("description"),
                    )
                )
        for up in uploads:
            if up.index not in used:
                out.append(FakeAttachment(self.fake.snowflake(), up.filename, up.content_type, up.data))
        return out

    def create(
        self,
        channel: FakeChannel,
        payload: dict[str, Any],
        uploads: list[Upload],
        *,
        mtype: int = 0,
        flags: int = 0,
        inter: FakeInteraction | None = None,
    ) -> FakeMessage:
        now = self.fake.clock()
        msg = FakeMessage(
            id=self.fake.snowflake(),
            channel_id=channel.id,
            guild_id=channel.guild_id or None,
            author=self.fake.bot_user.payload(),
            content=str(payload.get("content") or ""),
            embeds=list(payload.get("embeds") or []),
            components=list(payload.get("components") or []),
            attachments=self.apply_attachments([], payload.get("attachments"), uploads),
            flags=flags,
            type=mtype,
            created_at=now,
            allowed_mentions=payload.get("allowed_mentions"),
            webhook_id=self.fake.app_id if inter else None,
            interaction_id=inter.id if inter else None,
            owner_user_id=inter.user_id if inter else None,
            message_reference=payload.get("message_reference"),
        )
        msg.snapshot(now, "create")
        self.fake.messages[msg.id] = msg
        return msg

    def edit(self, msg: FakeMessage, payload: dict[str, Any], uploads: list[Upload]) -> None:
        if msg.deleted:
            raise ApiError(404, "Unknown Message", 10008)
        if "content" in payload:
            msg.content = str(payload["content"] or "")
        if "embeds" in payload:
            msg.embeds = list(payload["embeds"] or [])
        if "components" in payload:
            msg.components = list(payload["components"] or [])
        if "allowed_mentions" in payload:
            msg.allowed_mentions = payload["allowed_mentions"]
        if "flags" in payload and payload["flags"] is not None:
            editable = SUPPRESS_EMBEDS | IS_COMPONENTS_V2
            msg.flags = (msg.flags & ~editable) | (int(payload["flags"]) & editable)
        if "attachments" in payload or uploads:
            msg.attachments = self.apply_attachments(msg.attachments, payload.get("attachments"), uploads)
        msg.flags &= ~LOADING
        msg.edited_at = self.fake.clock()
        msg.snapshot(msg.edited_at, "edit")

    def delete(self, msg: FakeMessage) -> None:
        msg.deleted = True
        msg.snapshot(self.fake.clock(), "delete")
