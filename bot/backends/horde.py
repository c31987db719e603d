"""AI Horde: free, crowd-run, zero-config (anonymous key ``0000000000``).

Submit with ``POST /generate/async`` (202 + id), poll the cheap ``/generate/check/{id}``, then fetch
``/generate/status/{id}`` once (it is rate limited hard). Check and status share one token bucket per backend
instance so concurrent jobs do not multiply calls. A cancelled job DELETEs its request so no worker wastes time on
it, unless the call was handed over (``stop_remotely()``: another process follows the request up by its id). The
submitted id is handed to ``on_submitted`` so the job layer can persist it and :meth:`HordeBackend.resume` after a
crash or a rolling restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import quote

import aiohttp

from bot.backends import http
from bot.engine.backend import (
    Capabilities,
    ProgressCallback,
    ResumableBackend,
    SubmittedCallback,
    _noop_progress,
    stop_remotely,
)
from bot.engine.errors import NOT_SET_UP, FailureReason, GenerationError
from bot.engine.images import verify_image
from bot.engine.models import GeneratedImage, ImageRequest, Progress

log = logging.getLogger(__name__)

DEFAULT_URL = "https://aihorde.net/api/v2"
ANONYMOUS_KEY = "0000000000"
CLIENT_AGENT = "imagine-bot:0.1:self-hosted"
MAX_STEPS = 30
#: Sizes an anonymous user can afford without kudos up front (no side above 768 px).
SIZES: tuple[tuple[int, int], ...] = ((512, 512), (768, 768), (512, 768), (768, 512), (640, 640))

#: Called with the Horde request id right after submission (may be sync or async).


def normalise_url(url: str | None) -> str:
    """``https://aihorde.net``, ``.../api`` and ``.../api/v2`` all mean ``.../api/v2``."""
    if not url:
        return DEFAULT_URL
    return http.normalise_base_url(url, "/api/v2") + "/api/v2"


def map_error(reply: http.HttpReply, *, stage: str = "submit") -> GenerationError:
    """Horde errors are ``{"message", "rc"}``; ``stage`` is ``submit`` or ``poll`` (404 means expired there)."""
    data = reply.json()
    rc = str(data.get("rc") or "") if isinstance(data, dict) else ""
    message = http.error_detail(data, "message") if isinstance(data, dict) else http.plain_text(reply.body)
    said = f": {message}" if message else "."
    status = reply.status
    if rc == "KudosUpfront" or (status == 403 and "kudos" in message.lower()):
        return GenerationError(
            FailureReason.QUOTA,
            "AI Horde wants kudos up front for this request: pick a smaller size (at most 768 px a side) "
            "or fewer steps.",
            advice="AI Horde wants kudos up front for large requests from anonymous users; set "
            "IMAGE_BACKEND_API_KEY to a Horde API key with kudos.",
        )
    if rc == "CorruptPrompt":
        return GenerationError(FailureReason.CONTENT_REFUSED, f"AI Horde refused this prompt{said}")
    if rc == "NoValidWorkers" or rc.startswith("NoValid"):
        return GenerationError(FailureReason.NO_WORKERS, f"No AI Horde worker can serve this request{said}")
    if status in (401, 403):
        return GenerationError(
            FailureReason.AUTH,
            NOT_SET_UP,
            advice="AI Horde refused the API key; check IMAGE_BACKEND_API_KEY.",
        )
    if status == 429:
        return GenerationError(FailureReason.RATE_LIMITED, f"AI Horde is rate limiting us{said}")
    if status == 404:
        if stage == "poll":
            return GenerationError(
                FailureReason.UNAVAILABLE, "The AI Horde request expired or was removed before it finished."
            )
        return GenerationError(
            FailureReason.UNAVAILABLE,
            NOT_SET_UP,
            advice="No AI Horde API at this address; check IMAGE_BACKEND_URL.",
        )
    if status in (400, 422):
        return GenerationError(FailureReason.BAD_REQUEST, f"AI Horde rejected the request{said}")
    failed = f"AI Horde is unavailable (HTTP {status}){said}"
    return GenerationError(FailureReason.UNAVAILABLE, failed, advice=f"{failed} (see https://aihorde.net)")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class HordeBackend(ResumableBackend):
    """``IMAGE_BACKEND=horde`` (the default)."""

    name = "horde"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        steps: int = 25,
        cfg_scale: float = 7.0,
        sampler_name: str = "k_euler_a",
        retry: http.RetryPolicy | None = None,
        sleep: http.Sleep = asyncio.sleep,
        clock: http.Clock = time.monotonic,
        poll_interval_s: float = 2.0,
        limiter: http.RateLimiter | None = None,
        request_timeout_s: float = 60.0,
        cancel_timeout_s: float = 5.0,
        client_agent: str = CLIENT_AGENT,
    ) -> None:
        self._session = session
        self._api = normalise_url(base_url)
        self._key = api_key or ANONYMOUS_KEY
        self._model = model or None
        self._steps = max(1, min(steps, MAX_STEPS))
        self._cfg_scale = cfg_scale
        self._sampler = sampler_name
        self._retry = retry or http.RetryPolicy()
        self._sleep = sleep
        self._poll_interval_s = poll_interval_s
        # One bucket for check and status: about one call per poll interval on average, a small burst.
        self._limiter = limiter or http.RateLimiter(
            1 / max(poll_interval_s, 0.001),
            burst=3,
            clock=clock,
            # A fake clock only advances through the injected sleep; the real one needs the real sleep.
            sleep=asyncio.sleep if clock is time.monotonic else sleep,
        )
        self._timeout = http.make_timeout(request_timeout_s)
        self._cancel_timeout_s = cancel_timeout_s
        self._headers = {"apikey": self._key, "Client-Agent": client_agent}
        self.capabilities = Capabilities(
            negative_prompt=True,
            seed=True,
            sizes=SIZES,
            max_count=4,
            progress=True,
            preview=False,
            cancel=True,
            nsfw_flag=True,
        )

    def default_model(self) -> str | None:
        return self._model

    def payload(self, request: ImageRequest) -> dict[str, Any]:
        prompt = request.prompt
        if request.negative_prompt.strip():
            prompt = f"{prompt} ### {request.negative_prompt}"
        params: dict[str, Any] = {
            "width": request.width,
            "height": request.height,
            "steps": self._steps,
            "n": request.count,
            "sampler_name": self._sampler,
            "cfg_scale": self._cfg_scale,
        }
        if request.seed is not None:
            params["seed"] = str(request.seed)  # the Horde wants a string
        body: dict[str, Any] = {
            "prompt": prompt,
            "params": params,
            "nsfw": request.nsfw_allowed,
            "censor_nsfw": not request.nsfw_allowed,
            "r2": True,
            "trusted_workers": False,
        }
        model = request.model or self._model
        if model:
            body["models"] = [model]
        return body

    async def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        stage: str,
        json_body: Any = None,
        creates_work: bool = False,
    ) -> http.HttpReply:
        return await http.request(
            self._session,
            method,
            f"{self._api}{path}",
            what=what,
            map_error=lambda reply: map_error(reply, stage=stage),
            retry=self._retry,
            sleep=self._sleep,
            client_timeout=self._timeout,
            creates_work=creates_work,
            secrets=(self._key,) if self._key != ANONYMOUS_KEY else (),
            json=json_body,
            headers=self._headers,
        )

    async def generate(
        self,
        request: ImageRequest,
        on_progress: ProgressCallback = _noop_progress,
        *,
        on_submitted: SubmittedCallback | None = None,
    ) -> list[GeneratedImage]:
        """Submit, wait, download. ``on_submitted(horde_id)`` runs once the Horde accepted the request."""
        submit = asyncio.create_task(self._submit(self.payload(request)), name="horde-submit")
        try:
            # Shielded: if we are cancelled mid-submit we still learn the id, and can DELETE it.
            horde_id = await asyncio.shield(submit)
        except asyncio.CancelledError:
            await http.run_cleanup(
                self._delete_when_submitted(submit), limit_s=self._cancel_timeout_s, what="Horde cancel"
            )
            raise
        if on_submitted is not None:
            try:
                await http.maybe_await(on_submitted(horde_id))
            except asyncio.CancelledError:
                await self._stop(horde_id)
                raise
            except Exception as exc:
                log.warning("on_submitted callback failed: %s", type(exc).__name__)
        return await self._follow(horde_id, request.count, on_progress)

    async def resume(
        self, horde_id: str, on_progress: ProgressCallback = _noop_progress, *, count: int | None = None
    ) -> list[GeneratedImage]:
        """Keep following a request submitted earlier (crash recovery); nothing is submitted again."""
        return await self._follow(horde_id, count, on_progress)

    async def _submit(self, body: dict[str, Any]) -> str:
        reply = await self._call(
            "POST",
            "/generate/async",
            what="AI Horde submit",
            stage="submit",
            json_body=body,
            creates_work=True,
        )
        data = reply.json_object()
        horde_id = data.get("id")
        if not isinstance(horde_id, str) or not horde_id:
            raise GenerationError(FailureReason.UNAVAILABLE, "AI Horde accepted the request but sent no id.")
        log.info("horde request %s submitted (kudos %s)", horde_id, data.get("kudos"))
        return horde_id

    async def _delete_when_submitted(self, submit: asyncio.Task[str]) -> None:
        try:
            horde_id = await submit
        except GenerationError:
            return
        await self._delete(horde_id)

    async def _delete(self, horde_id: str) -> None:
        await self._call(
            "DELETE", f"/generate/status/{quote(horde_id, safe='')}", what="AI Horde cancel", stage="poll"
        )
        log.info("horde request %s deleted", horde_id)

    async def _follow(
        self, horde_id: str, count: int | None, on_progress: ProgressCallback
    ) -> list[GeneratedImage]:
        try:
            return await self._wait_and_fetch(horde_id, count, on_progress)
        except asyncio.CancelledError:
            await self._stop(horde_id)
            raise

    async def _stop(self, horde_id: str) -> None:
        """A cancelled call whose id is known: DELETE the request, unless the call was handed over."""
        if not stop_remotely():
            log.info("horde request %s handed over; left running for whoever follows it up", horde_id)
            return
        await http.run_cleanup(self._delete(horde_id), limit_s=self._cancel_timeout_s, what="Horde cancel")

    async def _wait_and_fetch(
        self, horde_id: str, count: int | None, on_progress: ProgressCallback
    ) -> list[GeneratedImage]:
        path_id = quote(horde_id, safe="")
        while True:
            await asyncio.sleep(self._poll_interval_s)
            await self._limiter.acquire()
            check = (
                await self._call("GET", f"/generate/check/{path_id}", what="AI Horde check", stage="poll")
            ).json_object()
            if check.get("faulted"):
                raise GenerationError(FailureReason.UNAVAILABLE, "An AI Horde worker failed on this request.")
            if check.get("is_possible") is False:
                await http.run_cleanup(
                    self._delete(horde_id), limit_s=self._cancel_timeout_s, what="Horde cancel"
                )
                raise GenerationError(
                    FailureReason.NO_WORKERS,
                    "No AI Horde worker can serve this request right now (try another model or a smaller size).",
                )
            http.report(on_progress, _progress(check, count))
            if check.get("done"):
                break
        await self._limiter.acquire()
        status = (
            await self._call("GET", f"/generate/status/{path_id}", what="AI Horde status", stage="poll")
        ).json_object()
        if status.get("faulted"):
            raise GenerationError(FailureReason.UNAVAILABLE, "An AI Horde worker failed on this request.")
        generations = status.get("generations")
        if not isinstance(generations, list):
            generations = []
        images: list[GeneratedImage] = []
        censored = 0
        for generation in generations:
            if not isinstance(generation, dict):
                continue
            if generation.get("censored"):
                censored += 1  # a refusal, never a result
                continue
            data = await self._image_bytes(generation.get("img"))
            images.append(await verify_image(data, seed=_int_or_none(generation.get("seed"))))
        if censored:
            log.info("horde request %s: %d of %d images censored", horde_id, censored, len(generations))
        if not images:
            if censored:
                raise GenerationError(
                    FailureReason.CENSORED,
                    "AI Horde's safety filter censored the image. Try a different prompt"
                    " (or, in an NSFW channel, allow NSFW).",
                )
            raise GenerationError(FailureReason.UNAVAILABLE, "AI Horde finished without any image.")
        return images

    async def _image_bytes(self, img: Any) -> bytes:
        """``img`` is a WebP URL (r2) or base64 (r2 off)."""
        if not isinstance(img, str) or not img:
            raise GenerationError(FailureReason.INVALID_IMAGE, "AI Horde sent a generation without an image.")
        if not img.startswith(("http://", "https://")):
            return await asyncio.to_thread(http.decode_base64_image, img)
        reply = await http.request(
            self._session,
            "GET",
            img,
            what="AI Horde image download",
            map_error=_map_download_error,
            retry=self._retry,
            sleep=self._sleep,
            client_timeout=self._timeout,
            headers={"Client-Agent": self._headers["Client-Agent"]},  # never the key: R2 is another host
        )
        return reply.body

    async def probe(self) -> None:
        """AI Horde's heartbeat (``GET /v2/status/heartbeat``), the cheapest call it has."""
        await self._call("GET", "/status/heartbeat", what="AI Horde health check", stage="submit")

    async def list_models(self) -> list[str]:
        reply = await self._call(
            "GET", "/status/models?type=image", what="AI Horde model list", stage="submit"
        )
        data = reply.json()
        if not isinstance(data, list):
            return []
        models = [m for m in data if isinstance(m, dict) and m.get("name")]
        models.sort(key=lambda m: -(_int_or_none(m.get("count")) or 0))
        return [str(m["name"]) for m in models]


def _progress(check: dict[str, Any], count: int | None) -> Progress:
    finished = _int_or_none(check.get("finished")) or 0
    total = (
        count or sum(_int_or_none(check.get(k)) or 0 for k in ("finished", "processing", "waiting")) or None
    )
    position = _int_or_none(check.get("queue_position"))
    wait = check.get("wait_time")
    note = None
    if check.get("processing"):
        note = "A worker is generating"
    elif position:
        note = f"In the AI Horde queue (position {position})"
    return Progress(
        fraction=min(1.0, finished / total) if total else None,
        eta_s=float(wait) if isinstance(wait, int | float) else None,
        queue_position=position,
        note=note,
    )


def _map_download_error(reply: http.HttpReply) -> GenerationError:
    if reply.status in (403, 404, 410):
        return GenerationError(
            FailureReason.UNAVAILABLE, "The AI Horde image link had expired or was missing."
        )
    return GenerationError(
        FailureReason.UNAVAILABLE, f"Downloading the AI Horde image failed (HTTP {reply.status})."
    )
