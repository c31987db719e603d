"""Fixtures for backend tests: one real ClientSession per test, a recording sleep, fast retry policy."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest

from bot.backends.http import RetryPolicy

FAST_RETRY = RetryPolicy(attempts=3, base_delay_s=0.01, max_delay_s=0.05, max_total_wait_s=30.0)


class RecordingSleep:
    """Stands in for asyncio.sleep in retry backoff: records the delay, yields once, never waits."""

    def __init__(self, on_call: Callable[[float], Awaitable[None]] | None = None) -> None:
        self.calls: list[float] = []
        self.on_call = on_call

    async def __call__(self, delay: float) -> None:
        self.calls.append(delay)
        if self.on_call is not None:
            await self.on_call(delay)
        await asyncio.sleep(0)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def sleeps() -> RecordingSleep:
    return RecordingSleep()


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until ``predicate()`` holds (the fakes change state from their own handlers)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


class OnLoopRecorder:
    """Records, for each call of the wrapped functions, whether it ran on the event loop's (main) thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []

    def wrap(self, name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*args: object, **kwargs: object) -> object:
            self.calls.append((name, threading.current_thread() is threading.main_thread()))
            return fn(*args, **kwargs)

        return wrapper

    @property
    def on_loop(self) -> list[str]:
        return [name for name, on_loop in self.calls if on_loop]


@pytest.fixture
def image_decoding(monkeypatch: pytest.MonkeyPatch) -> OnLoopRecorder:
    """Where the backends parse image-carrying JSON and decode base64: never on the event loop."""
    from bot.backends import http

    recorder = OnLoopRecorder()
    monkeypatch.setattr(http, "decode_base64_image", recorder.wrap("base64", http.decode_base64_image))
    monkeypatch.setattr(http.HttpReply, "json_object", recorder.wrap("json", http.HttpReply.json_object))
    return recorder
