"""Prometheus metrics for one bot: a private registry, fed by the job manager's events and read at scrape time.

Every label value comes from a closed set (job states, :class:`FailureReason`, HTTP status buckets, the
configured backend names), so the number of series is fixed: no user, guild, job or prompt ever becomes a label.

Names (``imagine_`` prefix):

- ``imagine_jobs_finished_total{state}``  jobs that reached a terminal state
- ``imagine_jobs{state="queued"|"running"}``  jobs active right now (read from the manager at scrape time)
- ``imagine_queue_depth``  jobs waiting for a slot; ``imagine_backend_in_flight`` generations holding one
- ``imagine_generation_seconds``  histogram, job start (RUNNING) to finish, succeeded jobs only
- ``imagine_cache_{hits,misses,evictions}_total``, ``imagine_cache_entries``, ``imagine_cache_bytes``
- ``imagine_backend_errors_total{reason}``  failed / timed-out jobs by :class:`FailureReason`
- ``imagine_discord_api_errors_total{status}``  Discord REST errors by status bucket
- per backend (``backend``: a configured name: the IMAGE_BACKENDS entry, or the IMAGE_BACKEND kind):
  ``imagine_backend_generations_total{backend,outcome}`` generations ended there (``succeeded``, ``failed``,
  ``failed_over``: refused before accepting, so moved to another backend; ``stopped``: cancelled),
  ``imagine_backend_slots_busy{backend}``, ``imagine_backend_slots{backend}`` (its concurrency) and
  ``imagine_backend_up{backend}`` (0 while its circuit breaker holds it out)
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from bot.engine.errors import FailureReason
from bot.engine.manager import JobEvent
from bot.engine.models import Job, JobState

if TYPE_CHECKING:
    from bot.engine.manager import JobManager

log = logging.getLogger(__name__)

#: What ``generate_latest`` writes: the classic text format (every Prometheus version reads it).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Seconds; an image takes from about one second (a local turbo model) to several minutes (a busy Horde).
LATENCY_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600)

#: Discord REST error buckets: the statuses that mean something different to an operator, and the rest.
DISCORD_STATUS_BUCKETS = ("401", "403", "404", "413", "429", "5xx", "other")
TERMINAL_STATES = tuple(state for state in JobState if state.is_terminal)
_FAILURE_STATES = (JobState.FAILED, JobState.TIMED_OUT)
_REASONS = frozenset(reason.value for reason in FailureReason)


def discord_status_bucket(status: object) -> str:
    """The label for a Discord error's HTTP status (bounded: one of :data:`DISCORD_STATUS_BUCKETS`)."""
    if not isinstance(status, int):
        return "other"
    if 500 <= status <= 599:
        return "5xx"
    text = str(status)
    return text if text in DISCORD_STATUS_BUCKETS else "other"


def failure_reason_label(reason: str | None) -> str:
    """A job's ``error_reason`` as a label: a :class:`FailureReason` value, or ``other`` for anything else."""
    return reason if reason in _REASONS else "other"


class Metrics:
    """Owns one :class:`CollectorRegistry` (not the global one, so several bots can live in one process).

    Wire :meth:`on_job_event` with ``manager.add_listener``; call :meth:`discord_error` where a Discord
    ``HTTPException`` is handled; serve :meth:`render` (after :meth:`refresh`) on ``/metrics``.
    """

    def __init__(
        self,
        manager: JobManager | None = None,
        *,
        cache: Any = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.manager = manager
        self.cache = cache
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.jobs_finished = Counter(
            "imagine_jobs_finished",
            "Jobs that reached a terminal state, by state.",
            ["state"],
            registry=self.registry,
        )
        self.generation_seconds = Histogram(
            "imagine_generation_seconds",
            "Seconds from a job's start (RUNNING) to its finish, for succeeded jobs.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.backend_errors = Counter(
            "imagine_backend_errors",
            "Failed or timed-out jobs, by failure reason.",
            ["reason"],
            registry=self.registry,
        )
        self.discord_errors = Counter(
            "imagine_discord_api_errors",
            "Errors answered by the Discord REST API, by HTTP status bucket.",
            ["status"],
            registry=self.registry,
        )
        # Every series exists from the start (at 0), so rate() and alerts work before the first event.
        for state in TERMINAL_STATES:
            self.jobs_finished.labels(state=state.value)
        for reason in sorted(_REASONS):
            self.backend_errors.labels(reason=reason)
        for bucket in DISCORD_STATUS_BUCKETS:
            self.discord_errors.labels(status=bucket)
        self._started: dict[str, float] = {}
        self._cache_stats: Mapping[str, float] = {}
        self.registry.register(_LiveCollector(self))

    # -- feeding --------------------------------------------------------------------------------------------
    def on_job_event(self, job: Job, event: JobEvent) -> None:
        """Manager listener (synchronous, cheap)."""
        if event is JobEvent.STARTED:
            self._started.setdefault(job.id, self.clock())
        elif event is JobEvent.FINISHED:
            started = self._started.pop(job.id, None)
            self.jobs_finished.labels(state=job.state.value).inc()
            if job.state is JobState.SUCCEEDED and started is not None:
                self.generation_seconds.observe(max(0.0, self.clock() - started))
            elif job.state in _FAILURE_STATES:
                self.backend_errors.labels(reason=failure_reason_label(job.error_reason)).inc()

    def discord_error(self, exc: BaseException) -> None:
        """Count a Discord REST error (a ``discord.HTTPException``) by its status bucket."""
        self.discord_errors.labels(status=discord_status_bucket(getattr(exc, "status", None))).inc()

    # -- scraping -------------------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Read what only exists as state elsewhere (the cache's counters) before a scrape."""
        if self.cache is None or not hasattr(self.cache, "stats"):
            return
        try:
            stats = self.cache.stats()
            if inspect.isawaitable(stats):
                stats = await stats
            self._cache_stats = _as_mapping(stats)
        except Exception:
            log.warning("could not read the cache statistics", exc_info=True)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        await self.refresh()
        return self.render()


def _as_mapping(stats: Any) -> Mapping[str, float]:
    """Cache stats as a plain mapping, whether the cache returns a dict, a dataclass or any object."""
    if isinstance(stats, Mapping):
        items: Iterable[tuple[str, Any]] = stats.items()
    else:
        items = ((name, getattr(stats, name, None)) for name in _CACHE_FIELDS)
    return {name: float(value) for name, value in items if isinstance(value, int | float)}


_CACHE_FIELDS = ("hits", "misses", "evictions", "entries", "bytes")


def _backend_families(manager: JobManager) -> Iterable[Metric]:
    """Per pool entry (labels: the configured names only), read from the pool and the queue model."""
    generations = CounterMetricFamily(
        "imagine_backend_generations",
        "Generations ended on each backend, by outcome.",
        labels=["backend", "outcome"],
    )
    busy = GaugeMetricFamily(
        "imagine_backend_slots_busy", "Slots held on each backend now.", labels=["backend"]
    )
    slots = GaugeMetricFamily("imagine_backend_slots", "Each backend's concurrency.", labels=["backend"])
    up = GaugeMetricFamily(
        "imagine_backend_up", "1 while a backend is in the pool, 0 while it is taken out.", labels=["backend"]
    )
    for entry in manager.pool:
        for outcome, count in entry.outcomes.items():
            generations.add_metric([entry.name, outcome], count)
        busy.add_metric([entry.name], manager.backend_load(entry.name))
        slots.add_metric([entry.name], entry.capacity)
        up.add_metric([entry.name], 1.0 if entry.up else 0.0)
    yield from (generations, busy, slots, up)


class _LiveCollector(Collector):
    """Values that are state somewhere else, read at scrape time rather than mirrored."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # no duplicate-name checks needed: these names are unique to this collector

    def collect(self) -> Iterable[Metric]:
        manager = self.metrics.manager
        if manager is not None:
            jobs = GaugeMetricFamily(
                "imagine_jobs", "Jobs queued or running now, by state.", labels=["state"]
            )
            jobs.add_metric([JobState.QUEUED.value], manager.queue_depth())
            jobs.add_metric([JobState.RUNNING.value], manager.running_count())
            yield jobs
            yield GaugeMetricFamily(
                "imagine_queue_depth", "Jobs waiting for a backend slot.", value=manager.queue_depth()
            )
            yield GaugeMetricFamily(
                "imagine_backend_in_flight",
                "Generations holding a backend slot now.",
                value=manager.backend_in_flight,
            )
            yield from _backend_families(manager)
        stats = self.metrics._cache_stats
        if self.metrics.cache is not None:
            for name in ("hits", "misses", "evictions"):
                yield CounterMetricFamily(
                    f"imagine_cache_{name}", f"Result cache {name}.", value=stats.get(name, 0.0)
                )
            yield GaugeMetricFamily(
                "imagine_cache_entries", "Results in the cache.", value=stats.get("entries", 0.0)
            )
            yield GaugeMetricFamily(
                "imagine_cache_bytes", "Bytes the cache holds.", value=stats.get("bytes", 0.0)
            )
