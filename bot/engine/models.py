"""The engine's vocabulary: what is asked for, what a job is, what comes back."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from bot.engine.errors import RequestRejected

MAX_PROMPT_CHARS = 1500
MAX_NEGATIVE_CHARS = 500
MAX_COUNT = 4
MAX_SEED = 2**32 - 1


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """One ``/imagine``: everything a backend needs, nothing about who asked."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    count: int = 1
    seed: int | None = None
    model: str | None = None
    nsfw_allowed: bool = False
    #: Bypass the cache and single flight (rerolls). Not part of the cache key.
    fresh: bool = False

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageRequest:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes: Any) -> ImageRequest:
        return dataclasses.replace(self, **changes)


def parse_size(text: str) -> tuple[int, int]:
    """``"768x512"`` -> ``(768, 512)``; raises :class:`RequestRejected` on anything else."""
    try:
        width_text, height_text = text.lower().replace(" ", "").split("x")
        width, height = int(width_text), int(height_text)
    except ValueError:
        raise RequestRejected(f"Size {text!r} is not WIDTHxHEIGHT, for example 512x512.") from None
    if width <= 0 or height <= 0:
        raise RequestRejected(f"Size {text!r} must be positive.")
    return width, height


def validate_request(
    request: ImageRequest,
    *,
    models: Sequence[str] | None = None,
    sizes: Sequence[tuple[int, int]] = (),
    max_count: int = MAX_COUNT,
) -> None:
    """Refuse a request before a job exists, with a reason the user can act on.

    ``models``: the models that may be named (empty: none may); ``None`` skips the check.
    """
    prompt = request.prompt.strip()
    if not prompt:
        raise RequestRejected("The prompt is empty.")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise RequestRejected(
            f"The prompt is {len(request.prompt)} characters; the limit is {MAX_PROMPT_CHARS}."
        )
    if len(request.negative_prompt) > MAX_NEGATIVE_CHARS:
        raise RequestRejected(
            f"The negative prompt is {len(request.negative_prompt)} characters; the limit is {MAX_NEGATIVE_CHARS}."
        )
    limit = min(max_count, MAX_COUNT)
    if not 1 <= request.count <= limit:
        raise RequestRejected(f"Count must be between 1 and {limit}.")
    if request.seed is not None and not 0 <= request.seed <= MAX_SEED:
        raise RequestRejected(f"Seed must be between 0 and {MAX_SEED}.")
    if sizes and (request.width, request.height) not in sizes:
        allowed = ", ".join(f"{w}x{h}" for w, h in sizes)
        raise RequestRejected(f"Size {request.size} is not available here; choose one of {allowed}.")
    if request.model is not None and models is not None and request.model not in models:
        raise RequestRejected(model_refusal(request.model, models), code="model")


#: Models named in a refusal; the rest are counted (AI Horde lists hundreds; a message holds 2,000 chars).
MODELS_NAMED = 10


def model_refusal(model: str, models: Sequence[str]) -> str:
    """The sentence for a model nobody allowed: which ones are, or that there is no choice."""
    asked = model if len(model) <= 60 else model[:59] + "…"
    if not models:
        return f"Model {asked!r} is not offered here; leave the model option empty to use the default."
    named = ", ".join(m if len(m) <= 80 else m[:79] + "…" for m in models[:MODELS_NAMED])
    more = len(models) - MODELS_NAMED
    rest = f" and {more} more (type in the model option to see them)" if more > 0 else ""
    return f"Model {asked!r} is not offered here; choose one of {named}{rest}."


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"
    INTERRUPTED = "interrupted"  # the process died while the job was running

    @property
    def is_terminal(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


ACTIVE_STATES = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True, slots=True)
class Progress:
    """What a backend can say while it works. Every field is optional."""

    fraction: float | None = None  # 0..1
    eta_s: float | None = None
    queue_position: int | None = None  # the backend's own queue (Horde)
    preview: bytes | None = None  # a small image of the work so far (A1111)
    note: str | None = None


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    data: bytes
    format: str  # Pillow's name: PNG, JPEG, WEBP
    width: int
    height: int
    seed: int | None = None

    @property
    def extension(self) -> str:
        return {"JPEG": "jpg"}.get(self.format, self.format.lower())


@dataclass(frozen=True, slots=True)
class GenerationResult:
    images: tuple[GeneratedImage, ...]
    backend: str
    model: str | None
    elapsed_s: float
    from_cache: bool = False


def new_job_id() -> str:
    """Short, URL- and custom_id-safe, sortable enough to read in logs."""
    return os.urandom(6).hex()  # 48 random bits, like the first 12 hex digits of a uuid4


@dataclass(slots=True)
class Job:
    """A job's record. The manager owns mutation; everyone else reads."""

    id: str
    request: ImageRequest
    guild_id: int
    user_id: int
    channel_id: int | None = None
    state: JobState = JobState.QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    backend: str | None = None
    #: Opaque to the engine: the Discord layer keeps what it needs to edit the job's message later.
    message_ref: dict[str, Any] | None = None
    #: Set on success: the cache key the images are stored under, and their content hashes and seeds.
    cache_key: str | None = None
    image_refs: list[str] = field(default_factory=list)
    seeds: list[int | None] = field(default_factory=list)
    from_cache: bool = False
    #: Set on failure / cancellation.
    error_reason: str | None = None
    error_message: str | None = None
    cancelled_by: str | None = None
    #: The backend's own id for the submitted generation (AI Horde), to follow it up after a restart.
    backend_ref: str | None = None
    #: When the outcome was posted to the requester (or why it could not be): the job is done for the user.
    #: Beside the state, not a state: quotas, /show and metrics keep reading SUCCEEDED. Written only by
    #: ``JobStore.mark_delivered``, so a state write racing a delivery can never undo its record.
    delivered_at: float | None = None
    delivery_error: str | None = None
    #: Not persisted: live only for this process.
    result: GenerationResult | None = None
    #: What the operator should change, when the failure was theirs to fix (never shown to members).
    error_advice: str | None = None
    queue_position: int | None = None
    #: Estimated seconds until it starts, from recent generation times (None: no history yet).
    queue_eta_s: float | None = None
    progress: Progress | None = None

    @property
    def is_active(self) -> bool:
        return not self.state.is_terminal
