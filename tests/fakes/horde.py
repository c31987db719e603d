"""A fake AI Horde (``/api/v2``) speaking the real protocol.

``POST /api/v2/generate/async`` -> 202 ``{id, kudos}`` (403 ``KudosUpfront`` for anonymous big requests),
``GET /api/v2/generate/check/{id}`` counting the queue down over polls, ``GET /api/v2/generate/status/{id}`` with
``generations: [{img, seed (string), censored, model, id}]`` where ``img`` is a WebP URL on this fake
(``/_img/<id>.webp``; base64 when ``r2`` is false), ``DELETE /api/v2/generate/status/{id}`` (cancel), errors as
``{"message", "rc"}``, ``GET /api/v2/status/models``, ``GET /api/v2/status/heartbeat``.

Standalone: ``python -m tests.fakes.horde --port 7001 [--delay 2]`` (``--delay``: seconds until done).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes._common import FakeServer, b64, make_image, pop_failure, run_standalone

ANONYMOUS_KEY = "0000000000"


@dataclass
class HordeRequest:
    id: str
    payload: dict[str, Any]
    n: int
    created: float
    checks: int = 0
    cancelled: bool = False


@dataclass
class HordeState:
    # counters
    submits: int = 0
    checks: int = 0
    status_calls: int = 0
    deletes: int = 0
    downloads: int = 0
    deleted_ids: list[str] = field(default_factory=list)
    submitted_ids: list[str] = field(default_factory=list)
    last_payload: dict[str, Any] | None = None
    last_apikey: str | None = None
    last_client_agent: str | None = None
    download_apikeys: list[str | None] = field(default_factory=list)
    # knobs
    checks_until_done: int = 2  # the check call that reports done
    done_after_s: float | None = None  # or: done once this much time has passed
    queue_position: int = 3
    wait_time: int = 12
    censored: bool = False
    is_possible: bool = True
    faulted: bool = False
    return_garbage: bool = False
    require_key: str | None = None  # if set, only this apikey is accepted
    anonymous_max_pixels: int = 768 * 768
    submit_delay: float = 0.0  # seconds /generate/async takes (after the request exists)
    fail_next: list[Any] = field(default_factory=list)  # for /generate/async
    fail_next_check: list[Any] = field(default_factory=list)
    fail_next_status: list[Any] = field(default_factory=list)
    #: ``GET /status/models``: (name, worker count, type) as the real API lists them; ``?type=image`` filters.
    models: list[tuple[str, int, str]] = field(
        default_factory=lambda: [
            ("stable_diffusion", 12, "image"),
            ("Deliberate", 30, "image"),
            ("koboldcpp/LLaMA2-13B-Tiefighter", 4, "text"),
        ]
    )
    model_list_calls: int = 0
    heartbeats: int = 0
    fail_model_list: int = 0  # answer the next N model-list requests with a 503


def _error(status: int, message: str, rc: str) -> web.Response:
    return web.json_response({"message": message, "rc": rc}, status=status)


class FakeHorde(FakeServer):
    KNOBS: ClassVar[frozenset[str]] = frozenset(
        {
            "checks_until_done",
            "done_after_s",
            "queue_position",
            "wait_time",
            "censored",
            "is_possible",
            "faulted",
            "return_garbage",
            "require_key",
            "anonymous_max_pixels",
            "submit_delay",
            "fail_next",
            "fail_next_check",
            "fail_next_status",
            "models",
            "fail_model_list",
        }
    )

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> None:
        self.state = HordeState()
        super().__init__(host=host, port=port)
        self.configure(**knobs)
        self.requests: dict[str, HordeRequest] = {}
        self.images: dict[str, bytes] = {}

    @property
    def api_url(self) -> str:
        return f"{self.url}/api/v2"

    def setup_routes(self, app: web.Application) -> None:
        app.router.add_post("/api/v2/generate/async", self.submit)
        app.router.add_get("/api/v2/generate/check/{id}", self.check)
        app.router.add_get("/api/v2/generate/status/{id}", self.status)
        app.router.add_delete("/api/v2/generate/status/{id}", self.delete)
        app.router.add_get("/api/v2/status/models", self.models)
        app.router.add_get("/api/v2/status/heartbeat", self.heartbeat)
        app.router.add_get("/_img/{name}", self.image)

    def _key_problem(self, request: web.Request) -> web.Response | None:
        key = request.headers.get("apikey")
        self.state.last_apikey = key
        self.state.last_client_agent = request.headers.get("Client-Agent")
        if self.state.require_key and key != self.state.require_key:
            return _error(401, "Invalid API Key", "InvalidAPIKey")
        return None

    def _done(self, req: HordeRequest) -> bool:
        if self.state.done_after_s is not None:
            return time.monotonic() - req.created >= self.state.done_after_s
        return req.checks >= self.state.checks_until_done

    async def submit(self, request: web.Request) -> web.Response:
        self.state.submits += 1
        if (denied := self._key_problem(request)) is not None:
            return denied
        try:
            payload = await request.json()
        except ValueError:
            return _error(400, "Input payload validation failed", "BadRequest")
        self.state.last_payload = payload
        if (failure := pop_failure(self.state.fail_next)) is not None:
            return failure
        prompt = payload.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            return _error(400, "Input payload validation failed", "BadRequest")
        params = payload.get("params") or {}
        width, height = int(params.get("width", 512)), int(params.get("height", 512))
        steps = int(params.get("steps", 30))
        if width % 64 or height % 64 or not 64 <= width <= 3072 or not 64 <= height <= 3072:
            return _error(400, "Image width and height have to be multiples of 64", "InvalidSize")
        anonymous = request.headers.get("apikey", ANONYMOUS_KEY) == ANONYMOUS_KEY
        if anonymous and (width * height > self.state.anonymous_max_pixels or steps > 50):
            return _error(
                403,
                "Due to heavy demand, for requests over 576x576 or over 50 steps (25 for k_heun and k_dpm_2*), "
                "the client needs to already have the required kudos. This request requires 23.0 kudos to fulfil.",
                "KudosUpfront",
            )
        seed = params.get("seed")
        if seed is not None and not isinstance(seed, str):
            return _error(
                400, "Input payload validation failed: params.seed is not of type 'string'", "BadRequest"
            )
        horde_id = str(uuid.uuid4())
        self.requests[horde_id] = HordeRequest(horde_id, payload, int(params.get("n", 1)), time.monotonic())
        self.state.submitted_ids.append(horde_id)
        if self.state.submit_delay > 0:
            await asyncio.sleep(self.state.submit_delay)
        return web.json_response({"id": horde_id, "kudos": 10.0}, status=202)

    def _find(self, request: web.Request) -> HordeRequest | None:
        req = self.requests.get(request.match_info["id"])
        return None if req is None or req.cancelled else req

    def _counts(self, req: HordeRequest) -> dict[str, Any]:
        done = self._done(req)
        position = 0 if done else max(0, self.state.queue_position - req.checks)
        processing = 0 if done or position > 0 else req.n
        step = self.state.wait_time / max(1, self.state.checks_until_done)
        return {
            "finished": req.n if done else 0,
            "processing": processing,
            "restarted": 0,
            "waiting": 0 if done or processing else req.n,
            "done": done,
            "faulted": self.state.faulted,
            "wait_time": 0 if done else max(0, round(self.state.wait_time - step * req.checks)),
            "queue_position": position,
            "kudos": 10.0,
            "is_possible": self.state.is_possible,
        }

    async def check(self, request: web.Request) -> web.Response:
        self.state.checks += 1
        if (failure := pop_failure(self.state.fail_next_check)) is not None:
            return failure
        req = self._find(request)
        if req is None:
            return _error(404, "Request Not found", "RequestNotFound")
        req.checks += 1
        return web.json_response(self._counts(req))

    async def status(self, request: web.Request) -> web.Response:
        self.state.status_calls += 1
        if (failure := pop_failure(self.state.fail_next_status)) is not None:
            return failure
        req = self._find(request)
        if req is None:
            return _error(404, "Request Not found", "RequestNotFound")
        body = self._counts(req)
        body["generations"] = self._generations(req, request) if body["done"] else []
        body["shared"] = False
        return web.json_response(body)

    def _generations(self, req: HordeRequest, request: web.Request) -> list[dict[str, Any]]:
        params = req.payload.get("params") or {}
        seed = int(params["seed"]) if params.get("seed") else random.randint(0, 2**32 - 1)
        width, height = int(params.get("width", 512)), int(params.get("height", 512))
        models = req.payload.get("models") or ["stable_diffusion"]
        r2 = req.payload.get("r2", True)
        generations = []
        for i in range(req.n):
            gen_id = str(uuid.uuid4())
            if self.state.return_garbage:
                data = b"RIFF\x00\x00\x00\x00WEBPnot really"
            else:
                data = make_image(seed + i, width, height, fmt="WEBP")
            self.images[gen_id] = data
            img = f"{request.url.origin()}/_img/{gen_id}.webp" if r2 else b64(data)
            generations.append(
                {
                    "img": img,
                    "seed": str(seed + i),
                    "id": gen_id,
                    "censored": self.state.censored,
                    "model": models[0],
                    "worker_id": "00000000-0000-0000-0000-000000000001",
                    "worker_name": "fake-worker",
                    "state": "ok",
                    "gen_metadata": [{"type": "censorship", "value": "csam"}] if self.state.censored else [],
                }
            )
        return generations

    async def delete(self, request: web.Request) -> web.Response:
        self.state.deletes += 1
        req = self._find(request)
        if req is None:
            return _error(404, "Request Not found", "RequestNotFound")
        req.cancelled = True
        self.state.deleted_ids.append(req.id)
        body = self._counts(req)
        body["generations"] = []
        return web.json_response(body)

    async def image(self, request: web.Request) -> web.Response:
        self.state.downloads += 1
        self.state.download_apikeys.append(request.headers.get("apikey"))
        data = self.images.get(request.match_info["name"].removesuffix(".webp"))
        if data is None:
            return web.Response(status=404, text="NoSuchKey")
        return web.Response(body=data, content_type="image/webp")

    async def heartbeat(self, request: web.Request) -> web.Response:
        self.state.heartbeats += 1
        return web.json_response({"message": "OK", "version": "4.44.0"})

    async def models(self, request: web.Request) -> web.Response:
        self.state.model_list_calls += 1
        if self.state.fail_model_list > 0:
            self.state.fail_model_list -= 1
            return _error(503, "Service is undergoing maintenance", "Maintenance")
        wanted = request.query.get("type")
        return web.json_response(
            [
                {"name": name, "count": count, "performance": 1.0, "queued": 0, "eta": 5, "type": kind}
                for name, count, kind in self.state.models
                if wanted is None or kind == wanted
            ]
        )


if __name__ == "__main__":
    run_standalone(
        lambda args: FakeHorde(host=args.host, port=args.port, done_after_s=args.delay or None),
        "Fake AI Horde API",
    )
