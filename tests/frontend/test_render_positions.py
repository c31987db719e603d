"""How a queue position and its estimated wait read: the engine's buckets, said plainly."""

from __future__ import annotations

import pytest

from bot.engine.models import ImageRequest, Job
from bot.frontend.render import status_line


def queued(position: int, eta: float | None = None) -> Job:
    job = Job(id="j", request=ImageRequest("x"), guild_id=1, user_id=1)
    job.queue_position, job.queue_eta_s = position, eta
    return job


@pytest.mark.parametrize(
    ("position", "shown"),
    [(7, "position 7 in"), (47, "position 40+ in"), (470, "position 400+ in"), (4700, "position 1,000+ in")],
)
def test_positions_are_exact_then_in_tens_hundreds_and_1000_plus(position: int, shown: str) -> None:
    assert shown in status_line(queued(position))


def test_an_estimated_wait_is_shown_roughly() -> None:
    assert status_line(queued(3)).endswith("this server's queue")
    assert status_line(queued(3, 20)).endswith("starts in under a minute")
    assert status_line(queued(30, 610)).endswith("about 10 min to wait")
