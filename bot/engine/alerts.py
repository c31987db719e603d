"""Operator alerts: failures only the operator can fix reach the log at WARNING and the owner, rate-limited.

A job that fails with a ``GenerationError`` carrying ``advice`` (bad key, no credit, wrong URL, backend down
or unreachable) is reported here by the manager, once per job. Two limits, both on the injectable clock:

- the log: one WARNING line per failure reason per ``log_window_s`` (5 minutes), with the number of jobs
  it hit; jobs failing for the same reason inside the window are counted and that count is logged when the
  window ends (a timer) or at the next failure after it, so a long outage is one line every 5 minutes, not
  one per job, and a short one still leaves its count;
- the notifiers (the frontend's owner DM): told once per distinct problem (its advice text) per
  ``notify_window_s`` (an hour). Each call runs in a task this object keeps and awaits in ``close()``; a
  notifier that fails is logged, never raised into a job.

A job's ordinary end (a refused prompt, a timeout, a cancel) is not reported here: it stays at INFO in the
manager's "job finished" line. Nothing here imports discord.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from bot.engine.errors import GenerationError

log = logging.getLogger(__name__)

LOG_WINDOW_S = 5 * 60
NOTIFY_WINDOW_S = 60 * 60
#: How long shutdown waits for a notification under way (a DM) before cancelling it.
CLOSE_WAIT_S = 5.0


@dataclass(frozen=True)
class OperatorAlert:
    """One problem, as a notifier receives it."""

    reason: str  # FailureReason value
    advice: str  # what the operator should change
    member_message: str  # what members were told


Notifier = Callable[[OperatorAlert], Awaitable[None]]


@dataclass
class _LogWindow:
    logged_at: float
    advice: str
    unlogged_jobs: int = 0
    timer: asyncio.TimerHandle | None = None


class OperatorAlerts:
    """Counts operator problems, logs them at WARNING within limits, and tells the notifiers."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        log_window_s: float = LOG_WINDOW_S,
        notify_window_s: float = NOTIFY_WINDOW_S,
    ) -> None:
        self.clock = clock
        self.log_window_s = log_window_s
        self.notify_window_s = notify_window_s
        self._notifiers: list[Notifier] = []
        self._windows: dict[str, _LogWindow] = {}
        self._notified_at: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Jobs hit per reason since start (for tests and diagnostics).
        self.jobs_hit: dict[str, int] = {}

    def add_notifier(self, notifier: Notifier) -> None:
        self._notifiers.append(notifier)

    def report(self, error: GenerationError, *, jobs: int = 1) -> None:
        """A job ended with this error; a no-op unless the error carries operator advice."""
        if error.advice is None:
            return
        reason = error.reason.value
        self.jobs_hit[reason] = self.jobs_hit.get(reason, 0) + jobs
        now = self.clock()
        window = self._windows.get(reason)
        if window is None or now - window.logged_at >= self.log_window_s:
            earlier = window.unlogged_jobs if window is not None else 0
            if window is not None and window.timer is not None:
                window.timer.cancel()
            self._windows[reason] = _LogWindow(logged_at=now, advice=error.advice)
            self._warn(reason, error.advice, jobs + earlier)
        else:
            window.unlogged_jobs += jobs
            window.advice = error.advice
            if window.timer is None:
                window.timer = self._flush_later(reason, window.logged_at + self.log_window_s - now)
        self._notify(OperatorAlert(reason=reason, advice=error.advice, member_message=error.message), now)

    def _warn(self, reason: str, advice: str, jobs: int) -> None:
        window_min = round(self.log_window_s / 60, 1)
        log.warning(
            "image backend problem for the operator: %s",
            advice,
            extra={"reason": reason, "jobs": jobs, "window_min": window_min},
        )

    def _flush_later(self, reason: str, delay: float) -> asyncio.TimerHandle | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None  # no loop (a synchronous caller): the next report or close() logs the count
        return loop.call_later(max(delay, 0.0), self._flush, reason)

    def _flush(self, reason: str) -> None:
        window = self._windows.get(reason)
        if window is None:
            return
        window.timer = None
        if window.unlogged_jobs:
            self._warn(reason, window.advice, window.unlogged_jobs)
            window.unlogged_jobs = 0
            window.logged_at = self.clock()

    def _notify(self, alert: OperatorAlert, now: float) -> None:
        last = self._notified_at.get(alert.advice)
        if last is not None and now - last < self.notify_window_s:
            return
        self._notified_at[alert.advice] = now
        for notifier in self._notifiers:
            task = asyncio.get_running_loop().create_task(self._run(notifier, alert), name="operator-alert")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, notifier: Notifier, alert: OperatorAlert) -> None:
        try:
            await notifier(alert)
        except Exception:
            log.exception("could not tell the operator", extra={"reason": alert.reason})

    async def close(self) -> None:
        """Log counts still inside a window; let notifications under way finish (bounded), then cancel them."""
        for reason in list(self._windows):
            window = self._windows[reason]
            if window.timer is not None:
                window.timer.cancel()
            self._flush(reason)
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=CLOSE_WAIT_S)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
