"""The ComfyUI backend: fill the workflow, submit once, follow the prompt, fetch its images, cancel it.

See the package docstring for the contract. HTTP goes through :mod:`bot.backends.http` (retry rules, no
secrets in messages); the websocket is :class:`~bot.backends.comfyui.events.EventSocket`'s.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import random
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import aiohttp

from bot.backends import http
from bot.backends.comfyui.events import RECHECK, EventSocket, Watch, execution_error, one_line
from bot.backends.comfyui.workflow import DEFAULTS, Workflow, choices_of
from bot.engine.backend import (
    Capabilities,
    ProgressCallback,
    ResumableBackend,
    SubmittedCallback,
    _noop_progress,
    stop_remotely,
)
from bot.engine.errors import FailureReason, GenerationError
from bot.engine.images import verify_image
from bot.engine.models import MAX_SEED, GeneratedImage, ImageRequest, Progress

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


def _node_errors(data: Mapping[str, Any]) -> str:
    errors = data.get("node_errors")
    if not isinstance(errors, dict) or not errors:
        return ""
    parts = []
    for node_id, info in list(errors.items())[:3]:
        if not isinstance(info, dict):
            continue
        what = f"node {node_id} ({info.get('class_type', '?')})"
        details = []
        for err in info.get("errors") or []:
            if isinstance(err, dict):
                detail = one_line(err.get("details") or err.get("message"), 120)
                if detail:
                    details.append(detail)
        parts.append(f"{what}: {'; '.join(details)}" if details else what)
    return "; ".join(parts)


def map_error(reply: http.HttpReply) -> GenerationError:
    """ComfyUI answers bad graphs with 400 ``{"error": {...}, "node_errors": {...}}``."""
    data = reply.json()
    status = reply.status
    if isinstance(data, dict):
        nodes = _node_errors(data)
        error = data.get("error")
        message = one_line(error.get("message") if isinstance(error, dict) else error)
    else:
        nodes, message = "", http.plain_text(reply.body)
    if status == 400 and nodes:
        return GenerationError(FailureReason.BAD_REQUEST, f"ComfyUI refused the workflow: {nodes}")
    said = f": {message}" if message else "."
    if status in (401, 403):
        return GenerationError(
            FailureReason.AUTH, "ComfyUI (or the proxy in front of it) refused the credentials."
        )
    if status == 404:
        return GenerationError(FailureReason.UNAVAILABLE, "No ComfyUI API at the configured address.")
    if status == 429:
        return GenerationError(FailureReason.RATE_LIMITED, f"ComfyUI is rate limiting requests{said}")
    if status in (400, 422):
        return GenerationError(FailureReason.BAD_REQUEST, f"ComfyUI refused the request{said}")
    return GenerationError(FailureReason.UNAVAILABLE, f"ComfyUI failed (HTTP {status}){said}")


def auth_headers(value: str | None) -> dict[str, str]:
    """``user:password`` is sent as Basic auth, anything else as a Bearer token (ComfyUI behind a proxy)."""
    if not value:
        return {}
    user, sep, _ = value.partition(":")
    if sep and user:
        return {"Authorization": "Basic " + base64.b64encode(value.encode("utf-8")).decode("ascii")}
    return {"Authorization": f"Bearer {value}"}


def _queue_ids(data: Mapping[str, Any], key: str) -> set[str]:
    """Prompt ids in ``queue_running`` / ``queue_pending`` (items are ``[number, prompt_id, ...]``)."""
    items = data.get(key)
    ids: set[str] = set()
    if isinstance(items, list):
        for item in items:
            if isinstance(item, list | tuple) and len(item) > 1:
                ids.add(str(item[1]))
    return ids


class ComfyUIBackend(ResumableBackend):
    """``IMAGE_BACKEND=comfyui``."""

    name = "comfyui"

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        workflow: Workflow | None = None,
        defaults: Mapping[str, str] | None = None,
        sizes: tuple[tuple[int, int], ...] | None = None,
        client_id_path: Path | None = None,
        retry: http.RetryPolicy | None = None,
        sleep: http.Sleep = asyncio.sleep,
        preview_interval_s: float = 3.0,
        poll_interval_s: float = 10.0,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        connect_wait_s: float = 5.0,
        request_timeout_s: float = 60.0,
        cancel_timeout_s: float = 5.0,
        start_timeout_s: float = 10.0,
    ) -> None:
        self._session = session
        root = http.normalise_base_url(base_url, "/api")
        self._root = root
        scheme = "wss" if root.startswith("https") else "ws"
        parts = urlsplit(root)
        self._key = api_key or None
        self._headers = auth_headers(self._key)
        self._secrets = (self._key, self._key.partition(":")[2] if self._key else None)
        self._model = model or None
        self.workflow = workflow or Workflow.builtin()
        self._defaults = {**DEFAULTS, **(defaults or {})}
        self._retry = retry or http.RetryPolicy()
        self._sleep = sleep
        self._preview_interval_s = preview_interval_s
        self._poll_interval_s = poll_interval_s
        self._timeout = http.make_timeout(request_timeout_s)
        self._cancel_timeout_s = cancel_timeout_s
        self._start_timeout_s = start_timeout_s
        self._object_info: dict[str, Any] | None = None
        self._checkpoints: list[str] | None = None
        self._socket = EventSocket(
            session,
            urlunsplit((scheme, parts.netloc, parts.path, "", "")),
            headers=self._headers,
            client_id_path=client_id_path,
            reconnect_min_s=reconnect_min_s,
            reconnect_max_s=reconnect_max_s,
            connect_wait_s=connect_wait_s,
        )
        self._warned_no_preview = False
        found = self.workflow.placeholders()
        self.capabilities = Capabilities(
            negative_prompt="negative_prompt" in found,
            seed="seed" in found,
            sizes=sizes or SIZES,
            # Without %batch_size% one prompt makes one image, whatever /imagine's count says.
            max_count=4 if "batch_size" in found else 1,
            progress=True,
            preview=True,
            cancel=True,
            nsfw_flag=False,
        )

    def default_model(self) -> str | None:
        return self._model

    @property
    def fingerprint(self) -> str:
        """Names what this instance generates with (workflow and defaults), for a cache key that must change
        when the admin's workflow does (part of :attr:`cache_identity`)."""
        document = {"workflow": self.workflow.graph, "defaults": self._defaults}
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Validate the workflow against the server and open the websocket; returns the problems found.

        A server that cannot be reached is not a problem here (it may come up later): it is logged, and the
        socket keeps trying to connect.
        """
        problems: list[str] = []
        try:
            # Bounded: a server that accepts but never answers must not hold the bot's start-up.
            async with asyncio.timeout(self._start_timeout_s):
                problems = await self.validate(retry=http.RetryPolicy(attempts=1))
        except GenerationError as exc:
            log.warning("ComfyUI: could not check %s at start: %s", self.workflow.source, exc.message)
        except TimeoutError:
            log.warning("ComfyUI: no answer from /object_info at start; %s is checked by ComfyUI when used",
                        self.workflow.source)  # fmt: skip
        for problem in problems:
            log.error("ComfyUI %s: %s", self.workflow.source, problem)
        await self._socket.ensure(wait=False)
        return problems

    async def aclose(self) -> None:
        """Close the websocket; followed generations end with their callers' cancellation."""
        await self._socket.aclose()

    @property
    def client_id(self) -> str | None:
        return self._socket.client_id

    @property
    def connections(self) -> int:
        """How many times the websocket came up."""
        return self._socket.connections

    # -- HTTP --------------------------------------------------------------------------------------------------
    async def _call(
        self,
        method: str,
        path: str,
        *,
        what: str,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        creates_work: bool = False,
        retry: http.RetryPolicy | None = None,
    ) -> http.HttpReply:
        return await http.request(
            self._session,
            method,
            f"{self._root}{path}",
            what=what,
            map_error=map_error,
            retry=retry or self._retry,
            sleep=self._sleep,
            client_timeout=self._timeout,
            creates_work=creates_work,
            secrets=self._secrets,
            json=json_body,
            headers=self._headers,
            params=params,
        )

    async def object_info(self, *, retry: http.RetryPolicy | None = None) -> dict[str, Any]:
        reply = await self._call("GET", "/object_info", what="ComfyUI object_info", retry=retry)
        data = await asyncio.to_thread(reply.json_object)  # megabytes on a server with many node packs
        self._object_info = data
        return data

    async def validate(self, *, retry: http.RetryPolicy | None = None) -> list[str]:
        """Problems of the workflow against this server's ``/object_info``, one line each."""
        return self.workflow.problems(await self.object_info(retry=retry))

    async def preview_hint(self) -> str | None:
        """An operator hint when the server runs without previews (``--preview-method``), from /system_stats."""
        reply = await self._call("GET", "/system_stats", what="ComfyUI system_stats")
        system = reply.json_object().get("system")
        argv = system.get("argv") if isinstance(system, dict) else None
        if not isinstance(argv, list):
            return None
        args = [str(a) for a in argv]
        for i, arg in enumerate(args):
            value = arg.partition("=")[2] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            if arg.startswith("--preview-method") and value != "none":
                return None
        return "ComfyUI runs without previews; start it with --preview-method auto for live previews"

    @property
    def cache_identity(self) -> str:
        return f"{self.name}:{self.fingerprint}"

    async def probe(self) -> None:
        """``GET /system_stats``: the cheapest thing ComfyUI answers."""
        await self._call("GET", "/system_stats", what="ComfyUI health check")

    async def list_models(self) -> list[str]:
        """Checkpoints from ``/object_info/CheckpointLoaderSimple``."""
        reply = await self._call("GET", "/object_info/CheckpointLoaderSimple", what="ComfyUI model list")
        models = choices_of(reply.json_object(), "CheckpointLoaderSimple", "ckpt_name")
        self._checkpoints = models
        return models

    # -- generation --------------------------------------------------------------------------------------------
    async def _values(self, request: ImageRequest) -> tuple[dict[str, Any], int]:
        seed = request.seed if request.seed is not None else random.randint(0, MAX_SEED)
        model = request.model or self._model
        if model is None and "model" in self.workflow.placeholders():
            models = self._checkpoints if self._checkpoints is not None else await self.list_models()
            if not models:
                raise GenerationError(
                    FailureReason.UNKNOWN_MODEL, "ComfyUI has no checkpoint to generate with."
                )
            model = models[0]
        values: dict[str, Any] = {
            **self._defaults,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "seed": seed,
            "width": request.width,
            "height": request.height,
            "model": model or "",
            "batch_size": request.count,
        }
        return values, seed

    async def generate(
        self,
        request: ImageRequest,
        on_progress: ProgressCallback = _noop_progress,
        *,
        on_submitted: SubmittedCallback | None = None,
    ) -> list[GeneratedImage]:
        await self._socket.ensure()
        values, seed = await self._values(request)
        graph = self.workflow.fill(values, self._object_info)
        ours = str(uuid.uuid4())
        self._socket.watch(ours)  # before submitting: its first events may come before the reply
        submit = asyncio.create_task(self._submit(graph, ours), name="comfyui-submit")
        try:
            # Shielded: cancelled mid-submit, we still learn the id and can take the prompt off the queue.
            prompt_id = await asyncio.shield(submit)
        except asyncio.CancelledError:
            self._socket.unwatch(ours)
            await http.run_cleanup(
                self._cancel_when_submitted(submit), limit_s=self._cancel_timeout_s, what="ComfyUI cancel"
            )
            raise
        except BaseException:
            self._socket.unwatch(ours)
            raise
        self._socket.rename(ours, prompt_id)
        self._socket.watch(prompt_id).events.put_nowait(RECHECK)  # where it stands in ComfyUI's queue
        if on_submitted is not None:
            try:
                await http.maybe_await(on_submitted(prompt_id))
            except asyncio.CancelledError:
                self._socket.unwatch(prompt_id)
                await self._stop(prompt_id)
                raise
            except Exception as exc:
                log.warning("on_submitted callback failed: %s", type(exc).__name__)
        single_seed = seed if request.count == 1 and self.capabilities.seed else None
        return await self._follow(prompt_id, request.count, single_seed, on_progress)

    async def resume(
        self, ref: str, on_progress: ProgressCallback = _noop_progress, *, count: int | None = None
    ) -> list[GeneratedImage]:
        """Follow a prompt submitted before a restart, through /history and /queue; nothing is submitted."""
        self._socket.watch(ref).events.put_nowait(RECHECK)
        await self._socket.ensure()
        return await self._follow(ref, count, None, on_progress)

    async def _submit(self, graph: dict[str, Any], prompt_id: str) -> str:
        try:
            reply = await self._call(
                "POST",
                "/prompt",
                what="ComfyUI submit",
                json_body={"prompt": graph, "client_id": self._socket.client_id, "prompt_id": prompt_id},
                creates_work=True,
            )
        except GenerationError as exc:
            if (
                exc.reason is FailureReason.BAD_REQUEST
            ):  # the member was told the node; the operator gets a hint
                log.warning("%s; `python -m bot check` lists what is wrong with %s", exc.message,
                            self.workflow.source)  # fmt: skip
            raise
        data = reply.json_object()
        if data.get("node_errors"):
            # Accepted, but some output nodes were dropped: say so to the operator, the rest still runs.
            log.warning("ComfyUI accepted the prompt with node errors: %s", _node_errors(data))
        returned = data.get("prompt_id")
        if not isinstance(returned, str) or not returned:
            raise GenerationError(FailureReason.UNAVAILABLE, "ComfyUI accepted the prompt but sent no id.")
        log.info("ComfyUI prompt %s queued (number %s)", returned, data.get("number"))
        return returned

    async def _cancel_when_submitted(self, submit: asyncio.Task[str]) -> None:
        try:
            prompt_id = await submit
        except GenerationError:
            return
        await self.cancel(prompt_id)

    async def cancel(self, prompt_id: str) -> None:
        """Delete a pending prompt; interrupt a running one only while the queue shows it is ours that runs."""
        once = http.RetryPolicy(attempts=1)
        queue = (await self._call("GET", "/queue", what="ComfyUI queue", retry=once)).json_object()
        if prompt_id in _queue_ids(queue, "queue_pending"):
            await self._call(
                "POST", "/queue", what="ComfyUI cancel", json_body={"delete": [prompt_id]}, retry=once
            )
            log.info("ComfyUI prompt %s removed from the queue", prompt_id)
        elif prompt_id in _queue_ids(queue, "queue_running"):
            await self._call(
                "POST", "/interrupt", what="ComfyUI interrupt", json_body={"prompt_id": prompt_id}, retry=once
            )
            log.info("ComfyUI prompt %s interrupted", prompt_id)
        else:
            log.info("ComfyUI prompt %s is neither queued nor running; nothing to cancel", prompt_id)

    async def _history(self, prompt_id: str) -> dict[str, Any] | None:
        # Quoted: the id came from a server (or from the store after a restart), not from us.
        reply = await self._call("GET", f"/history/{quote(prompt_id, safe='')}", what="ComfyUI history")
        entry = (await asyncio.to_thread(reply.json_object)).get(prompt_id)
        return entry if isinstance(entry, dict) else None

    async def _follow(
        self, prompt_id: str, count: int | None, seed: int | None, on_progress: ProgressCallback
    ) -> list[GeneratedImage]:
        watch = self._socket.watch(prompt_id)
        try:
            return await self._wait(prompt_id, watch, count, seed, on_progress)
        except asyncio.CancelledError:
            await self._stop(prompt_id)
            raise
        finally:
            self._socket.unwatch(prompt_id, watch)

    async def _stop(self, prompt_id: str) -> None:
        """A cancelled call whose prompt id is known: take it off the queue or interrupt it, unless the call
        was handed over (another process follows the prompt up through /history)."""
        if not stop_remotely():
            log.info("ComfyUI prompt %s handed over; left to run for whoever follows it up", prompt_id)
            return
        await http.run_cleanup(self.cancel(prompt_id), limit_s=self._cancel_timeout_s, what="ComfyUI cancel")

    async def _wait(
        self,
        prompt_id: str,
        watch: Watch,
        count: int | None,
        seed: int | None,
        on_progress: ProgressCallback,
    ) -> list[GeneratedImage]:
        saw_preview = False
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel that arrives as the queue
            # hands over an event (Cancel pressed just as the prompt's recheck was queued), and the generation
            # would go on waiting.
            try:
                async with asyncio.timeout(self._poll_interval_s):
                    event = await watch.events.get()
            except TimeoutError:
                event = RECHECK  # no word for a while: ask, do not trust the socket alone
            if event.kind == "executing":
                if not watch.announced:
                    watch.announced = True
                    http.report(on_progress, Progress(fraction=watch.fraction, note="Generating"))
            elif event.kind == "progress":
                watch.fraction = event.fraction
                http.report(on_progress, Progress(fraction=event.fraction, note="Generating"))
                if not saw_preview and event.fraction == 1.0 and not self._warned_no_preview:
                    self._warned_no_preview = True
                    log.info("ComfyUI sent no preview; start it with --preview-method auto for live previews")
            elif event.kind == "preview":
                saw_preview = True
                now = time.monotonic()
                if now - watch.last_preview_at >= self._preview_interval_s:
                    watch.last_preview_at = now
                    http.report(
                        on_progress,
                        Progress(fraction=watch.fraction, preview=event.preview, note="Generating"),
                    )
            elif event.kind == "failed":
                raise GenerationError(FailureReason.UNAVAILABLE, event.message)
            elif event.kind == "interrupted":
                raise GenerationError(
                    FailureReason.UNAVAILABLE, "The generation was stopped on the ComfyUI server."
                )
            else:  # done, or recheck
                result = await self._finished(prompt_id, count, seed, settle=event.kind == "done")
                if result is not None:
                    return result
                if event.kind != "recheck":
                    continue
                position = await self._position(prompt_id)
                if position is None:
                    # Not queued, not running: finished between the two calls, or forgotten by the server.
                    result = await self._finished(prompt_id, count, seed, settle=False)
                    if result is not None:
                        return result
                    raise GenerationError(
                        FailureReason.UNAVAILABLE,
                        "ComfyUI no longer has this generation (was it restarted?).",
                    )
                if position > 0 and not watch.announced:
                    note = f"Waiting in ComfyUI's queue (position {position})"
                    http.report(on_progress, Progress(queue_position=position, note=note))

    async def _finished(
        self, prompt_id: str, count: int | None, seed: int | None, *, settle: bool
    ) -> list[GeneratedImage] | None:
        """The prompt's images once /history has it; ``None`` while it is not there yet.

        ``settle``: the socket said it ended; ComfyUI writes /history just after ``execution_success``, so ask
        a few times before going back to waiting.
        """
        for attempt in range(10 if settle else 1):
            entry = await self._history(prompt_id)
            if entry is not None:
                return await self._outputs(prompt_id, entry, count, seed)
            if settle:
                await asyncio.sleep(0.05 * (attempt + 1))
        return None

    async def _position(self, prompt_id: str) -> int | None:
        """0 while running, N when N-th in line (ComfyUI's queue is shared with its web UI), None if absent."""
        queue = (await self._call("GET", "/queue", what="ComfyUI queue")).json_object()
        if prompt_id in _queue_ids(queue, "queue_running"):
            return 0
        pending = queue.get("queue_pending")
        numbers = {
            str(item[1]): item[0]
            for item in (pending if isinstance(pending, list) else [])
            if isinstance(item, list | tuple) and len(item) > 1 and isinstance(item[0], int | float)
        }
        if prompt_id not in numbers:
            return None
        # ComfyUI lists pending prompts in heap order, not in order: count the ones numbered before ours.
        return 1 + sum(1 for number in numbers.values() if number < numbers[prompt_id])

    async def _outputs(
        self, prompt_id: str, entry: dict[str, Any], count: int | None, seed: int | None
    ) -> list[GeneratedImage]:
        status = entry.get("status") if isinstance(entry.get("status"), dict) else {}
        if status.get("status_str") == "error":
            raise GenerationError(FailureReason.UNAVAILABLE, _history_error(status))
        outputs = entry.get("outputs") if isinstance(entry.get("outputs"), dict) else {}
        saved: list[dict[str, Any]] = []
        temporary: list[dict[str, Any]] = []
        for output in outputs.values():
            images = output.get("images") if isinstance(output, dict) else None
            for image in images if isinstance(images, list) else []:
                if isinstance(image, dict) and isinstance(image.get("filename"), str):
                    (saved if image.get("type", "output") == "output" else temporary).append(image)
        files = saved or temporary  # a workflow ending in PreviewImage only has temp files
        if count:
            files = files[:count]
        if not files:
            log.warning("ComfyUI prompt %s ended without images: does the workflow save one?", prompt_id)
            raise GenerationError(FailureReason.INVALID_IMAGE, "ComfyUI finished without an image.")
        images = []
        for file in files:
            reply = await self._call(
                "GET",
                "/view",
                what="ComfyUI image download",
                params={
                    "filename": file["filename"],
                    "subfolder": str(file.get("subfolder") or ""),
                    "type": str(file.get("type") or "output"),
                },
            )
            images.append(await verify_image(reply.body, seed=seed))
        log.info("ComfyUI prompt %s: %d image(s)", prompt_id, len(images))
        return images


def _history_error(status: Mapping[str, Any]) -> str:
    for item in status.get("messages") or []:
        if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], dict):
            if item[0] == "execution_error":
                return execution_error(item[1])
            if item[0] == "execution_interrupted":
                return "The generation was stopped on the ComfyUI server."
    return "ComfyUI reported an error for this generation."
