"""Image backends behind one interface, built from the settings by :func:`create_backend`."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from bot.backends.http import Clock, RetryPolicy, Sleep
from bot.engine.backend import Backend, Capabilities, ProgressCallback
from bot.settings import Settings

__all__ = ["Backend", "Capabilities", "ProgressCallback", "create_backend"]


def create_backend(
    settings: Settings,
    session: aiohttp.ClientSession,
    *,
    sleep: Sleep = asyncio.sleep,
    clock: Clock = time.monotonic,
    retry: RetryPolicy | None = None,
    poll_interval_s: float | None = None,
) -> Backend:
    """The backend ``IMAGE_BACKEND`` names, talking through the one shared ``session``.

    ``sleep`` (retry backoff), ``clock`` (Horde rate limiter), ``retry`` and ``poll_interval_s`` exist for tests.
    Raises :class:`bot.settings.SettingsError` for a key the backend cannot use (A1111 wants ``user:pass``).
    """
    key = (
        settings.image_backend_api_key.get_secret_value().strip() if settings.image_backend_api_key else None
    )
    key = key or None
    model = settings.image_model
    if settings.image_backend == "openai":
        from bot.backends.openai import OpenAIBackend

        assert settings.image_backend_url is not None  # Settings requires it for openai
        return OpenAIBackend(
            session, settings.image_backend_url, api_key=key, model=model, retry=retry, sleep=sleep
        )
    if settings.image_backend == "a1111":
        from bot.backends.a1111 import A1111Backend

        assert settings.image_backend_url is not None  # Settings requires it for a1111
        return A1111Backend(
            session,
            settings.image_backend_url,
            api_key=key,
            model=model,
            retry=retry,
            sleep=sleep,
            **({"poll_interval_s": poll_interval_s} if poll_interval_s is not None else {}),
        )
    if settings.image_backend == "horde":
        from bot.backends.horde import HordeBackend

        return HordeBackend(
            session,
            settings.image_backend_url,
            api_key=key,
            model=model,
            retry=retry,
            sleep=sleep,
            clock=clock,
            **({"poll_interval_s": poll_interval_s} if poll_interval_s is not None else {}),
        )
    raise ValueError(f"unknown image backend {settings.image_backend!r}")
