"""OperatorAlerts: WARNING once per reason per 5 minutes with a job count, owners told once per problem per hour."""

from __future__ import annotations

import asyncio
import logging

import pytest

from bot.engine.alerts import OperatorAlert, OperatorAlerts
from bot.engine.errors import NOT_SET_UP, FailureReason, GenerationError

BAD_KEY = GenerationError(FailureReason.AUTH, NOT_SET_UP, advice="the backend refused IMAGE_BACKEND_API_KEY")
DOWN = GenerationError(FailureReason.UNAVAILABLE, "down", advice="cannot connect to http://127.0.0.1:1")
REFUSED = GenerationError(FailureReason.CONTENT_REFUSED, "The image service refused this prompt.")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "bot.engine.alerts" and r.levelno == logging.WARNING]


async def test_one_warning_per_reason_per_window_with_the_jobs_it_hit(caplog) -> None:
    clock = Clock()
    alerts = OperatorAlerts(clock=clock)
    with caplog.at_level(logging.WARNING, logger="bot.engine.alerts"):
        alerts.report(BAD_KEY)
        for _ in range(4):
            clock.now += 30
            alerts.report(BAD_KEY)
        alerts.report(DOWN)  # another reason: its own line at once
        first = warnings(caplog)
        assert [(r.reason, r.jobs) for r in first] == [("auth", 1), ("unavailable", 1)]
        assert "IMAGE_BACKEND_API_KEY" in first[0].getMessage()
        clock.now += 300  # the window is over: the next failure's line counts the four held back, and itself
        alerts.report(BAD_KEY)
        assert [(r.reason, r.jobs) for r in warnings(caplog)][2:] == [("auth", 5)]
        alerts.report(BAD_KEY)
        await alerts.close()  # shutdown logs what the current window still holds
    assert [(r.reason, r.jobs) for r in warnings(caplog)][3:] == [("auth", 1)]
    assert alerts.jobs_hit == {"auth": 7, "unavailable": 1}


async def test_a_window_with_failures_held_back_is_logged_when_it_ends(caplog) -> None:
    alerts = OperatorAlerts(log_window_s=0.2)
    with caplog.at_level(logging.WARNING, logger="bot.engine.alerts"):
        alerts.report(DOWN)
        alerts.report(DOWN)
        alerts.report(DOWN)
        await asyncio.sleep(0.4)  # the window's timer fires: nobody needs to fail again for the count to show
        assert [r.jobs for r in warnings(caplog)] == [1, 2]
        await alerts.close()
    assert [r.jobs for r in warnings(caplog)] == [1, 2]


async def test_an_ordinary_job_end_is_not_an_operator_alert(caplog) -> None:
    alerts = OperatorAlerts()
    told: list[OperatorAlert] = []

    async def notifier(alert: OperatorAlert) -> None:
        told.append(alert)

    alerts.add_notifier(notifier)
    with caplog.at_level(logging.INFO, logger="bot.engine.alerts"):
        alerts.report(REFUSED)
        await alerts.close()
    assert caplog.records == [] and told == [] and alerts.jobs_hit == {}


async def test_notifiers_hear_once_per_distinct_problem_per_hour() -> None:
    clock = Clock()
    alerts = OperatorAlerts(clock=clock)
    told: list[OperatorAlert] = []

    async def notifier(alert: OperatorAlert) -> None:
        told.append(alert)

    alerts.add_notifier(notifier)
    for _ in range(10):
        alerts.report(BAD_KEY)
        clock.now += 60
    alerts.report(DOWN)  # a distinct problem is told at once
    await asyncio.sleep(0)
    assert [(a.reason, a.advice, a.member_message) for a in told] == [
        ("auth", BAD_KEY.advice, NOT_SET_UP),
        ("unavailable", DOWN.advice, "down"),
    ]
    clock.now += 3600 - 10 * 60 - 1
    alerts.report(BAD_KEY)  # still within the hour of the first DM
    await asyncio.sleep(0)
    assert len(told) == 2
    clock.now += 1
    alerts.report(BAD_KEY)  # an hour after the first: told again
    await alerts.close()
    assert [a.reason for a in told] == ["auth", "unavailable", "auth"]


async def test_a_failing_notifier_is_logged_and_never_reaches_the_job(caplog) -> None:
    alerts = OperatorAlerts()

    async def broken(alert: OperatorAlert) -> None:
        raise RuntimeError("notifier bug")

    alerts.add_notifier(broken)
    with caplog.at_level(logging.ERROR, logger="bot.engine.alerts"):
        alerts.report(BAD_KEY)  # does not raise
        await alerts.close()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "could not tell the operator"
    ]
