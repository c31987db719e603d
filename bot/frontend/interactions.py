"""Helpers every cog uses: option autocomplete, who counts as a manager, telling a user something failed."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import discord
from discord import app_commands

log = logging.getLogger(__name__)
NO_MENTIONS = discord.AllowedMentions.none()
#: Job ids as the engine makes them (bot.engine.models.new_job_id).
JOB_ID_RE = re.compile(r"[0-9a-f]{12}")
#: A job the store says is queued or running that this process does not run: another process of the fleet
#: took it over (a process died, or handed it over at a restart). A Cancel pressed here cannot reach it.
RUNNING_ELSEWHERE = (
    "That job is being made by another of the bot's processes, so it cannot be cancelled from here; "
    "its result will still be posted."
)
#: A cancel passed to the process running the job, which has not confirmed within the wait.
CANCEL_PASSED_ON = "The cancel was passed to the bot process making that job; it stops there in a moment."


def user_label(user: discord.abc.User) -> str:
    """A member's name as shown in messages ("Cancelled by …"), markdown escaped."""
    return discord.utils.escape_markdown(user.display_name)


def age(seconds: float) -> str:
    """``42 s``, ``5 min``, ``3 h``, ``2 d``: rough and short, for lists."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def channel_is_nsfw(interaction: discord.Interaction) -> bool:
    """Age-restricted channel? (Threads and DMs have no such flag: no.)"""
    is_nsfw = getattr(interaction.channel, "is_nsfw", None)
    return bool(is_nsfw()) if callable(is_nsfw) else False


async def reply(interaction: discord.Interaction, content: str) -> None:
    """Ephemeral, never pinging; works whether or not the interaction was acknowledged already."""
    if interaction.response.is_done():
        await interaction.followup.send(content, ephemeral=True, allowed_mentions=NO_MENTIONS)
    else:
        await interaction.response.send_message(content, ephemeral=True, allowed_mentions=NO_MENTIONS)


MAX_CHOICES = 25  # Discord's limit for choices and autocomplete answers


def model_choices(models: Iterable[str], current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete for a model option: the models members may choose (``manager.models``: IMAGE_MODELS, or
    the backend's own list) containing what was typed, those starting with it first.

    A name longer than a choice value may be (100) is left out: cut short, it would name no model.
    """
    needle = current.casefold()
    found = [m for m in models if len(m) <= 100 and needle in m.casefold()]
    found.sort(key=lambda m: not m.casefold().startswith(needle))  # stable: the catalog's order within each
    return [app_commands.Choice(name=m, value=m) for m in found[:MAX_CHOICES]]


def is_manager(interaction: discord.Interaction) -> bool:
    """Manage Server (or Administrator), checked by the bot itself: a server can override a command's
    default permissions, so those alone prove nothing."""
    permissions = interaction.permissions
    return bool(permissions.manage_guild or permissions.administrator)


async def tell_failure(interaction: discord.Interaction) -> None:
    """Say privately that something went wrong, however far the interaction got; never raises."""
    try:
        await reply(interaction, "Something went wrong on the bot's side; try again in a moment.")
    except discord.HTTPException as exc:
        log.info("could not tell the user a command failed", extra={"status": exc.status, "code": exc.code})
