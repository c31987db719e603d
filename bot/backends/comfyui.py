"""ComfyUI (``IMAGE_BACKEND=comfyui``): the admin's own API-format workflow, filled in and queued.

Contract:

* **Workflow.** ``COMFYUI_WORKFLOW`` names an API-format graph (ComfyUI: Export (API)); without it a built-in
  txt2img graph is used. String values hold placeholders (``%prompt%``, ``%seed%``, ... see
  :data:`PLACEHOLDERS`); a value that is exactly one placeholder becomes a number where the node wants one (the
  input's type from ``/object_info``, else the placeholder's natural type). What ``/imagine`` never asks for
  (steps, scale, sampler, scheduler) comes from ``COMFYUI_DEFAULTS``. The graph's shape is checked when it is
  loaded (:class:`SettingsError`); :meth:`ComfyUIBackend.validate` checks it against ``GET /object_info``
  (unknown node classes, placeholders in inputs a node does not have, literal choices ComfyUI does not offer),
  one line per problem, at start and in ``python -m bot check``.
* **One websocket.** ``/ws?clientId=...`` is opened once per backend instance, reconnected with backoff, and its
  client id is kept in a file (``DATA_DIR/comfyui-client-id``) so a restarted bot is the same client again.
  Events are routed to generations by ``prompt_id``; a type-1 binary preview frame carries no id and belongs to
  the prompt of the last ``executing`` event. After every (re)connect each followed prompt re-checks
  ``/history``, so a prompt that ended while the socket was down is not waited on forever. Without the socket
  (or with events lost) a slow ``/history`` + ``/queue`` poll still ends every generation.
* **Submit once.** ``POST /prompt`` carries our own ``prompt_id`` and the socket's ``client_id``; the id ComfyUI
  *returns* is the one followed and handed to ``on_submitted`` (older servers ignore ours). :meth:`resume`
  follows a stored id through ``/history`` and ``/queue`` and never submits again. A 400 with ``node_errors`` is
  a refusal that names the node.
* **End.** ``execution_success`` or ``executing`` with ``node: null`` ends a prompt; outputs come from
  ``/history/{id}`` then ``/view``. ``execution_error`` / ``execution_interrupted`` end it as a failure, the
  exception message cut to one line.
* **Cancel.** A pending prompt is deleted from the queue (``POST /queue {"delete": [id]}``); a running one is
  interrupted (``POST /interrupt {"prompt_id": id}``) only while ``GET /queue`` shows it running, because older
  servers ignore the body and stop whatever runs.
* Operator hints (``--preview-method auto``, installing node packs) go to logs and ``check``, never to members.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import random
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from bot.backends import http
from bot.engine.backend import (
    Capabilities,
    ProgressCallback,
    ResumableBackend,
    SubmittedCallback,
    _noop_progress,
)
from bot.engine.errors import FailureReason, GenerationError
from bot.engine.images import verify_image
from bot.engine.models import MAX_SEED, GeneratedImage, ImageRequest, Progress
from bot.settings import SettingsError

log = logging.getLogger(__name__)

#: The placeholders a workflow may hold, the convention most ComfyUI front-ends share.
PLACEHOLDERS = (
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "scale",
    "model",
    "sampler",
    "scheduler",
    "batch_size",
)
#: The natural type of a placeholder standing alone, used when ``/object_info`` has not told us the input's type.
_NUMERIC: dict[str, type] = {
    "seed": int,
    "width": int,
    "height": int,
    "steps": int,
    "batch_size": int,
    "scale": float,
}
DEFAULTS: dict[str, str] = {"steps": "25", "scale": "7", "sampler": "euler", "scheduler": "normal"}
_TOKEN = re.compile(r"%(" + "|".join(PLACEHOLDERS) + r")%")

SIZES: tuple[tuple[int, int], ...] = (
    (512, 512),
    (768, 768),
    (1024, 1024),
    (512, 768),
    (768, 512),
    (832, 1216),
    (1216, 832),
)

#: ComfyUI's default graph (checkpoint -> two CLIP encodes -> empty latent -> KSampler -> VAE decode -> save).
BUILTIN_WORKFLOW: dict[str, Any] = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": "%seed%",
            "steps": "%steps%",
            "cfg": "%scale%",
            "sampler_name": "%sampler%",
            "scheduler": "%scheduler%",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
    },
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "%model%"}},
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": "%width%", "height": "%height%", "batch_size": "%batch_size%"},
    },
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "%prompt%", "clip": ["4", 1]}},
    "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "%negative_prompt%", "clip": ["4", 1]}},
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "imagine", "images": ["8", 0]}},
}


# -- the workflow ------------------------------------------------------------------------------------------------
def _input_spec(object_info: Mapping[str, Any], class_type: str, name: str) -> Any:
    """The ``/object_info`` spec of one input (``["INT", {...}]``, ``[[choices]]``, ``["COMBO", {options}]``)."""
    node = object_info.get(class_type)
    inputs = node.get("input") if isinstance(node, dict) else None
    if not isinstance(inputs, dict):
        return None
    for section in ("required", "optional"):
        specs = inputs.get(section)
        if isinstance(specs, dict) and name in specs:
            return specs[name]
    return None


def _spec_type(spec: Any) -> str | list[Any] | None:
    """``"INT"``, ``"FLOAT"``, ``"STRING"``, a list of choices, or ``None`` when unknown."""
    if not isinstance(spec, list | tuple) or not spec:
        return None
    head = spec[0]
    if isinstance(head, list):
        return head
    if head == "COMBO" and len(spec) > 1 and isinstance(spec[1], dict):
        options = spec[1].get("options")
        return list(options) if isinstance(options, list) else None
    return head if isinstance(head, str) else None


def _class_inputs(object_info: Mapping[str, Any], class_type: str) -> set[str]:
    node = object_info.get(class_type)
    inputs = node.get("input") if isinstance(node, dict) else None
    names: set[str] = set()
    if isinstance(inputs, dict):
        for section in ("required", "optional"):
            if isinstance(inputs.get(section), dict):
                names.update(inputs[section])
    return names


def choices_of(object_info: Mapping[str, Any], class_type: str, name: str) -> list[str]:
    kind = _spec_type(_input_spec(object_info, class_type, name))
    return [str(c) for c in kind] if isinstance(kind, list) else []


@dataclass(frozen=True)
class Workflow:
    """An API-format graph with placeholders; ``source`` names it in messages (a file name or "built-in")."""

    graph: dict[str, Any]
    source: str = "built-in workflow"

    @classmethod
    def builtin(cls) -> Workflow:
        return cls(copy.deepcopy(BUILTIN_WORKFLOW))

    @classmethod
    def load(cls, path: Path) -> Workflow:
        """Read and shape-check a workflow file (blocking: call it off the event loop, or before it runs)."""
        name = f"COMFYUI_WORKFLOW ({path.name})"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SettingsError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
        try:
            graph = json.loads(text)
        except ValueError as exc:
            raise SettingsError(f"{name}: not valid JSON ({exc})") from None
        workflow = cls(graph, path.name) if isinstance(graph, dict) else None
        problems = workflow.shape_problems() if workflow else ["the file holds no JSON object"]
        if problems:
            raise SettingsError(f"{name}: {'; '.join(problems)}")
        assert workflow is not None
        return workflow

    def nodes(self) -> Iterable[tuple[str, dict[str, Any]]]:
        for node_id, node in self.graph.items():
            if isinstance(node, dict):
                yield str(node_id), node

    def shape_problems(self) -> list[str]:
        """What makes the graph unusable before any server is asked."""
        if "nodes" in self.graph and "links" in self.graph:
            return [
                "this is the UI format; save the workflow with Export (API) instead "
                "(enable the dev mode options in older ComfyUI settings to see it)"
            ]
        problems = []
        for node_id, node in self.graph.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                problems.append(f"node {node_id} has no class_type (is this an API-format export?)")
            elif not isinstance(node.get("inputs", {}), dict):
                problems.append(f"node {node_id} ({node['class_type']}): inputs must be an object")
        if not self.graph:
            problems.append("the workflow has no nodes")
        elif not problems and "prompt" not in self.placeholders():
            problems.append("no %prompt% placeholder anywhere, so /imagine's prompt would be ignored")
        return problems

    def placeholders(self) -> set[str]:
        found: set[str] = set()
        for _, node in self.nodes():
            for value in (node.get("inputs") or {}).values():
                if isinstance(value, str):
                    found.update(_TOKEN.findall(value))
        return found

    def problems(self, object_info: Mapping[str, Any]) -> list[str]:
        """One line per problem against a server's ``/object_info``."""
        problems: list[str] = []
        for node_id, node in self.nodes():
            class_type = str(node.get("class_type"))
            where = f"node {node_id} ({class_type})"
            if class_type not in object_info:
                problems.append(
                    f"{where}: ComfyUI has no node type {class_type!r} (is its custom node pack installed?)"
                )
                continue
            known = _class_inputs(object_info, class_type)
            for name, value in (node.get("inputs") or {}).items():
                if not isinstance(value, str):
                    continue
                tokens = _TOKEN.findall(value)
                if tokens and name not in known:
                    problems.append(
                        f"{where}: %{tokens[0]}% is in input {name!r}, which {class_type} does not have"
                    )
                    continue
                options = choices_of(object_info, class_type, name)
                if not tokens and options and value not in options:
                    problems.append(f"{where}: {name} {value!r} is not among ComfyUI's choices")
        return problems

    def fill(self, values: Mapping[str, Any], object_info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """A copy of the graph with every placeholder replaced (``values`` holds one per placeholder name)."""
        graph = copy.deepcopy(self.graph)
        for _, node in Workflow(graph).nodes():
            inputs = node.get("inputs")
            if not isinstance(inputs, dict):
                continue
            for name, value in inputs.items():
                if not isinstance(value, str) or "%" not in value:
                    continue
                whole = _TOKEN.fullmatch(value)
                if whole:
                    kind = (
                        _spec_type(_input_spec(object_info, str(node.get("class_type")), name))
                        if object_info
                        else None
                    )
                    inputs[name] = _typed(whole.group(1), values[whole.group(1)], kind)
                else:
                    inputs[name] = _TOKEN.sub(lambda m: _text(values[m.group(1)]), value)
        return graph


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _typed(name: str, value: Any, kind: str | list[Any] | None) -> Any:
    """A lone placeholder's value in the type the node wants (a number for INT/FLOAT inputs)."""
    target: type | None
    if kind == "INT":
        target = int
    elif kind == "FLOAT":
        target = float
    elif kind is None:
        target = _NUMERIC.get(name)
    else:
        target = None  # STRING, a choice list, or a custom type: text
    if target is None:
        return _text(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _text(value)
    return int(number) if target is int else number


# -- errors ------------------------------------------------------------------------------------------------------
def one_line(text: Any, limit: int = 200) -> str:
    """The first non-empty line of an exception message, bounded (tracebacks never reach members)."""
    for line in str(text or "").splitlines():
        if line.strip():
            line = " ".join(line.split())
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


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


# -- routing -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Event:
    kind: str  # progress | preview | executing | done | failed | interrupted | recheck
    fraction: float | None = None
    preview: bytes | None = None
    message: str = ""


RECHECK = _Event("recheck")


@dataclass
class _Watch:
    """One followed prompt: the events routed to it, and when it last showed a preview."""

    events: asyncio.Queue[_Event] = field(default_factory=asyncio.Queue)
    fraction: float | None = None
    last_preview_at: float = float("-inf")
    announced: bool = False


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
    ) -> None:
        self._session = session
        root = http.normalise_base_url(base_url, "/api")
        self._root = root
        scheme = "wss" if root.startswith("https") else "ws"
        parts = urlsplit(root)
        self._ws_root = urlunsplit((scheme, parts.netloc, parts.path, "", ""))
        self._key = api_key or None
        self._headers = auth_headers(self._key)
        self._secrets = (self._key, self._key.partition(":")[2] if self._key else None)
        self._model = model or None
        self.workflow = workflow or Workflow.builtin()
        self._defaults = {**DEFAULTS, **(defaults or {})}
        self._client_id_path = client_id_path
        self._retry = retry or http.RetryPolicy()
        self._sleep = sleep
        self._preview_interval_s = preview_interval_s
        self._poll_interval_s = poll_interval_s
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        self._connect_wait_s = connect_wait_s
        self._timeout = http.make_timeout(request_timeout_s)
        self._cancel_timeout_s = cancel_timeout_s
        self.client_id: str | None = None
        self._object_info: dict[str, Any] | None = None
        self._checkpoints: list[str] | None = None
        self._watches: dict[str, _Watch] = {}
        self._running_prompt: str | None = None
        self._socket_task: asyncio.Task[None] | None = None
        self._start_lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._closed = False
        #: How many times the websocket came up (a public probe for tests and logs).
        self.connections = 0
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

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Validate the workflow against the server and open the websocket; returns the problems found.

        A server that cannot be reached is not a problem here (it may come up later): it is logged, and the
        socket keeps trying to connect.
        """
        problems: list[str] = []
        try:
            problems = await self.validate(retry=http.RetryPolicy(attempts=1))
        except GenerationError as exc:
            log.warning("ComfyUI: could not check %s at start: %s", self.workflow.source, exc.message)
        for problem in problems:
            log.error("ComfyUI %s: %s", self.workflow.source, problem)
        await self._ensure_socket(wait=False)
        return problems

    async def aclose(self) -> None:
        """Close the websocket; followed generations end with their callers' cancellation."""
        self._closed = True
        task, self._socket_task = self._socket_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _ensure_socket(self, *, wait: bool = True) -> None:
        async with self._start_lock:
            if self._closed:
                raise GenerationError(FailureReason.UNAVAILABLE, "The ComfyUI backend is shutting down.")
            if self.client_id is None:
                self.client_id = await asyncio.to_thread(self._load_client_id)
            if self._socket_task is None or self._socket_task.done():
                self._socket_task = asyncio.create_task(self._run_socket(), name="comfyui-websocket")
                self._socket_task.add_done_callback(_log_socket_end)
        if wait and not self._connected.is_set():
            # Events sent before we listen are lost (the end is still found through /history): wait a little.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), self._connect_wait_s)

    def _load_client_id(self) -> str:
        """The persisted client id, so a restarted bot reconnects as the same ComfyUI client."""
        path = self._client_id_path
        if path is not None:
            with contextlib.suppress(OSError, UnicodeDecodeError):
                text = path.read_text(encoding="utf-8").strip()
                if re.fullmatch(r"[0-9a-f]{32}", text):
                    return text
        client_id = uuid.uuid4().hex
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(client_id + "\n", encoding="utf-8")
            except OSError as exc:
                log.warning("ComfyUI: cannot store the client id in %s (%s)", path, exc.strerror or exc)
        return client_id

    # -- the websocket -----------------------------------------------------------------------------------------
    async def _run_socket(self) -> None:
        delay = self._reconnect[0]
        url = f"{self._ws_root}/ws?clientId={self.client_id}"
        while True:
            try:
                async with self._session.ws_connect(
                    url, headers=self._headers, heartbeat=30, max_msg_size=32 * 1024 * 1024
                ) as ws:
                    await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": True}})
                    self.connections += 1
                    self._connected.set()
                    delay = self._reconnect[0]
                    log.info("ComfyUI websocket connected (%s)", http.safe_url(self._root))
                    self._recheck_all()  # prompts that ended while we were away
                    async for message in ws:
                        if message.type is aiohttp.WSMsgType.TEXT:
                            self._on_text(message.data)
                        elif message.type is aiohttp.WSMsgType.BINARY:
                            self._on_binary(message.data)
                        elif message.type is aiohttp.WSMsgType.ERROR:
                            break
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                log.info("ComfyUI websocket: %s; reconnecting in %.1fs", type(exc).__name__, delay)
            finally:
                self._connected.clear()
            await asyncio.sleep(delay)
            delay = min(self._reconnect[1], delay * 2)

    def _recheck_all(self) -> None:
        for watch in self._watches.values():
            watch.events.put_nowait(RECHECK)

    def _route(self, prompt_id: Any, event: _Event) -> None:
        watch = self._watches.get(str(prompt_id)) if prompt_id is not None else None
        if watch is not None:
            watch.events.put_nowait(event)

    def _on_text(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            return
        if not isinstance(message, dict) or not isinstance(message.get("data"), dict):
            return
        kind, data = message.get("type"), message["data"]
        prompt_id = data.get("prompt_id")
        if kind == "executing":
            if data.get("node") is None:
                if prompt_id is None or prompt_id == self._running_prompt:
                    prompt_id = prompt_id or self._running_prompt
                    self._running_prompt = None
                self._route(prompt_id, _Event("done"))
            else:
                self._running_prompt = prompt_id
                self._route(prompt_id, _Event("executing"))
        elif kind == "execution_start":
            self._running_prompt = prompt_id
            self._route(prompt_id, _Event("executing"))
        elif kind == "progress":
            value, maximum = data.get("value"), data.get("max")
            if isinstance(value, int | float) and isinstance(maximum, int | float) and maximum > 0:
                self._route(prompt_id, _Event("progress", fraction=min(1.0, max(0.0, value / maximum))))
        elif kind == "execution_success":
            self._route(prompt_id, _Event("done"))
        elif kind == "execution_error":
            self._route(prompt_id, _Event("failed", message=_execution_error(data)))
        elif kind == "execution_interrupted":
            self._route(prompt_id, _Event("interrupted"))

    def _on_binary(self, data: bytes) -> None:
        if len(data) < 8:
            return
        event_type = int.from_bytes(data[:4], "big")
        if event_type == 1:  # preview: image type, then the bytes; it belongs to whatever runs
            self._route(self._running_prompt, _Event("preview", preview=bytes(data[8:])))
        elif event_type == 4:  # preview with metadata: length, JSON, bytes
            length = int.from_bytes(data[4:8], "big")
            try:
                meta = json.loads(data[8 : 8 + length])
            except ValueError:
                return
            if isinstance(meta, dict):
                prompt_id = meta.get("prompt_id") or self._running_prompt
                self._route(prompt_id, _Event("preview", preview=bytes(data[8 + length :])))

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
        await self._ensure_socket()
        values, seed = await self._values(request)
        graph = self.workflow.fill(values, self._object_info)
        ours = str(uuid.uuid4())
        self._watches[ours] = _Watch()  # before submitting: its first events may come before the reply
        submit = asyncio.create_task(self._submit(graph, ours), name="comfyui-submit")
        try:
            # Shielded: cancelled mid-submit, we still learn the id and can take the prompt off the queue.
            prompt_id = await asyncio.shield(submit)
        except asyncio.CancelledError:
            self._watches.pop(ours, None)
            await http.run_cleanup(
                self._cancel_when_submitted(submit), limit_s=self._cancel_timeout_s, what="ComfyUI cancel"
            )
            raise
        except BaseException:
            self._watches.pop(ours, None)
            raise
        watch = self._watches.pop(ours)
        self._watches[prompt_id] = watch
        if prompt_id != ours:
            # An older server chose its own id: whatever it sent under it before now was not routed.
            watch.events.put_nowait(RECHECK)
        if on_submitted is not None:
            try:
                await http.maybe_await(on_submitted(prompt_id))
            except asyncio.CancelledError:
                self._watches.pop(prompt_id, None)
                await http.run_cleanup(
                    self.cancel(prompt_id), limit_s=self._cancel_timeout_s, what="ComfyUI cancel"
                )
                raise
            except Exception as exc:
                log.warning("on_submitted callback failed: %s", type(exc).__name__)
        single_seed = seed if request.count == 1 and self.capabilities.seed else None
        return await self._follow(prompt_id, request.count, single_seed, on_progress)

    async def resume(
        self, ref: str, on_progress: ProgressCallback = _noop_progress, *, count: int | None = None
    ) -> list[GeneratedImage]:
        """Follow a prompt submitted before a restart, through /history and /queue; nothing is submitted."""
        self._watches.setdefault(ref, _Watch()).events.put_nowait(RECHECK)
        await self._ensure_socket()
        return await self._follow(ref, count, None, on_progress)

    async def _submit(self, graph: dict[str, Any], prompt_id: str) -> str:
        reply = await self._call(
            "POST",
            "/prompt",
            what="ComfyUI submit",
            json_body={"prompt": graph, "client_id": self.client_id, "prompt_id": prompt_id},
            creates_work=True,
        )
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
        reply = await self._call("GET", f"/history/{prompt_id}", what="ComfyUI history")
        entry = (await asyncio.to_thread(reply.json_object)).get(prompt_id)
        return entry if isinstance(entry, dict) else None

    async def _follow(
        self, prompt_id: str, count: int | None, seed: int | None, on_progress: ProgressCallback
    ) -> list[GeneratedImage]:
        watch = self._watches.setdefault(prompt_id, _Watch())
        try:
            return await self._wait(prompt_id, watch, count, seed, on_progress)
        except asyncio.CancelledError:
            await http.run_cleanup(
                self.cancel(prompt_id), limit_s=self._cancel_timeout_s, what="ComfyUI cancel"
            )
            raise
        finally:
            if self._watches.get(prompt_id) is watch:
                del self._watches[prompt_id]

    async def _wait(
        self,
        prompt_id: str,
        watch: _Watch,
        count: int | None,
        seed: int | None,
        on_progress: ProgressCallback,
    ) -> list[GeneratedImage]:
        saw_preview = False
        while True:
            try:
                event = await asyncio.wait_for(watch.events.get(), self._poll_interval_s)
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
                if event.kind == "recheck" and not await self._known(prompt_id):
                    raise GenerationError(
                        FailureReason.UNAVAILABLE,
                        "ComfyUI no longer has this generation (was it restarted?).",
                    )

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

    async def _known(self, prompt_id: str) -> bool:
        """Still queued or running, or finished meanwhile (a prompt moves from the queue to /history)."""
        queue = (await self._call("GET", "/queue", what="ComfyUI queue")).json_object()
        if prompt_id in _queue_ids(queue, "queue_running") | _queue_ids(queue, "queue_pending"):
            return True
        return await self._history(prompt_id) is not None

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


def _execution_error(data: Mapping[str, Any]) -> str:
    node = data.get("node_type") or data.get("node_id") or "a node"
    message = one_line(data.get("exception_message")) or one_line(data.get("exception_type")) or "an error"
    return f"ComfyUI failed in {node}: {message}"


def _history_error(status: Mapping[str, Any]) -> str:
    for item in status.get("messages") or []:
        if isinstance(item, list | tuple) and len(item) == 2 and isinstance(item[1], dict):
            if item[0] == "execution_error":
                return _execution_error(item[1])
            if item[0] == "execution_interrupted":
                return "The generation was stopped on the ComfyUI server."
    return "ComfyUI reported an error for this generation."


def _log_socket_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("ComfyUI websocket task stopped: %r", task.exception())
