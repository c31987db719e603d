"""Member commands: ``/quota`` (what is left today), ``/history`` (your last jobs here), ``/show`` (re-post a result).

``/history`` ends with how long jobs are kept (``HISTORY_RETENTION_DAYS``, see :mod:`bot.engine.retention`) and
shows a deleted job as *deleted*; ``/show`` of a deleted job says so.

Everything is scoped to the guild the command runs in: a job of another guild is "not found". ``/show`` re-posts
from the result cache, and never shows a result made where NSFW output was allowed in a channel that is not
age-restricted.
"""

from __future__ import annotations

import io
import logging
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.engine.models import Job, JobState
from bot.engine.retention import is_deleted
from bot.frontend.interactions import JOB_ID_RE, NO_MENTIONS, age, channel_is_nsfw, reply
from bot.frontend.messenger import DEFAULT_UPLOAD_LIMIT, prepare_uploads
from bot.frontend.render import escape, excerpt, job_embed

if TYPE_CHECKING:
    from bot.frontend.client import ImagineBot

log = logging.getLogger(__name__)

HISTORY_LIMIT = 10


def retention_sentence(days: int) -> str:
    """How long /history keeps jobs, in a member's words (HISTORY_RETENTION_DAYS; 0 keeps them forever)."""
    if days <= 0:
        return "Jobs are kept until you delete them (the Delete button on a result)."
    span = "1 day" if days == 1 else f"{days} days"
    return f"Jobs are kept for {span}, then deleted with their images; Delete on a result removes it sooner."


class UserCog(commands.Cog, name="User"):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.manager = bot.manager
        self.policy = bot.policy
        self.store = bot.engine.store
        self.cache = bot.engine.cache

    # -- /quota -------------------------------------------------------------------------------------------
    @app_commands.command(name="quota", description="How many images you have left today")
    @app_commands.guild_only()
    async def quota(self, interaction: discord.Interaction) -> None:
        guild_id, user_id = interaction.guild_id, interaction.user.id
        assert guild_id is not None
        status = self.policy.quota_status(guild_id, user_id)
        active = self.manager.active_count(guild_id, user_id)
        jobs = f"You have {active} of {self.manager.user_limit(guild_id)} jobs queued or running."
        if status.unlimited:
            text = f"This server sets no daily image limit; you made {status.used} images today. {jobs}"
        else:
            pending = f" ({status.in_flight} in progress)" if status.in_flight else ""
            text = (
                f"You have **{status.remaining} of {status.limit}** images left today{pending}; "
                f"{status.used} made so far. The quota resets at 00:00 UTC (<t:{int(status.resets_at)}:R>). "
                + jobs
            )
        await reply(interaction, text)

    # -- /history ---------------------------------------------------------------------------------------------
    @app_commands.command(name="history", description="Your last image jobs in this server")
    @app_commands.guild_only()
    async def history(self, interaction: discord.Interaction) -> None:
        guild_id = interaction.guild_id
        assert guild_id is not None
        await interaction.response.defer(ephemeral=True, thinking=True)
        jobs = await self.store.list_jobs(guild_id=guild_id, user_id=interaction.user.id, limit=HISTORY_LIMIT)
        kept = retention_sentence(self.bot.engine.settings.history_retention_days)
        if not jobs:
            await reply(interaction, f"You have no image jobs in this server yet. {kept}")
            return
        now = time.time()
        lines = ["**Your last jobs here** (use `/show job_id` to see a result again)"]
        for stored in jobs:
            job = self.manager.get(stored.id) or stored
            what = "*deleted*" if is_deleted(job) else escape(excerpt(job.request.prompt, 60))
            lines.append(f"`{job.id}` · {job.state.value} · {age(now - job.created_at)} ago · {what}")
        # The retention sentence goes last and always fits: the list is what gets cut.
        text = "\n".join(lines)[: 1990 - len(kept) - 1]
        await reply(interaction, f"{text}\n{kept}")

    # -- /show ----------------------------------------------------------------------------------------------
    @app_commands.command(name="show", description="Post a past result of this server again")
    @app_commands.describe(job_id="The job id (from /history or a job message's footer)")
    @app_commands.guild_only()
    async def show(self, interaction: discord.Interaction, job_id: app_commands.Range[str, 1, 40]) -> None:
        job_id = job_id.strip().lower()
        job: Job | None = None
        if JOB_ID_RE.fullmatch(job_id):
            job = self.manager.get(job_id) or await self.store.get_job(job_id)
        if job is None or job.guild_id != interaction.guild_id:
            await reply(interaction, f"No job `{escape(job_id[:20])}` in this server.")
            return
        if is_deleted(job):
            await reply(interaction, f"Job `{job.id}` was deleted; its prompt and images are gone.")
            return
        if job.state is not JobState.SUCCEEDED:
            await reply(interaction, f"Job `{job.id}` has no images ({job.state.value.replace('_', ' ')}).")
            return
        if job.request.nsfw_allowed and not channel_is_nsfw(interaction):
            await reply(
                interaction,
                f"Job `{job.id}` was made where NSFW images were allowed; show it in an age-restricted channel.",
            )
            return
        images = list(job.result.images) if job.result is not None else None
        if images is None and job.image_refs:
            images = await self.cache.get_images(job.image_refs)
        if not images:
            await reply(
                interaction,
                f"The images of job `{job.id}` are no longer kept (expired from the cache, or deleted).",
            )
            return
        await interaction.response.defer(thinking=True)
        limit = interaction.filesize_limit or DEFAULT_UPLOAD_LIMIT
        prepared = await prepare_uploads(job.id, images, limit)
        embed = job_embed(job)
        embed.set_footer(text=f"Job {job.id} · shown again for {interaction.user.display_name}"[:2048])
        files = [discord.File(io.BytesIO(data), filename=name) for data, name in prepared]
        await interaction.edit_original_response(embed=embed, attachments=files, allowed_mentions=NO_MENTIONS)
        log.info("result shown again", extra={"job": job.id, "by": interaction.user.id})


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(UserCog(bot))
