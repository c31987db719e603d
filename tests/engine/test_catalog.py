"""The model catalog: which models members may choose, from IMAGE_MODELS or the backend's own list."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from bot.engine.backend import Backend, Capabilities
from bot.engine.catalog import ModelCatalog
from bot.engine.errors import FailureReason, GenerationError, RequestRejected
from bot.engine.manager import JobManager
from bot.engine.models import MODELS_NAMED, ImageRequest
from tests.helpers import ControlledBackend


class ListingBackend(Backend):
    """Answers list_models from a script: a list, an exception to raise, or None (cannot list)."""

    name = "listing"
    capabilities = Capabilities()

    def __init__(self, *answers: Any, default: str | None = None) -> None:
        self.answers = list(answers)
        self.asked = 0
        self._default = default

    async def generate(self, request, on_progress=None):  # type: ignore[no-untyped-def,override]
        raise AssertionError("the catalog never generates")

    async def list_models(self) -> list[str] | None:
        self.asked += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def default_model(self) -> str | None:
        return self._default


class NotAChoice(ListingBackend):
    lists_choosable_models = False  # like OpenAI: its list is not a menu


class ManualSleep:
    """The refresh loop's sleep, advanced by the test: no real waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self._wakers: list[asyncio.Future[None]] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        waker = asyncio.get_running_loop().create_future()
        self._wakers.append(waker)
        await waker

    async def elapse(self) -> None:
        """End the pending sleep and let the loop run up to its next sleep."""
        count = len(self.delays)
        self._wakers.pop(0).set_result(None)
        async with asyncio.timeout(2):
            while len(self.delays) == count:
                await asyncio.sleep(0)


DOWN = GenerationError(FailureReason.UNAVAILABLE, "The backend did not answer.")


async def test_configured_models_win_and_nothing_is_fetched() -> None:
    backend = ListingBackend(["x", "y"])
    catalog = ModelCatalog(backend, configured=["flux", "sdxl"], default="flux")
    await catalog.start()
    assert catalog.source == "configured" and catalog.models == ("flux", "sdxl")
    assert backend.asked == 0
    await catalog.close()


async def test_the_backends_list_is_fetched_at_start_and_refreshed_every_ten_minutes() -> None:
    sleep = ManualSleep()
    backend = ListingBackend(["a", "b"], ["a", "b", "c"])
    catalog = ModelCatalog(backend, sleep=sleep)
    await catalog.start()
    try:
        assert catalog.source == "backend" and catalog.models == ("a", "b")
        assert catalog.allows("a") and catalog.allows(None) and not catalog.allows("z")
        assert sleep.delays == [600.0]
        await sleep.elapse()
        assert catalog.models == ("a", "b", "c") and backend.asked == 2
        assert sleep.delays == [600.0, 600.0]
    finally:
        await catalog.close()
    assert catalog.refreshes == 2


async def test_a_failed_refresh_keeps_the_last_list_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    sleep = ManualSleep()
    backend = ListingBackend(["a", "b"], DOWN, RuntimeError("bug"), ["b"])
    catalog = ModelCatalog(backend, sleep=sleep)
    await catalog.start()
    try:
        with caplog.at_level(logging.WARNING, logger="bot.engine.catalog"):
            await sleep.elapse()
            await sleep.elapse()
        assert catalog.models == ("a", "b") and catalog.failures == 2
        assert sum("could not refresh the model list" in r.getMessage() for r in caplog.records) == 2
        assert sleep.delays == [600.0, 600.0, 600.0]  # a list is known: the normal pace
        await sleep.elapse()
        assert catalog.models == ("b",)
    finally:
        await catalog.close()


async def test_without_a_first_list_it_retries_sooner_and_allows_only_the_default() -> None:
    sleep = ManualSleep()
    backend = ListingBackend(DOWN, DOWN, ["a"], default="base")
    catalog = ModelCatalog(backend, default="base", sleep=sleep)
    await catalog.start()
    try:
        assert catalog.models == ("base",) and not catalog.allows("a")
        await sleep.elapse()
        assert sleep.delays == [30.0, 30.0]
        await sleep.elapse()
        assert catalog.models == ("base", "a") and sleep.delays[-1] == 600.0
    finally:
        await catalog.close()


async def test_a_hanging_first_fetch_does_not_hold_up_the_start() -> None:
    class Hanging(ListingBackend):
        async def list_models(self) -> list[str] | None:
            await asyncio.Event().wait()
            return None

    catalog = ModelCatalog(Hanging([]), first_fetch_timeout_s=0.05)
    await catalog.start()
    assert catalog.models == ()
    await catalog.close()  # the tracked task is cancelled and awaited


async def test_a_backend_whose_list_is_not_a_menu_offers_only_the_default() -> None:
    backend = NotAChoice(["gpt-4o", "gpt-image-1", "dall-e-3"])
    catalog = ModelCatalog(backend, default="flux")
    await catalog.start()
    assert catalog.source == "default" and catalog.models == ("flux",) and backend.asked == 0
    assert ModelCatalog(NotAChoice(["x"])).models == ()


async def test_a_backend_that_cannot_list_offers_only_the_default() -> None:
    catalog = ModelCatalog(ListingBackend(None), sleep=ManualSleep())
    await catalog.start()
    try:
        assert catalog.models == () and catalog.failures == 1
    finally:
        await catalog.close()


# -- admission --------------------------------------------------------------------------------------------


async def test_admission_refuses_a_model_nobody_allowed_before_the_backend_sees_it() -> None:
    backend = ControlledBackend(auto_release=True)
    manager = JobManager(backend)
    manager.catalog = ModelCatalog.fixed(["a", "b"])
    try:
        with pytest.raises(RequestRejected) as refused:
            await manager.submit(ImageRequest("x", model="expensive"), guild_id=1, user_id=1)
        assert refused.value.code == "model"
        assert refused.value.message == "Model 'expensive' is not offered here; choose one of a, b."
        job = await manager.submit(ImageRequest("x", model="b"), guild_id=1, user_id=1)
        await manager.wait(job.id)
        assert [c.request.model for c in backend.calls] == ["b"]
    finally:
        await manager.shutdown(0)


def test_with_no_choice_a_named_model_is_refused_and_none_runs_the_default() -> None:
    manager = JobManager(ControlledBackend())  # IMAGE_MODELS empty, nothing listed: the shipped default
    with pytest.raises(RequestRejected, match="leave the model option empty"):
        manager.check_admission(ImageRequest("x", model="anything"), 1, 1)
    assert manager.check_admission(ImageRequest("x"), 1, 1).model is None


def test_a_long_list_is_named_in_part() -> None:
    manager = JobManager(ControlledBackend())
    manager.catalog = ModelCatalog.fixed([f"model-{i}" for i in range(300)])
    with pytest.raises(RequestRejected) as refused:
        manager.check_admission(ImageRequest("x", model="nope"), 1, 1)
    text = refused.value.message
    assert f"model-{MODELS_NAMED - 1}," in text or f"model-{MODELS_NAMED - 1} " in text
    assert f"model-{MODELS_NAMED}," not in text and "290 more" in text and len(text) < 2000


async def test_an_unrestricted_catalog_lets_any_model_through_and_fetches_nothing() -> None:
    backend = ListingBackend(["a"])
    catalog = ModelCatalog(backend, restricted=False)
    await catalog.start()
    assert catalog.allowed is None and catalog.allows("anything") and backend.asked == 0
    manager = JobManager(ControlledBackend())
    manager.catalog = catalog
    assert manager.check_admission(ImageRequest("x", model="anything"), 1, 1).model == "anything"
