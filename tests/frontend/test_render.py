"""What a job's message says, and how often it is edited."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from bot.engine.manager import JobEvent
from bot.engine.models import ImageRequest, Job, JobState, Progress
from bot.frontend.messenger import JobMessenger
from bot.frontend.render import escape, job_embed, job_view, status_line


def make_job(**changes: object) -> Job:
    job = Job(id="0123456789ab", request=ImageRequest(prompt="a cat"), guild_id=1, user_id=2, backend="horde")
    for name, value in changes.items():
        setattr(job, name, value)
    return job


def test_status_lines_say_where_the_job_is() -> None:
    assert status_line(make_job(queue_position=3)) == "Queued — position 3 in this server's queue"
    assert status_line(make_job(queue_position=47)) == "Queued — position 40+ in this server's queue"
    running = make_job(state=JobState.RUNNING, progress=Progress(fraction=0.5, eta_s=4.2))
    assert "50%" in status_line(running) and "about 4 s left" in status_line(running)
    horde = make_job(state=JobState.RUNNING, progress=Progress(queue_position=12, eta_s=30))
    assert "backend queue position 12" in status_line(horde)
    failed = make_job(state=JobState.FAILED, error_reason="content_refused", error_message="Not allowed.")
    assert status_line(failed) == "The image service refused this prompt: Not allowed."
    assert "Reroll" in status_line(make_job(state=JobState.INTERRUPTED))


def test_user_text_is_shown_literally() -> None:
    text = escape("**bold** @everyone <@&123> `code`")
    assert "\\*\\*bold\\*\\*" in text
    assert "@everyone" not in text  # a zero-width space breaks the mention
    embed = job_embed(make_job(request=ImageRequest(prompt="@here _x_")))
    assert "@here" not in (embed.description or "")


def test_buttons_follow_the_state() -> None:
    def labels(job: Job) -> list[str | None]:
        return [item.label for item in job_view(job).children]  # type: ignore[attr-defined]

    assert labels(make_job()) == ["Cancel"]
    assert labels(make_job(state=JobState.SUCCEEDED)) == ["Reroll", "Variations", "Delete"]
    assert labels(make_job(state=JobState.FAILED)) == ["Reroll", "Variations"]
    custom_ids = [item.custom_id for item in job_view(make_job()).children]  # type: ignore[attr-defined]
    assert custom_ids == ["imagine:cancel:0123456789ab"]


class RecordingMessenger(JobMessenger):
    """The real coalescing logic; only the HTTP edit is replaced by a recorder (a unit's collaborator)."""

    def __init__(self) -> None:
        bot = SimpleNamespace(metrics=SimpleNamespace(discord_error=lambda exc: None))
        super().__init__(bot, min_interval=0.05)  # type: ignore[arg-type]
        self.sent: list[str] = []

    async def _edit_original(self, job, *, embed, view, files) -> None:  # type: ignore[override]
        self.sent.append(embed.author.name or "")


async def test_progress_edits_are_coalesced_and_unchanged_states_not_resent() -> None:
    messenger = RecordingMessenger()
    job = make_job(
        message_ref={"application_id": 1, "token": "t", "created_at": time.time()}, queue_position=40
    )
    for position in range(40, 30, -1):  # the queue moves ten times in a burst, all behind "position 30+"
        job.queue_position = position
        messenger.on_job_event(job, JobEvent.QUEUED)
    await asyncio.sleep(0.3)
    assert messenger.sent == ["Queued — position 30+ in this server's queue"]  # one edit for the burst
    job.queue_position = 2
    messenger.on_job_event(job, JobEvent.QUEUED)
    job.state = JobState.RUNNING
    for fraction in (0.1, 0.2, 0.3):
        job.progress = Progress(fraction=fraction)
        messenger.on_job_event(job, JobEvent.PROGRESS)
    await asyncio.sleep(0.3)
    # Latest state wins: the burst of progress collapses into at most two more edits, ending on the newest.
    assert 2 <= len(messenger.sent) <= 3
    assert messenger.sent[-1].endswith("30%")
    await messenger.close()


async def test_a_progress_edit_never_shows_a_finished_job_before_its_result_is_posted() -> None:
    """The manager sets the final state, then writes it (a slow database) before delivering: a pump woken in
    between must leave the message alone, or members read "Done" with no image until the upload lands."""
    messenger = RecordingMessenger()
    job = make_job(message_ref={"application_id": 1, "token": "t", "created_at": time.time()})
    job.state = JobState.RUNNING
    job.progress = Progress(fraction=0.5)
    messenger.on_job_event(job, JobEvent.PROGRESS)
    await asyncio.sleep(0.1)
    assert len(messenger.sent) == 1
    job.progress = Progress(fraction=0.9)
    messenger.on_job_event(job, JobEvent.PROGRESS)  # a pump is due again ...
    job.state = JobState.SUCCEEDED  # ... and the job finishes before it runs; delivery comes later
    await asyncio.sleep(0.2)
    assert len(messenger.sent) == 1, messenger.sent
    await messenger.close()


async def test_a_job_that_starts_a_moment_after_queued_shows_generating_at_the_running_pace() -> None:
    """In a fleet a job waits a moment for its slot: it is shown "Queued", then starts. The next edit must come
    at the running pace (min_interval), not the queued one (three times as long), or a short generation is
    never shown generating at all."""
    messenger = RecordingMessenger()
    messenger.min_interval = 0.2  # queued pace 0.6 s
    job = make_job(
        message_ref={"application_id": 1, "token": "t", "created_at": time.time()}, queue_position=2
    )
    messenger.on_job_event(job, JobEvent.QUEUED)
    await asyncio.sleep(0.05)
    assert messenger.sent == ["Queued — position 2 in this server's queue"]
    job.queue_position = 1
    messenger.on_job_event(job, JobEvent.QUEUED)  # the pump now waits out the queued pace
    await asyncio.sleep(0.05)
    job.state, job.queue_position = JobState.RUNNING, None
    messenger.on_job_event(job, JobEvent.STARTED)
    await asyncio.sleep(0.35)  # past the running pace, well before the queued one
    assert len(messenger.sent) == 2 and messenger.sent[-1].startswith("Generating"), messenger.sent
    # Sent back to the queue, it waits at the queued pace again (no busy loop on the old wake-up).
    job.state, job.queue_position = JobState.QUEUED, 2
    messenger.on_job_event(job, JobEvent.QUEUED)
    await asyncio.sleep(0.3)
    assert len(messenger.sent) == 2
    await asyncio.sleep(0.5)
    assert len(messenger.sent) == 3 and messenger.sent[-1].startswith("Queued")
    await messenger.close()
