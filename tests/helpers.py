"""Small spec'd collaborators for unit tests. Wire-level fakes live in ``tests/fakes``."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from bot.engine.backend import Backend, Capabilities, ProgressCallback
from bot.engine.errors import GenerationError
from bot.engine.images import make_test_png, verify_image
from bot.engine.manager import JobManager
from bot.engine.models import GeneratedImage, ImageRequest, Progress

PNG = make_test_png(8, 8)


@dataclass
class Call:
    request: ImageRequest
    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False
    finished: bool = False


class ControlledBackend(Backend):
    """A backend whose calls the test holds and releases, measuring real concurrency as it goes.

    Prompts of the form ``"g<guild>:..."`` let it count concurrency per guild independently of the scheduler.
    """

    name = "controlled"

    def __init__(
        self,
        *,
        auto_release: bool = False,
        delay: float | Callable[[], float] = 0.0,
        fail_with: Exception | None = None,
        sizes: tuple[tuple[int, int], ...] = ((512, 512), (768, 768)),
    ) -> None:
        self.capabilities = Capabilities(sizes=sizes, progress=True, cancel=True)
        self.auto_release = auto_release
        self.delay = delay
        self.fail_with = fail_with
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.per_guild: Counter[str] = Counter()
        self.max_per_guild: Counter[str] = Counter()
        self.start_order: list[str] = []
        self.call_started = asyncio.Condition()

    async def generate(
        self, request: ImageRequest, on_progress: ProgressCallback = lambda _: None
    ) -> list[GeneratedImage]:
        call = Call(request)
        self.calls.append(call)
        guild = request.prompt.split(":", 1)[0]
        self.in_flight += 1
        self.per_guild[guild] += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.max_per_guild[guild] = max(self.max_per_guild[guild], self.per_guild[guild])
        self.start_order.append(request.prompt)
        call.started.set()
        async with self.call_started:
            self.call_started.notify_all()
        try:
            on_progress(Progress(fraction=0.5, eta_s=1.0))
            delay = self.delay() if callable(self.delay) else self.delay
            if delay:
                await asyncio.sleep(delay)
            if not self.auto_release:
                await call.release.wait()
            if self.fail_with is not None:
                raise self.fail_with
            call.finished = True
            return [
                await verify_image(PNG, seed=request.seed if request.seed is not None else len(self.calls))
            ]
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        finally:
            self.in_flight -= 1
            self.per_guild[guild] -= 1

    async def list_models(self) -> list[str]:
        return ["test-model"]

    async def wait_calls(self, count: int, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout), self.call_started:
            await self.call_started.wait_for(lambda: len(self.calls) >= count)

    def release_all(self) -> None:
        for call in self.calls:
            call.release.set()


class FailingBackend(ControlledBackend):
    def __init__(self, error: GenerationError) -> None:
        super().__init__(auto_release=True, fail_with=error)


def req(prompt: str, **kw: object) -> ImageRequest:
    return ImageRequest(prompt=prompt, **kw)  # type: ignore[arg-type]


def make_manager(backend: Backend, **kw: object) -> JobManager:
    """A manager with roomy test limits (2 per guild, 4 at the backend, 50 per member); ``kw`` overrides."""
    options: dict[str, object] = {
        "guild_concurrency": 2,
        "guild_concurrency_max": 8,
        "backend_concurrency": 4,
        "user_max_jobs": 50,
        "queue_timeout_s": 30,
        "job_timeout_s": 30,
    }
    options.update(kw)
    return JobManager(backend, **options)  # type: ignore[arg-type]


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds (a state to reach, not a speed check)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
