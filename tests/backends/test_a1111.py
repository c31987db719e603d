"""A1111Backend against the fake A1111 server, over real HTTP."""

from __future__ import annotations

import asyncio
import io
import socket
from typing import Any

import aiohttp
import pytest
from PIL import Image

from bot.backends import http
from bot.backends.a1111 import A1111Backend
from bot.engine.errors import FailureReason, GenerationError
from bot.engine.models import ImageRequest, Progress
from bot.settings import SettingsError
from tests.backends.conftest import FAST_RETRY, RecordingSleep, eventually
from tests.fakes.a1111 import FakeA1111

REQ = ImageRequest(prompt="a lighthouse", negative_prompt="fog", width=512, height=512)


def make(session: aiohttp.ClientSession, url: str, sleeps: RecordingSleep, **kwargs: Any) -> A1111Backend:
    kwargs.setdefault("poll_interval_s", 0.02)
    return A1111Backend(session, url, retry=FAST_RETRY, sleep=sleeps, **kwargs)


async def test_success_payload_and_seeds_from_info_string(session, sleeps) -> None:
    async with FakeA1111() as fake:
        backend = make(session, fake.url, sleeps, model="sd_xl_base_1.0.safetensors [31e35c80fc]")
        images = await backend.generate(REQ.replace(count=2, seed=1234))
    assert [img.seed for img in images] == [1234, 1235]
    assert all(img.format == "PNG" and img.width == 512 for img in images)
    body = fake.state.last_payload
    assert body["force_task_id"].startswith("task(") and body["force_task_id"] == fake.state.task_ids[0]
    assert (body["prompt"], body["negative_prompt"]) == ("a lighthouse", "fog")
    assert (body["batch_size"], body["n_iter"], body["steps"], body["seed"]) == (2, 1, 25, 1234)
    assert body["override_settings"] == {"sd_model_checkpoint": "sd_xl_base_1.0.safetensors [31e35c80fc]"}
    assert backend.inflight == 0


async def test_random_seed_is_minus_one_and_reported_back(session, sleeps) -> None:
    async with FakeA1111() as fake:
        images = await make(session, fake.url, sleeps).generate(REQ)
    assert fake.state.last_payload["seed"] == -1
    assert "override_settings" not in fake.state.last_payload
    assert isinstance(images[0].seed, int) and images[0].seed >= 0


async def test_fresh_task_id_per_generation(session, sleeps) -> None:
    async with FakeA1111() as fake:
        backend = make(session, fake.url, sleeps)
        await backend.generate(REQ)
        await backend.generate(REQ)
    assert len(set(fake.state.task_ids)) == 2


async def test_grid_image_is_dropped(session, sleeps) -> None:
    async with FakeA1111(prepend_grid=True) as fake:
        images = await make(session, fake.url, sleeps).generate(REQ.replace(count=2, seed=5))
    assert len(images) == 2 and [i.seed for i in images] == [5, 6]
    assert all(i.width == 512 for i in images)


async def test_progress_with_previews_from_internal_progress(session, sleeps) -> None:
    seen: list[Progress] = []
    async with FakeA1111(delay=0.4) as fake:
        await make(session, fake.url, sleeps).generate(REQ, seen.append)
    assert fake.state.progress_polls >= 3
    assert fake.state.global_progress_polls == 0
    fractions = [p.fraction for p in seen if p.fraction is not None]
    assert fractions and all(0 <= f <= 1 for f in fractions)
    previews = [p.preview for p in seen if p.preview]
    assert previews, "expected at least one live preview"
    with Image.open(io.BytesIO(previews[0])) as preview:
        assert preview.format == "PNG"


@pytest.mark.parametrize("internal", [True, False], ids=["internal-progress", "global-progress"])
@pytest.mark.parametrize(
    "override",
    [
        {"progress": float("nan"), "eta": float("nan"), "eta_relative": float("nan")},
        {"progress": float("inf"), "eta": float("inf"), "eta_relative": float("inf")},
        {"progress": float("-inf"), "eta": -5.0, "eta_relative": float("-inf")},
        {"progress": 7.5, "eta": 1e300, "eta_relative": 1e300},
    ],
    ids=["nan", "inf", "negative", "huge"],
)
async def test_non_finite_progress_is_clamped_at_the_boundary(
    session, sleeps, override: dict[str, float], internal: bool
) -> None:
    seen: list[Progress] = []
    async with FakeA1111(delay=0.3, progress_override=override, internal_progress=internal) as fake:
        await make(session, fake.url, sleeps).generate(REQ, seen.append)
    assert fake.state.progress_polls + fake.state.global_progress_polls >= 2
    assert seen, "progress was reported"
    for progress in seen:
        assert progress.fraction is None or 0.0 <= progress.fraction <= 1.0, progress
        assert progress.eta_s is None or 0.0 <= progress.eta_s <= http.MAX_ETA_S, progress


async def test_queued_behind_another_job_reports_queue_position(session, sleeps) -> None:
    seen: list[Progress] = []
    async with FakeA1111(delay=0.3) as fake:
        foreign = asyncio.create_task(
            session.post(
                f"{fake.url}/sdapi/v1/txt2img", json={"prompt": "x", "force_task_id": "task(foreign)"}
            )
        )
        await eventually(lambda: fake.current == "task(foreign)")
        await make(session, fake.url, sleeps).generate(REQ, seen.append)
        (await foreign).release()
    assert any(p.queue_position == 1 for p in seen)


async def test_fallback_global_progress_only_when_our_job_is_alone(session, sleeps) -> None:
    async with FakeA1111(delay=0.3, internal_progress=False) as fake:
        backend = make(session, fake.url, sleeps)
        first = asyncio.create_task(backend.generate(REQ))
        second = asyncio.create_task(backend.generate(REQ))
        await eventually(lambda: fake.current is not None and len(fake.pending) == 1)
        await asyncio.sleep(0.15)  # several poll intervals with two of ours in flight
        assert fake.state.global_progress_polls == 0
        await asyncio.gather(first, second)
    assert fake.state.progress_polls >= 1  # it tried /internal/progress first (404)
    assert fake.state.global_progress_polls >= 1  # then polled the global one while alone


async def test_cancel_interrupts_our_active_generation(session, sleeps) -> None:
    async with FakeA1111(delay=5.0) as fake:
        task = asyncio.create_task(make(session, fake.url, sleeps).generate(REQ))
        await eventually(lambda: fake.current is not None)
        ours = fake.current
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert fake.state.interrupts == 1
        assert fake.state.interrupted_tasks == [ours]
        await eventually(lambda: fake.current is None, timeout=1.0)  # it really stopped early


async def test_cancel_does_not_interrupt_someone_elses_job(session, sleeps) -> None:
    async with FakeA1111(delay=0.4) as fake:
        foreign = asyncio.create_task(
            session.post(
                f"{fake.url}/sdapi/v1/txt2img", json={"prompt": "x", "force_task_id": "task(foreign)"}
            )
        )
        await eventually(lambda: fake.current == "task(foreign)")
        ours = asyncio.create_task(make(session, fake.url, sleeps).generate(REQ))
        await eventually(lambda: len(fake.pending) == 1)
        ours.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ours
        assert fake.state.interrupts == 0
        reply = await foreign
        assert reply.status == 200
        reply.release()
    assert fake.state.interrupted_tasks == []


async def test_cancel_in_fallback_mode_interrupts_when_alone(session, sleeps) -> None:
    async with FakeA1111(delay=5.0, internal_progress=False) as fake:
        task = asyncio.create_task(make(session, fake.url, sleeps).generate(REQ))
        await eventually(lambda: fake.current is not None)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert fake.state.interrupts == 1


async def test_basic_auth(session, sleeps) -> None:
    async with FakeA1111(require_auth="alice:s3cret-pw") as fake:
        images = await make(session, fake.url, sleeps, api_key="alice:s3cret-pw").generate(REQ)
        assert len(images) == 1
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps, api_key="alice:wrong-pw-42").generate(REQ)
    assert caught.value.reason is FailureReason.AUTH
    assert "wrong-pw-42" not in caught.value.message
    assert fake.state.auth_failures == 1


def test_key_without_colon_is_a_settings_error() -> None:
    with pytest.raises(SettingsError, match="user:password"):
        A1111Backend(None, "http://h:7860", api_key="justatoken")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("status", "body", "reason", "words"),
    [
        (404, {"detail": "Not Found"}, FailureReason.UNAVAILABLE, "--api"),
        (422, {"detail": [{"loc": ["body", "steps"], "msg": "value is not a valid integer"}]}, FailureReason.BAD_REQUEST, "steps"),
        (500, {"error": "OutOfMemoryError", "detail": "CUDA out of memory", "body": "", "errors": "CUDA out of memory. Tried to allocate 2.00 GiB"}, FailureReason.UNAVAILABLE, "CUDA out of memory"),
    ],
)  # fmt: skip
async def test_error_mapping_without_resubmitting(session, sleeps, status, body, reason, words) -> None:
    async with FakeA1111(fail_next=[(status, body)]) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is reason
    # What the operator reads; a member reads no flags or settings (only an A1111 422 is theirs to fix).
    assert words in (caught.value.advice or caught.value.message)
    assert "--api" not in caught.value.message and "IMAGE_BACKEND" not in caught.value.message
    assert fake.state.txt2img_calls == 1
    assert sleeps.calls == []


async def test_503_before_work_is_retried_once(session, sleeps) -> None:
    async with FakeA1111(fail_next=[(503, {"detail": "Service Unavailable"})]) as fake:
        images = await make(session, fake.url, sleeps).generate(REQ)
    assert len(images) == 1
    assert fake.state.txt2img_calls == 2 and fake.state.completed == 1
    assert len(sleeps.calls) == 1


async def test_read_timeout_after_submit_is_not_retried(session, sleeps) -> None:
    async with FakeA1111(delay=0.5) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps, request_timeout_s=0.15).generate(REQ)
        assert caught.value.reason is FailureReason.TIMEOUT
        await asyncio.sleep(0.1)
        assert fake.state.txt2img_calls == 1
    assert sleeps.calls == []


async def test_invalid_image_bytes(session, sleeps) -> None:
    async with FakeA1111(return_garbage=True) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.INVALID_IMAGE


@pytest.mark.parametrize("suffix", ["", "/", "/sdapi/v1", "/sdapi/v1/", "/sdapi"])
async def test_url_with_or_without_api_suffix(session, sleeps, suffix: str) -> None:
    async with FakeA1111() as fake:
        backend = make(session, fake.url + suffix, sleeps)
        assert await backend.list_models() == fake.state.models
        await backend.generate(REQ)
    assert fake.state.txt2img_calls == 1


async def test_connection_refused_before_send_is_retried(session) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = FakeA1111(port=port)

    async def start_server_on_first_backoff(_: float) -> None:
        if fake.port == port and fake._runner is None:
            await fake.start()

    sleeps = RecordingSleep(start_server_on_first_backoff)
    try:
        images = await make(session, f"http://127.0.0.1:{port}", sleeps).generate(REQ)
    finally:
        await fake.close()
    assert len(images) == 1
    assert len(sleeps.calls) == 1
    assert fake.state.txt2img_calls == 1


async def test_reply_parsing_and_base64_decoding_run_off_the_event_loop(
    session, sleeps, image_decoding
) -> None:
    async with FakeA1111() as fake:
        # No progress polls: only the txt2img reply is parsed and decoded.
        images = await make(session, fake.url, sleeps, poll_interval_s=60).generate(REQ.replace(count=2))
    assert len(images) == 2
    assert {name for name, _ in image_decoding.calls} == {"json", "base64"}
    assert image_decoding.on_loop == []
