"""Image backends behind one interface, built from the settings by :func:`create_backend`."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import aiohttp

from bot.backends.http import Clock, RetryPolicy, Sleep
from bot.engine.backend import Backend, Capabilities, ProgressCallback
from bot.engine.catalog import ModelCatalog
from bot.engine.pool import BackendPool, PoolEntry
from bot.settings import BackendEntry, Settings

__all__ = ["Backend", "Capabilities", "ProgressCallback", "create_backend", "create_pool"]


def create_backend(
    settings: Settings,
    session: aiohttp.ClientSession,
    *,
    sleep: Sleep = asyncio.sleep,
    clock: Clock = time.monotonic,
    retry: RetryPolicy | None = None,
    poll_interval_s: float | None = None,
    entry: BackendEntry | None = None,
) -> Backend:
    """The backend ``IMAGE_BACKEND`` names (or one ``IMAGE_BACKENDS`` entry), talking through the one shared
    ``session``.

    ``sleep`` (retry backoff), ``clock`` (Horde rate limiter), ``retry`` and ``poll_interval_s`` exist for tests.
    Raises :class:`bot.settings.SettingsError` for a key the backend cannot use (A1111 wants ``user:pass``)
    or a ComfyUI workflow file that cannot be used. ``IMAGE_SIZES`` (an entry's ``sizes``) replaces the sizes
    of any kind.
    """
    entry = entry or settings.backend_entries()[0]
    backend = _create(
        settings, entry, session, sleep=sleep, clock=clock, retry=retry, poll_interval_s=poll_interval_s
    )
    if entry.sizes:
        backend.capabilities = dataclasses.replace(backend.capabilities, sizes=tuple(entry.sizes))
    return backend


def create_pool(
    settings: Settings,
    session: aiohttp.ClientSession,
    *,
    retry: RetryPolicy | None = None,
    poll_interval_s: float | None = None,
    probe_interval_s: float | None = None,
) -> BackendPool:
    """Every backend the settings name, as a pool: ``IMAGE_BACKENDS``, or ``IMAGE_BACKEND`` as a pool of one.

    A pool entry without ``models`` serves what its backend lists (or only the default model); the catalogs
    start with the service (``ModelCatalog.start``).
    """
    entries = settings.backend_entries()
    many = len(entries) > 1 or bool(settings.image_backends)
    pool_entries = []
    for entry in entries:
        backend = create_backend(settings, session, retry=retry, poll_interval_s=poll_interval_s, entry=entry)
        catalog = (
            ModelCatalog(backend, configured=entry.models, default=backend.default_model()) if many else None
        )
        pool_entries.append(PoolEntry(entry.name, backend, entry.concurrency, catalog=catalog))
    if not many:
        return BackendPool.single(pool_entries[0].backend, entries[0].concurrency)
    return BackendPool(pool_entries, **({"probe_interval_s": probe_interval_s} if probe_interval_s else {}))


def _create(
    settings: Settings,
    entry: BackendEntry,
    session: aiohttp.ClientSession,
    *,
    sleep: Sleep,
    clock: Clock,
    retry: RetryPolicy | None,
    poll_interval_s: float | None,
) -> Backend:
    key = entry.api_key.get_secret_value().strip() if entry.api_key else None
    key = key or None
    model = settings.image_model
    kind, url = entry.kind, entry.url
    if kind == "openai":
        from bot.backends.openai import OpenAIBackend

        assert url is not None  # Settings requires it for openai
        return OpenAIBackend(
            session,
            url,
            api_key=key,
            model=model,
            max_count_per_call=entry.max_count_per_call,
            retry=retry,
            sleep=sleep,
        )
    if kind == "comfyui":
        from bot.backends.comfyui import ComfyUIBackend, Workflow

        assert url is not None  # Settings defaults it for comfyui
        workflow = Workflow.load(entry.workflow) if entry.workflow else None
        # Each ComfyUI of a pool gets its own persisted client id (a restart reconnects as the same client).
        client_id = "comfyui-client-id" if not settings.image_backends else f"comfyui-client-id-{entry.name}"
        return ComfyUIBackend(
            session,
            url,
            api_key=key,
            model=model,
            workflow=workflow,
            defaults=settings.comfyui_defaults,
            client_id_path=settings.data_dir / client_id,
            retry=retry,
            sleep=sleep,
            **({"poll_interval_s": poll_interval_s} if poll_interval_s is not None else {}),
        )
    if kind == "a1111":
        from bot.backends.a1111 import A1111Backend

        assert url is not None  # Settings requires it for a1111
        return A1111Backend(
            session,
            url,
            api_key=key,
            model=model,
            retry=retry,
            sleep=sleep,
            **({"poll_interval_s": poll_interval_s} if poll_interval_s is not None else {}),
        )
    if kind == "horde":
        from bot.backends.horde import HordeBackend

        return HordeBackend(
            session,
            url,
            api_key=key,
            model=model,
            retry=retry,
            sleep=sleep,
            clock=clock,
            **({"poll_interval_s": poll_interval_s} if poll_interval_s is not None else {}),
        )
    raise ValueError(f"unknown image backend {kind!r}")
