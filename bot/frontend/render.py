"""What a job's Discord message says at each stage. Pure functions: easy to test, nothing sent from here."""

from __future__ import annotations

import discord

from bot.engine.models import Job, JobState
from bot.engine.queue import shown_position

#: custom_id prefixes; the job id follows. Kept short: custom ids are at most 100 characters.
CANCEL_ID = "imagine:cancel:"
REROLL_ID = "imagine:reroll:"
VARIATIONS_ID = "imagine:vary:"
DELETE_ID = "imagine:delete:"

COLOURS = {
    JobState.QUEUED: discord.Colour.light_grey(),
    JobState.RUNNING: discord.Colour.blurple(),
    JobState.SUCCEEDED: discord.Colour.green(),
    JobState.FAILED: discord.Colour.red(),
    JobState.TIMED_OUT: discord.Colour.orange(),
    JobState.CANCELLED: discord.Colour.dark_grey(),
    JobState.INTERRUPTED: discord.Colour.orange(),
}

FAILURE_TITLES = {
    "unavailable": "The image service is unavailable",
    "rate_limited": "The image service is busy",
    "quota": "The image service is out of credit",
    "auth": "The image service refused our key",
    "content_refused": "The image service refused this prompt",
    "censored": "The image service refused this prompt",
    "unknown_model": "That model is not available",
    "bad_request": "The image service rejected the options",
    "no_workers": "No worker can take this request right now",
    "invalid_image": "The image service sent back a broken image",
    "timeout": "Timed out",
    "internal": "Something went wrong",
}


def escape(text: str) -> str:
    """Show user text literally: no markdown, no mentions (allowed_mentions is off too, belt and braces)."""
    return discord.utils.escape_mentions(discord.utils.escape_markdown(text))


def excerpt(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _rough_position(position: int) -> str:
    """Exact near the front, then in tens, hundreds, and "1,000+" (the engine's buckets: one edit per bucket)."""
    value, exact = shown_position(position)
    return str(value) if exact else f"{value:,}+"


def _rough_wait(seconds: float | None) -> str:
    """An estimated wait, said as roughly as it is known."""
    if seconds is None:
        return ""
    if seconds < 60:
        return " — starts in under a minute"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f" — about {minutes} min to wait"
    return f" — about {round(seconds / 3600)} h to wait"


def _progress_bar(fraction: float, width: int = 16) -> str:
    filled = max(0, min(width, round(fraction * width)))
    return "█" * filled + "░" * (width - filled)


def status_line(job: Job) -> str:
    if job.state is JobState.QUEUED:
        if job.queue_position:
            return (
                f"Queued — position {_rough_position(job.queue_position)} in this server's queue"
                + _rough_wait(job.queue_eta_s)
            )
        return "Queued"
    if job.state is JobState.RUNNING:
        progress = job.progress
        parts = ["Generating"]
        if progress is not None:
            if progress.queue_position:
                parts.append(f"— backend queue position {progress.queue_position}")
            if progress.fraction is not None:
                parts.append(f"{_progress_bar(progress.fraction)} {progress.fraction:.0%}")
            if progress.eta_s is not None and progress.eta_s > 0:
                parts.append(f"(about {int(progress.eta_s + 0.5)} s left)")
        return " ".join(parts)
    if job.state is JobState.SUCCEEDED:
        count = len(job.image_refs) or len(job.seeds) or 1
        return f"Done — {count} image{'s' if count != 1 else ''}" + (
            " (from cache)" if job.from_cache else ""
        )
    if job.state is JobState.CANCELLED:
        return job.error_message or "Cancelled."
    if job.state is JobState.INTERRUPTED:
        return "Interrupted by a restart — press Reroll to try again."
    title = FAILURE_TITLES.get(job.error_reason or "", "Failed")
    return f"{title}: {job.error_message}" if job.error_message else title


def job_embed(job: Job, *, elapsed_s: float | None = None) -> discord.Embed:
    request = job.request
    embed = discord.Embed(description=escape(request.prompt), colour=COLOURS.get(job.state))
    embed.set_author(name=status_line(job)[:256])
    if request.negative_prompt:
        embed.add_field(name="Negative", value=escape(request.negative_prompt)[:1024], inline=False)
    embed.add_field(name="Size", value=request.size)
    if job.state is JobState.SUCCEEDED:
        seeds = [str(s) for s in job.seeds if s is not None]
        if seeds:
            embed.add_field(name="Seed" + ("s" if len(seeds) > 1 else ""), value=", ".join(seeds)[:1024])
    elif request.seed is not None:
        embed.add_field(name="Seed", value=str(request.seed))
    if request.model:
        embed.add_field(name="Model", value=escape(request.model)[:1024])
    if job.backend:
        embed.add_field(name="Backend", value=job.backend)
    if elapsed_s is not None and job.state is JobState.SUCCEEDED:
        embed.add_field(name="Time", value=f"{elapsed_s:.1f} s" + (" (from cache)" if job.from_cache else ""))
    embed.set_footer(text=f"Job {job.id}")
    return embed


def job_view(job: Job) -> discord.ui.View:
    """Buttons for the job's current state. Handled by DynamicItems (by custom_id), so they outlive the process.

    The view is stopped before it is sent: discord.py then does not keep a copy per message in memory.
    """
    view = discord.ui.View(timeout=None)
    if job.is_active:
        view.add_item(
            discord.ui.Button(label="Cancel", style=discord.ButtonStyle.danger, custom_id=CANCEL_ID + job.id)
        )
    else:
        view.add_item(
            discord.ui.Button(
                label="Reroll", style=discord.ButtonStyle.primary, custom_id=REROLL_ID + job.id, emoji="🎲"
            )
        )
        view.add_item(
            discord.ui.Button(
                label="Variations", style=discord.ButtonStyle.secondary, custom_id=VARIATIONS_ID + job.id
            )
        )
        if job.state is JobState.SUCCEEDED:
            view.add_item(
                discord.ui.Button(
                    label="Delete", style=discord.ButtonStyle.secondary, custom_id=DELETE_ID + job.id
                )
            )
    view.stop()
    return view
