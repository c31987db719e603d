"""A fake AUTOMATIC1111 / Forge API speaking the real protocol.

``POST /sdapi/v1/txt2img`` (honours ``force_task_id``; ``info`` is a JSON *string*), one generation at a time
behind a global lock, ``POST /internal/progress`` per task id (live previews as data URLs),
``GET /sdapi/v1/progress`` (global), ``POST /sdapi/v1/interrupt`` (ends the running generation early with a
partial image, like the real server), ``GET /sdapi/v1/sd-models``, ``GET /sdapi/v1/options`` (a few of the
WebUI's options: what health checks ask), optional HTTP Basic auth on ``/sdapi``. ``active`` / ``max_active``
count txt2img requests open at once (waiting for the lock included): what a client's concurrency limit bounds.

Standalone: ``python -m tests.fakes.a1111 --port 7860 [--delay 2]``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes._common import FakeServer, b64, make_image, pop_failure, run_standalone

DEFAULT_MODELS = ["v1-5-pruned-emaonly.safetensors [6ce0161689]", "sd_xl_base_1.0.safetensors [31e35c80fc]"]


@dataclass
class A1111State:
    # counters
    txt2img_calls: int = 0
    completed: int = 0
    interrupts: int = 0
    interrupted_tasks: list[str] = field(default_factory=list)
    progress_polls: int = 0  # /internal/progress
    global_progress_polls: int = 0  # /sdapi/v1/progress
    task_ids: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # of every txt2img that reached the server
    last_payload: dict[str, Any] | None = None
    auth_failures: int = 0
    options_calls: int = 0
    active: int = 0  # txt2img requests open now (running or waiting for the lock)
    max_active: int = 0
    # knobs
    delay: float = 0.0
    fail_next: list[Any] = field(default_factory=list)  # (status, json body[, headers]) for txt2img
    return_garbage: bool = False
    require_auth: str | None = None  # "user:pass"
    internal_progress: bool = True  # False: /internal/progress answers 404 (older forks)
    prepend_grid: bool = False
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    #: Replace fields of the progress replies while a generation runs, e.g. ``{"progress": float("nan")}``
    #: (aiohttp's json_response writes ``NaN``/``Infinity`` like Python's json, and A1111's own encoder).
    progress_override: dict[str, Any] = field(default_factory=dict)
    model_list_calls: int = 0
    fail_model_list: int = 0  # answer the next N model-list requests with a 500


class FakeA1111(FakeServer):
    KNOBS: ClassVar[frozenset[str]] = frozenset(
        {
            "delay",
            "fail_next",
            "return_garbage",
            "require_auth",
            "internal_progress",
            "prepend_grid",
            "models",
            "progress_override",
            "fail_model_list",
        }
    )

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> None:
        self.state = A1111State()
        super().__init__(host=host, port=port)
        self.configure(**knobs)
        self._lock = asyncio.Lock()
        self.current: str | None = None
        self.pending: dict[str, float] = {}
        self.finished: set[str] = set()
        self._started = 0.0
        self._progress = 0.0
        self._interrupt = False
        self._preview_id = 0
        self._steps = 20
        self._step = 0

    def setup_routes(self, app: web.Application) -> None:
        app.router.add_post("/sdapi/v1/txt2img", self.txt2img)
        app.router.add_post("/internal/progress", self.internal_progress)
        app.router.add_get("/sdapi/v1/progress", self.global_progress)
        app.router.add_post("/sdapi/v1/interrupt", self.interrupt)
        app.router.add_get("/sdapi/v1/sd-models", self.sd_models)
        app.router.add_get("/sdapi/v1/options", self.options)

    def _auth_failed(self, request: web.Request) -> web.Response | None:
        if not self.state.require_auth:
            return None
        header = request.headers.get("Authorization", "")
        expected = "Basic " + base64.b64encode(self.state.require_auth.encode()).decode()
        if header == expected:
            return None
        self.state.auth_failures += 1
        return web.json_response(
            {"detail": "Incorrect username or password"}, status=401, headers={"WWW-Authenticate": "Basic"}
        )

    async def options(self, request: web.Request) -> web.Response:
        if (denied := self._auth_failed(request)) is not None:
            return denied
        self.state.options_calls += 1
        return web.json_response({"sd_model_checkpoint": self.state.models[0] if self.state.models else None})

    async def txt2img(self, request: web.Request) -> web.Response:
        self.state.active += 1
        self.state.max_active = max(self.state.max_active, self.state.active)
        try:
            return await self._txt2img(request)
        finally:
            self.state.active -= 1

    async def _txt2img(self, request: web.Request) -> web.Response:
        if (denied := self._auth_failed(request)) is not None:
            return denied
        self.state.txt2img_calls += 1
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response({"detail": [{"loc": ["body"], "msg": "invalid JSON"}]}, status=422)
        self.state.last_payload = payload
        if isinstance(payload, dict) and isinstance(payload.get("prompt"), str):
            self.state.prompts.append(payload["prompt"])
        if (failure := pop_failure(self.state.fail_next)) is not None:
            return failure
        width, height = payload.get("width", 512), payload.get("height", 512)
        if (
            not isinstance(width, int)
            or not isinstance(height, int)
            or not isinstance(payload.get("prompt"), str)
        ):
            return web.json_response(
                {"detail": [{"loc": ["body", "width"], "msg": "value is not a valid integer"}]}, status=422
            )
        task_id = payload.get("force_task_id") or f"task({uuid.uuid4().hex})"
        self.state.task_ids.append(task_id)
        self.pending[task_id] = time.monotonic()
        async with self._lock:  # one generation at a time, like the real server
            self.pending.pop(task_id, None)
            self.current = task_id
            self._started = time.monotonic()
            self._progress = 0.0
            self._interrupt = False
            self._steps = int(payload.get("steps") or 20)
            self._step = 0
            interrupted = False
            try:
                while not self.closing:
                    elapsed = time.monotonic() - self._started
                    delay = self.state.delay
                    if delay <= 0 or elapsed >= delay:
                        break
                    if self._interrupt:
                        interrupted = True
                        break
                    self._progress = elapsed / delay
                    step = int(self._progress * self._steps)
                    if step != self._step:
                        self._step = step
                        self._preview_id += 1
                    await asyncio.sleep(min(0.01, delay / 20))
            finally:
                self.current = None
                self.finished.add(task_id)
        self.state.completed += 1
        count = int(payload.get("batch_size") or 1) * int(payload.get("n_iter") or 1)
        seed = payload.get("seed", -1)
        if not isinstance(seed, int) or seed < 0:
            seed = random.randint(0, 2**32 - 1)
        seeds = [seed + i for i in range(count)]
        if self.state.return_garbage:
            images = [b64(b"this is not a png") for _ in seeds]
        else:
            # An interrupted generation returns what it had (a "partial" image), as the real server does.
            images = [b64(make_image(s + (7 if interrupted else 0), width, height)) for s in seeds]
        if self.state.prepend_grid and count > 1:
            images.insert(0, b64(make_image(0, 32, 32)))
        info = {
            "prompt": payload.get("prompt"),
            "all_prompts": [payload.get("prompt")] * count,
            "negative_prompt": payload.get("negative_prompt", ""),
            "seed": seed,
            "all_seeds": seeds,
            "subseed": -1,
            "width": width,
            "height": height,
            "sampler_name": payload.get("sampler_name"),
            "cfg_scale": payload.get("cfg_scale"),
            "steps": payload.get("steps"),
            "batch_size": count,
            "sd_model_name": (payload.get("override_settings") or {}).get("sd_model_checkpoint"),
            "infotexts": [f"{payload.get('prompt')}\nSeed: {s}" for s in seeds],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        }
        return web.json_response({"images": images, "parameters": payload, "info": json.dumps(info)})

    def _preview_data_url(self) -> str:
        return "data:image/png;base64," + b64(make_image(self._preview_id, 16, 16))

    async def internal_progress(self, request: web.Request) -> web.Response:
        self.state.progress_polls += 1
        if not self.state.internal_progress:
            return web.json_response({"detail": "Not Found"}, status=404)
        body = await request.json()
        task_id = body.get("id_task")
        active = task_id is not None and task_id == self.current
        queued = task_id in self.pending
        completed = task_id in self.finished
        if not active:
            text = "Waiting..."
            if queued:
                order = sorted(self.pending, key=lambda k: self.pending[k])
                text = f"In queue: {order.index(task_id) + 1}/{len(order)}"
            return web.json_response(
                {
                    "active": False,
                    "queued": queued,
                    "completed": completed,
                    "progress": None,
                    "eta": None,
                    "live_preview": None,
                    "id_live_preview": -1,
                    "textinfo": text,
                }
            )
        elapsed = time.monotonic() - self._started
        eta = elapsed / self._progress - elapsed if self._progress > 0 else None
        live_preview = None
        preview_id = body.get("id_live_preview", -1)
        if body.get("live_preview") and self._preview_id > 0 and preview_id != self._preview_id:
            live_preview = self._preview_data_url()
            preview_id = self._preview_id
        return web.json_response(
            {
                "active": True,
                "queued": False,
                "completed": False,
                "progress": self._progress,
                "eta": eta,
                "live_preview": live_preview,
                "id_live_preview": preview_id,
                "textinfo": f"Sampling step {self._step}/{self._steps}",
                **self.state.progress_override,
            }
        )

    async def global_progress(self, request: web.Request) -> web.Response:
        if (denied := self._auth_failed(request)) is not None:
            return denied
        self.state.global_progress_polls += 1
        running = self.current is not None
        elapsed = time.monotonic() - self._started if running else 0.0
        eta = elapsed / self._progress - elapsed if running and self._progress > 0 else 0.0
        return web.json_response(
            {
                "progress": self._progress if running else 0.0,
                "eta_relative": eta,
                "state": {
                    "skipped": False,
                    "interrupted": self._interrupt,
                    "job": self.current or "",
                    "job_count": (1 if running else 0) + len(self.pending),
                    "job_timestamp": "0",
                    "job_no": 0,
                    "sampling_step": self._step,
                    "sampling_steps": self._steps,
                },
                "current_image": b64(make_image(self._preview_id, 16, 16))
                if running and self._preview_id
                else None,
                "textinfo": None,
                **(self.state.progress_override if running else {}),
            }
        )

    async def interrupt(self, request: web.Request) -> web.Response:
        if (denied := self._auth_failed(request)) is not None:
            return denied
        self.state.interrupts += 1
        if self.current is not None:
            self._interrupt = True
            self.state.interrupted_tasks.append(self.current)
        return web.json_response({})

    async def sd_models(self, request: web.Request) -> web.Response:
        if (denied := self._auth_failed(request)) is not None:
            return denied
        self.state.model_list_calls += 1
        if self.state.fail_model_list > 0:
            self.state.fail_model_list -= 1
            return web.json_response({"error": "OSError", "detail": "models folder unreadable"}, status=500)
        return web.json_response(
            [
                {
                    "title": title,
                    "model_name": title.split(".")[0],
                    "hash": title[-9:-1] if title.endswith("]") else None,
                    "sha256": None,
                    "filename": f"/models/Stable-diffusion/{title.split(' ')[0]}",
                    "config": None,
                }
                for title in self.state.models
            ]
        )


if __name__ == "__main__":
    run_standalone(lambda args: FakeA1111(host=args.host, port=args.port, delay=args.delay), "Fake A1111 API")
