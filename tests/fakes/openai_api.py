"""A fake OpenAI-compatible images API (OpenAI / gpt4free / LocalAI flavours).

``POST /v1/images/generations`` answering ``{created, data: [{b64_json | url, revised_prompt}]}``: ``b64_json``
when asked, absolute ``url`` for ``response_format=url``, and — like gpt4free without ``response_format`` —
relative ``/media/<name>.png`` links served by the fake itself. ``ignore_n`` answers one image whatever ``n``
asks (gpt4free); ``max_n`` refuses a larger ``n`` with a 400 naming it (DALL-E 3). ``gpt-image*`` models reject
``response_format`` (400 unknown_parameter) as OpenAI does. Errors are ``{"error": {message, type, param, code}}``.

Standalone: ``python -m tests.fakes.openai_api --port 1337 [--delay 1]``.
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


def openai_error(
    status: int, message: str, type_: str, code: str | None, param: str | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status=status
    )


@dataclass
class OpenAIState:
    # counters
    generations: int = 0
    downloads: int = 0
    model_list_calls: int = 0
    last_payload: dict[str, Any] | None = None
    last_authorization: str | None = None
    download_authorizations: list[str | None] = field(default_factory=list)
    # knobs
    delay: float = 0.0
    fail_next: list[Any] = field(default_factory=list)  # (status, json body[, headers])
    return_garbage: bool = False
    require_key: str | None = None
    reply_format: str | None = None  # force "b64_json" | "url" | "media"; None follows the request
    known_models: list[str] | None = None  # None: any model is accepted
    ignore_n: bool = False  # gpt4free: one image per call, whatever n says
    max_n: int | None = None  # DALL-E 3: a 400 naming n when more are asked for
    payloads: list[dict[str, Any]] = field(default_factory=list)
    #: Generations being made right now (inside ``delay``), and the most at once.
    in_flight: int = 0
    max_in_flight: int = 0


class FakeOpenAI(FakeServer):
    KNOBS: ClassVar[frozenset[str]] = frozenset(
        {
            "delay",
            "fail_next",
            "return_garbage",
            "require_key",
            "reply_format",
            "known_models",
            "ignore_n",
            "max_n",
        }
    )

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> None:
        self.state = OpenAIState()
        super().__init__(host=host, port=port)
        self.configure(**knobs)
        self.media: dict[str, bytes] = {}

    def setup_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/images/generations", self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/media/{name}", self.download)

    def _unauthorised(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization")
        self.state.last_authorization = header
        if self.state.require_key and header != f"Bearer {self.state.require_key}":
            key = (header or "").removeprefix("Bearer ")
            shown = f"{key[:3]}***{key[-4:]}" if len(key) > 8 else key
            return openai_error(
                401, f"Incorrect API key provided: {shown}.", "invalid_request_error", "invalid_api_key"
            )
        return None

    async def generate(self, request: web.Request) -> web.Response:
        self.state.generations += 1
        if (denied := self._unauthorised(request)) is not None:
            return denied
        try:
            payload = await request.json()
        except ValueError:
            return openai_error(400, "We could not parse the JSON body.", "invalid_request_error", None)
        self.state.last_payload = payload
        self.state.payloads.append(payload)
        if (failure := pop_failure(self.state.fail_next)) is not None:
            return failure
        model = str(payload.get("model") or "dall-e-2")
        if self.state.known_models is not None and model not in self.state.known_models:
            return openai_error(
                404,
                f"The model '{model}' does not exist.",
                "invalid_request_error",
                "model_not_found",
                "model",
            )
        fmt = payload.get("response_format")
        if model.startswith("gpt-image") and fmt is not None:
            return openai_error(
                400,
                "Unknown parameter: 'response_format'.",
                "invalid_request_error",
                "unknown_parameter",
                "model",
            )
        if not isinstance(payload.get("prompt"), str) or not payload["prompt"].strip():
            return openai_error(400, "Missing prompt.", "invalid_request_error", None, "prompt")
        n = int(payload.get("n") or 1)
        if self.state.max_n is not None and n > self.state.max_n:
            return openai_error(
                400,
                f"Invalid 'n': integer above maximum value. Expected a value <= {self.state.max_n}, "
                f"but got {n} instead.",
                "invalid_request_error",
                "integer_above_max_value",
                "n",
            )
        if self.state.ignore_n:
            n = 1
        if self.state.delay > 0:
            self.state.in_flight += 1
            self.state.max_in_flight = max(self.state.max_in_flight, self.state.in_flight)
            try:
                await asyncio.sleep(self.state.delay)
            finally:
                self.state.in_flight -= 1
        mode = self.state.reply_format or ("b64_json" if model.startswith("gpt-image") else fmt) or "media"
        seed = payload.get("seed")
        base_seed = seed if isinstance(seed, int) else random.randint(0, 2**31)
        data = []
        for i in range(n):
            image = (
                b"<html>not an image</html>"
                if self.state.return_garbage
                else make_image(base_seed + i, 64, 64)
            )
            entry: dict[str, Any] = {"revised_prompt": payload["prompt"]}
            if mode == "b64_json":
                entry["b64_json"] = b64(image)
            else:
                name = f"{uuid.uuid4().hex}.png"
                self.media[name] = image
                entry["url"] = f"/media/{name}" if mode == "media" else f"{request.url.origin()}/media/{name}"
            data.append(entry)
        return web.json_response({"created": int(time.time()), "data": data})

    async def download(self, request: web.Request) -> web.Response:
        self.state.downloads += 1
        self.state.download_authorizations.append(request.headers.get("Authorization"))
        data = self.media.get(request.match_info["name"])
        if data is None:
            return web.json_response({"detail": "Not Found"}, status=404)
        return web.Response(body=data, content_type="image/png")

    async def models(self, request: web.Request) -> web.Response:
        self.state.model_list_calls += 1
        if (denied := self._unauthorised(request)) is not None:
            return denied
        names = self.state.known_models or ["gpt-image-1", "flux", "sdxl-turbo"]
        return web.json_response({"object": "list", "data": [{"id": n, "object": "model"} for n in names]})


if __name__ == "__main__":
    run_standalone(
        lambda args: FakeOpenAI(host=args.host, port=args.port, delay=args.delay), "Fake OpenAI images API"
    )
