"""Each backend's health probe (what a pool's circuit breaker asks before taking a backend back), against its
wire-level fake: answered while the server is up, a clear GenerationError while it is down, and up again after
it restarts on the same port."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from bot.backends.a1111 import A1111Backend
from bot.backends.comfyui import ComfyUIBackend
from bot.backends.horde import HordeBackend
from bot.backends.openai import OpenAIBackend
from bot.engine.backend import Backend
from bot.engine.errors import FailureReason, GenerationError
from tests.backends.conftest import FAST_RETRY
from tests.fakes._common import FakeServer
from tests.fakes.a1111 import FakeA1111
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.horde import FakeHorde
from tests.fakes.openai_api import FakeOpenAI

Make = Callable[[aiohttp.ClientSession, str], Backend]


def _horde(session: aiohttp.ClientSession, url: str) -> Backend:
    return HordeBackend(session, url, retry=FAST_RETRY)


def _a1111(session: aiohttp.ClientSession, url: str) -> Backend:
    return A1111Backend(session, url, retry=FAST_RETRY)


def _openai(session: aiohttp.ClientSession, url: str) -> Backend:
    return OpenAIBackend(session, url, retry=FAST_RETRY)


def _comfyui(session: aiohttp.ClientSession, url: str) -> Backend:
    return ComfyUIBackend(session, url, retry=FAST_RETRY)


KINDS: list[tuple[str, type[FakeServer], Make, str]] = [
    ("horde", FakeHorde, _horde, "/api/v2/status/heartbeat"),
    ("a1111", FakeA1111, _a1111, "/sdapi/v1/options"),
    ("openai", FakeOpenAI, _openai, "/v1/models"),
    ("comfyui", FakeComfyUI, _comfyui, "/system_stats"),
]


@pytest.mark.parametrize(("kind", "fake_type", "make", "path"), KINDS, ids=[k[0] for k in KINDS])
async def test_probe_answers_while_up_fails_clearly_while_down_and_heals(
    session: aiohttp.ClientSession, kind: str, fake_type: type[FakeServer], make: Make, path: str
) -> None:
    seen: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        seen.append(request.path)
        return await handler(request)

    fake: Any = fake_type()
    fake.app.middlewares.append(record)  # before the first start freezes the app
    async with fake:
        backend = make(session, fake.url)
        await backend.probe()
        assert path in seen  # its own cheap health request, not a generation
        assert not any(p.endswith(("/generate/async", "/txt2img", "/prompt", "/generations")) for p in seen)

        await fake.kill()
        with pytest.raises(GenerationError) as down:
            await backend.probe()
        assert down.value.reason is FailureReason.UNAVAILABLE
        assert "Traceback" not in down.value.message

        await fake.start()  # back on the same port
        await backend.probe()
