"""The async manager driven by a hypothesis state machine on virtual time.

An event loop whose clock the test owns (no real sleeps), a backend whose calls the test finishes, fails,
hangs or lets wind down slowly (and that may tell each generation's id, so a rolling restart can hand it over),
a store whose writes the test can fail: submit, cancel in every state, queue and job timeouts, shutdown. After every step: the model's invariants, the manager agreeing with the model, the
backend never over capacity, every job finishing once, and the store agreeing with memory.

The pool machine runs the same rules (and more) on three backends with mixed models that refuse before
accepting, fail, are taken out and probed back in.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bot.engine.backend import Capabilities, ResumableBackend, stop_remotely
from bot.engine.catalog import ModelCatalog
from bot.engine.errors import FailureReason, GenerationError
from bot.engine.manager import JobEvent, JobManager
from bot.engine.models import GeneratedImage, ImageRequest, Job, JobState
from bot.engine.pool import BackendPool, PoolEntry
from bot.engine.queue import JobPhase
from tests.helpers import PNG

EPOCH = 1_800_000_000.0
CAPACITY = 3


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0


class Call:
    def __init__(self, request: ImageRequest) -> None:
        self.request = request
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.active = True
        self.cancelled = False
        #: The id it told (``on_submitted``), when the backend tells ids.
        self.ref: str | None = None
        #: Cancelled as handed over: the remote generation was left running (no cancel, no wind-down).
        self.handed_over = False


class ScriptedBackend(ResumableBackend):
    """Every call waits for the test; a cancel winds down for ``wind_down_s`` of virtual time. With
    ``reports_ids`` each call tells its id first (like the Horde), so shutdown may hand it over."""

    name = "scripted"

    def __init__(self) -> None:
        self.capabilities = Capabilities(sizes=((512, 512),))
        self.calls: list[Call] = []
        self.active = 0
        self.max_active = 0
        self.wind_down_s = 0.0
        #: Tells each generation's id (a rule turns it off); the pool's entries tell none unless the rule says.
        self.reports_ids = True

    async def generate(
        self, request, on_progress=lambda _: None, *, on_submitted=None
    ) -> list[GeneratedImage]:
        call = self._new_call(request)
        self.calls.append(call)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.reports_ids and on_submitted is not None:
                call.ref = f"ref-{len(self.calls)}"
                await on_submitted(call.ref)
            return self._answer(call, await call.outcome)
        except asyncio.CancelledError:
            if call.ref is not None and not stop_remotely():
                call.handed_over = True
                raise
            call.cancelled = True
            if self.wind_down_s:
                await asyncio.sleep(self.wind_down_s)
            raise
        finally:
            call.active = False
            self.active -= 1

    async def resume(self, ref, on_progress=lambda _: None, *, count=None) -> list[GeneratedImage]:
        raise AssertionError("nothing is adopted here")

    def _new_call(self, request: ImageRequest) -> Call:
        return Call(request)

    def _answer(self, call: Call, outcome: str) -> list[GeneratedImage]:
        """What the backend answers once the test decided the call's ``outcome``."""
        if outcome == "fail":
            raise GenerationError(FailureReason.UNAVAILABLE, "The image service is down.")
        return [GeneratedImage(PNG, "PNG", 8, 8, seed=1)]

    async def list_models(self) -> list[str]:
        return []


class ScriptedStore:
    def __init__(self) -> None:
        self.records: dict[str, JobState] = {}
        self.refs: dict[str, str | None] = {}
        self.fail_next = 0

    async def save_job(self, job: Job) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise OSError("database is locked")
        self.records[job.id] = job.state
        self.refs[job.id] = job.backend_ref


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = VirtualClock()
        self.loop = asyncio.new_event_loop()
        self.loop.time = lambda: self.clock.now  # type: ignore[method-assign]
        self.backend = ScriptedBackend()
        self.store = ScriptedStore()
        self.manager = self.run(self._make())
        self.jobs: dict[str, Job] = {}
        self.finished: Counter[str] = Counter()
        self.tasks: list[asyncio.Task[object]] = []
        self.ids = itertools.count(1)
        self.shut = False
        self.handed: set[str] = set()  # jobs handed back at shutdown (another process runs them)
        self.offered: set[str] = set()  # jobs offered to the other processes (taken or not)
        self.manager.add_listener(self._heard)

    async def _make(self) -> JobManager:
        return JobManager(
            self.backend,
            store=self.store,  # type: ignore[arg-type]
            guild_concurrency=2,
            backend_concurrency=CAPACITY,
            user_max_jobs=3,
            queue_timeout_s=30,
            job_timeout_s=20,
            clock=lambda: EPOCH + self.clock.now,
        )

    def _heard(self, job: Job, event: JobEvent) -> None:
        if event is JobEvent.FINISHED:
            self.finished[job.id] += 1

    # -- driving the loop -------------------------------------------------------------------------------------
    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def settle(self) -> None:
        async def drain() -> None:
            for _ in range(30):
                await asyncio.sleep(0)

        self.run(drain())

    def advance(self, seconds: float) -> None:
        """Move virtual time forward timer by timer, settling in between (no real sleep)."""
        target = self.clock.now + seconds
        while True:
            scheduled = [h.when() for h in self.loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
            upcoming = min((w for w in scheduled if w <= target), default=None)
            if upcoming is None:
                break
            self.clock.now = max(self.clock.now, upcoming)
            self.settle()
        self.clock.now = target
        self.settle()

    def teardown(self) -> None:
        if not self.shut:
            self.do_shutdown()
        self.loop.close()

    # -- rules ----------------------------------------------------------------------------------------------
    @precondition(lambda self: not self.shut)
    @rule(guild=st.integers(1, 3), member=st.integers(1, 3), prompt=st.sampled_from(["a", "b", "fresh"]))
    def submit(self, guild: int, member: int, prompt: str) -> None:
        request = ImageRequest(prompt=prompt, fresh=prompt == "fresh")
        job_id = f"j{next(self.ids)}"

        async def submit() -> Job | None:
            try:
                return await self.manager.submit(request, guild_id=guild, user_id=member, job_id=job_id)
            except Exception:
                return None  # refused (member limit) or the first write failed: no job exists

        job = self.run(submit())
        if job is not None:
            self.jobs[job.id] = job
        else:
            assert self.manager.get(job_id) is None
        self.settle()

    @precondition(lambda self: any(c.active and not c.outcome.done() for c in self.backend.calls))
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "fail"]))
    def finish_call(self, data: st.DataObject, outcome: str) -> None:
        calls = [c for c in self.backend.calls if c.active and not c.outcome.done()]
        call = data.draw(st.sampled_from(calls))
        call.outcome.set_result(outcome)
        self.settle()

    @precondition(lambda self: any(j.is_active for j in self.jobs.values()))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(sorted(j.id for j in self.jobs.values() if j.is_active)))
        self.tasks.append(self.loop.create_task(self.manager.cancel(job, by="tester")))
        self.settle()

    @rule(seconds=st.sampled_from([0.5, 3.0, 12.0, 25.0]))
    def wait(self, seconds: float) -> None:
        self.advance(seconds)

    @rule(wind_down=st.sampled_from([0.0, 2.0, 15.0]))
    def backend_winds_down(self, wind_down: float) -> None:
        self.backend.wind_down_s = wind_down

    @rule(reports=st.booleans())
    def backend_reports_ids(self, reports: bool) -> None:
        """Generations submitted from now on tell their id (another process could follow them up), or not."""
        self.backend.reports_ids = reports

    @rule(takes=st.booleans())
    def other_processes_take_queued_jobs(self, takes: bool) -> None:
        """A fleet: at shutdown, a job still queued is handed back (taken or not) instead of cancelled, and a
        running generation whose id was told is handed over with all its jobs (taken or not)."""
        self._join_fleet(takes)

    @precondition(lambda self: not self.shut)
    @rule()
    def shutdown_beside_another_process_that_takes_jobs(self) -> None:
        """A rolling restart, in one step (so the derandomized budget reaches it with work running)."""
        self._join_fleet(True)
        self.do_shutdown()

    def _join_fleet(self, takes: bool) -> None:
        machine = self

        class Fleet:
            async def available(self) -> bool:
                return True

            async def take(self, job: Job) -> bool:
                machine.offered.add(job.id)
                if takes:
                    machine.handed.add(job.id)
                return takes

        self.manager.hand_back = Fleet()

    @rule(count=st.integers(1, 2))
    def store_fails(self, count: int) -> None:
        self.store.fail_next = count

    @precondition(lambda self: not self.shut)
    @rule()
    def shutdown(self) -> None:
        self.do_shutdown()

    def do_shutdown(self) -> None:
        self.shut = True
        self.store.fail_next = 0
        task = self.loop.create_task(self.manager.shutdown(grace=5))
        for _ in range(100):
            if task.done():
                break
            self.advance(5)
        assert task.done()
        task.result()
        calls = {call.ref: call for call in self._all_calls() if call.ref is not None}
        for job in self.jobs.values():
            if job.id not in self.handed:
                assert job.state.is_terminal, job
                continue
            assert self.finished[job.id] == 0, job  # no end of its own here
            if job.state is JobState.RUNNING:
                # Handed over running: its record names the generation, which was left running, not cancelled.
                assert job.backend_ref is not None and self.store.refs.get(job.id) == job.backend_ref, job
                assert calls[job.backend_ref].handed_over and not calls[job.backend_ref].cancelled, job
            else:
                assert job.state is JobState.QUEUED, job
        for call in calls.values():  # a generation left running belongs to jobs another process follows up
            if call.handed_over:
                owners = [
                    j for j in self.jobs.values() if j.backend_ref == call.ref and not j.state.is_terminal
                ]
                assert owners and all(j.id in self.handed for j in owners), call.ref
        assert self.manager.task_count() == 0 and not self.manager.queue.jobs
        for pending in self.tasks:
            assert pending.done()

    def _all_calls(self) -> list[Call]:
        return list(self.backend.calls)

    # -- invariants -----------------------------------------------------------------------------------------
    @invariant()
    def manager_agrees_with_the_model(self) -> None:
        self.manager.check_invariants()

    @invariant()
    def backend_never_over_capacity(self) -> None:
        assert self.backend.max_active <= CAPACITY
        # Every call still alive on the backend holds its slot in the model (a winding-down one too).
        assert self.backend.active <= self.manager.backend_in_flight

    @invariant()
    def every_job_finishes_once(self) -> None:
        for job_id, count in self.finished.items():
            assert count == 1, job_id
        for job in self.jobs.values():
            if job.state.is_terminal:
                assert self.finished[job.id] == 1, job

    @invariant()
    def the_store_agrees_with_memory(self) -> None:
        unsaved = set(self.manager.unsaved_jobs())
        for job in self.jobs.values():
            if job.id not in unsaved:
                assert self.store.records.get(job.id) is job.state, (job.id, job.state)

    @invariant()
    def memory_agrees_with_the_model(self) -> None:
        """Once the loop is idle, a job's state is its phase in the model (a cancel may still be winding down)."""
        for job in self.jobs.values():
            if job.cancelled_by is not None or self.shut:
                continue
            phase = self.manager.queue.phase(job.id)
            expected = {JobState.QUEUED: "waiting", JobState.RUNNING: "running"}.get(job.state)
            assert (phase.value if phase is not None else None) == expected, (job.id, job.state, phase)

    @invariant()
    def members_counted_once(self) -> None:
        for (guild, member), record in list(self.manager.queue.members.items()):
            live = [
                j
                for j in self.jobs.values()
                if j.guild_id == guild and j.user_id == member and self.manager.get(j.id) is not None
            ]
            assert record.jobs + record.reserved <= len(live) or not live


TestManagerMachine = ManagerMachine.TestCase


# -- pools: mixed models, backends refusing, dying and coming back ------------------------------------------------
POOL = {"a": (2, ("base", "x")), "b": (1, ("base", "y")), "c": (2, ("base",))}  # name: (capacity, models)


class PoolCall(Call):
    def __init__(self, request: ImageRequest, jobs: set[str]) -> None:
        super().__init__(request)
        self.jobs = jobs  # the jobs this generation was submitted for
        self.refused = False  # answered before accepting: not a submit that counts


class PoolScripted(ScriptedBackend):
    """One pool entry: calls wait for the test, which may also make them refuse before accepting."""

    def __init__(self, name: str, machine: PoolManagerMachine) -> None:
        super().__init__()
        self.name = name
        self.machine = machine
        self.probe_ok = True
        self.reports_ids = False  # refusing before accepting is what these entries do most

    def _new_call(self, request: ImageRequest) -> Call:
        # The jobs this call generates for: on this backend in the model now. A job cancelled a moment ago may
        # still be winding down (active, same prompt) but has left the model: the call is not its.
        queue = self.machine.manager.queue
        jobs = {
            j.id
            for j in self.machine.manager.active_jobs()
            if j.backend == self.name
            and queue.phase(j.id) is JobPhase.RUNNING
            and (j.request.prompt, j.request.model) == (request.prompt, request.model)
        }
        return PoolCall(request, jobs)

    def _answer(self, call: Call, outcome: str) -> list[GeneratedImage]:
        if outcome in ("refuse", "busy") and call.ref is not None:
            outcome = "fail"  # it told its id: it had taken the generation, so it can only fail it now
        if outcome in ("refuse", "busy"):
            call.refused = True  # type: ignore[attr-defined]
            reason = FailureReason.UNAVAILABLE if outcome == "refuse" else FailureReason.RATE_LIMITED
            raise GenerationError(reason, "Not taken.", not_accepted=True)
        return super()._answer(call, outcome)

    async def probe(self) -> None:
        if not self.probe_ok:
            raise GenerationError(FailureReason.UNAVAILABLE, "still down")


class PoolManagerMachine(ManagerMachine):
    """The same machine on a pool of three backends with different models and capacities: calls may also be
    refused before acceptance (moved elsewhere) and backends are taken out (two failures in a row) and probed
    back (their probe answering or not). Also: no backend over its own capacity, and no job's generation
    accepted twice."""

    async def _make(self) -> JobManager:
        self.backends = {name: PoolScripted(name, self) for name in POOL}
        self.backend = self.backends["a"]  # the base machine's checks see one of them; ours see all
        entries = [
            PoolEntry(name, self.backends[name], capacity, catalog=ModelCatalog(None, configured=models))
            for name, (capacity, models) in POOL.items()
        ]
        pool = BackendPool(entries, failures_to_trip=2, probe_interval_s=4.0)
        return JobManager(
            pool,
            store=self.store,  # type: ignore[arg-type]
            guild_concurrency=2,
            user_max_jobs=3,
            queue_timeout_s=30,
            job_timeout_s=20,
            default_model="base",
            clock=lambda: EPOCH + self.clock.now,
        )

    @precondition(lambda self: not self.shut)
    @rule(
        guild=st.integers(1, 3),
        member=st.integers(1, 3),
        prompt=st.sampled_from(["a", "b", "fresh"]),
        model=st.sampled_from(["base", "x", "y"]),
    )
    def submit_model(self, guild: int, member: int, prompt: str, model: str) -> None:
        number = next(self.ids)
        fresh = prompt == "fresh"
        request = ImageRequest(prompt=f"fresh{number}" if fresh else prompt, fresh=fresh, model=model)
        job_id = f"j{number}"

        async def submit() -> Job | None:
            try:
                return await self.manager.submit(request, guild_id=guild, user_id=member, job_id=job_id)
            except Exception:
                return None

        job = self.run(submit())
        if job is not None:
            self.jobs[job.id] = job
        self.settle()

    @precondition(lambda self: not self.shut)
    @rule(guild=st.integers(1, 3), member=st.integers(1, 3), prompt=st.sampled_from(["a", "b", "fresh"]))
    def submit(self, guild: int, member: int, prompt: str) -> None:
        """The base machine's submit, with fresh prompts told apart (each is its own generation)."""
        self.submit_model(guild, member, prompt, "base")

    def _all_calls(self) -> list[Call]:
        return [c for b in self.backends.values() for c in b.calls]

    def _open_calls(self) -> list[Call]:
        return [c for b in self.backends.values() for c in b.calls if c.active and not c.outcome.done()]

    @precondition(lambda self: bool(self._open_calls()))
    @rule(data=st.data(), outcome=st.sampled_from(["ok", "fail", "refuse", "busy"]))
    def finish_pool_call(self, data: st.DataObject, outcome: str) -> None:
        call = data.draw(st.sampled_from(self._open_calls()))
        call.outcome.set_result(outcome)
        self.settle()

    @rule(name=st.sampled_from(sorted(POOL)), ok=st.booleans())
    def backend_health(self, name: str, ok: bool) -> None:
        self.backends[name].probe_ok = ok

    @invariant()
    def each_backend_within_its_capacity(self) -> None:
        for name, backend in self.backends.items():
            assert backend.max_active <= POOL[name][0], name
            assert backend.active <= self.manager.backend_load(name), name

    @invariant()
    def no_generation_accepted_twice(self) -> None:
        accepted: Counter[str] = Counter()
        for backend in self.backends.values():
            for call in backend.calls:
                if not call.refused and not call.cancelled:  # type: ignore[attr-defined]
                    accepted.update(call.jobs)  # type: ignore[attr-defined]
        assert all(count == 1 for count in accepted.values()), accepted

    @invariant()
    def jobs_run_only_where_their_model_is_served(self) -> None:
        for job in self.jobs.values():
            if job.state is JobState.RUNNING and job.backend is not None:
                assert job.request.model in POOL[job.backend][1], (job.id, job.backend, job.request.model)


TestPoolManagerMachine = PoolManagerMachine.TestCase
