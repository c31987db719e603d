"""Telling the bot's owner about problems only they can fix, by DM (the engine's operator-alert notifier).

The owner is the application's owner in the Developer Portal, or the team's owner for a team application
(``GET /oauth2/applications/@me``: ``owner``, ``team.owner_user_id``). ``OperatorAlerts`` (bot/engine/
alerts.py) decides when to call: once per distinct problem per hour. This module only delivers: one DM
with the advice and what members were told. An owner whose DMs are closed (Discord's 50007 "Cannot send
messages to this user") is fine: that is logged once, and the advice is in the log and in ``check``.
"""

from __future__ import annotations

import logging

import discord

from bot.engine.alerts import OperatorAlert

log = logging.getLogger(__name__)

#: Discord's JSON error code for "Cannot send messages to this user" (DMs closed, or no shared server).
CANNOT_DM = 50007


class OwnerNotifier:
    """Sends the owner one DM per alert it is handed; the owner is looked up once."""

    def __init__(self, client: discord.Client) -> None:
        self.client = client
        self._owner_id: int | None = None
        self._told_dms_closed = False

    async def owner_id(self) -> int:
        if self._owner_id is None:
            app = await self.client.application_info()
            team_owner = app.team.owner_id if app.team is not None else None
            self._owner_id = team_owner or app.owner.id
        return self._owner_id

    async def __call__(self, alert: OperatorAlert) -> None:
        owner_id = await self.owner_id()
        channel = await self.client.create_dm(discord.Object(owner_id))
        name = self.client.user.name if self.client.user else "The bot"
        text = (
            f"**{discord.utils.escape_markdown(name)}: the image service needs your attention.**\n"
            f"{discord.utils.escape_markdown(alert.advice)}\n"
            f"Members were told: “{discord.utils.escape_markdown(alert.member_message)}”\n"
            "-# One message per problem per hour; every occurrence is in the bot's log "
            "(`python -m bot check` diagnoses the set-up)."
        )
        try:
            await channel.send(text[:2000], allowed_mentions=discord.AllowedMentions.none())
        except discord.Forbidden as exc:
            if exc.code != CANNOT_DM:
                raise
            if not self._told_dms_closed:
                self._told_dms_closed = True
                log.warning(
                    "cannot DM the bot owner (their DMs are closed to this bot); operator problems are "
                    "only in this log",
                    extra={"owner": owner_id},
                )
            return
        log.info("told the bot owner", extra={"owner": owner_id, "reason": alert.reason})
