"""``/imagine`` and its buttons: a thin adapter from Discord interactions to the job manager.

Every way to create a job (the command, Reroll, Variations) goes through :meth:`ImagineCog.start_job`, which
runs the manager's in-memory admission check *before* acknowledging: a refusal is an ephemeral message, and
only an admitted job is deferred (Discord fixes a reply's visibility at the defer).
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.engine.errors import RequestRejected
from bot.engine.manager import random_seed
from bot.engine.models import MAX_NEGATIVE_CHARS, MAX_PROMPT_CHARS, MAX_SEED, ImageRequest, Job, JobState
from bot.engine.retention import delete_job, is_deleted
from bot.frontend.interactions import (
    CANCEL_PASSED_ON,
    JOB_ID_RE,
    RUNNING_ELSEWHERE,
    channel_is_nsfw,
    is_manager,
    model_choices,
    reply,
    tell_failure,
    user_label,
)
from bot.frontend.messenger import message_ref_for
from bot.frontend.render import CANCEL_ID, DELETE_ID, REROLL_ID, VARIATIONS_ID

if TYPE_CHECKING:
    from bot.frontend.client import ImagineBot

log = logging.getLogger(__name__)

JOB_ID = rf"(?P<job_id>{JOB_ID_RE.pattern})"


async def may_manage(interaction: discord.Interaction, job: Job) -> bool:
    """The job's owner, a member with Manage Server in the job's own guild, or the application's owner
    (who may act everywhere, as with /jobs)."""
    if interaction.user.id == job.user_id:
        return True
    if interaction.guild_id == job.guild_id and is_manager(interaction):
        return True
    try:
        return await interaction.client.is_owner(interaction.user)  # type: ignore[attr-defined]
    except discord.HTTPException:
        return False


class ImagineCog(commands.Cog, name="Imagine"):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.manager = bot.manager
        self.imagine_command = self._build_imagine_command()

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.imagine_command)
        self.bot.add_dynamic_items(CancelButton, RerollButton, VariationsButton, DeleteButton)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.imagine_command.name)
        self.bot.remove_dynamic_items(CancelButton, RerollButton, VariationsButton, DeleteButton)

    # -- /imagine -----------------------------------------------------------------------------------------
    def _build_imagine_command(self) -> app_commands.Command:
        """Built at run time: the size choices are the configured backend's."""
        sizes = self.manager.capabilities.sizes
        size_choices = [app_commands.Choice(name=f"{w}x{h}", value=f"{w}x{h}") for w, h in sizes][:25]
        cog = self

        @app_commands.describe(
            prompt="What to draw",
            negative_prompt="What to keep out of the image",
            size="Width x height in pixels",
            count="How many images (1-4)",
            seed="Fix the seed to repeat a result",
            model="Which model to use",
        )
        @app_commands.choices(size=size_choices)
        async def imagine(
            interaction: discord.Interaction,
            prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
            negative_prompt: app_commands.Range[str, 0, MAX_NEGATIVE_CHARS] | None = None,
            size: str | None = None,
            count: app_commands.Range[int, 1, 4] = 1,
            seed: app_commands.Range[int, 0, MAX_SEED] | None = None,
            model: str | None = None,
        ) -> None:
            await cog.imagine(interaction, prompt, negative_prompt, size, count, seed, model)

        command = app_commands.Command(
            name="imagine",
            description="Generate images from a prompt",
            callback=imagine,
            allowed_contexts=app_commands.AppCommandContext(
                guild=True, dm_channel=False, private_channel=False
            ),
            allowed_installs=app_commands.AppInstallationType(guild=True, user=False),
        )
        command.guild_only = True
        command.autocomplete("model")(self.model_autocomplete)
        return command

    async def model_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return model_choices(self.manager.models, current)

    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: str,
        negative_prompt: str | None,
        size: str | None,
        count: int,
        seed: int | None,
        model: str | None,
    ) -> None:
        width = height = 0  # 0: the guild's default size, else the backend's
        if size:
            match = re.fullmatch(r"(\d+)x(\d+)", size)
            if match is None:
                await reply(interaction, f"Size {size!r} is not WIDTHxHEIGHT.")
                return
            width, height = int(match[1]), int(match[2])
        request = ImageRequest(
            prompt=prompt,
            negative_prompt=negative_prompt or "",
            width=width,
            height=height,
            count=count,
            seed=seed,
            model=model or None,
            nsfw_allowed=channel_is_nsfw(interaction),
        )
        await self.start_job(interaction, request)

    # -- the one admission path --------------------------------------------------------------------------
    async def start_job(self, interaction: discord.Interaction, request: ImageRequest) -> Job | None:
        guild_id, user_id = interaction.guild_id, interaction.user.id
        if guild_id is None:
            await reply(interaction, "Use this in a server.")
            return None
        channel_nsfw = channel_is_nsfw(interaction)
        try:
            request = self.manager.check_admission(
                request,
                guild_id,
                user_id,
                channel_id=interaction.channel_id,
                channel_nsfw=channel_nsfw,
            )
        except RequestRejected as refusal:
            await reply(interaction, refusal.message)
            return None
        # Until submit() counts this job, a burst of /imagine from one member would all pass the check above and
        # be refused only after the (public) defer: the manager's one record counts it while the defer is on the
        # wire, and submit() takes over with no await in between.
        with self.manager.holding(guild_id, user_id, request.count):
            await interaction.response.defer(thinking=True)
        try:
            job = await self.manager.submit(
                request,
                guild_id=guild_id,
                user_id=user_id,
                channel_id=interaction.channel_id,
                channel_nsfw=channel_nsfw,
                message_ref=message_ref_for(interaction),
            )
        except RequestRejected as refusal:
            # Lost a race between the check and the submit (rare): the reply is already public.
            await interaction.edit_original_response(
                content=refusal.message, allowed_mentions=discord.AllowedMentions.none()
            )
            return None
        except Exception:
            # The job could not even be recorded (the store failing): the deferred reply must not think forever.
            log.exception("could not start a job", extra={"guild": guild_id, "user": user_id})
            await interaction.edit_original_response(
                content="Something went wrong on the bot's side; nothing was started. Try again in a moment.",
                allowed_mentions=discord.AllowedMentions.none(),
            )
            return None
        return job

    # -- buttons ------------------------------------------------------------------------------------------
    async def find_job(self, interaction: discord.Interaction, job_id: str) -> Job | None:
        job = self.manager.get(job_id) or await self.bot.engine.store.get_job(job_id)
        if job is None or job.guild_id != interaction.guild_id:
            await reply(interaction, "That job is not known any more.")
            return None
        return job

    async def press_cancel(self, interaction: discord.Interaction, job_id: str) -> None:
        job = await self.find_job(interaction, job_id)
        if job is None:
            return
        if not await may_manage(interaction, job):
            await reply(
                interaction, "That job is not yours; only its owner or a server manager can cancel it."
            )
            return
        if not job.is_active:
            await reply(interaction, _already_over(job))
            return
        if self.manager.get(job.id) is None:  # another process of the fleet runs it: ask that one
            if not self.bot.engine.cancels_reach_other_processes:
                await reply(interaction, RUNNING_ELSEWHERE)
                return
            await interaction.response.defer()
            there = await self.bot.engine.cancel_elsewhere(job.id, by=user_label(interaction.user))
            if there is not None and there.state is JobState.CANCELLED:
                return  # the process that ran it edits its message to say so
            text = CANCEL_PASSED_ON if there is None or there.is_active else _already_over(there)
            await interaction.followup.send(text, ephemeral=True)
            return
        await interaction.response.defer()
        cancelled = await self.manager.cancel(job.id, reason="cancelled", by=user_label(interaction.user))
        if not cancelled:
            await interaction.followup.send(_already_over(job), ephemeral=True)

    async def press_reroll(self, interaction: discord.Interaction, job_id: str, *, variations: bool) -> None:
        job = await self.find_job(interaction, job_id)
        if job is None:
            return
        original = job.request
        if variations:
            request = original.replace(seed=None, count=4, fresh=True)
        else:
            request = original.replace(seed=random_seed(), fresh=True)
        # The channel decides NSFW, not the original job: a reroll in a safe channel stays safe.
        request = request.replace(nsfw_allowed=channel_is_nsfw(interaction))
        await self.start_job(interaction, request)

    async def press_delete(self, interaction: discord.Interaction, job_id: str) -> None:
        job = await self.find_job(interaction, job_id)
        if job is None:
            return
        if not await may_manage(interaction, job):
            await reply(
                interaction, "That image is not yours; only its owner or a server manager can delete it."
            )
            return
        await interaction.response.defer()
        # A second press (or another manager) may have deleted it first: what was asked is done either way.
        with contextlib.suppress(discord.NotFound):
            await interaction.delete_original_response()
        # Deleted means gone: the prompt, the images (unless another job still shows them) and the cache
        # entry, so /show cannot post it again and nobody is served it "from cache".
        if job.state.is_terminal and not is_deleted(job):
            engine = self.bot.engine
            await delete_job(engine.store, engine.cache, job)
        log.info("result deleted", extra={"job": job.id, "by": interaction.user.id})


def _already_over(job: Job) -> str:
    return (
        "That job was already cancelled."
        if job.state is JobState.CANCELLED
        else "That job has already finished."
    )


def _cog(interaction: discord.Interaction) -> ImagineCog:
    cog = interaction.client.get_cog("Imagine")  # type: ignore[union-attr]
    assert isinstance(cog, ImagineCog)
    return cog


ButtonHandler = Callable[[ImagineCog, discord.Interaction, str], Awaitable[None]]


def _job_button(
    name: str, prefix: str, press: ButtonHandler
) -> type[discord.ui.DynamicItem[discord.ui.Button]]:
    """A button class whose custom id carries the job id, so a click is understood after a restart too.

    DynamicItems are matched by custom id alone: no view has to be stored or re-registered per message.
    """

    class JobButton(discord.ui.DynamicItem[discord.ui.Button], template=re.escape(prefix) + JOB_ID):
        def __init__(self, job_id: str) -> None:
            super().__init__(discord.ui.Button(custom_id=prefix + job_id))
            self.job_id = job_id

        @classmethod
        async def from_custom_id(
            cls, interaction: discord.Interaction, item: discord.ui.Item, match: re.Match[str], /
        ) -> JobButton:
            return cls(match["job_id"])

        async def callback(self, interaction: discord.Interaction) -> None:
            try:
                await press(_cog(interaction), interaction, self.job_id)
            except Exception:
                log.exception("%s button failed", name, extra={"job": self.job_id})
                await tell_failure(interaction)

    JobButton.__name__ = JobButton.__qualname__ = name
    return JobButton


async def _press_reroll(cog: ImagineCog, interaction: discord.Interaction, job_id: str) -> None:
    await cog.press_reroll(interaction, job_id, variations=False)


async def _press_variations(cog: ImagineCog, interaction: discord.Interaction, job_id: str) -> None:
    await cog.press_reroll(interaction, job_id, variations=True)


CancelButton = _job_button("CancelButton", CANCEL_ID, ImagineCog.press_cancel)
RerollButton = _job_button("RerollButton", REROLL_ID, _press_reroll)
VariationsButton = _job_button("VariationsButton", VARIATIONS_ID, _press_variations)
DeleteButton = _job_button("DeleteButton", DELETE_ID, ImagineCog.press_delete)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(ImagineCog(bot))
