"""A pool of backends serving one bot (``IMAGE_BACKENDS``): who can serve what, and who is healthy.

Each :class:`PoolEntry` is one configured backend: its name (the operator's, also the ``backend`` metrics
label), the :class:`~bot.engine.backend.Backend`, its slots (``concurrency``) and what it serves (its ``models``
or its own list, its sizes, its largest count per job). The queue model schedules on the entries' names; the
pool answers the questions around it:

* **Eligibility** (:meth:`BackendPool.eligible`): the entries that could ever serve a request (model, size,
  count, negative prompt). Health plays no part: a job only the broken backend serves waits for it.
* **Health** (a circuit breaker per entry): ``FAILURES_TO_TRIP`` failures in a row that say "the backend is not
  working" (cannot connect, 5xx, timeouts: :data:`HEALTH_FAILURES`) take an entry *out*; any answer that
  shows it alive (a success, a refused prompt) resets the count. An entry that is out is probed with its
  cheapest health request (:meth:`~bot.engine.backend.Backend.probe`) every ``probe_interval_s`` by one tracked
  background task, which runs only while some entry is out and is cancelled and awaited by :meth:`aclose`.
  ``on_change(name, out)`` tells the manager, which tells the queue model.
* A pool of one (``IMAGE_BACKEND``) never takes its only backend out: its jobs fail at once with the backend's
  own message, as they always did, instead of waiting for it.

Nothing here imports discord or the concrete backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from bot.engine.backend import Backend, Capabilities
from bot.engine.catalog import ModelCatalog
from bot.engine.errors import FailureReason, GenerationError
from bot.engine.models import ImageRequest

log = logging.getLogger(__name__)

#: Failures in a row that take a backend out.
FAILURES_TO_TRIP = 3
#: How often a backend that is out is asked whether it is back.
PROBE_INTERVAL_S = 15.0
#: A probe that takes longer than this failed.
PROBE_TIMEOUT_S = 10.0
#: Failures that say the backend itself is not working (as opposed to refusing one request).
HEALTH_FAILURES = frozenset({FailureReason.UNAVAILABLE, FailureReason.TIMEOUT})


class Health(StrEnum):
    UP = "up"
    OUT = "out"  # circuit open: granted nothing until a probe answers


@dataclass(eq=False)
class PoolEntry:
    """One configured backend of the pool."""

    name: str
    backend: Backend
    capacity: int
    #: Which models it serves: its ``models`` setting, else its own list (refreshed), else only the default.
    catalog: ModelCatalog | None = None
    health: Health = Health.UP
    failures: int = 0  # in a row
    #: The last failure, as a member could read it (never advice, URLs or keys).
    last_error: str | None = None
    last_error_at: float | None = None
    #: Generations ended here, by outcome: succeeded, failed, failed_over (refused before acceptance), stopped.
    outcomes: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(("succeeded", "failed", "failed_over", "stopped"), 0)
    )

    @property
    def kind(self) -> str:
        return self.backend.name

    @property
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities

    @property
    def up(self) -> bool:
        return self.health is Health.UP

    def serves_model(self, model: str | None, default: str | None) -> bool:
        """Whether this entry has ``model``. The bot-wide default counts only where nothing says otherwise:
        an entry whose ``models`` (or own list) lacks it would be asked for a model it cannot load."""
        if model is None or model == self.backend.default_model():
            return True
        catalog = self.catalog
        if catalog is None:
            return True
        if catalog.configured:
            return model in catalog.configured
        if catalog.backend is not None:  # it lists its models: those, once a first list arrived
            listed = catalog.listed
            return listed is None or model in listed
        return model == default  # it cannot list and nobody said: only the default

    def serves(self, request: ImageRequest, default: str | None) -> bool:
        caps = self.capabilities
        return (
            (request.width, request.height) in caps.sizes
            and request.count <= caps.max_count
            and (caps.negative_prompt or not request.negative_prompt)
            and self.serves_model(request.model, default)
        )


class BackendPool:
    """The entries, their eligibility and their health. See the module docstring."""

    def __init__(
        self,
        entries: Sequence[PoolEntry],
        *,
        failures_to_trip: int = FAILURES_TO_TRIP,
        probe_interval_s: float = PROBE_INTERVAL_S,
        probe_timeout_s: float = PROBE_TIMEOUT_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not entries:
            raise ValueError("a pool needs at least one backend")
        names = [entry.name for entry in entries]
        if len(set(names)) != len(names):
            raise ValueError("pool entries need unique names")
        self.entries: dict[str, PoolEntry] = {entry.name: entry for entry in entries}
        #: More than one entry (fixed: a pool's entries never change after it is built).
        self.many = len(self.entries) > 1
        #: The first entry (``IMAGE_BACKEND``'s, for a pool of one).
        self.primary: PoolEntry = entries[0]
        self.failures_to_trip = failures_to_trip
        self.probe_interval_s = probe_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.clock = clock
        #: Told ``(name, out)`` when an entry is taken out or brought back (the manager tells the queue model).
        self.on_change: Callable[[str, bool], None] | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self._closed = False
        self.probes = 0  # health requests sent (a probe for tests and logs)

    @classmethod
    def single(cls, backend: Backend, capacity: int) -> BackendPool:
        """``IMAGE_BACKEND``: a pool of one, named after the backend's kind."""
        return cls([PoolEntry(backend.name, backend, capacity)])

    # -- reading ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[PoolEntry]:
        return iter(self.entries.values())

    def __getitem__(self, name: str) -> PoolEntry:
        return self.entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def capacities(self) -> dict[str, int]:
        return {entry.name: entry.capacity for entry in self}

    @property
    def capabilities(self) -> Capabilities:
        """What some entry supports (admission validates against it; eligibility then picks the entries).

        A pool of one: exactly its backend's. Sizes keep the order entries list them (the first entry's
        default size stays the default).
        """
        if not self.many:
            return self.primary.capabilities
        all_caps = [entry.capabilities for entry in self]
        sizes = tuple(dict.fromkeys(size for caps in all_caps for size in caps.sizes))
        return dataclasses.replace(
            all_caps[0],
            sizes=sizes,
            max_count=max(caps.max_count for caps in all_caps),
            negative_prompt=any(caps.negative_prompt for caps in all_caps),
            seed=any(caps.seed for caps in all_caps),
            progress=any(caps.progress for caps in all_caps),
            preview=any(caps.preview for caps in all_caps),
            cancel=any(caps.cancel for caps in all_caps),
        )

    def eligible(self, request: ImageRequest, default: str | None) -> frozenset[str]:
        """The entries that could serve ``request`` at all (up or out)."""
        return frozenset(entry.name for entry in self if entry.serves(request, default))

    def identity(self, names: frozenset[str] | None = None) -> str:
        """What the cache key names: the distinct kinds and workflows among ``names`` (all when None), so
        identical backends share results whatever the operator called them."""
        entries = [self.entries[n] for n in sorted(names)] if names is not None else list(self)
        return "+".join(sorted({entry.backend.cache_identity for entry in entries}))

    # -- health -------------------------------------------------------------------------------------------
    def record(self, name: str, outcome: str, error: BaseException | None = None) -> None:
        """A generation ended on ``name`` with ``outcome`` (succeeded, failed, failed_over, stopped)."""
        entry = self.entries.get(name)
        if entry is None:
            return
        entry.outcomes[outcome] = entry.outcomes.get(outcome, 0) + 1
        if outcome == "stopped":
            return  # says nothing about the backend
        if isinstance(error, GenerationError):
            entry.last_error = error.message
            entry.last_error_at = self.clock()
            if error.reason in HEALTH_FAILURES:
                entry.failures += 1
                if entry.failures >= self.failures_to_trip and entry.up and self.many:
                    self._take_out(entry)
                return
        elif error is not None:
            return  # our own bug: not the backend's health
        entry.failures = 0  # it answered

    def _take_out(self, entry: PoolEntry) -> None:
        entry.health = Health.OUT
        log.warning(
            "backend taken out after %d failures in a row; probing it every %.0f s",
            entry.failures,
            self.probe_interval_s,
            extra={"backend": entry.name, "reason": entry.last_error},
        )
        self._changed(entry.name, out=True)
        if not self._closed and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.create_task(self._probe_loop(), name="backend-probe")
            self._probe_task.add_done_callback(self._probe_done)

    def _bring_back(self, entry: PoolEntry) -> None:
        entry.health = Health.UP
        entry.failures = 0
        log.warning("backend answers again; back in the pool", extra={"backend": entry.name})
        self._changed(entry.name, out=False)

    def _changed(self, name: str, *, out: bool) -> None:
        if self.on_change is not None:
            try:
                self.on_change(name, out)
            except Exception:
                log.exception("pool listener failed", extra={"backend": name})

    async def probe(self, entry: PoolEntry) -> bool:
        """Ask one entry's health request once; bring it back if it answers. True when it did."""
        self.probes += 1
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                await entry.backend.probe()
        except asyncio.CancelledError:
            raise
        except GenerationError as exc:
            entry.last_error, entry.last_error_at = exc.message, self.clock()
            return False
        except TimeoutError:
            entry.last_error, entry.last_error_at = "The health check got no answer in time.", self.clock()
            return False
        except Exception as exc:  # a backend's bug must not end the probe loop
            log.warning("backend probe crashed: %s", type(exc).__name__, extra={"backend": entry.name})
            return False
        if not entry.up:
            self._bring_back(entry)
        return True

    async def _probe_loop(self) -> None:
        while any(not entry.up for entry in self):
            await asyncio.sleep(self.probe_interval_s)
            for entry in [e for e in self if not e.up]:
                await self.probe(entry)

    @staticmethod
    def _probe_done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("backend probing stopped", exc_info=task.exception())

    @property
    def probing(self) -> bool:
        return self._probe_task is not None and not self._probe_task.done()

    async def aclose(self) -> None:
        """Stop probing (cancelled and awaited); the backends themselves are closed by whoever opened them."""
        self._closed = True
        task, self._probe_task = self._probe_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
