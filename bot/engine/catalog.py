"""Which models members may choose: the one owner of that fact, asked by admission and autocomplete.

Sources, in order:

1. ``IMAGE_MODELS`` (``configured``), when the operator set it: exactly those (``IMAGE_MODEL`` is merged in by
   the settings), never fetched;
2. otherwise, for a backend that lists what may be chosen (``Backend.lists_choosable_models``: AI Horde's
   ``/v2/status/models``, A1111's ``/sdapi/v1/sd-models``), the backend's own list: fetched by :meth:`start`
   and refreshed every ``refresh_s`` (10 minutes) by one tracked background task. A failed refresh keeps the
   last list and is logged; until a first list arrives it is retried every ``retry_s``;
3. otherwise nothing: a request naming a model is refused, and one naming none runs the default.

A pool (``IMAGE_BACKENDS``) has one catalog per entry (its ``models``, else its own list) and the manager's is
their union (``parts``); ``IMAGE_MODELS`` still overrides the union.

The default model (``IMAGE_MODEL``, or the backend's own) is always allowed. The operator's command line
(``python -m bot imagine --model``) uses an unrestricted catalog: the limit protects the operator from members. A model nobody allowed is refused
at admission (:meth:`bot.engine.manager.JobManager.check_admission`), so it never reaches the backend.
Reading :attr:`models` is memory only, within Discord's 3-second deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable

from bot.engine.backend import Backend
from bot.engine.errors import GenerationError

log = logging.getLogger(__name__)

REFRESH_S = 600.0
RETRY_S = 30.0
#: ``start`` waits this long for the first list, then carries on (the refresh task keeps trying).
FIRST_FETCH_TIMEOUT_S = 10.0

Sleep = Callable[[float], Awaitable[None]]


class ModelCatalog:
    def __init__(
        self,
        backend: Backend | None = None,
        *,
        configured: Iterable[str] = (),
        default: str | None = None,
        refresh_s: float = REFRESH_S,
        retry_s: float = RETRY_S,
        first_fetch_timeout_s: float = FIRST_FETCH_TIMEOUT_S,
        sleep: Sleep = asyncio.sleep,
        restricted: bool = True,
        parts: Iterable[ModelCatalog] = (),
    ) -> None:
        """``restricted=False``: any model may be named (the operator's own command line), nothing fetched.

        ``parts``: the catalogs of a pool's entries; this one offers their union (unless ``configured``).
        """
        self.restricted = restricted
        self.parts: tuple[ModelCatalog, ...] = tuple(parts)
        self.configured: tuple[str, ...] = tuple(dict.fromkeys(configured))
        self.default = default
        #: The backend asked for its list; None when the configured list or nothing is all there is.
        self.backend = (
            backend
            if restricted and backend is not None and not self.configured and backend.lists_choosable_models
            else None
        )
        self.refresh_s = refresh_s
        self.retry_s = retry_s
        self.first_fetch_timeout_s = first_fetch_timeout_s
        self._sleep = sleep
        self._listed: tuple[str, ...] | None = None  # the backend's last list; None before the first
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0  # lists fetched (a probe for tests and logs)
        self.failures = 0

    @classmethod
    def fixed(cls, models: Iterable[str] = (), default: str | None = None) -> ModelCatalog:
        """A catalog of exactly ``models`` (the engine built without a service: tests, benchmarks)."""
        return cls(None, configured=models, default=default)

    # -- reading (memory only) -------------------------------------------------------------------------
    @property
    def source(self) -> str:
        """``configured`` (IMAGE_MODELS), ``backend`` (its own list) or ``default`` (no choice)."""
        if self.configured:
            return "configured"
        if self.parts:
            return "backends"
        return "backend" if self.backend is not None else "default"

    @property
    def models(self) -> tuple[str, ...]:
        """What members may choose, in the order to offer them (autocomplete)."""
        if not self.configured and self.parts:
            models: tuple[str, ...] = tuple(dict.fromkeys(m for part in self.parts for m in part.models))
        else:
            models = self.configured or self._listed or ()
        if self.default and self.default not in models:
            models = (self.default, *models)
        return models

    @property
    def allowed(self) -> tuple[str, ...] | None:
        """What admission checks against: :attr:`models`, or None when any model may be named."""
        return self.models if self.restricted else None

    @property
    def listed(self) -> tuple[str, ...] | None:
        """The backend's last list (None before the first, or for a catalog that does not fetch)."""
        return self._listed

    def allows(self, model: str | None) -> bool:
        return model is None or not self.restricted or model in self.models

    # -- the backend's list ------------------------------------------------------------------------------
    async def refresh(self) -> bool:
        """Ask the backend once; on failure keep the last list (logged). True when a list arrived."""
        if self.backend is None:
            return False
        try:
            listed = await self.backend.list_models()
        except asyncio.CancelledError:
            raise
        except GenerationError as exc:
            return self._failed(exc.message)
        except Exception as exc:  # a backend's bug must not end the refresh loop
            return self._failed(type(exc).__name__)
        if listed is None:
            return self._failed("the backend does not list its models")
        self._listed = tuple(dict.fromkeys(str(m) for m in listed if m))
        self.refreshes += 1
        log.info("models listed by the backend", extra={"models": len(self._listed)})
        return True

    def _failed(self, why: str) -> bool:
        self.failures += 1
        kept = len(self._listed) if self._listed is not None else 0
        log.warning("could not refresh the model list (keeping %d models): %s", kept, why)
        return False

    async def start(self) -> None:
        """Fetch the first list (waiting at most ``first_fetch_timeout_s``) and start the refresh task."""
        if self.parts:
            await asyncio.gather(*(part.start() for part in self.parts))
        if self.backend is None or self._task is not None:
            return
        first = asyncio.Event()
        self._task = asyncio.create_task(self._run(first), name="model-catalog-refresh")
        self._task.add_done_callback(self._task_done)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.first_fetch_timeout_s):
                await first.wait()

    async def _run(self, first: asyncio.Event) -> None:
        while True:
            ok = await self.refresh()
            first.set()
            await self._sleep(self.refresh_s if ok or self._listed is not None else self.retry_s)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("model list refresh stopped", exc_info=task.exception())

    async def close(self) -> None:
        for part in self.parts:
            await part.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
