"""OpenAI-compatible image generation: OpenAI itself, gpt4free's API server, LocalAI.

One ``POST {base}/v1/images/generations``; replies carry ``b64_json`` or a ``url`` (gpt4free answers relative
``/media/...`` links on itself), so both are handled and links are downloaded through the shared session.

Servers as they are: gpt4free ignores ``n`` and answers one image, DALL-E 3 refuses any ``n`` above 1 with a
400 naming ``n``. So a job asks again for the images still missing, one call after another (within the job's one
slot, never in parallel; if a follow-up call fails, the images already made are returned), and after a 400 about ``n`` it asks one at a time from then on; ``max_count_per_call``
(``IMAGE_MAX_COUNT_PER_CALL``) says so up front. A follow-up call with a seed asks for the next seed, so
the images differ. gpt4free answers every upstream failure with HTTP 500 and ``{"error": {"message"}}``: the
message is what the user reads (its traceback dropped), and an upstream rate limit is said to be one (not
retried: a 500 to a request that creates work is never sent twice).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp

from bot.backends import http
from bot.engine.backend import Backend, Capabilities, ProgressCallback, _noop_progress
from bot.engine.errors import NOT_SET_UP, FailureReason, GenerationError
from bot.engine.images import verify_image
from bot.engine.models import MAX_SEED, GeneratedImage, ImageRequest

log = logging.getLogger(__name__)

SIZES: tuple[tuple[int, int], ...] = ((1024, 1024), (1536, 1024), (1024, 1536))
CONTENT_CODES = frozenset({"content_policy_violation", "moderation_blocked", "content_filter"})
#: A 400 about ``n`` (DALL-E 3: "Invalid 'n': integer above maximum value. Expected a value <= 1 ...").
_ABOUT_N = re.compile(r"""['"`]n['"`]|\bn\s*(?:must|should|<=?|>)|\bparameter n\b""", re.IGNORECASE)
#: gpt4free's 500s name upstream rate limits only in their text.
_RATE_LIMIT_TEXT = re.compile(r"rate.?limit|too many requests|\b429\b", re.IGNORECASE)


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
            "The image service account is out of credit; the bot owner has been told.",
            advice="The image service account behind IMAGE_BACKEND_API_KEY is out of credit "
            "(insufficient_quota): add credit or use another key.",
        )
    if status in (401, 403):
        return GenerationError(
            FailureReason.AUTH,
            NOT_SET_UP,
            advice="The image service refused the API key; check IMAGE_BACKEND_API_KEY.",
        )
    if status == 429:
        return GenerationError(
            FailureReason.RATE_LIMITED, f"The image service is rate limiting requests{said}"
        )
    if status == 500 and _RATE_LIMIT_TEXT.search(message):
        # Not RATE_LIMITED: that would retry, and a 500 to a request that creates work is never sent twice.
        return GenerationError(
            FailureReason.UNAVAILABLE,
            f"The image service's upstream is rate limiting it; try again in a minute{said}",
        )
    if code == "model_not_found" or status == 404:
        return GenerationError(
            FailureReason.UNKNOWN_MODEL, f"The image service does not know this model{said}"
        )
    if status in (400, 409, 413, 422):
        return GenerationError(FailureReason.BAD_REQUEST, f"The image service rejected the request{said}")
    failed = f"The image service failed (HTTP {status}){said}"
    return GenerationError(FailureReason.UNAVAILABLE, failed, advice=f"{failed} (see the service's own log)")


def refuses_n(reply: http.HttpReply) -> bool:
    """A 400 that is about the number of images asked for (so asking for one would work)."""
    if reply.status != 400:
        return False
    data = reply.json()
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("param") == "n":
        return True
    message, _, _ = _error_fields(reply)
    return bool(_ABOUT_N.search(message))


class _TooManyPerCall(Exception):
    """The server refused ``n`` > 1; carries nothing, the caller retries with ``n=1``."""


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
        max_count_per_call: int | None = None,
        sizes: tuple[tuple[int, int], ...] | None = None,
        retry: http.RetryPolicy | None = None,
        sleep: http.Sleep = asyncio.sleep,
        request_timeout_s: float = 300.0,
        download_timeout_s: float = 60.0,
    ) -> None:
        """``extras``: send gpt4free's ``negative_prompt``/``seed``/``width``/``height``; by default on for every
        server except api.openai.com (OpenAI rejects unknown fields). ``max_count_per_call``: images asked
        for in one call (``1`` for DALL-E 3); ``None`` asks for all and learns from the server's answers.
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
        #: Lowered to 1 for good once the server refuses a larger ``n``.
        self.max_count_per_call = max_count_per_call
        self.capabilities = Capabilities(
            negative_prompt=self._extras,
            seed=self._extras,
            sizes=sizes or SIZES,
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
        """Ask until ``request.count`` images came, one call after another.

        The first call's failure is the job's; a follow-up call's failure returns the images already made.
        """
        images: list[GeneratedImage] = []
        while len(images) < request.count:
            missing = request.count - len(images)
            n = min(missing, self.max_count_per_call or missing)
            # The same seed again would give the same picture again.
            seed = (request.seed + len(images)) % (MAX_SEED + 1) if request.seed is not None else None
            part = request.replace(count=n, seed=seed)
            try:
                got = await self._generate_once(part)
            except _TooManyPerCall:
                log.info("the image service refuses n=%d; asking for one image per call from now on", n)
                self.max_count_per_call = 1
                continue
            except GenerationError as exc:
                if not images:
                    raise
                # The images already made are kept (they may have cost credit); the job says how many came.
                log.info("a follow-up call failed (%s); returning %d of %d images", exc.reason.value,
                         len(images), request.count)  # fmt: skip
                break
            images.extend(got[:missing])
            if len(got) < n:
                log.info("asked for %d images, got %d; asking again for the rest", n, len(got))
        return images

    async def _generate_once(self, request: ImageRequest) -> list[GeneratedImage]:
        def map_reply(reply: http.HttpReply) -> GenerationError:
            # Escapes http.request's mapping on purpose: a 400 made no image, so asking again with n=1 is safe.
            if request.count > 1 and refuses_n(reply):
                raise _TooManyPerCall
            return map_error(reply)

        reply = await http.request(
            self._session,
            "POST",
            f"{self._api}/images/generations",
            what="Image generation",
            map_error=map_reply,
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
        entries = entries[: request.count]
        # The seed names the image only when the call made exactly one with it.
        seed = request.seed if self._extras and len(entries) == 1 else None
        images: list[GeneratedImage] = []
        for entry in entries:
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

    async def probe(self) -> None:
        """``GET /v1/models``: every OpenAI-compatible server answers it."""
        await self.list_models()

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
