"""The shared retry rules and helpers in bot.backends.http, against a tiny scripted aiohttp server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from bot.backends import http
from bot.engine.errors import FailureReason, GenerationError
from bot.engine.models import Progress
from tests.backends.conftest import FAST_RETRY, RecordingSleep


def map_error(reply: http.HttpReply) -> GenerationError:
    if reply.status == 429:
        return GenerationError(FailureReason.RATE_LIMITED, f"slow down ({reply.body.decode()})")
    return GenerationError(FailureReason.UNAVAILABLE, f"HTTP {reply.status}: {reply.body.decode()}")


@dataclass
class Script:
    """Each request pops the next step: an int status, "drop" (close the socket), or ("sleep", s)."""

    steps: list[object] = field(default_factory=list)
    hits: int = 0
    headers: dict[int, dict[str, str]] = field(default_factory=dict)


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[str, Script]]:
    script = Script()

    async def handler(request: web.Request) -> web.StreamResponse:
        script.hits += 1
        step = script.steps.pop(0) if script.steps else 200
        if step == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if isinstance(step, tuple):
            await asyncio.sleep(step[1])
            step = 200
        assert isinstance(step, int)
        return web.Response(
            status=step,
            text="ok" if step < 400 else "bad key sk-echoed-1234",
            headers=script.headers.get(step),
        )

    app = web.Application()
    app.router.add_route("*", "/x", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}/x", script
    await runner.cleanup()


async def call(
    session, url: str, sleeps: RecordingSleep, *, method: str = "POST", **kwargs
) -> http.HttpReply:
    kwargs.setdefault("client_timeout", http.make_timeout(5))
    kwargs.setdefault("retry", FAST_RETRY)
    return await http.request(
        session, method, url, what="Test call", map_error=map_error, sleep=sleeps, **kwargs
    )


async def test_502_503_retried_with_growing_backoff(session, sleeps, scripted) -> None:
    url, script = scripted
    script.steps = [502, 503]
    reply = await call(session, url, sleeps, creates_work=True)
    assert reply.status == 200 and reply.body == b"ok"
    assert script.hits == 3
    assert len(sleeps.calls) == 2 and sleeps.calls[1] > sleeps.calls[0]


async def test_attempts_are_bounded(session, sleeps, scripted) -> None:
    url, script = scripted
    script.steps = [503] * 10
    with pytest.raises(GenerationError) as caught:
        await call(session, url, sleeps)
    assert caught.value.reason is FailureReason.UNAVAILABLE
    assert script.hits == FAST_RETRY.attempts


@pytest.mark.parametrize("status", [400, 401, 404, 500])
async def test_other_statuses_fail_at_once(session, sleeps, scripted, status: int) -> None:
    url, script = scripted
    script.steps = [status]
    with pytest.raises(GenerationError):
        await call(session, url, sleeps)
    assert script.hits == 1 and sleeps.calls == []


async def test_504_on_work_creating_post_is_not_retried(session, sleeps, scripted) -> None:
    url, script = scripted
    script.steps = [504, 504]
    with pytest.raises(GenerationError):
        await call(session, url, sleeps, creates_work=True)
    assert script.hits == 1
    script.steps = [504]
    await call(session, url, sleeps, method="GET")
    assert script.hits == 3


async def test_retry_after_is_honoured_and_total_wait_capped(session, sleeps, scripted) -> None:
    url, script = scripted
    script.headers[429] = {"Retry-After": "4"}
    script.steps = [429]
    await call(session, url, sleeps)
    assert sleeps.calls == [4.0]
    script.headers[429] = {"Retry-After": "3600"}
    script.steps = [429]
    with pytest.raises(GenerationError) as caught:
        await call(session, url, sleeps)
    assert caught.value.reason is FailureReason.RATE_LIMITED
    assert caught.value.retry_after == 3600
    assert sleeps.calls == [4.0]  # no hour-long sleep


async def test_dropped_connection_not_retried_for_work_but_retried_for_reads(
    session, sleeps, scripted
) -> None:
    url, script = scripted
    script.steps = ["drop"]
    with pytest.raises(GenerationError) as caught:
        await call(session, url, sleeps, creates_work=True)
    assert caught.value.reason is FailureReason.UNAVAILABLE
    assert script.hits == 1
    script.steps = ["drop"]
    await call(session, url, sleeps, method="GET")
    assert script.hits == 3


async def test_read_timeout_after_sending_is_not_retried(session, sleeps, scripted) -> None:
    url, script = scripted
    script.steps = [("sleep", 0.5)]
    with pytest.raises(GenerationError) as caught:
        await call(session, url, sleeps, creates_work=True, client_timeout=http.make_timeout(0.1))
    assert caught.value.reason is FailureReason.TIMEOUT
    assert script.hits == 1 and sleeps.calls == []


async def test_connection_refused_is_retried_then_unavailable(session, sleeps, scripted) -> None:
    url, _ = scripted
    dead = url.rsplit(":", 1)[0] + ":1/x"  # port 1: nothing listens
    with pytest.raises(GenerationError) as caught:
        await call(session, dead, sleeps, creates_work=True)
    assert caught.value.reason is FailureReason.UNAVAILABLE
    assert "could not connect" in caught.value.message
    assert caught.value.advice is not None and "cannot connect to" in caught.value.advice
    assert "IMAGE_BACKEND_URL" in caught.value.advice
    assert len(sleeps.calls) == FAST_RETRY.attempts - 1


async def test_secrets_are_scrubbed_from_messages(session, sleeps, scripted) -> None:
    url, script = scripted
    script.steps = [400]
    with pytest.raises(GenerationError) as caught:
        await call(session, url, sleeps, secrets=["sk-echoed-1234"])  # the server echoes our key
    assert "sk-echoed-1234" not in caught.value.message and "***" in caught.value.message


async def test_oversized_reply_is_refused(session, sleeps, scripted) -> None:
    url, _ = scripted
    with pytest.raises(GenerationError, match="too large"):
        await call(session, url, sleeps, max_bytes=1)


def test_normalise_base_url() -> None:
    n = http.normalise_base_url
    assert n("http://h:1337/v1", "/v1") == n("http://h:1337/", "/v1") == "http://h:1337"
    assert (
        n("http://h:7860/sdapi/v1/", "/sdapi/v1") == n("http://h:7860/sdapi", "/sdapi/v1") == "http://h:7860"
    )
    assert n("https://x/prefix/v1", "/v1") == "https://x/prefix"
    assert n("https://aihorde.net/api", "/api/v2") == "https://aihorde.net"


def test_safe_url_and_helpers() -> None:
    assert http.safe_url("https://u:pw@host:8080/p?sig=secret") == "https://host:8080/p"
    assert http.same_origin("http://a:1/x", "http://a:1/y") and not http.same_origin(
        "http://a:1", "http://b:1"
    )
    assert http.parse_retry_after({"Retry-After": "7"}) == 7.0
    assert http.parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) is None
    assert http.decode_base64_image("data:image/png;base64,aGk=") == b"hi"
    with pytest.raises(GenerationError) as caught:
        http.decode_base64_image(None)
    assert caught.value.reason is FailureReason.INVALID_IMAGE


async def test_rate_limiter_spaces_calls_with_injected_clock() -> None:
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(delay: float) -> None:
        slept.append(delay)
        now[0] += delay

    limiter = http.RateLimiter(0.5, burst=2, clock=lambda: now[0], sleep=fake_sleep)
    for _ in range(4):
        await limiter.acquire()
    assert slept == [2.0, 2.0]  # two from the burst, then one per 2 s
    now[0] += 100
    await limiter.acquire()
    assert slept == [2.0, 2.0]  # refilled while idle


async def test_run_cleanup_is_bounded_and_survives_a_second_cancel() -> None:
    finished = asyncio.Event()

    async def slow_cleanup() -> None:
        await asyncio.sleep(0.05)
        finished.set()

    async def cancelled_job() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await http.run_cleanup(slow_cleanup(), limit_s=1, what="test cleanup")
            raise

    job = asyncio.create_task(cancelled_job())
    await asyncio.sleep(0)
    job.cancel()
    await asyncio.sleep(0.01)
    job.cancel()  # impatient second cancel: cleanup keeps running
    with pytest.raises(asyncio.CancelledError):
        await job
    await asyncio.wait_for(finished.wait(), 1)

    never = asyncio.Event()
    await asyncio.wait_for(http.run_cleanup(never.wait(), limit_s=0.05, what="stuck cleanup"), 1)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (Progress(fraction=float("nan"), eta_s=float("nan")), Progress()),
        (Progress(fraction=float("inf"), eta_s=float("inf")), Progress()),
        (Progress(fraction=float("-inf"), eta_s=-3.0), Progress(eta_s=0.0)),
        (Progress(fraction=-0.5, eta_s=1e300), Progress(fraction=0.0, eta_s=http.MAX_ETA_S)),
        (Progress(fraction=1.5, queue_position=-2), Progress(fraction=1.0, queue_position=0)),
        (Progress(fraction=0.25, eta_s=12.0, queue_position=3, note="x"),) * 2,
    ],
)
def test_reported_progress_is_finite_and_in_range(given: Progress, expected: Progress) -> None:
    seen: list[Progress] = []
    http.report(seen.append, given)
    assert seen == [expected]
