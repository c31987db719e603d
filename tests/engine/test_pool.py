"""Pools in the engine: eligibility, least-loaded scheduling, failover only before acceptance, the circuit
breaker and its probes, the cache key, and the queue model's pool operations (``set_out``, ``bounce``)."""

from __future__ import annotations

import pytest

from bot.engine.backend import Capabilities, ResumableBackend
from bot.engine.cache import cache_key
from bot.engine.catalog import ModelCatalog
from bot.engine.errors import FailureReason, GenerationError, RequestRejected
from bot.engine.manager import BACKEND_LOST, JobManager
from bot.engine.models import GeneratedImage, ImageRequest, Job, JobState
from bot.engine.pool import BackendPool, Health, PoolEntry
from bot.engine.queue import InvariantError, QueueModel, Requeued, Start
from tests.helpers import ControlledBackend, until

REFUSED = GenerationError(FailureReason.RATE_LIMITED, "Busy.", not_accepted=True)
DOWN = GenerationError(FailureReason.UNAVAILABLE, "could not connect", not_accepted=True)
LOST = GenerationError(FailureReason.UNAVAILABLE, "the backend closed the connection before answering")


class PoolBackend(ControlledBackend):
    """A controlled backend that can refuse (before accepting), fail its probe, and counts accepted calls."""

    def __init__(self, kind: str = "controlled", **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.name = kind
        self.refuse: list[GenerationError] = []  # raised at the submit, before any call is accepted
        self.probe_ok = True
        self.probes = 0
        self.accepted = 0

    async def generate(self, request, on_progress=lambda _: None) -> list[GeneratedImage]:
        if self.refuse:
            raise self.refuse.pop(0)
        self.accepted += 1
        return await super().generate(request, on_progress)

    async def probe(self) -> None:
        self.probes += 1
        if not self.probe_ok:
            raise GenerationError(FailureReason.UNAVAILABLE, "still down")


def entry(name: str, backend: PoolBackend, capacity: int, models: tuple[str, ...] = ()) -> PoolEntry:
    catalog = ModelCatalog(None, configured=models) if models else None
    return PoolEntry(name, backend, capacity, catalog=catalog)


def make(entries: list[PoolEntry], **kw: object) -> JobManager:
    pool = BackendPool(entries, probe_interval_s=0.01, failures_to_trip=int(kw.pop("trip", 3)))  # type: ignore[call-overload]
    options: dict[str, object] = {
        "guild_concurrency": 8,
        "user_max_jobs": 50,
        "queue_timeout_s": 30,
        "job_timeout_s": 30,
        "default_model": "base",
    }
    options.update(kw)
    return JobManager(pool, **options)  # type: ignore[arg-type]


async def ended(manager: JobManager, job: Job) -> Job:
    await manager.wait(job.id)
    return job


def req(prompt: str, **kw: object) -> ImageRequest:
    return ImageRequest(prompt=prompt, fresh=True, **kw)  # type: ignore[arg-type]


# -- the queue model ------------------------------------------------------------------------------------------
def test_model_grants_nothing_on_a_backend_taken_out_and_resumes_when_back() -> None:
    model = QueueModel({"a": 1, "b": 1}, guild_limit=lambda _: 8)
    model.set_out("a", True)
    first = [d for d in model.admit("j1", 1, 1, key=None, eligible={"a"}) if isinstance(d, Start)]
    assert first == []  # waits: only "a" serves it and "a" is out
    other = [d for d in model.admit("j2", 1, 2, key=None) if isinstance(d, Start)]
    assert [s.backend for s in other] == ["b"]
    model.check_invariants()
    back = [d for d in model.set_out("a", False) if isinstance(d, Start)]
    assert [(s.backend, s.jobs) for s in back] == [("a", ("j1",))]
    model.check_invariants()


def test_model_bounce_requeues_the_flight_never_on_that_backend_again() -> None:
    model = QueueModel({"a": 1, "b": 1, "c": 1}, guild_limit=lambda _: 8)
    (start,) = [d for d in model.admit("j1", 1, 1, key="k") if isinstance(d, Start)]
    model.admit("j2", 2, 1, key="k")  # shares the flight
    decisions = model.bounce(start.flight)
    assert Requeued(("j1", "j2")) in decisions
    (restart,) = [d for d in decisions if isinstance(d, Start)]
    assert restart.backend != start.backend and restart.flight == start.flight
    model.check_invariants()
    again = [d for d in model.bounce(restart.flight) if isinstance(d, Start)]
    assert {again[0].backend} == {"a", "b", "c"} - {start.backend, restart.backend}
    model.check_invariants()
    with pytest.raises(InvariantError):
        model.bounce(again[0].flight)  # nowhere left: the manager ends such a flight instead


def test_model_check_catches_an_empty_eligible_set() -> None:
    model = QueueModel({"a": 1}, guild_limit=lambda _: 8)
    model.admit("j1", 1, 1, key=None, eligible=set())
    with pytest.raises(InvariantError, match="may run on"):
        model.check_invariants()


# -- eligibility and admission --------------------------------------------------------------------------------
async def test_jobs_go_only_to_backends_serving_their_model_and_size(closing) -> None:
    sdxl = PoolBackend(auto_release=True, sizes=((1024, 1024),))
    small = PoolBackend(auto_release=True, sizes=((512, 512),))
    manager = make([entry("sdxl", sdxl, 2, ("base", "xl")), entry("small", small, 2, ("base", "tiny"))])
    closing(manager)
    assert set(manager.capabilities.sizes) == {(1024, 1024), (512, 512)}
    jobs = [
        await manager.submit(req("a", model="xl", width=1024, height=1024), guild_id=1, user_id=1),
        await manager.submit(req("b", model="tiny", width=512, height=512), guild_id=1, user_id=2),
        await manager.submit(req("c", model="base", width=512, height=512), guild_id=1, user_id=3),
    ]
    for job in jobs:
        assert (await ended(manager, job)).state is JobState.SUCCEEDED
    assert [c.request.prompt for c in sdxl.calls] == ["a"]
    assert sorted(c.request.prompt for c in small.calls) == ["b", "c"]
    assert [job.backend for job in jobs] == ["sdxl", "small", "small"]


async def test_a_request_no_backend_could_ever_serve_is_refused_at_admission(closing) -> None:
    manager = make(
        [
            entry("sdxl", PoolBackend(sizes=((1024, 1024),)), 1, ("base", "xl")),
            entry("small", PoolBackend(sizes=((512, 512),)), 1, ("base", "tiny")),
        ]
    )
    closing(manager)
    with pytest.raises(
        RequestRejected, match=r"None of the image servers here can make 512x512 with the model xl"
    ):
        manager.check_admission(req("x", model="xl", width=512, height=512), 1, 1)
    with pytest.raises(RequestRejected) as refused:
        manager.check_admission(req("x", model="tiny", width=1024, height=1024), 1, 1)
    assert refused.value.code == "no_backend" and "tiny" in refused.value.message
    manager.check_admission(req("x", model="tiny", width=512, height=512), 1, 1)  # one can: admitted


async def test_least_loaded_backend_gets_the_next_job(closing) -> None:
    big, small = PoolBackend(), PoolBackend()
    manager = make([entry("big", big, 4), entry("small", small, 1)])
    closing(manager)
    for i in range(5):
        await manager.submit(req(f"g1:{i}"), guild_id=1, user_id=i)
    await until(lambda: len(big.calls) + len(small.calls) == 5)
    # big (4 slots) takes jobs while it is less loaded than small: 0/4 < 0/1? tie -> by name; then ratios.
    assert (len(big.calls), len(small.calls)) == (4, 1)
    assert big.max_in_flight <= 4 and small.max_in_flight <= 1
    manager.check_invariants()
    big.release_all()
    small.release_all()


# -- failover -------------------------------------------------------------------------------------------------
async def test_a_submit_refused_before_acceptance_moves_to_another_backend_once(closing) -> None:
    first, second = PoolBackend(auto_release=True), PoolBackend(auto_release=True)
    first.refuse = [REFUSED]
    manager = make([entry("a", first, 1), entry("b", second, 1)])
    closing(manager)
    events: list[str] = []
    manager.add_listener(lambda job, event: events.append(f"{event.value}:{job.backend}"))
    job = await manager.submit(req("x"), guild_id=1, user_id=1)
    assert (await ended(manager, job)).state is JobState.SUCCEEDED
    assert (first.accepted, second.accepted) == (0, 1)  # submitted once, where it was accepted
    assert job.backend == "b"
    assert manager.pool["a"].outcomes["failed_over"] == 1 and manager.pool["b"].outcomes["succeeded"] == 1
    manager.check_invariants()


async def test_a_generation_the_backend_accepted_is_never_sent_elsewhere(closing) -> None:
    first, second = PoolBackend(auto_release=True, fail_with=LOST), PoolBackend(auto_release=True)
    manager = make([entry("a", first, 1), entry("b", second, 1)])
    closing(manager)
    job = await manager.submit(req("x"), guild_id=1, user_id=1)
    assert (await ended(manager, job)).state is JobState.FAILED
    assert job.error_message == BACKEND_LOST  # what the member reads (the result offers Reroll)
    assert (first.accepted, second.accepted) == (1, 0)


async def test_refused_everywhere_fails_with_the_last_refusal(closing) -> None:
    first, second = PoolBackend(), PoolBackend()
    first.refuse, second.refuse = [REFUSED], [REFUSED]
    manager = make([entry("a", first, 1), entry("b", second, 1)])
    closing(manager)
    job = await manager.submit(req("x"), guild_id=1, user_id=1)
    assert (await ended(manager, job)).state is JobState.FAILED
    assert job.error_reason == FailureReason.RATE_LIMITED.value
    assert first.accepted + second.accepted == 0


async def test_a_pool_of_one_fails_as_before_without_failover(closing) -> None:
    only = PoolBackend()
    only.refuse = [DOWN, DOWN, DOWN, DOWN]
    manager = JobManager(only, queue_timeout_s=30, job_timeout_s=30)
    closing(manager)
    for i in range(4):
        job = await manager.submit(req(f"x{i}"), guild_id=1, user_id=i)
        assert (await ended(manager, job)).state is JobState.FAILED
        assert job.error_message == "could not connect"  # the backend's own message, as before pools
    assert manager.pool.primary.health is Health.UP  # its only backend is never taken out


# -- health ---------------------------------------------------------------------------------------------------
async def test_a_failing_backend_is_taken_out_probed_and_brought_back(closing) -> None:
    flaky, steady = PoolBackend(auto_release=True), PoolBackend(auto_release=True)
    flaky.refuse = [DOWN, DOWN, DOWN]
    flaky.probe_ok = False
    manager = make([entry("a", flaky, 1), entry("b", steady, 1)], trip=3)
    closing(manager)
    for i in range(3):  # one at a time: both free, the tie goes to "a" (by name), which refuses
        job = await manager.submit(req(f"x{i}"), guild_id=1, user_id=i)
        assert (await ended(manager, job)).state is JobState.SUCCEEDED  # failed over to "b"
    assert manager.pool["a"].outcomes["failed_over"] == 3
    assert manager.pool["a"].health is Health.OUT
    assert manager.pool["a"].last_error == "could not connect"
    await until(lambda: flaky.probes >= 2)  # probed while out, still down
    # While out it is granted nothing: the next jobs all run on "b".
    more = [await manager.submit(req(f"y{i}"), guild_id=1, user_id=10 + i) for i in range(3)]
    for job in more:
        assert (await ended(manager, job)).state is JobState.SUCCEEDED
    assert flaky.accepted == 0 and steady.accepted == 6
    flaky.probe_ok = True
    await until(lambda: manager.pool["a"].up)
    await until(lambda: not manager.pool.probing)  # probing stops once every backend is back
    manager.check_invariants()


async def test_a_job_only_a_backend_out_can_serve_waits_for_it(closing) -> None:
    xl, other = PoolBackend(auto_release=True), PoolBackend(auto_release=True)
    xl.refuse = [DOWN]
    xl.probe_ok = False
    manager = make([entry("xl", xl, 1, ("base", "xl")), entry("other", other, 1, ("base",))], trip=1)
    closing(manager)
    job = await manager.submit(req("w", model="xl"), guild_id=1, user_id=1)
    await until(lambda: not manager.pool["xl"].up)
    await until(lambda: xl.probes >= 2)
    assert manager.get(job.id).state is JobState.QUEUED  # waits for "xl" rather than failing at once
    assert job.backend is None
    xl.probe_ok = True
    assert (await ended(manager, job)).state is JobState.SUCCEEDED
    assert (xl.accepted, other.accepted) == (1, 0)


async def test_a_job_waiting_for_a_backend_out_times_out_in_the_queue(closing) -> None:
    xl, other = PoolBackend(), PoolBackend()
    xl.refuse = [DOWN]
    xl.probe_ok = False
    manager = make(
        [entry("xl", xl, 1, ("base", "xl")), entry("other", other, 1, ("base",))], trip=1, queue_timeout_s=0.3
    )
    closing(manager)
    job = await manager.submit(req("w", model="xl"), guild_id=1, user_id=1)
    assert (await ended(manager, job)).state is JobState.TIMED_OUT
    assert xl.accepted == 0 and not manager.pool["xl"].up


async def test_a_refusal_that_is_not_a_health_failure_fails_when_nobody_else_serves(closing) -> None:
    xl, other = PoolBackend(), PoolBackend()
    xl.refuse = [REFUSED]  # 429: the backend is alive, just will not take it
    manager = make([entry("xl", xl, 1, ("base", "xl")), entry("other", other, 1, ("base",))], trip=1)
    closing(manager)
    job = await manager.submit(req("w", model="xl"), guild_id=1, user_id=1)
    assert (await ended(manager, job)).state is JobState.FAILED
    assert job.error_message == "Busy." and manager.pool["xl"].up


# -- the cache key --------------------------------------------------------------------------------------------
def test_cache_key_names_the_kind_not_the_entry_name() -> None:
    a, b = PoolBackend(kind="a1111"), PoolBackend(kind="a1111")
    same = BackendPool([entry("gpu-1", a, 1), entry("gpu-2", b, 1)])
    renamed = BackendPool(
        [entry("left", PoolBackend(kind="a1111"), 1), entry("right", PoolBackend(kind="a1111"), 1)]
    )
    mixed = BackendPool([entry("gpu-1", a, 1), entry("cloud", PoolBackend(kind="openai"), 1)])
    request = ImageRequest(prompt="p", width=512, height=512)
    assert same.identity() == renamed.identity() == "a1111"
    assert cache_key(request, backend=same.identity(), model=None) == cache_key(
        request, backend=renamed.identity(), model=None
    )
    assert mixed.identity() == "a1111+openai"
    assert mixed.identity(frozenset({"gpu-1"})) == "a1111"


def test_pool_capabilities_are_what_some_entry_supports() -> None:
    one = PoolBackend()
    one.capabilities = Capabilities(sizes=((512, 512),), max_count=1, negative_prompt=False)
    two = PoolBackend()
    two.capabilities = Capabilities(sizes=((768, 512), (512, 512)), max_count=4, negative_prompt=True)
    pool = BackendPool([entry("one", one, 1), entry("two", two, 1)])
    caps = pool.capabilities
    assert caps.sizes == ((512, 512), (768, 512)) and caps.max_count == 4 and caps.negative_prompt
    assert pool.eligible(ImageRequest(prompt="p", count=2), None) == {"two"}
    assert pool.eligible(ImageRequest(prompt="p", negative_prompt="ugly"), None) == {"two"}
    assert pool.eligible(ImageRequest(prompt="p"), None) == {"one", "two"}
    assert BackendPool.single(one, 3).capabilities is one.capabilities


class Followable(PoolBackend, ResumableBackend):
    """A controlled backend whose generations can be followed up by id after a restart."""

    async def generate(self, request, on_progress=lambda _: None, *, on_submitted=None):  # type: ignore[override]
        return await super().generate(request, on_progress)

    async def resume(self, ref, on_progress=lambda _: None, *, count=None) -> list[GeneratedImage]:
        raise AssertionError("not followed here")


def test_a_generation_is_followed_up_only_on_the_entry_that_accepted_it() -> None:
    # After a restart, a job submitted to an entry the configuration no longer has (the Horde replaced by a
    # ComfyUI, say) cannot be followed: following its id on another backend would ask the wrong server.
    horde = Followable("horde")
    single = make([entry("horde", horde, 1)])
    replaced = make([entry("comfyui", Followable("comfyui"), 1)])

    def ran_on(backend: str | None) -> Job:
        job = Job(id="a1b2c3d4e5f6", request=req("x"), guild_id=1, user_id=2, backend=backend)
        job.backend_ref = "remote-id"
        return job

    assert single.can_resume(ran_on("horde"))
    assert single.can_resume(ran_on(None))  # a record from before backends were named: the only one
    assert not replaced.can_resume(ran_on("horde"))
    assert not make([entry("a", horde, 1), entry("b", Followable("b"), 1)]).can_resume(ran_on(None))


def test_the_bot_wide_default_model_goes_only_to_entries_that_have_it() -> None:
    # IMAGE_MODEL=base; gpu-1 says it serves only sdxl: asking it for "base" would make it load a model it
    # does not have. An entry that says nothing about models takes the default.
    restricted = entry("gpu-1", PoolBackend(), 1, models=("sdxl",))
    open_entry = entry("gpu-2", PoolBackend(), 1)
    pool = BackendPool([restricted, open_entry])
    assert pool.eligible(ImageRequest(prompt="p", model="base"), "base") == {"gpu-2"}
    assert pool.eligible(ImageRequest(prompt="p", model="sdxl"), "base") == {"gpu-1", "gpu-2"}
    assert pool.eligible(ImageRequest(prompt="p", model="base"), "base") != {"gpu-1"}
    assert BackendPool([restricted]).eligible(ImageRequest(prompt="p", model="base"), "base") == frozenset()
