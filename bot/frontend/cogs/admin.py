"""Server admin commands: ``/jobs`` (see and stop this server's jobs), ``/settings`` (this server's rules) and
``/backends`` (the image backends: health, load, last error; never a URL or a key).

Both groups carry ``default_permissions=manage_guild``, but a server can override that in its integration
settings, so every callback checks the member's permission itself: Manage Server in the guild where the command
runs, or the bot's application owner (who may act everywhere). An admin only ever sees and touches jobs of the
guild the command runs in; a job of another guild is "not found".
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.engine.models import Job, JobState
from bot.engine.policy import (
    MAX_BLOCKED_WORDS,
    NSFW_POLICIES,
    GuildSettings,
    InvalidGuildSetting,
    normalise_blocked_word,
    split_words,
)
from bot.engine.pool import PoolEntry
from bot.engine.store import StoreError
from bot.frontend.interactions import (
    CANCEL_PASSED_ON,
    JOB_ID_RE,
    RUNNING_ELSEWHERE,
    age,
    is_manager,
    model_choices,
    reply,
    user_label,
)
from bot.frontend.render import escape, excerpt

if TYPE_CHECKING:
    from bot.frontend.client import ImagineBot

log = logging.getLogger(__name__)

MANAGE_GUILD = discord.Permissions(manage_guild=True)
LIST_LIMIT = 20
#: /jobs list state filter: "active" (the default) is queued + running; "recent" is every state.
STATE_FILTERS = ("active", "queued", "running", "succeeded", "failed", "cancelled", "timed_out", "recent")


def job_line(job: Job, now: float) -> str:
    if job.state is JobState.QUEUED and job.queue_position:
        where = f"position {job.queue_position}"
    else:
        where = f"{age(now - job.created_at)} ago"
    return (
        f"`{job.id}` <@{job.user_id}> · {job.state.value} · {where} · "
        f"{escape(excerpt(job.request.prompt, 50))}"
    )


def backend_line(entry: PoolEntry, load: int, now: float) -> str:
    """One pool entry for /backends: name, kind, health, load and its last error (what a member could read)."""
    health = "up" if entry.up else "**out** (being probed)"
    line = f"**{escape(entry.name)}** · {entry.kind} · {health} · {load}/{entry.capacity} busy"
    if entry.last_error:
        when = f" ({age(now - entry.last_error_at)} ago)" if entry.last_error_at is not None else ""
        line += f" · last error{when}: {escape(excerpt(entry.last_error, 120))}"
    return line


def truncate_lines(lines: list[str], limit: int = 1900) -> str:
    out: list[str] = []
    size = 0
    for index, line in enumerate(lines):
        if size + len(line) + 1 > limit:
            out.append(f"… and {len(lines) - index} more")
            break
        out.append(line)
        size += len(line) + 1
    return "\n".join(out)


class AdminCog(commands.Cog, name="Admin"):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.manager = bot.manager
        self.policy = bot.policy
        self.store = bot.engine.store
        self.jobs_group = self._build_jobs_group()
        self.settings_group = self._build_settings_group()
        self.backends_command = self._build_backends_command()

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.jobs_group)
        self.bot.tree.add_command(self.settings_group)
        self.bot.tree.add_command(self.backends_command)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.jobs_group.name)
        self.bot.tree.remove_command(self.settings_group.name)
        self.bot.tree.remove_command(self.backends_command.name)

    # -- who may act ----------------------------------------------------------------------------------------
    async def is_owner(self, interaction: discord.Interaction) -> bool:
        try:
            return await self.bot.is_owner(interaction.user)
        except discord.HTTPException:
            return False

    async def authorise(self, interaction: discord.Interaction) -> bool:
        """Manage Server here, or the application owner; otherwise refuse (ephemerally) and return False."""
        if interaction.guild_id is not None and is_manager(interaction):
            return True
        if await self.is_owner(interaction):
            return interaction.guild_id is not None
        await reply(interaction, "You need the **Manage Server** permission to use this command.")
        log.info(
            "admin command refused",
            extra={"user": interaction.user.id, "guild": interaction.guild_id},
        )
        return False

    async def find_job(self, interaction: discord.Interaction, job_id: str) -> Job | None:
        """A job of this guild (any guild for the owner); None after telling the admin it was not found."""
        job_id = job_id.strip().lower()
        job = None
        if JOB_ID_RE.fullmatch(job_id):
            job = self.manager.get(job_id) or await self.store.get_job(job_id)
        if job is not None and job.guild_id != interaction.guild_id and not await self.is_owner(interaction):
            job = None
        if job is None:
            await reply(interaction, f"No job `{escape(job_id[:20])}` in this server.")
        return job

    # -- /backends --------------------------------------------------------------------------------------
    def _build_backends_command(self) -> app_commands.Command:  # type: ignore[type-arg]
        cog = self

        @app_commands.command(name="backends", description="The image backends: health, load and last error")
        @app_commands.default_permissions(manage_guild=True)
        @app_commands.guild_only()
        async def backends(interaction: discord.Interaction) -> None:
            await cog.backends_show(interaction)

        return backends

    async def backends_show(self, interaction: discord.Interaction) -> None:
        if not await self.authorise(interaction):
            return
        now = time.time()
        lines = [backend_line(e, self.manager.backend_load(e.name), now) for e in self.manager.pool]
        await reply(interaction, truncate_lines(lines))

    # -- /jobs ------------------------------------------------------------------------------------------
    def _build_jobs_group(self) -> app_commands.Group:
        cog = self
        group = app_commands.Group(
            name="jobs",
            description="See and stop this server's image jobs",
            default_permissions=MANAGE_GUILD,
            guild_only=True,
        )

        @group.command(name="list", description="Queued and running jobs of this server (or a filter)")
        @app_commands.describe(
            user="Only this member's jobs", state="Which jobs (default: queued and running)"
        )
        @app_commands.choices(state=[app_commands.Choice(name=s, value=s) for s in STATE_FILTERS])
        async def list_(
            interaction: discord.Interaction, user: discord.User | None = None, state: str | None = None
        ) -> None:
            await cog.jobs_list(interaction, user, state or "active")

        @group.command(name="cancel", description="Cancel one job of this server")
        @app_commands.describe(job_id="The job id (in the job message's footer)")
        async def cancel(interaction: discord.Interaction, job_id: app_commands.Range[str, 1, 40]) -> None:
            await cog.jobs_cancel(interaction, job_id)

        @group.command(
            name="cancel-all", description="Cancel every queued and running job here, or a member's"
        )
        @app_commands.describe(user="Only this member's jobs")
        async def cancel_all(interaction: discord.Interaction, user: discord.User | None = None) -> None:
            await cog.jobs_cancel_all(interaction, user)

        return group

    async def jobs_list(
        self, interaction: discord.Interaction, user: discord.User | None, state: str
    ) -> None:
        if not await self.authorise(interaction):
            return
        guild_id = interaction.guild_id
        assert guild_id is not None
        user_id = user.id if user else None
        if state in ("active", "queued", "running"):
            jobs = self.manager.active_jobs(guild_id=guild_id, user_id=user_id)
            if state != "active":
                jobs = [j for j in jobs if j.state.value == state]
        else:
            states = None if state == "recent" else [JobState(state)]
            await interaction.response.defer(ephemeral=True, thinking=True)
            jobs = await self.store.list_jobs(
                guild_id=guild_id, user_id=user_id, states=states, limit=LIST_LIMIT
            )
            # The store may lag the live state of active jobs by a moment; prefer what the manager knows.
            jobs = [self.manager.get(j.id) or j for j in jobs]
        who = f" of <@{user_id}>" if user_id else ""
        label = "queued or running" if state == "active" else state.replace("_", " ")
        if not jobs:
            await reply(interaction, f"No {label} jobs{who} in this server.")
            return
        now = time.time()
        lines = [f"**{label.capitalize()} jobs{who}** ({len(jobs)})"]
        lines += [job_line(job, now) for job in jobs[:LIST_LIMIT]]
        await reply(interaction, truncate_lines(lines))

    async def jobs_cancel(self, interaction: discord.Interaction, job_id: str) -> None:
        if not await self.authorise(interaction):
            return
        job = await self.find_job(interaction, job_id)
        if job is None:
            return
        if not job.is_active:
            await reply(interaction, f"Job `{job.id}` has already finished ({job.state.value}).")
            return
        if self.manager.get(job.id) is None:  # another process of the fleet runs it: ask that one
            if not self.bot.engine.cancels_reach_other_processes:
                await reply(interaction, RUNNING_ELSEWHERE)
                return
            await interaction.response.defer(ephemeral=True, thinking=True)
            there = await self.bot.engine.cancel_elsewhere(job.id, by=user_label(interaction.user))
            log.info("cancel passed to another process", extra={"job": job.id, "by": interaction.user.id})
            if there is not None and there.state is JobState.CANCELLED:
                await reply(interaction, f"Cancelled job `{job.id}` of <@{job.user_id}>.")
            elif there is None or there.is_active:
                await reply(interaction, CANCEL_PASSED_ON)
            else:
                await reply(interaction, f"Job `{job.id}` had already finished.")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        cancelled = await self.manager.cancel(job.id, reason="cancelled", by=user_label(interaction.user))
        log.info("job cancelled by an admin", extra={"job": job.id, "by": interaction.user.id})
        if cancelled:
            await reply(interaction, f"Cancelled job `{job.id}` of <@{job.user_id}>.")
        else:
            await reply(interaction, f"Job `{job.id}` had already finished.")

    async def jobs_cancel_all(self, interaction: discord.Interaction, user: discord.User | None) -> None:
        if not await self.authorise(interaction):
            return
        guild_id = interaction.guild_id
        jobs = self.manager.active_jobs(guild_id=guild_id, user_id=user.id if user else None)
        who = f" of <@{user.id}>" if user else ""
        if not jobs:
            await reply(interaction, f"No queued or running jobs{who} in this server.")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        by = user_label(interaction.user)
        results = await asyncio.gather(
            *(self.manager.cancel(job.id, reason="cancelled", by=by) for job in jobs), return_exceptions=True
        )
        done = sum(1 for r in results if r is True)
        for r in results:
            if isinstance(r, BaseException):
                log.error("cancel failed", exc_info=r)
        log.info(
            "jobs cancelled by an admin", extra={"guild": guild_id, "count": done, "by": interaction.user.id}
        )
        await reply(interaction, f"Cancelled {done} job{'s' if done != 1 else ''}{who}.")

    # -- /settings ------------------------------------------------------------------------------------------
    def _build_settings_group(self) -> app_commands.Group:
        cog = self
        sizes = self.manager.capabilities.sizes
        size_choices = [app_commands.Choice(name=f"{w}x{h}", value=f"{w}x{h}") for w, h in sizes][:25]
        group = app_commands.Group(
            name="settings",
            description="This server's image rules",
            default_permissions=MANAGE_GUILD,
            guild_only=True,
        )
        channels = app_commands.Group(name="channels", description="Where /imagine may be used", parent=group)
        words = app_commands.Group(name="blocked-words", description="Words refused in prompts", parent=group)

        @group.command(name="show", description="Show this server's settings")
        async def show(interaction: discord.Interaction) -> None:
            if await cog.authorise(interaction):
                await reply(interaction, cog.describe(interaction.guild_id or 0))

        @group.command(name="set", description="Change one or more settings")
        @app_commands.describe(
            concurrency="Images generated at once for this server (capped by the bot's operator)",
            max_jobs_per_user="Queued or running jobs one member may have",
            daily_images="Images per member per day (UTC); 0 = unlimited",
            nsfw="Allow NSFW output in age-restricted channels, or never",
            default_size="Size used when /imagine gives none",
            default_model="Model used when /imagine gives none",
        )
        @app_commands.choices(
            nsfw=[app_commands.Choice(name=p, value=p) for p in NSFW_POLICIES], default_size=size_choices
        )
        async def set_(
            interaction: discord.Interaction,
            concurrency: app_commands.Range[int, 1, 64] | None = None,
            max_jobs_per_user: app_commands.Range[int, 1, 100] | None = None,
            daily_images: app_commands.Range[int, 0, 100_000] | None = None,
            nsfw: str | None = None,
            default_size: str | None = None,
            default_model: str | None = None,
        ) -> None:
            changes = {
                "concurrency": concurrency,
                "max_jobs_per_user": max_jobs_per_user,
                "daily_images": daily_images,
                "nsfw": nsfw,
                "default_size": default_size,
                "default_model": default_model,
            }
            await cog.settings_set(interaction, {k: v for k, v in changes.items() if v is not None})

        set_.autocomplete("default_model")(self.model_autocomplete)

        @group.command(name="reset", description="Put a setting (or all) back to the bot's default")
        @app_commands.choices(
            setting=[
                app_commands.Choice(name=n.replace("_", " "), value=n)
                for n in (*GuildSettings.__dataclass_fields__, "all")
            ]
        )
        async def reset(interaction: discord.Interaction, setting: str) -> None:
            await cog.settings_reset(interaction, setting)

        @channels.command(
            name="add", description="Allow /imagine in a channel (once any is added, only there)"
        )
        async def channels_add(interaction: discord.Interaction, channel: discord.TextChannel) -> None:
            await cog.edit_channels(interaction, add=channel.id)

        @channels.command(name="remove", description="Stop allowing /imagine in a channel")
        async def channels_remove(interaction: discord.Interaction, channel: discord.TextChannel) -> None:
            await cog.edit_channels(interaction, remove=channel.id)

        @channels.command(name="clear", description="Allow /imagine in every channel again")
        async def channels_clear(interaction: discord.Interaction) -> None:
            await cog.edit_channels(interaction, clear=True)

        @words.command(
            name="add", description="Refuse prompts with these words (comma-separated, * wildcard)"
        )
        @app_commands.describe(words="Comma-separated; * matches any letters, e.g. gore, blood*")
        async def words_add(
            interaction: discord.Interaction, words: app_commands.Range[str, 1, 4000]
        ) -> None:
            await cog.edit_words(interaction, add=words)

        @words.command(name="remove", description="Stop refusing these words (comma-separated)")
        async def words_remove(
            interaction: discord.Interaction, words: app_commands.Range[str, 1, 4000]
        ) -> None:
            await cog.edit_words(interaction, remove=words)

        @words.command(name="clear", description="Remove every blocked word")
        async def words_clear(interaction: discord.Interaction) -> None:
            await cog.edit_words(interaction, clear=True)

        @words.command(name="list", description="Show the blocked words (only to you)")
        async def words_list(interaction: discord.Interaction) -> None:
            if not await cog.authorise(interaction):
                return
            entries = cog.policy.settings_for(interaction.guild_id or 0).blocked_words
            text = ", ".join(f"`{e}`" for e in entries) if entries else "No blocked words."
            await reply(interaction, text[:1900])

        return group

    async def model_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        return model_choices(self.manager.models, current)

    def describe(self, guild_id: int) -> str:
        s = self.policy.settings_for(guild_id)
        default = " (bot default)"
        channels = ", ".join(f"<#{c}>" for c in s.channels) if s.channels else "all channels"
        caps = self.manager.capabilities
        size = s.default_size or "{}x{} (backend default)".format(*caps.default_size)
        model = s.default_model or (
            f"{self.manager.default_model} (bot default)" if self.manager.default_model else "backend default"
        )
        lines = [
            "**Settings for this server**",
            f"Concurrency: {self.manager.guild_limit(guild_id)}"
            + (default if s.concurrency is None else "")
            + f" (ceiling {self.manager.guild_concurrency_max})",
            f"Max jobs per user: {self.manager.user_limit(guild_id)}"
            + (default if s.max_jobs_per_user is None else ""),
            f"Daily images per user: {s.daily_images or 'unlimited'}",
            f"NSFW: {s.nsfw}",
            f"Default size: {size}",
            f"Default model: {escape(model)}",
            f"Channels: {channels}",
            f"Blocked words: {len(s.blocked_words)} (see `/settings blocked-words list`)",
        ]
        return "\n".join(lines)

    async def _update(self, interaction: discord.Interaction, **changes: object) -> list[str] | None:
        try:
            _, notes = await self.policy.update(interaction.guild_id or 0, **changes)
        except InvalidGuildSetting as exc:
            await reply(interaction, f"Not changed: {exc.message}")
            return None
        except StoreError as exc:
            log.error("could not save guild settings: %s", exc.message)
            await reply(interaction, "Not changed: the settings could not be saved; try again later.")
            return None
        log.info(
            "guild settings changed",
            extra={"guild": interaction.guild_id, "by": interaction.user.id, "settings": sorted(changes)},
        )
        return notes

    async def settings_set(self, interaction: discord.Interaction, changes: dict[str, object]) -> None:
        if not await self.authorise(interaction):
            return
        if not changes:
            await reply(
                interaction,
                "Nothing to change: give at least one option.\n\n" + self.describe(interaction.guild_id or 0),
            )
            return
        notes = await self._update(interaction, **changes)
        if notes is None:
            return
        text = "Saved. " + " ".join(notes) + "\n\n" + self.describe(interaction.guild_id or 0)
        await reply(interaction, text)

    async def settings_reset(self, interaction: discord.Interaction, setting: str) -> None:
        if not await self.authorise(interaction):
            return
        defaults = GuildSettings()
        names = list(GuildSettings.__dataclass_fields__) if setting == "all" else [setting]
        if any(n not in GuildSettings.__dataclass_fields__ for n in names):
            await reply(interaction, f"Unknown setting {escape(setting)}.")
            return
        if await self._update(interaction, **{n: getattr(defaults, n) for n in names}) is None:
            return
        await reply(interaction, "Reset. \n\n" + self.describe(interaction.guild_id or 0))

    async def edit_channels(
        self,
        interaction: discord.Interaction,
        *,
        add: int | None = None,
        remove: int | None = None,
        clear: bool = False,
    ) -> None:
        if not await self.authorise(interaction):
            return
        current = set(self.policy.settings_for(interaction.guild_id or 0).channels)
        if clear:
            current.clear()
        if add is not None:
            current.add(add)
        if remove is not None:
            if remove not in current:
                await reply(interaction, f"<#{remove}> was not in the list.")
                return
            current.discard(remove)
        if await self._update(interaction, channels=tuple(current)) is None:
            return
        where = ", ".join(f"<#{c}>" for c in sorted(current)) if current else "every channel"
        await reply(interaction, f"/imagine is now allowed in {where}.")

    async def edit_words(
        self,
        interaction: discord.Interaction,
        *,
        add: str | None = None,
        remove: str | None = None,
        clear: bool = False,
    ) -> None:
        if not await self.authorise(interaction):
            return
        current = list(self.policy.settings_for(interaction.guild_id or 0).blocked_words)
        try:
            if clear:
                current = []
            if add is not None:
                new = [normalise_blocked_word(w) for w in split_words(add)]
                if not new:
                    raise InvalidGuildSetting("Give at least one word.")
                current += [w for w in new if w not in current]
                if len(current) > MAX_BLOCKED_WORDS:
                    raise InvalidGuildSetting(
                        f"That would make {len(current)} blocked words; the limit is {MAX_BLOCKED_WORDS}."
                    )
            missing: list[str] = []
            if remove is not None:
                gone = [normalise_blocked_word(w) for w in split_words(remove)]
                missing = [w for w in gone if w not in current]
                current = [w for w in current if w not in gone]
        except InvalidGuildSetting as exc:
            await reply(interaction, f"Not changed: {exc.message}")
            return
        if await self._update(interaction, blocked_words=tuple(current)) is None:
            return
        text = f"Saved: {len(current)} blocked word{'s' if len(current) != 1 else ''}."
        if missing:
            text += f" {len(missing)} of the words to remove were not in the list."
        await reply(interaction, text)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(AdminCog(bot))
