"""HordeBackend against the fake AI Horde, over real HTTP."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from bot.backends.horde import ANONYMOUS_KEY, CLIENT_AGENT, DEFAULT_URL, HordeBackend, normalise_url
from bot.engine.backend import backend_call
from bot.engine.errors import FailureReason, GenerationError
from bot.engine.models import ImageRequest, Progress
from tests.backends.conftest import FAST_RETRY, RecordingSleep, eventually
from tests.fakes._common import b64, make_image
from tests.fakes.horde import FakeHorde

REQ = ImageRequest(prompt="a castle", width=512, height=512)


def make(
    session: aiohttp.ClientSession, url: str | None, sleeps: RecordingSleep, **kwargs: Any
) -> HordeBackend:
    kwargs.setdefault("poll_interval_s", 0.005)
    return HordeBackend(session, url, retry=FAST_RETRY, sleep=sleeps, **kwargs)


async def test_submit_check_status_download(session, sleeps) -> None:
    seen: list[Progress] = []
    submitted: list[str] = []
    async with FakeHorde(checks_until_done=3, queue_position=2, wait_time=9) as fake:
        backend = make(session, fake.url, sleeps, model="Deliberate")
        images = await backend.generate(
            REQ.replace(negative_prompt="ugly", seed=77, count=2), seen.append, on_submitted=submitted.append
        )
    assert [img.seed for img in images] == [77, 78]
    assert all(img.format == "WEBP" and (img.width, img.height) == (512, 512) for img in images)
    assert (fake.state.submits, fake.state.checks, fake.state.status_calls) == (1, 3, 1)
    assert fake.state.downloads == 2
    assert submitted == fake.state.submitted_ids
    body = fake.state.last_payload
    assert body["prompt"] == "a castle ### ugly"
    assert body["params"]["seed"] == "77" and body["params"]["n"] == 2 and body["params"]["steps"] <= 30
    assert body["models"] == ["Deliberate"]
    assert (body["nsfw"], body["censor_nsfw"], body["r2"], body["trusted_workers"]) == (
        False,
        True,
        True,
        False,
    )
    assert fake.state.last_apikey == ANONYMOUS_KEY
    assert fake.state.last_client_agent == CLIENT_AGENT
    assert fake.state.download_apikeys == [None, None]  # the key never goes to the image host
    assert [p.queue_position for p in seen][:2] == [1, 0]
    assert seen[0].eta_s is not None and seen[0].eta_s > 0
    assert seen[-1].fraction == 1.0


async def test_no_negative_means_no_separator_and_nsfw_flag(session, sleeps) -> None:
    async with FakeHorde(checks_until_done=1) as fake:
        await make(session, fake.url, sleeps).generate(REQ.replace(nsfw_allowed=True))
    body = fake.state.last_payload
    assert body["prompt"] == "a castle"
    assert "seed" not in body["params"] and "models" not in body
    assert (body["nsfw"], body["censor_nsfw"]) == (True, False)


async def test_resume_follows_an_existing_request_without_resubmitting(session, sleeps) -> None:
    async with FakeHorde(checks_until_done=2) as fake:
        async with session.post(
            f"{fake.api_url}/generate/async",
            json={"prompt": "x", "params": {"width": 512, "height": 512, "n": 1, "seed": "9"}},
            headers={"apikey": ANONYMOUS_KEY},
        ) as reply:
            assert reply.status == 202
            horde_id = (await reply.json())["id"]
        images = await make(session, fake.url, sleeps).resume(horde_id, count=1)
    assert images[0].seed == 9
    assert fake.state.submits == 1


async def test_not_possible_is_no_workers_and_deletes(session, sleeps) -> None:
    async with FakeHorde(is_possible=False) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.NO_WORKERS
    assert fake.state.deletes == 1 and fake.state.deleted_ids == fake.state.submitted_ids


async def test_faulted_is_unavailable(session, sleeps) -> None:
    async with FakeHorde(faulted=True) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.UNAVAILABLE


async def test_censored_is_a_refusal_not_a_result(session, sleeps) -> None:
    async with FakeHorde(censored=True, checks_until_done=1) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.CENSORED
    assert "censored" in caught.value.message
    assert fake.state.downloads == 0


async def test_anonymous_big_request_needs_kudos(session, sleeps) -> None:
    async with FakeHorde() as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ.replace(width=1024, height=1024))
    assert caught.value.reason is FailureReason.QUOTA
    assert "kudos" in caught.value.message and "768 px" in caught.value.message  # what a member can do
    assert "IMAGE_BACKEND_API_KEY" not in caught.value.message
    assert caught.value.advice is not None and "IMAGE_BACKEND_API_KEY" in caught.value.advice
    assert fake.state.submits == 1 and sleeps.calls == []


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (400, {"message": "This prompt appears to violate our terms of service", "rc": "CorruptPrompt"}, FailureReason.CONTENT_REFUSED),
        (400, {"message": "No active worker matches the request", "rc": "NoValidWorkers"}, FailureReason.NO_WORKERS),
        (400, {"message": "Input payload validation failed", "rc": "BadRequest"}, FailureReason.BAD_REQUEST),
        (500, {"message": "Internal Server Error", "rc": "InternalServerError"}, FailureReason.UNAVAILABLE),
    ],
)  # fmt: skip
async def test_submit_errors_map_without_retry(session, sleeps, status, body, reason) -> None:
    async with FakeHorde(fail_next=[(status, body)]) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is reason
    assert fake.state.submits == 1 and sleeps.calls == []


async def test_bad_key_is_auth_and_never_echoed(session, sleeps) -> None:
    key = "my-secret-horde-key"
    async with FakeHorde(require_key="the-right-key") as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps, api_key=key).generate(REQ)
    assert caught.value.reason is FailureReason.AUTH
    assert key not in caught.value.message
    assert fake.state.last_apikey == key


async def test_too_many_prompts_retries_honouring_retry_after(session, sleeps) -> None:
    busy = (429, {"message": "Parallel requests exceeded", "rc": "TooManyPrompts"}, {"Retry-After": "3"})
    async with FakeHorde(fail_next=[busy], checks_until_done=1) as fake:
        images = await make(session, fake.url, sleeps).generate(REQ)
    assert len(images) == 1
    assert sleeps.calls == [3.0]
    assert fake.state.submits == 2 and len(fake.state.submitted_ids) == 1  # created exactly once


async def test_too_many_prompts_exhausted_is_rate_limited(session, sleeps) -> None:
    busy = (429, {"message": "Parallel requests exceeded", "rc": "TooManyPrompts"})
    async with FakeHorde(fail_next=[busy] * 5) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.RATE_LIMITED
    assert fake.state.submits == 3 and fake.state.submitted_ids == []


async def test_503_is_retried(session, sleeps) -> None:
    down = (503, {"message": "Horde is in maintenance", "rc": "MaintenanceMode"})
    async with FakeHorde(fail_next=[down], checks_until_done=1) as fake:
        await make(session, fake.url, sleeps).generate(REQ)
    assert fake.state.submits == 2 and len(sleeps.calls) == 1


@pytest.mark.parametrize("knob", ["fail_next_check", "fail_next_status"])
async def test_404_while_polling_means_expired(session, sleeps, knob: str) -> None:
    gone = (404, {"message": "Request Not found", "rc": "RequestNotFound"})
    async with FakeHorde(checks_until_done=1, **{knob: [gone]}) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.UNAVAILABLE
    assert "expired" in caught.value.message


async def test_cancel_sends_delete(session, sleeps) -> None:
    async with FakeHorde(checks_until_done=10_000) as fake:
        task = asyncio.create_task(make(session, fake.url, sleeps).generate(REQ))
        await eventually(lambda: fake.state.checks >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert fake.state.deletes == 1
    assert fake.state.deleted_ids == fake.state.submitted_ids


async def test_a_handed_over_call_is_cancelled_without_deleting_and_is_followed_up_elsewhere(
    session, sleeps
) -> None:
    # A rolling restart: the caller hands the call over (another process follows the id up), then cancels it.
    async with FakeHorde(checks_until_done=10_000) as fake:
        submitted: list[str] = []
        handed: list[object] = []

        async def generate() -> object:
            with backend_call() as call:
                handed.append(call)
                return await make(session, fake.url, sleeps).generate(REQ, on_submitted=submitted.append)

        task = asyncio.create_task(generate())
        await eventually(lambda: fake.state.checks >= 2)
        handed[0].hand_over()  # type: ignore[attr-defined]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake.state.deletes == 0
        fake.configure(checks_until_done=0)
        images = await make(session, fake.url, sleeps).resume(submitted[0], count=1)
    assert len(images) == 1 and fake.state.submits == 1 and fake.state.deletes == 0


async def test_a_cancel_outside_a_handed_over_call_still_deletes(session, sleeps) -> None:
    async with FakeHorde(checks_until_done=10_000) as fake:

        async def generate() -> object:
            with backend_call():  # opened, never handed over: an ordinary cancel
                return await make(session, fake.url, sleeps).generate(REQ)

        task = asyncio.create_task(generate())
        await eventually(lambda: fake.state.checks >= 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert fake.state.deleted_ids == fake.state.submitted_ids


async def test_invalid_image_bytes(session, sleeps) -> None:
    async with FakeHorde(return_garbage=True, checks_until_done=1) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.INVALID_IMAGE


async def test_base64_images_when_r2_is_off(session, sleeps) -> None:
    backend = make(session, "http://unused.invalid", sleeps)
    webp = make_image(3, 32, 32, fmt="WEBP")
    assert await backend._image_bytes(b64(webp)) == webp


@pytest.mark.parametrize("suffix", ["", "/", "/api", "/api/", "/api/v2", "/api/v2/"])
async def test_url_with_or_without_api_suffix(session, sleeps, suffix: str) -> None:
    async with FakeHorde(checks_until_done=1) as fake:
        backend = make(session, fake.url + suffix, sleeps)
        assert await backend.list_models() == ["Deliberate", "stable_diffusion"]  # busiest first
        await backend.generate(REQ)
    assert fake.state.submits == 1


def test_defaults() -> None:
    assert normalise_url(None) == DEFAULT_URL == "https://aihorde.net/api/v2"
    assert normalise_url("https://aihorde.net") == DEFAULT_URL
    backend = HordeBackend(None)  # type: ignore[arg-type]
    caps = backend.capabilities
    assert caps.progress and caps.cancel and caps.nsfw_flag and not caps.preview
    assert max(max(size) for size in caps.sizes) <= 768
    assert backend.payload(REQ)["params"]["steps"] <= 30
    assert HordeBackend(None, steps=80).payload(REQ)["params"]["steps"] == 30  # type: ignore[arg-type]


async def test_cancel_during_submit_still_deletes_the_request(session, sleeps) -> None:
    async with FakeHorde(submit_delay=0.2, checks_until_done=10_000) as fake:
        task = asyncio.create_task(make(session, fake.url, sleeps).generate(REQ))
        await eventually(lambda: len(fake.state.submitted_ids) == 1)  # created, reply not yet sent
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake.state.deletes == 1
        assert fake.state.deleted_ids == fake.state.submitted_ids
        assert fake.state.checks == 0


async def test_base64_images_are_decoded_off_the_event_loop(session, sleeps, image_decoding) -> None:
    backend = HordeBackend(session, "http://127.0.0.1:9", retry=FAST_RETRY, sleep=sleeps)
    data = make_image(1, 64, 64)
    assert await backend._image_bytes(b64(data)) == data  # what the Horde sends with r2 off
    assert image_decoding.calls and image_decoding.on_loop == []
