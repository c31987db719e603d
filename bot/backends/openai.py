"""OpenAI-compatible image generation: OpenAI itself, gpt4free's API server, LocalAI.

One ``POST {base}/v1/images/generations``; replies carry ``b64_json`` or a ``url`` (gpt4free answers relative
``/media/...`` links on itself), so both are handled and links are downloaded through the shared session.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from bot.backends import http
from bot.engine.backend import Backend, Capabilities, ProgressCallback, _noop_progress
from bot.engine.errors import FailureReason, GenerationError
from bot.engine.images import verify_image
from bot.engine.models import GeneratedImage, ImageRequest

log = logging.getLogger(__name__)

SIZES: tuple[tuple[int, int], ...] = ((1024, 1024), (1536, 1024), (1024, 1536))
CONTENT_CODES = frozenset({"content_policy_violation", "moderation_blocked", "content_filter"})


def _error_fields(reply: http.HttpReply) -> tuple[str, str, str]:
    """(message, code, type) from ``{"error": {...}}``, a FastAPI ``{"detail": ...}`` or a bare string."""
    data = reply.json()
    message = code = kind = ""
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = str(error.get("message") or "")
            code = str(error.get("code") or "")
            kind = str(error.get("type") or "")
        elif isinstance(error, str):
            message = error
        if not message:
            message = http.error_detail(data, "detail", "message")
    elif data is None:
        message = http.plain_text(reply.body)
    return message.strip(), code, kind


def map_error(reply: http.HttpReply) -> GenerationError:
    """Turn an OpenAI / gpt4free error reply into a reason and a sentence a user can act on."""
    message, code, kind = _error_fields(reply)
    said = f": {message}" if message else "."
    status = reply.status
    if code in CONTENT_CODES or kind in CONTENT_CODES:
        return GenerationError(FailureReason.CONTENT_REFUSED, f"The image service refused this prompt{said}")
    if code == "insufficient_quota" or kind == "insufficient_quota":
        return GenerationError(
            FailureReason.QUOTA,
            "The image service account is out of credit (insufficient quota); ask the bot owner.",
        )
    if status in (401, 403):
        return GenerationError(
            FailureReason.AUTH, "The image service refused the API key; check IMAGE_BACKEND_API_KEY."
        )
    if status == 429:
        return GenerationError(
            FailureReason.RATE_LIMITED, f"The image service is rate limiting requests{said}"
        )
    if code == "model_not_found" or status == 404:
        return GenerationError(
            FailureReason.UNKNOWN_MODEL, f"The image service does not know this model{said}"
        )
    if status in (400, 409, 413, 422):
        return GenerationError(FailureReason.BAD_REQUEST, f"The image service rejected the request{said}")
    return GenerationError(FailureReason.UNAVAILABLE, f"The image service failed (HTTP {status}){said}")


class OpenAIBackend(Backend):
    """``IMAGE_BACKEND=openai``: any server speaking OpenAI's images API."""

    name = "openai"
    #: /v1/models lists chat models and the priciest image models: members get IMAGE_MODEL(S) only.
    lists_choosable_models = False

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        extras: bool | None = None,
        retry: http.RetryPolicy | None = None,
        sleep: http.Sleep = asyncio.sleep,
        request_timeout_s: float = 300.0,
        download_timeout_s: float = 60.0,
    ) -> None:
        """``extras``: send gpt4free's ``negative_prompt``/``seed``/``width``/``height``; by default on for every
        server except api.openai.com (OpenAI rejects unknown fields).
        """
        self._session = session
        self._root = http.normalise_base_url(base_url, "/v1")
        self._api = f"{self._root}/v1"
        self._key = api_key or None
        self._model = model or None
        host = (urlsplit(self._root).hostname or "").lower()
        self._extras = (not host.endswith("openai.com")) if extras is None else extras
        self._retry = retry or http.RetryPolicy()
        self._sleep = sleep
        self._timeout = http.make_timeout(request_timeout_s)
        self._download_timeout = http.make_timeout(download_timeout_s)
        self.capabilities = Capabilities(
            negative_prompt=self._extras,
            seed=self._extras,
            sizes=SIZES,
            max_count=4,
            progress=False,
            preview=False,
            cancel=False,
            nsfw_flag=False,
        )

    def default_model(self) -> str | None:
        return self._model

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self._key}"} if self._key else {}

    def payload(self, request: ImageRequest) -> dict[str, Any]:
        """The request body; public so the wire format is testable without a server."""
        model = request.model or self._model
        body: dict[str, Any] = {"prompt": request.prompt, "n": request.count, "size": request.size}
        if model:
            body["model"] = model
        if not (model or "").lower().startswith("gpt-image"):
            # gpt-image models always answer b64_json and reject the field.
            body["response_format"] = "b64_json"
        if self._extras:
            if request.negative_prompt:
                body["negative_prompt"] = request.negative_prompt
            if request.seed is not None:
                body["seed"] = request.seed
            body["width"] = request.width
            body["height"] = request.height
        return body

    async def generate(
        self, request: ImageRequest, on_progress: ProgressCallback = _noop_progress
    ) -> list[GeneratedImage]:
        reply = await http.request(
            self._session,
            "POST",
            f"{self._api}/images/generations",
            what="Image generation",
            map_error=map_error,
            retry=self._retry,
            sleep=self._sleep,
            client_timeout=self._timeout,
            creates_work=True,
            secrets=(self._key,),
            json=self.payload(request),
            headers=self._headers(),
        )
        entries = (await asyncio.to_thread(reply.json_object)).get("data")
        if not isinstance(entries, list) or not entries:
            raise GenerationError(
                FailureReason.INVALID_IMAGE, "The image service answered without any image."
            )
        seed = request.seed if self._extras and request.count == 1 else None
        images: list[GeneratedImage] = []
        for entry in entries[: request.count]:
            if not isinstance(entry, dict):
                raise GenerationError(
                    FailureReason.INVALID_IMAGE, "The image service sent a malformed reply."
                )
            if entry.get("b64_json"):
                data = await asyncio.to_thread(http.decode_base64_image, entry["b64_json"])
            elif isinstance(entry.get("url"), str) and entry["url"]:
                data = await self._download(entry["url"])
            else:
                raise GenerationError(
                    FailureReason.INVALID_IMAGE, "The image service sent an entry with no image."
                )
            images.append(await verify_image(data, seed=seed))
        return images

    async def _download(self, url: str) -> bytes:
        """Fetch an image link; relative links (gpt4free's ``/media/...``) live on the server itself."""
        if url.startswith("data:"):
            return await asyncio.to_thread(http.decode_base64_image, url)
        absolute = urljoin(self._root + "/", url)
        if urlsplit(absolute).scheme not in ("http", "https"):
            raise GenerationError(
                FailureReason.INVALID_IMAGE, "The image service sent an unusable image link."
            )
        # Never hand our key to another host (OpenAI links point at blob storage).
        headers = self._headers() if http.same_origin(absolute, self._root) else {}
        reply = await http.request(
            self._session,
            "GET",
            absolute,
            what="Image download",
            map_error=_map_download_error,
            retry=self._retry,
            sleep=self._sleep,
            client_timeout=self._download_timeout,
            secrets=(self._key,),
            headers=headers,
        )
        return reply.body

    async def list_models(self) -> list[str]:
        reply = await http.request(
            self._session,
            "GET",
            f"{self._api}/models",
            what="Model list",
            map_error=map_error,
            retry=self._retry,
            sleep=self._sleep,
            client_timeout=self._download_timeout,
            secrets=(self._key,),
            headers=self._headers(),
        )
        data = reply.json_object().get("data")
        if not isinstance(data, list):
            return []
        return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]


def _map_download_error(reply: http.HttpReply) -> GenerationError:
    if reply.status in (403, 404, 410):
        return GenerationError(
            FailureReason.UNAVAILABLE, "The generated image's link had expired or was missing."
        )
    return GenerationError(FailureReason.UNAVAILABLE, f"Downloading the image failed (HTTP {reply.status}).")
