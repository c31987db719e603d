"""Shared plumbing for the wire-level fakes: an aiohttp server usable in-process or standalone.

In-process: ``async with FakeX(**knobs) as fake: fake.url, fake.state``. Standalone:
``python -m tests.fakes.<name> --port N [--host H] [--delay S]``; every fake then also answers
``GET /_fake/state`` (counters and knobs as JSON), ``POST /_fake/config`` (``{"knob": value}``) and
``POST /_fake/reset`` (zero the counters), so a test driving the bot as a subprocess can steer and observe it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import io
import logging
import signal
import zlib
from collections.abc import Callable
from typing import Any, ClassVar

from aiohttp import web
from PIL import Image

log = logging.getLogger(__name__)


def color_for(seed: int) -> tuple[int, int, int]:
    """A colour that differs by seed, so tests (and eyes) can tell images apart."""
    h = zlib.crc32(str(seed).encode())
    return (h & 0xFF, (h >> 8) & 0xFF, (h >> 16) & 0xFF)


def make_image(seed: int, width: int = 64, height: int = 64, fmt: str = "PNG") -> bytes:
    """A real, decodable image (PNG or WEBP) coloured by ``seed``; sizes are capped to keep fakes fast."""
    width, height = max(8, min(int(width), 2048)), max(8, min(int(height), 2048))
    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), color_for(seed))
    if fmt.upper() == "WEBP":
        image.save(buffer, format="WEBP", quality=50)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def json_error(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(body, status=status, headers=headers)


def pop_failure(queue: list[Any]) -> web.Response | None:
    """Pop a queued ``(status, body[, headers])`` failure, if any, as a response."""
    if not queue:
        return None
    item = queue.pop(0)
    status, body = int(item[0]), item[1]
    headers = {str(k): str(v) for k, v in item[2].items()} if len(item) > 2 and item[2] else None
    return json_error(status, body, headers)


class FakeServer:
    """Base class: subclasses define ``State`` (a dataclass of counters and knobs) and ``setup_routes``."""

    #: Names of ``state`` fields ``POST /_fake/config`` may set.
    KNOBS: ClassVar[frozenset[str]] = frozenset()
    state: Any

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.closing = False
        self.app = web.Application(client_max_size=8 * 1024 * 1024)
        self.app.router.add_get("/_fake/state", self._get_state)
        self.app.router.add_post("/_fake/config", self._post_config)
        self.app.router.add_post("/_fake/reset", self._post_reset)
        self.setup_routes(self.app)
        self._runner: web.AppRunner | None = None

    def setup_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def configure(self, **knobs: Any) -> None:
        unknown = set(knobs) - self.KNOBS
        if unknown:
            raise ValueError(f"unknown knobs: {', '.join(sorted(unknown))}")
        for name, value in knobs.items():
            if name.startswith("fail_next") and value is not None:
                value = [tuple(item) for item in value]
            setattr(self.state, name, value)

    def reset_counters(self) -> None:
        fresh = type(self.state)()
        for f in dataclasses.fields(self.state):
            if f.name not in self.KNOBS:
                setattr(self.state, f.name, getattr(fresh, f.name))

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self.state):
            value = getattr(self.state, f.name)
            if isinstance(value, set):
                value = sorted(value)
            elif isinstance(value, bytes):
                continue
            out[f.name] = value
        return out

    async def _get_state(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot())

    async def _post_config(self, request: web.Request) -> web.Response:
        try:
            knobs = await request.json()
            self.configure(**knobs)
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(self.snapshot())

    async def _post_reset(self, request: web.Request) -> web.Response:
        self.reset_counters()
        return web.json_response(self.snapshot())

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen (again, after :meth:`close`: on the same port, a restarted server)."""
        self.closing = False
        self._runner = web.AppRunner(self.app, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def close(self) -> None:
        self.closing = True
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def kill(self) -> None:
        """Die like a crashed server: stop listening and drop the connections of requests in progress (their
        handlers are cancelled, nothing is answered). :meth:`start` brings it back on the same port."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()  # stops listening; cancels what still runs after shutdown_timeout

    async def __aenter__(self) -> FakeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def run_standalone(factory: Callable[[argparse.Namespace], FakeServer], description: str) -> None:
    """``python -m tests.fakes.<name> --port N [--host H] [--delay S]``: serve until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each generation takes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def serve() -> None:
        fake = factory(args)
        await fake.start()
        print(f"{type(fake).__name__} listening on {fake.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await fake.close()

    asyncio.run(serve())
