"""The one interface every image backend implements.

Cancellation is asyncio cancellation: the job manager cancels the task awaiting :meth:`Backend.generate`, and
the backend, on ``CancelledError``, tells the remote side to stop (A1111 interrupt, Horde DELETE) before
re-raising. A backend never submits the same generation twice.

One exception, for :class:`ResumableBackend` only: a call the caller *handed over* (:class:`BackendCall`; at a
rolling restart another process follows the generation up by its id) is cancelled without stopping the
generation remotely: the backend asks :func:`stop_remotely` in its cancel path and leaves the remote work alone
when it says False.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import ClassVar

from bot.engine.models import GeneratedImage, ImageRequest, Progress

ProgressCallback = Callable[[Progress], None]
#: Told the backend's own id for a generation once it is submitted (may be a coroutine function).
SubmittedCallback = Callable[[str], Awaitable[None] | None]


def _noop_progress(_: Progress) -> None:
    return None


class BackendCall:
    """One call into a backend, as its caller sees it (opened with :func:`backend_call`).

    :meth:`hand_over` says, before the caller cancels the call's task, that the generation lives on elsewhere:
    another process follows it up by the id ``on_submitted`` was given. The backend then abandons only its own
    wait (polls, websocket watch) and leaves the generation running at the remote side.
    """

    __slots__ = ("handed_over",)

    def __init__(self) -> None:
        self.handed_over = False

    def hand_over(self) -> None:
        self.handed_over = True


_current_call: ContextVar[BackendCall | None] = ContextVar("backend_call", default=None)


@contextlib.contextmanager
def backend_call() -> Iterator[BackendCall]:
    """Around one ``generate`` / ``resume`` awaited in this task: the backend's cancel path sees the call."""
    call = BackendCall()
    token = _current_call.set(call)
    try:
        yield call
    finally:
        _current_call.reset(token)


def stop_remotely() -> bool:
    """Asked by a :class:`ResumableBackend` cancelled after it handed its generation's id to ``on_submitted``
    (or while it resumes one): whether to stop that generation at the remote side. False only when the caller
    handed the call over (:meth:`BackendCall.hand_over`). A generation whose id nobody was told yet is always
    stopped: nobody else could follow it up."""
    call = _current_call.get()
    return call is None or not call.handed_over


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend supports, so the Discord layer offers only what works."""

    negative_prompt: bool = True
    seed: bool = True
    sizes: tuple[tuple[int, int], ...] = ((512, 512),)
    max_count: int = 4
    progress: bool = False
    preview: bool = False
    cancel: bool = False
    nsfw_flag: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def default_size(self) -> tuple[int, int]:
        return self.sizes[0]


class Backend(abc.ABC):
    """An image generator reached over HTTP through the shared ``aiohttp.ClientSession``."""

    #: ``horde`` | ``openai`` | ``a1111``: part of the cache key and a metrics label.
    name: str
    capabilities: Capabilities

    @abc.abstractmethod
    async def generate(
        self, request: ImageRequest, on_progress: ProgressCallback = _noop_progress
    ) -> list[GeneratedImage]:
        """Run one generation and return verified images (decoded off the event loop).

        Raises :class:`bot.engine.errors.GenerationError` with a readable reason on any failure.
        """

    #: Whether :meth:`list_models` names what members may choose when ``IMAGE_MODELS`` is empty. False for
    #: OpenAI-compatible servers: ``/v1/models`` lists chat models and the priciest image models, so there
    #: only ``IMAGE_MODEL`` is offered (the list still serves ``python -m bot check``).
    lists_choosable_models: ClassVar[bool] = True

    async def list_models(self) -> list[str] | None:
        """Names of the models the backend itself offers, fetched from it; ``None``: this backend cannot list.

        With ``IMAGE_MODELS`` empty these are the only models members may choose
        (:class:`bot.engine.catalog.ModelCatalog` refreshes them); ``python -m bot check`` shows them too.
        Raises :class:`bot.engine.errors.GenerationError` when the backend cannot be asked.
        """
        return None

    def default_model(self) -> str | None:
        """The model used when a request names none (``None``: the backend decides)."""
        return None

    @property
    def cache_identity(self) -> str:
        """What makes this backend's results differ from another's for the same request (the cache key names
        it): the kind, plus whatever else changes the output (ComfyUI: the workflow). Two pool entries with
        the same identity share cached results."""
        return self.name

    async def probe(self) -> None:
        """The cheapest request that shows the backend answers (a pool's circuit breaker asks it before
        taking a backend back). Raises :class:`bot.engine.errors.GenerationError` when it does not.

        The default lists the models; backends override it with their own health request.
        """
        await self.list_models()

    async def start(self) -> list[str]:
        """Open what the backend keeps open (ComfyUI's websocket) and check its set-up; returns the problems
        found (logged by the backend, not fatal: the server may come up later). Called once by the service."""
        return []

    async def aclose(self) -> None:
        """Close what :meth:`start` opened; called after the manager stopped using the backend."""
        return None


class ResumableBackend(Backend):
    """A backend whose generations run remotely under an id of their own (AI Horde, ComfyUI).

    The id is handed to ``on_submitted`` so the job layer can store it; after a restart, :meth:`resume` follows
    the same generation instead of submitting it again (possibly from another process). Cancelled once the id
    was handed out, it stops the generation remotely unless :func:`stop_remotely` says the call was handed over.
    """

    @abc.abstractmethod
    async def generate(
        self,
        request: ImageRequest,
        on_progress: ProgressCallback = _noop_progress,
        *,
        on_submitted: SubmittedCallback | None = None,
    ) -> list[GeneratedImage]: ...

    @abc.abstractmethod
    async def resume(
        self, ref: str, on_progress: ProgressCallback = _noop_progress, *, count: int | None = None
    ) -> list[GeneratedImage]:
        """Keep following a generation submitted earlier, by its backend id; nothing is submitted again."""
