"""Helpers every cog uses: option autocomplete, who counts as a manager, telling a user something failed."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import discord
from discord import app_commands

log = logging.getLogger(__name__)
NO_MENTIONS = discord.AllowedMentions.none()

MAX_CHOICES = 25  # Discord's limit for choices and autocomplete answers


def model_choices(models: Iterable[str], current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete for a model option: the operator's IMAGE_MODELS containing what was typed."""
    needle = current.casefold()
    return [app_commands.Choice(name=m[:100], value=m[:100]) for m in models if needle in m.casefold()][
        :MAX_CHOICES
    ]


def is_manager(interaction: discord.Interaction) -> bool:
    """Manage Server (or Administrator), checked by the bot itself: a server can override a command's
    default permissions, so those alone prove nothing."""
    permissions = interaction.permissions
    return bool(permissions.manage_guild or permissions.administrator)


async def tell_failure(interaction: discord.Interaction) -> None:
    """Say privately that something went wrong, however far the interaction got; never raises."""
    text = "Something went wrong on the bot's side; try again in a moment."
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
        else:
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
    except discord.HTTPException as exc:
        log.info("could not tell the user a command failed", extra={"status": exc.status, "code": exc.code})
