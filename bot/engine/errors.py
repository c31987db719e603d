"""Errors the engine speaks in: each carries a bounded ``reason`` (for metrics), a message a user can read and,
for failures the operator must fix, separate ``advice`` that only the operator sees."""

from __future__ import annotations

from enum import StrEnum


class FailureReason(StrEnum):
    """Why a generation failed. A closed set, so it is safe as a metrics label."""

    UNAVAILABLE = "unavailable"  # cannot reach the backend, or it answered 5xx
    RATE_LIMITED = "rate_limited"  # still rate limited after the allowed retries
    QUOTA = "quota"  # out of credit (OpenAI insufficient_quota, Horde KudosUpfront)
    AUTH = "auth"  # bad or missing API key
    CONTENT_REFUSED = "content_refused"  # the backend's content policy said no
    CENSORED = "censored"  # Horde returned a censored image
    UNKNOWN_MODEL = "unknown_model"
    BAD_REQUEST = "bad_request"  # the backend rejected the parameters
    NO_WORKERS = "no_workers"  # Horde: nobody can serve this request
    INVALID_IMAGE = "invalid_image"  # the bytes we got back are not an image
    TIMEOUT = "timeout"
    INTERNAL = "internal"  # a bug on our side; logged with a traceback, shown to users as a plain sentence


#: What members read when the failure is the operator's to fix (they cannot act on setting names).
NOT_SET_UP = "The image service is not set up correctly; the bot owner has been told."
#: What members read when the image service is down or unreachable: not their fault, and it may pass.
SERVICE_DOWN = "The image service is not answering right now; the bot owner has been told. Try again later."


class EndReason(StrEnum):
    """Why a job ended without a result of its own making: the one name for each (a job's ``error_reason``).

    Backend failures use :class:`FailureReason`; these are the ends the engine itself decides.
    """

    CANCELLED = "cancelled"  # a member or a manager pressed Cancel
    SHUTDOWN = "shutdown"  # still queued or running when the shutdown grace ended
    QUEUE_TIMEOUT = "timeout"  # waited QUEUE_TIMEOUT_S for a slot (the same label as FailureReason.TIMEOUT)
    INTERRUPTED = "interrupted"  # the process died while it ran (recovery)
    HANDED_OVER = (
        "handed_over"  # still queued at shutdown, given back for another process to run (no end here)
    )


class GenerationError(Exception):
    """A generation failed for a reason a user can be told about.

    ``message`` is for the member who asked, in their words; it never names settings or command-line flags.
    ``advice`` is for the operator (log, ``check``, the owner's DM): what is wrong with the set-up and what to
    change. A failure with advice is one an operator must act on (bad key, no credit, wrong URL, backend down
    or unreachable); one without (a refused prompt, a worker failing once, a timeout) is the job's own end.

    ``not_accepted`` says the backend certainly did not take the generation: the connection for the submit never
    came up, or the submit itself was answered 429/503. Only such a failure may move a job to another backend
    of a pool (anything later may mean the work is already running there).
    """

    def __init__(
        self,
        reason: FailureReason,
        message: str,
        *,
        advice: str | None = None,
        retry_after: float | None = None,
        not_accepted: bool = False,
    ) -> None:
        super().__init__(advice or message)
        self.reason = reason
        self.message = message
        self.advice = advice
        self.retry_after = retry_after
        self.not_accepted = not_accepted

    @property
    def needs_operator(self) -> bool:
        return self.advice is not None

    def __repr__(self) -> str:
        return f"GenerationError({self.reason.value!r}, {self.message!r}, advice={self.advice!r})"


class RequestRejected(Exception):
    """A request was refused before any job existed (invalid options, over a limit, shutting down)."""

    def __init__(self, message: str, *, code: str = "invalid") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class ShuttingDown(RequestRejected):
    def __init__(self) -> None:
        super().__init__("The bot is restarting; try again in a moment.", code="shutting_down")
