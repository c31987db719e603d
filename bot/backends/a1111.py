"""AUTOMATIC1111 / Forge (``--api``): ``POST /sdapi/v1/txt2img`` with a task id we choose.

A1111 runs one generation at a time and its interrupt stops *whatever* runs, so we name every generation
(``force_task_id``), ask ``/internal/progress`` about that id for progress and previews, and interrupt only when
that id is the active one. Closing the HTTP connection does not stop A1111, hence the explicit interrupt.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import uuid
from typing import Any

import aiohttp

from bot.backends import http
from bot.engine.backend import Backend, Capabilities, ProgressCallback, _noop_progress
from bot.engine.errors import NOT_SET_UP, FailureReason, GenerationError
from bot.engine.images import verify_image
from bot.engine.models import GeneratedImage, ImageRequest, Progress
from bot.settings import SettingsError

log = logging.getLogger(__name__)

SIZES: tuple[tuple[int, int], ...] = (
    (512, 512),
    (768, 768),
    (1024, 1024),
    (512, 768),
    (768, 512),
    (832, 1216),
    (1216, 832),
)
_QUEUE_TEXT = re.compile(r"(\d+)\s*/\s*(\d+)")


def _detail(reply: http.HttpReply) -> str:
    data = reply.json()
    if data is None:
        return http.plain_text(reply.body)
    detail = http.error_detail(data, "detail", "errors", "error", "message")
    return detail


def map_error(reply: http.HttpReply, *, endpoint: str = "txt2img") -> GenerationError:
    """A1111 errors are ``{"error","detail","body","errors"}`` (FastAPI's ``{"detail"}`` for 401/404/422)."""
    detail = _detail(reply)
    said = f": {detail}" if detail else "."
    status = reply.status
    if status in (401, 403):
        return GenerationError(
            FailureReason.AUTH,
            NOT_SET_UP,
            advice="Stable Diffusion WebUI refused the credentials; set IMAGE_BACKEND_API_KEY to "
            "user:password as given to --api-auth.",
        )
    if status == 404:
        return GenerationError(
            FailureReason.UNAVAILABLE,
            NOT_SET_UP,
            advice=f"Stable Diffusion WebUI has no {endpoint} endpoint here: API not enabled, start it with "
            "--api (or check IMAGE_BACKEND_URL).",
        )
    if status == 422 or status == 400:
        return GenerationError(
            FailureReason.BAD_REQUEST, f"Stable Diffusion WebUI rejected the request{said}"
        )
    if status == 429:
        return GenerationError(
            FailureReason.RATE_LIMITED, "Stable Diffusion WebUI is rate limiting requests."
        )
    failed = f"Stable Diffusion WebUI failed (HTTP {status}){said}"
    return GenerationError(FailureReason.UNAVAILABLE, failed, advice=f"{failed} (see its console)")


def basic_auth_headers(value: str | None) -> dict[str, str]:
    """``user:password`` (A1111's ``--api-auth``) as an Authorization header; built by hand because
    ``aiohttp.BasicAuth`` is deprecated in newer aiohttp releases.
    """
    if not value:
        return {}
    user, sep, _password = value.partition(":")
    if not sep or not user:
        raise SettingsError(
            "IMAGE_BACKEND_API_KEY: for a1111 it must be user:password (as given to --api-auth)"
        )
    return {"Authorization": "Basic " + base64.b64encode(value.encode("utf-8")).decode("ascii")}


def _seeds(info: Any, count: int) -> list[int | None]:
    """Seeds live in ``info``, a JSON *string*: ``all_seeds``, else ``seed`` counting up."""
    if isinstance(info, str):
        try:
            info = json.loads(info)
        except ValueError:
            info = {}
    if not isinstance(info, dict):
        return [None] * count
    all_seeds = info.get("all_seeds")
    if isinstance(all_seeds, list) and all_seeds:
        seeds = [s if isinstance(s, int) else None for s in all_seeds]
        return (seeds + [None] * count)[:count]
    seed = info.get("seed")
    if isinstance(seed, int) and seed >= 0:
        return [seed + i for i in range(count)]
    return [None] * count


class A1111Backend(Backend):
    """``IMAGE_BACKEND=a1111``: AUTOMATIC1111 or Forge with ``--api``."""

    name = "a1111"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        steps: int = 25,
        cfg_scale: float = 7.0,
        sampler_name: str = "Euler a",
        retry: http.RetryPolicy | None = None,
        sleep: http.Sleep = asyncio.sleep,
        poll_interval_s: float = 1.0,
        request_timeout_s: float = 1800.0,
        poll_timeout_s: float = 10.0,
        cancel_timeout_s: float = 5.0,
    ) -> None:
        self._session = session
        self._root = http.normalise_base_url(base_url, "/sdapi/v1")
        self._headers = basic_auth_headers(api_key)
        self._secrets = (api_key, api_key.partition(":")[2] if api_key else None)
        self._model = model or None
        self._steps = steps
        self._cfg_scale = cfg_scale
        self._sampler = sampler_name
        self._retry = retry or http.RetryPolicy()
        self._sleep = sleep
        self._poll_interval_s = poll_interval_s
        # Model loads can take minutes; the job manager's own timeout is the real bound.
        self._gen_timeout = http.make_timeout(request_timeout_s)
        self._poll_timeout = http.make_timeout(poll_timeout_s, connect=min(5.0, poll_timeout_s))
        self._cancel_timeout_s = cancel_timeout_s
        #: None until known; False once /internal/progress answered 404 (then the global fallback is used).
        self._internal_progress: bool | None = None
        #: Our generations currently in flight: the global /sdapi/v1/progress is ours only when this is 1.
        self.inflight = 0
        self.capabilities = Capabilities(
            negative_prompt=True,
            seed=True,
            sizes=SIZES,
            max_count=4,
            progress=True,
            preview=True,
            cancel=True,
            nsfw_flag=False,
        )

    def default_model(self) -> str | None:
        return self._model

    def payload(self, request: ImageRequest, task_id: str) -> dict[str, Any]:
        model = request.model or self._model
        body: dict[str, Any] = {
            "force_task_id": task_id,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "width": request.width,
            "height": request.height,
            "steps": self._steps,
            "seed": -1 if request.seed is None else request.seed,
            "batch_size": request.count,
            "n_iter": 1,
            "cfg_scale": self._cfg_scale,
            "sampler_name": self._sampler,
            "send_images": True,
            "save_images": False,
            "do_not_save_grid": True,
        }
        if model:
            body["override_settings"] = {"sd_model_checkpoint": model}
        return body

    async def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json_body: Any = None,
        client_timeout: aiohttp.ClientTimeout | None = None,
        creates_work: bool = False,
        retry: http.RetryPolicy | None = None,
    ) -> http.HttpReply:
        endpoint = path.rsplit("/", 1)[-1]
        return await http.request(
            self._session,
            method,
            f"{self._root}{path}",
            what=what,
            map_error=lambda reply: map_error(reply, endpoint=endpoint),
            retry=retry or self._retry,
            sleep=self._sleep,
            client_timeout=client_timeout or self._poll_timeout,
            creates_work=creates_work,
            secrets=self._secrets,
            json=json_body,
            headers=self._headers,
        )

    async def generate(
        self, request: ImageRequest, on_progress: ProgressCallback = _noop_progress
    ) -> list[GeneratedImage]:
        task_id = f"task({uuid.uuid4().hex})"
        self.inflight += 1
        poller = asyncio.create_task(
            self._poll_progress(task_id, on_progress), name=f"a1111-progress-{task_id}"
        )
        try:
            try:
                reply = await self._call(
                    "POST",
                    "/sdapi/v1/txt2img",
                    what="Stable Diffusion txt2img",
                    json_body=self.payload(request, task_id),
                    client_timeout=self._gen_timeout,
                    creates_work=True,
                )
            except asyncio.CancelledError:
                poller.cancel()
                log.info("generation %s cancelled; interrupting it if it is running", task_id)
                await http.run_cleanup(
                    self._interrupt_if_ours(task_id), limit_s=self._cancel_timeout_s, what="A1111 interrupt"
                )
                raise
        finally:
            poller.cancel()
            (outcome,) = await asyncio.gather(poller, return_exceptions=True)
            if isinstance(outcome, Exception):  # progress is best effort, but a bug in it must not go unseen
                log.warning("progress polling stopped: %r", outcome)
            self.inflight -= 1
        data = await asyncio.to_thread(reply.json_object)
        encoded = data.get("images")
        if not isinstance(encoded, list) or not encoded:
            raise GenerationError(
                FailureReason.INVALID_IMAGE, "Stable Diffusion WebUI answered without any image."
            )
        if len(encoded) == request.count + 1:
            encoded = encoded[1:]  # a grid was prepended despite do_not_save_grid
        encoded = encoded[: request.count]
        seeds = _seeds(data.get("info"), len(encoded))
        images = []
        for text, seed in zip(encoded, seeds, strict=True):
            images.append(
                await verify_image(await asyncio.to_thread(http.decode_base64_image, text), seed=seed)
            )
        return images

    async def _poll_progress(self, task_id: str, on_progress: ProgressCallback) -> None:
        """Best effort: poll about once per ``poll_interval_s`` and report; failures only log."""
        last_preview = -1
        while True:
            await asyncio.sleep(self._poll_interval_s)
            try:
                if self._internal_progress is not False:
                    status = await self._internal_or_missing(task_id, last_preview, live_preview=True)
                    if status is None:
                        continue  # no /internal/progress here: fall back from the next poll on
                    progress, last_preview = _internal_progress(status, last_preview)
                elif self.inflight == 1:
                    reply = await self._call(
                        "GET", "/sdapi/v1/progress", what="A1111 progress", retry=http.RetryPolicy(attempts=1)
                    )
                    progress = _global_progress(reply.json_object())
                else:
                    continue  # the global progress would describe someone else's job
            except GenerationError as exc:
                log.debug("progress poll failed: %s", exc.message)
                continue
            if progress is not None:
                http.report(on_progress, progress)

    async def _interrupt_if_ours(self, task_id: str) -> None:
        """Interrupt only our own running generation: A1111's interrupt stops whatever is running."""
        if self._internal_progress is not False:
            status = await self._internal_or_missing(task_id)
            if status is not None:
                if status.get("active"):
                    await self._interrupt(task_id)
                else:
                    log.info(
                        "not interrupting %s: it is not the active job (queued=%s)",
                        task_id,
                        status.get("queued"),
                    )
                return
        if self.inflight == 1:
            await self._interrupt(task_id)
        else:
            log.info("not interrupting %s: cannot tell whose job is running", task_id)

    async def _internal_or_missing(
        self, task_id: str, id_live_preview: int = -1, *, live_preview: bool = False
    ) -> dict[str, Any] | None:
        """The task's ``/internal/progress`` status, or ``None`` (and fallback mode) if the endpoint is 404."""
        try:
            reply = await self._session.post(
                f"{self._root}/internal/progress",
                json={"id_task": task_id, "id_live_preview": id_live_preview, "live_preview": live_preview},
                headers=self._headers,
                timeout=self._poll_timeout,
                raise_for_status=False,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise GenerationError(
                FailureReason.UNAVAILABLE, f"A1111 progress: {type(exc).__name__}"
            ) from None
        async with reply:
            if reply.status == 404:
                self._internal_progress = False
                return None
            if reply.status >= 400:
                raise GenerationError(FailureReason.UNAVAILABLE, f"A1111 progress: HTTP {reply.status}")
            self._internal_progress = True
            try:
                data = await reply.json(content_type=None)
            except (ValueError, aiohttp.ClientError, TimeoutError):
                data = None
            return data if isinstance(data, dict) else {}

    async def _interrupt(self, task_id: str) -> None:
        await self._call(
            "POST", "/sdapi/v1/interrupt", what="A1111 interrupt", retry=http.RetryPolicy(attempts=1)
        )
        log.info("interrupted %s", task_id)

    async def probe(self) -> None:
        """``GET /sdapi/v1/options``: answered even while a generation holds the WebUI's lock."""
        await self._call("GET", "/sdapi/v1/options", what="A1111 health check")

    async def list_models(self) -> list[str]:
        reply = await self._call("GET", "/sdapi/v1/sd-models", what="A1111 model list")
        data = reply.json()
        if not isinstance(data, list):
            return []
        return [str(m["title"]) for m in data if isinstance(m, dict) and m.get("title")]


def _internal_progress(status: dict[str, Any], last_preview: int) -> tuple[Progress | None, int]:
    """``/internal/progress`` -> Progress; a preview only when its id is new."""
    text = status.get("textinfo") if isinstance(status.get("textinfo"), str) else None
    if status.get("completed") and not status.get("active"):
        return None, last_preview
    if not status.get("active"):
        if status.get("queued"):
            position = None
            match = _QUEUE_TEXT.search(text or "")
            if match:
                position = int(match.group(1))
            return Progress(queue_position=position, note=text or "Queued"), last_preview
        return None, last_preview
    preview = None
    preview_id = status.get("id_live_preview")
    data_url = status.get("live_preview")
    if isinstance(data_url, str) and data_url and isinstance(preview_id, int) and preview_id != last_preview:
        try:
            preview = http.decode_base64_image(data_url)
            last_preview = preview_id
        except GenerationError:
            preview = None
    fraction = status.get("progress")
    eta = status.get("eta")
    return (
        Progress(
            fraction=float(fraction) if isinstance(fraction, int | float) else None,
            eta_s=float(eta) if isinstance(eta, int | float) else None,
            preview=preview,
            note=text,
        ),
        last_preview,
    )


def _global_progress(data: dict[str, Any]) -> Progress | None:
    """``GET /sdapi/v1/progress`` (used only while our job is the only one we have running)."""
    state = data.get("state") if isinstance(data.get("state"), dict) else {}
    fraction = data.get("progress")
    if not state.get("job_count") and not fraction:
        return None
    preview = None
    image = data.get("current_image")
    if isinstance(image, str) and image:
        try:
            preview = http.decode_base64_image(image)
        except GenerationError:
            preview = None
    eta = data.get("eta_relative")
    return Progress(
        fraction=float(fraction) if isinstance(fraction, int | float) else None,
        eta_s=float(eta) if isinstance(eta, int | float) else None,
        preview=preview,
    )
