"""Image backends behind one interface, built from the settings by :func:`create_backend`."""

from __future__ import annotations

import asyncio
import dataclasses
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
    Raises :class:`bot.settings.SettingsError` for a key the backend cannot use (A1111 wants ``user:pass``)
    or a ComfyUI workflow file that cannot be used. ``IMAGE_SIZES`` replaces the sizes of any kind.
    """
    backend = _create(
        settings, session, sleep=sleep, clock=clock, retry=retry, poll_interval_s=poll_interval_s
    )
    if settings.image_sizes:
        backend.capabilities = dataclasses.replace(backend.capabilities, sizes=tuple(settings.image_sizes))
    return backend


def _create(
    settings: Settings,
    session: aiohttp.ClientSession,
    *,
    sleep: Sleep,
    clock: Clock,
    retry: RetryPolicy | None,
    poll_interval_s: float | None,
) -> Backend:
    key = (
        settings.image_backend_api_key.get_secret_value().strip() if settings.image_backend_api_key else None
    )
    key = key or None
    model = settings.image_model
    if settings.image_backend == "openai":
        from bot.backends.openai import OpenAIBackend

        assert settings.image_backend_url is not None  # Settings requires it for openai
        return OpenAIBackend(
            session,
            settings.image_backend_url,
            api_key=key,
            model=model,
            max_count_per_call=settings.image_max_count_per_call,
            retry=retry,
            sleep=sleep,
        )
    if settings.image_backend == "comfyui":
        from bot.backends.comfyui import ComfyUIBackend, Workflow

        assert settings.image_backend_url is not None  # Settings defaults it for comfyui
        workflow = Workflow.load(settings.comfyui_workflow) if settings.comfyui_workflow else None
        return ComfyUIBackend(
            session,
            settings.image_backend_url,
            api_key=key,
            model=model,
            workflow=workflow,
            defaults=settings.comfyui_defaults,
            client_id_path=settings.data_dir / "comfyui-client-id",
            retry=retry,
            sleep=sleep,
            **({"poll_interval_s": poll_interval_s} if poll_interval_s is not None else {}),
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
