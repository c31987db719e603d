"""OpenAIBackend against the fake OpenAI-compatible server, over real HTTP."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.backends.openai import OpenAIBackend
from bot.engine.errors import FailureReason, GenerationError
from bot.engine.models import ImageRequest
from tests.backends.conftest import FAST_RETRY, RecordingSleep
from tests.fakes.openai_api import FakeOpenAI

REQ = ImageRequest(prompt="a red fox", width=1024, height=1024)


def make(session: aiohttp.ClientSession, url: str, sleeps: RecordingSleep, **kwargs: Any) -> OpenAIBackend:
    return OpenAIBackend(session, url, retry=FAST_RETRY, sleep=sleeps, **kwargs)


def err(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


async def test_b64_json_reply(session, sleeps) -> None:
    async with FakeOpenAI() as fake:
        backend = make(session, fake.url, sleeps, api_key="sk-test", model="flux")
        images = await backend.generate(REQ.replace(count=2))
    assert len(images) == 2
    assert all(img.format == "PNG" for img in images)
    assert images[0].data != images[1].data  # coloured by seed
    assert fake.state.last_payload["response_format"] == "b64_json"
    assert fake.state.last_payload["model"] == "flux"
    assert fake.state.last_payload["n"] == 2
    assert fake.state.last_payload["size"] == "1024x1024"
    assert fake.state.last_authorization == "Bearer sk-test"
    assert fake.state.downloads == 0


async def test_absolute_url_reply_is_downloaded_through_the_session(session, sleeps) -> None:
    async with FakeOpenAI(reply_format="url") as fake:
        images = await make(session, fake.url, sleeps, api_key="sk-test").generate(REQ)
    assert images[0].format == "PNG"
    assert fake.state.downloads == 1
    assert fake.state.download_authorizations == ["Bearer sk-test"]  # same origin: key allowed


@pytest.mark.parametrize("suffix", ["", "/v1", "/v1/"])
async def test_relative_media_url_resolved_against_base(session, sleeps, suffix: str) -> None:
    async with FakeOpenAI(reply_format="media") as fake:
        images = await make(session, fake.url + suffix, sleeps).generate(REQ)
    assert len(images) == 1 and images[0].width == 64
    assert fake.state.generations == 1
    assert fake.state.downloads == 1


async def test_gpt_image_models_omit_response_format(session, sleeps) -> None:
    async with FakeOpenAI() as fake:
        images = await make(session, fake.url, sleeps, model="gpt-image-1").generate(REQ)
    assert "response_format" not in fake.state.last_payload
    assert images[0].format == "PNG"


async def test_gpt4free_extras_sent_and_seed_returned(session, sleeps) -> None:
    async with FakeOpenAI() as fake:
        backend = make(session, fake.url, sleeps)
        images = await backend.generate(REQ.replace(negative_prompt="blurry", seed=42))
    assert backend.capabilities.negative_prompt and backend.capabilities.seed
    body = fake.state.last_payload
    assert (body["negative_prompt"], body["seed"], body["width"], body["height"]) == (
        "blurry",
        42,
        1024,
        1024,
    )
    assert images[0].seed == 42


def test_openai_com_gets_no_extras() -> None:
    backend = OpenAIBackend(None, "https://api.openai.com/v1", api_key="k")  # type: ignore[arg-type]
    body = backend.payload(REQ.replace(negative_prompt="x", seed=1))
    assert "negative_prompt" not in body and "seed" not in body and "width" not in body
    assert not backend.capabilities.seed and not backend.capabilities.negative_prompt
    assert backend.capabilities.sizes == ((1024, 1024), (1536, 1024), (1024, 1536))


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (400, err("Your request was rejected by the safety system.", "invalid_request_error", "content_policy_violation"), FailureReason.CONTENT_REFUSED),
        (400, err("Request blocked by moderation.", "image_generation_user_error", "moderation_blocked"), FailureReason.CONTENT_REFUSED),
        (429, err("You exceeded your current quota.", "insufficient_quota", "insufficient_quota"), FailureReason.QUOTA),
        (404, err("The model 'nope' does not exist", "invalid_request_error", "model_not_found"), FailureReason.UNKNOWN_MODEL),
        (404, {"error": {"message": "Model not found: nope"}}, FailureReason.UNKNOWN_MODEL),  # gpt4free
        (422, {"detail": [{"loc": ["body", "n"], "msg": "ensure this value is less than 10"}]}, FailureReason.BAD_REQUEST),
        (400, err("Invalid size.", "invalid_request_error", "invalid_value"), FailureReason.BAD_REQUEST),
        (500, {"error": {"message": "Upstream provider rate limited"}}, FailureReason.UNAVAILABLE),
    ],
)  # fmt: skip
async def test_error_bodies_map_to_reasons_without_retry(session, sleeps, status, body, reason) -> None:
    async with FakeOpenAI(fail_next=[(status, body)]) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is reason
    assert caught.value.message  # a sentence, not a traceback
    assert "Traceback" not in caught.value.message
    assert fake.state.generations == 1  # never submitted twice
    assert sleeps.calls == []


async def test_wrong_key_is_auth_and_key_never_in_message(session, sleeps) -> None:
    key = "sk-wrong-secret-123456"
    async with FakeOpenAI(require_key="sk-right", fail_next=[]) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps, api_key=key).generate(REQ)
    assert caught.value.reason is FailureReason.AUTH
    assert key not in caught.value.message and key not in repr(caught.value)


async def test_server_message_echoing_the_key_is_scrubbed(session, sleeps) -> None:
    key = "sk-leaky-secret-987"
    body = err(f"bad request for key {key}", "invalid_request_error", None)
    async with FakeOpenAI(fail_next=[(400, body)]) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps, api_key=key).generate(REQ)
    assert key not in caught.value.message
    assert "***" in caught.value.message


async def test_rate_limit_exceeded_is_retried_honouring_retry_after(session, sleeps) -> None:
    limited = (429, err("Rate limit reached", "requests", "rate_limit_exceeded"), {"Retry-After": "2"})
    async with FakeOpenAI(fail_next=[limited, limited]) as fake:
        images = await make(session, fake.url, sleeps).generate(REQ)
    assert len(images) == 1
    assert sleeps.calls == [2.0, 2.0]
    assert fake.state.generations == 3


async def test_rate_limit_exhausted_is_rate_limited(session, sleeps) -> None:
    limited = (429, err("Rate limit reached", "requests", "rate_limit_exceeded"))
    async with FakeOpenAI(fail_next=[limited] * 5) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.RATE_LIMITED
    assert fake.state.generations == 3
    assert len(sleeps.calls) == 2


async def test_503_is_retried(session, sleeps) -> None:
    async with FakeOpenAI(
        fail_next=[(503, err("The engine is currently overloaded", "server_error", None))]
    ) as fake:
        images = await make(session, fake.url, sleeps).generate(REQ)
    assert len(images) == 1
    assert fake.state.generations == 2 and len(sleeps.calls) == 1


@pytest.mark.parametrize("reply_format", ["b64_json", "media"])
async def test_bytes_that_are_not_an_image(session, sleeps, reply_format: str) -> None:
    async with FakeOpenAI(return_garbage=True, reply_format=reply_format) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.INVALID_IMAGE


async def test_unknown_model_via_known_models(session, sleeps) -> None:
    async with FakeOpenAI(known_models=["flux"]) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps, model="nope").generate(REQ)
        assert await make(session, fake.url, sleeps).list_models() == ["flux"]
    assert caught.value.reason is FailureReason.UNKNOWN_MODEL


async def test_unreachable_server_is_unavailable_after_bounded_retries(session, sleeps) -> None:
    async with FakeOpenAI() as fake:
        url = fake.url
    with pytest.raises(GenerationError) as caught:
        await make(session, url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.UNAVAILABLE
    assert len(sleeps.calls) == FAST_RETRY.attempts - 1


async def test_reply_parsing_and_base64_decoding_run_off_the_event_loop(
    session, sleeps, image_decoding
) -> None:
    async with FakeOpenAI(reply_format="b64_json") as fake:
        images = await make(session, fake.url, sleeps).generate(REQ.replace(count=2))
    assert len(images) == 2
    assert {name for name, _ in image_decoding.calls} == {"json", "base64"}
    assert image_decoding.on_loop == []


async def test_a_server_that_ignores_n_is_asked_again_for_the_rest(session, sleeps) -> None:
    async with FakeOpenAI(ignore_n=True) as fake:
        images = await make(session, fake.url, sleeps).generate(REQ.replace(count=4, seed=7))
    assert len(images) == 4
    assert [p["n"] for p in fake.state.payloads] == [4, 3, 2, 1]  # one call after another, for the rest
    assert [p["seed"] for p in fake.state.payloads] == [7, 8, 9, 10]  # each a new picture
    assert [img.seed for img in images] == [7, 8, 9, 10]
    assert len({img.data for img in images}) == 4
    assert sleeps.calls == []


async def test_a_server_that_refuses_n_above_one_is_asked_one_at_a_time(session, sleeps) -> None:
    async with FakeOpenAI(max_n=1) as fake:
        backend = make(session, fake.url, sleeps, model="dall-e-3")
        images = await backend.generate(REQ.replace(count=4))
        assert len(images) == 4
        assert [p["n"] for p in fake.state.payloads] == [4, 1, 1, 1, 1]
        fake.state.payloads.clear()
        assert len(await backend.generate(REQ.replace(count=2))) == 2
        assert [p["n"] for p in fake.state.payloads] == [1, 1]  # remembered: no refused call again


async def test_max_count_per_call_says_one_up_front(session, sleeps) -> None:
    async with FakeOpenAI(max_n=1) as fake:
        images = await make(session, fake.url, sleeps, max_count_per_call=1).generate(REQ.replace(count=3))
    assert len(images) == 3 and [p["n"] for p in fake.state.payloads] == [1, 1, 1]


async def test_a_400_not_about_n_is_not_retried_with_one(session, sleeps) -> None:
    body = err("Invalid size: 999x999.", "invalid_request_error", "invalid_value")
    async with FakeOpenAI(fail_next=[(400, body)]) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ.replace(count=2))
    assert caught.value.reason is FailureReason.BAD_REQUEST
    assert fake.state.generations == 1


async def test_media_urls_work_across_follow_up_calls(session, sleeps) -> None:
    async with FakeOpenAI(ignore_n=True, reply_format="media") as fake:
        images = await make(session, fake.url + "/v1", sleeps).generate(REQ.replace(count=2))
    assert len(images) == 2 and fake.state.downloads == 2


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        ("RateLimitError: Rate limit exceeded for this provider", "upstream is rate limiting it; try again"),
        ("ResponseStatusError: Response 429: Too Many Requests", "upstream is rate limiting it; try again"),
        ("MissingAuthError: Add a .har file", "(HTTP 500): MissingAuthError: Add a .har file"),
        ('Traceback (most recent call last):\n  File "g4f/api.py", line 9\nValueError: Model is busy', "(HTTP 500): ValueError: Model is busy"),
    ],
)  # fmt: skip
async def test_gpt4free_500_bodies_become_clear_messages(session, sleeps, message, shown) -> None:
    failures = [(500, {"error": {"message": message}, "model": "flux", "provider": "PollinationsAI"})] * 3
    async with FakeOpenAI(fail_next=failures) as fake:
        with pytest.raises(GenerationError) as caught:
            await make(session, fake.url, sleeps).generate(REQ)
    assert caught.value.reason is FailureReason.UNAVAILABLE
    assert shown in caught.value.message and "Traceback" not in caught.value.message
    assert "File " not in caught.value.message
    assert fake.state.generations == 1  # a 500 to a generation is never sent twice


def test_image_sizes_replace_the_sizes_of_every_kind(session) -> None:
    from bot.backends import create_backend
    from bot.settings import load_settings

    for kind in ("openai", "a1111", "horde", "comfyui"):
        settings = load_settings(
            env_file=None,
            image_backend=kind,
            image_backend_url="http://127.0.0.1:9",
            image_sizes="768x512, 512x512,1024x1024",
        )
        backend = create_backend(settings, session)
        assert backend.capabilities.sizes == ((768, 512), (512, 512), (1024, 1024)), kind
    default = create_backend(
        load_settings(env_file=None, image_backend="openai", image_backend_url="http://h"), session
    )
    assert default.capabilities.sizes == ((1024, 1024), (1536, 1024), (1024, 1536))


def test_image_max_count_per_call_reaches_the_openai_backend(session) -> None:
    from bot.backends import create_backend
    from bot.settings import load_settings

    settings = load_settings(
        env_file=None, image_backend="openai", image_backend_url="http://h", image_max_count_per_call="1"
    )
    assert create_backend(settings, session).max_count_per_call == 1


class FailsAfterOneOpenAI(FakeOpenAI):
    """gpt4free's one image per call, then an upstream failure for every later call."""

    async def generate(self, request: web.Request) -> web.Response:
        if self.state.generations >= 1:
            self.state.generations += 1
            return web.json_response({"error": {"message": "upstream failed"}}, status=500)
        return await super().generate(request)


async def test_a_failed_follow_up_call_keeps_the_images_already_made(session, sleeps) -> None:
    async with FailsAfterOneOpenAI(ignore_n=True) as fake:
        images = await make(session, fake.url, sleeps).generate(REQ.replace(count=3))
    assert len(images) == 1 and fake.state.generations == 2


async def test_a_failed_first_call_is_the_jobs_failure(session, sleeps) -> None:
    async with FakeOpenAI(fail_next=[(500, {"error": {"message": "upstream failed"}})]) as fake:
        with pytest.raises(GenerationError):
            await make(session, fake.url, sleeps).generate(REQ.replace(count=3))
    assert fake.state.generations == 1
