"""Keeps each job's Discord message in step with the job, then posts the result.

- Progress edits are coalesced: the latest state wins, one edit in flight per job, at most one per interval.
- Edits go through the interaction's webhook (application id + token from the job's ``message_ref``), so the
  same code works for a job started by this process or found in the store after a restart.
- From ~14 minutes after the interaction (or when Discord says the token is dead) the token is not used: the
  result is posted in the channel when the bot may, pinging only the requester; otherwise it stays recorded.
- Images within the upload limit are posted byte-for-byte; larger ones are re-encoded off the event loop.
- Delivery is recorded: once the outcome is posted (or cannot be), ``JobStore.mark_delivered`` says so. Until
  then the job's images stay pinned in the cache, so a restart after a crash mid-post can post them again.
  A record the store refused (the database away) is retried in the background, 1 s then doubling up to 30 s,
  until it is written: once the database is back its rows say what the members saw.
- Per-job state (``_JobMessage``) lives only while the job's message can still change: it is dropped when the
  final message is posted, so nothing here grows with the number of jobs served.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import discord

from bot.engine.images import shrink_to_fit
from bot.engine.manager import JobEvent
from bot.engine.models import GeneratedImage, Job, JobState
from bot.engine.store import StoreError
from bot.frontend.render import job_embed, job_view

if TYPE_CHECKING:
    from bot.engine.cache import ResultCache
    from bot.engine.store import JobStore

log = logging.getLogger(__name__)

#: Discord kills interaction tokens after 15 minutes; stop using them a minute before.
TOKEN_USABLE_S = 14 * 60
DEFAULT_UPLOAD_LIMIT = 10 * 1024 * 1024
#: First wait before a delivery record the store refused is tried again (doubling up to RECORD_RETRY_MAX_S).
RECORD_RETRY_S = 1.0
RECORD_RETRY_MAX_S = 30.0
#: Error codes that mean the interaction token (or its message) is gone for good.
DEAD_TOKEN_CODES = {50027, 10015, 10008, 10062}
NO_MENTIONS = discord.AllowedMentions.none()


def message_ref_for(interaction: discord.Interaction) -> dict[str, Any]:
    """What we keep to edit a job's message later, in this process or the next."""
    permissions = interaction.app_permissions
    return {
        "application_id": interaction.application_id,
        "interaction_id": interaction.id,
        "token": interaction.token,
        "created_at": interaction.created_at.timestamp(),
        "channel_id": interaction.channel_id,
        "guild_id": interaction.guild_id,
        "upload_limit": interaction.filesize_limit or DEFAULT_UPLOAD_LIMIT,
        "can_post": bool(permissions.send_messages and permissions.attach_files),
        "channel_nsfw": bool(getattr(interaction.channel, "is_nsfw", lambda: False)()),
    }


@dataclass(eq=False)
class _JobMessage:
    """One job's Discord message while it can still change (progress edits pending)."""

    job: Job
    dirty: bool = False
    closed: bool = False
    token_dead: bool = False
    last_edit: float = 0.0
    last_signature: tuple[str, int] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    task: asyncio.Task[None] | None = None
    #: Set when the job starts: a pump waiting out the (longer) queued interval wakes to show it sooner.
    started: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class _Delivery:
    """A posted outcome, to be recorded: when, why it could not be posted (None: it was), and whether the
    job's images are pinned until the record is written."""

    job: Job
    at: float
    error: str | None
    pinned: bool


class DiscordErrorSink(Protocol):
    """Where failed Discord calls are counted (the service's metrics)."""

    def discord_error(self, exc: discord.HTTPException) -> None: ...


class _NoErrorSink:
    def discord_error(self, exc: discord.HTTPException) -> None:
        pass


class JobMessenger:
    def __init__(
        self,
        bot: discord.Client,
        *,
        cache: ResultCache | None = None,
        store: JobStore | None = None,
        errors: DiscordErrorSink | None = None,
        min_interval: float = 1.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.bot = bot
        self.cache = cache
        self.store = store
        self.errors: DiscordErrorSink = errors or _NoErrorSink()
        self.min_interval = min_interval
        self.clock = clock
        self._messages: dict[str, _JobMessage] = {}
        #: Jobs another process claimed from this one (rare: a lapsed lease): never edited here again.
        self._taken: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Deliveries posted but not recorded yet (the store refused): retried by ``_record_task``.
        self._unrecorded: dict[str, _Delivery] = {}
        self._record_task: asyncio.Task[None] | None = None
        self.edits = 0

    # -- manager hooks ----------------------------------------------------------------------------------
    def on_job_event(self, job: Job, event: JobEvent) -> None:
        """Listener: mark the job's message stale and make sure one pump is running for it."""
        if event is JobEvent.TAKEN:
            self._drop(job)
            return
        if event is JobEvent.FINISHED or not job.message_ref or job.id in self._taken:
            return
        entry = self._messages.get(job.id)
        if entry is None:
            entry = self._messages[job.id] = _JobMessage(job)
        if entry.closed or entry.token_dead:
            return
        entry.dirty = True
        if event is JobEvent.STARTED:
            entry.started.set()
        if entry.task is None or entry.task.done():
            entry.task = asyncio.create_task(self._pump(entry), name=f"progress-{job.id}")
            self._tasks.add(entry.task)
            entry.task.add_done_callback(self._task_done)

    def _drop(self, job: Job) -> None:
        """Another process answers for the job now (it claimed it while our lease had lapsed): its message is
        theirs to edit, so ours stops at once, and later events of the job are not heard."""
        self._taken.add(job.id)
        entry = self._messages.pop(job.id, None)
        if entry is not None:
            entry.closed = True
            if entry.task is not None and not entry.task.done():
                entry.task.cancel()

    async def deliver(self, job: Job) -> None:
        """Manager delivery hook: runs inside the job's task once the job is finished."""
        entry = self._messages.pop(job.id, None) or _JobMessage(job)
        entry.closed = True
        async with entry.lock:  # let an edit already on the wire land first
            pass
        if entry.task is not None and not entry.task.done():
            entry.task.cancel()
        if not job.message_ref:
            return
        await self.post_and_record(job, token_dead=entry.token_dead)

    async def post_and_record(self, job: Job, *, token_dead: bool = False) -> None:
        """Post the job's outcome, then record that it was delivered (or why it could not be).

        Safe to repeat (recovery calls it for a job a dead process was posting): ``@original`` is edited, not
        added to. The images stay pinned in the cache until the record is written.
        """
        pinned = self.cache is not None and job.state is JobState.SUCCEEDED and bool(job.image_refs)
        if pinned:
            assert self.cache is not None
            await self.cache.pin(job.id, job.image_refs)
        error = await self.post_final(job, token_dead=token_dead)
        delivery = _Delivery(job, self.clock(), error, pinned)
        if await self._record(delivery):
            return
        # Not recorded yet: retried until the store takes it. Should this process end first, the next start
        # posts it again (an edit of the same message), which is harmless.
        self._unrecorded[job.id] = delivery
        if self._record_task is None or self._record_task.done():
            self._record_task = asyncio.create_task(self._retry_records(), name="delivery-records")
            self._tasks.add(self._record_task)
            self._record_task.add_done_callback(self._task_done)

    async def _record(self, delivery: _Delivery, *, retrying: bool = False) -> bool:
        """Write the delivery record (then unpin the images); False when the store refused it."""
        job = delivery.job
        if self.store is not None:
            try:
                await self.store.mark_delivered(job.id, at=delivery.at, error=delivery.error)
            except StoreError as exc:
                if not retrying:  # one line per delivery, not one per try (the store says it is away)
                    log.info(
                        "delivery not recorded yet; retrying", extra={"job": job.id, "error": exc.message}
                    )
                return False
            except Exception:
                log.exception("could not record a delivery; retrying", extra={"job": job.id})
                return False
        job.delivered_at, job.delivery_error = (
            (None, delivery.error) if delivery.error else (delivery.at, None)
        )
        if delivery.pinned:
            assert self.cache is not None
            await self.cache.unpin(job.id)
        return True

    async def _retry_records(self) -> None:
        delay = RECORD_RETRY_S
        while self._unrecorded:
            await asyncio.sleep(delay)
            await self._flush_records()
            delay = min(delay * 2, RECORD_RETRY_MAX_S)

    async def _flush_records(self) -> None:
        for job_id, delivery in list(self._unrecorded.items()):
            if await self._record(delivery, retrying=True):
                self._unrecorded.pop(job_id, None)

    def unrecorded_deliveries(self) -> list[str]:
        """Jobs whose outcome was posted but whose record the store has not taken yet (being retried)."""
        return list(self._unrecorded)

    async def close(self) -> None:
        for task in list(self._tasks):  # progress pumps and the record retry
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._record_task = None
        await self._flush_records()  # a last try; what is left is posted again by the next start
        self._messages.clear()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed", task.get_name(), exc_info=task.exception())

    # -- progress -----------------------------------------------------------------------------------------
    async def _pump(self, entry: _JobMessage) -> None:
        while entry.dirty and not entry.closed:
            # A queue position matters less than progress: while queued, edit a third as often.
            interval = self.min_interval * (3 if entry.job.state is JobState.QUEUED else 1)
            wait = entry.last_edit + interval - time.monotonic()
            if wait > 0:
                if entry.job.state is JobState.QUEUED:
                    # A job that waited a moment for a slot (a fleet's grant) shows "Generating" at the running
                    # pace, not a queued interval after its "Queued".
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await entry.started.wait()
                    entry.started.clear()
                else:
                    await asyncio.sleep(wait)
                continue
            entry.dirty = False
            async with entry.lock:
                if entry.closed:
                    return
                job = entry.job
                if job.state.is_terminal:
                    return  # the result is deliver()'s to post: an edit now would say "Done" with no image
                if not self.token_usable(job):
                    entry.token_dead = True
                    return
                try:
                    files = []
                    embed = job_embed(job)
                    preview = job.progress.preview if job.progress and job.state is JobState.RUNNING else None
                    # Nothing a user would see changed (a queue moving far behind them): no edit, no traffic.
                    signature = (json.dumps(embed.to_dict(), sort_keys=True), hash(preview))
                    if signature == entry.last_signature:
                        continue
                    entry.last_signature = signature
                    if preview:
                        files.append(discord.File(io.BytesIO(preview), filename="preview.png"))
                        embed.set_image(url="attachment://preview.png")
                    await self._edit_original(job, embed=embed, view=job_view(job), files=files)
                except discord.HTTPException as exc:
                    entry.last_signature = None  # not shown: the same state is worth another try
                    self.errors.discord_error(exc)  # imagine_discord_api_errors_total{status}
                    if exc.code in DEAD_TOKEN_CODES:
                        entry.token_dead = True
                        return
                    log.warning(
                        "progress edit failed", extra={"job": job.id, "status": exc.status, "code": exc.code}
                    )
                finally:
                    entry.last_edit = time.monotonic()

    # -- the result ---------------------------------------------------------------------------------------
    def token_usable(self, job: Job) -> bool:
        ref = job.message_ref or {}
        created = ref.get("created_at")
        return (
            bool(ref.get("token")) and created is not None and self.clock() < float(created) + TOKEN_USABLE_S
        )

    async def post_final(self, job: Job, *, token_dead: bool = False) -> str | None:
        """Show the job's outcome: edit its message, or post in the channel when the token is gone.

        Returns None once posted, else one line saying why it could not be (recorded as ``delivery_error``).
        """
        images = await self._images_for(job)
        elapsed = job.result.elapsed_s if job.result is not None else None
        embed = job_embed(job, elapsed_s=elapsed)
        view = job_view(job)
        limit = int((job.message_ref or {}).get("upload_limit") or DEFAULT_UPLOAD_LIMIT)
        prepared = await prepare_uploads(job.id, images, limit)
        if not token_dead and self.token_usable(job):
            try:
                await self._with_shrink_retry(
                    job.id,
                    prepared,
                    limit,
                    lambda files: self._edit_original(job, embed=embed, view=view, files=files),
                )
                log.info("result posted", extra={"job": job.id, "state": job.state.value})
                return None
            except discord.HTTPException as exc:
                self.errors.discord_error(exc)  # imagine_discord_api_errors_total{status}
                if exc.code not in DEAD_TOKEN_CODES:
                    log.error(
                        "could not post result", extra={"job": job.id, "status": exc.status, "code": exc.code}
                    )
                    return f"Discord refused the edit (HTTP {exc.status}, code {exc.code})"
        return await self._post_in_channel(job, embed, view, prepared, limit)

    async def _post_in_channel(
        self,
        job: Job,
        embed: discord.Embed,
        view: discord.ui.View,
        prepared: list[tuple[bytes, str]],
        limit: int,
    ) -> str | None:
        ref = job.message_ref or {}
        channel_id = ref.get("channel_id") or job.channel_id
        if not ref.get("can_post") or not channel_id:
            log.warning("token expired and the bot may not post here; result kept", extra={"job": job.id})
            return "the token expired and the bot may not post in the channel"
        channel = self.bot.get_partial_messageable(int(channel_id), guild_id=job.guild_id)
        content = (
            f"<@{job.user_id}> your image is ready."
            if job.state is JobState.SUCCEEDED
            else f"<@{job.user_id}>"
        )

        async def send(files: list[discord.File]) -> None:
            await channel.send(
                content=content,
                embed=embed,
                view=view,
                files=files,
                allowed_mentions=discord.AllowedMentions(
                    users=[discord.Object(job.user_id)], roles=False, everyone=False
                ),
            )

        try:
            await self._with_shrink_retry(job.id, prepared, limit, send)
            log.info("result posted in channel (token expired)", extra={"job": job.id})
            return None
        except discord.HTTPException as exc:
            self.errors.discord_error(exc)  # imagine_discord_api_errors_total{status}
            log.error(
                "could not post result in channel",
                extra={"job": job.id, "status": exc.status, "code": exc.code},
            )
            return f"Discord refused the channel post (HTTP {exc.status}, code {exc.code})"

    async def _with_shrink_retry(
        self,
        job_id: str,
        prepared: list[tuple[bytes, str]],
        limit: int,
        send: Callable[[list[discord.File]], Any],
    ) -> None:
        try:
            await send(_files(prepared))
        except discord.HTTPException as exc:
            if exc.status != 413 and exc.code != 40005:
                raise
            # Counted here only when handled here (the caller counts a raise).
            self.errors.discord_error(exc)
            log.warning("upload too large for Discord; shrinking once more", extra={"job": job_id})
            # Discord's real limit was lower than we were told: aim well under what was refused.
            target = int(min(limit, max((len(data) for data, _ in prepared), default=limit)) * 0.6)
            smaller = await prepare_uploads(
                job_id, [_as_image(d, n) for d, n in prepared], target, force=True
            )
            await send(_files(smaller))

    async def _images_for(self, job: Job) -> list[GeneratedImage]:
        if job.state is not JobState.SUCCEEDED:
            return []
        if job.result is not None:
            return list(job.result.images)
        if self.cache is None or not job.image_refs:
            return []
        images = await self.cache.get_images(job.image_refs)
        return images or []

    async def _edit_original(
        self, job: Job, *, embed: discord.Embed, view: discord.ui.View, files: list[discord.File]
    ) -> None:
        ref = job.message_ref or {}
        webhook = discord.Webhook.partial(int(ref["application_id"]), str(ref["token"]), client=self.bot)
        await webhook.edit_message(
            "@original",  # type: ignore[arg-type]  # discord.py formats it into the route as is
            embed=embed,
            view=view,
            attachments=files,
            allowed_mentions=NO_MENTIONS,
        )
        self.edits += 1


def _files(prepared: list[tuple[bytes, str]]) -> list[discord.File]:
    return [discord.File(io.BytesIO(data), filename=name) for data, name in prepared]


def _as_image(data: bytes, name: str) -> GeneratedImage:
    return GeneratedImage(data=data, format=name.rsplit(".", 1)[-1].upper(), width=0, height=0)


async def prepare_uploads(
    job_id: str, images: list[GeneratedImage], limit: int, *, force: bool = False
) -> list[tuple[bytes, str]]:
    """(bytes, filename) per image: unchanged when within ``limit``, else re-encoded/downscaled to fit."""
    prepared: list[tuple[bytes, str]] = []
    for index, image in enumerate(images, start=1):
        data, extension = image.data, image.extension
        if force or len(data) > limit:
            data, extension = await shrink_to_fit(data, limit)
        prepared.append((data, f"{job_id}-{index}.{extension}"))
    return prepared
