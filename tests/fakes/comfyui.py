"""A fake ComfyUI server: HTTP and the websocket, at the wire level (facts: shared/notes/image-backends.md).

``POST /prompt`` validates the graph against its ``/object_info`` (unknown class, a choice not offered, a value
that is not an INT/FLOAT where one is wanted) and answers 400 ``node_errors`` as ComfyUI does; otherwise it
queues the prompt (our ``prompt_id`` is honoured unless ``honour_prompt_id`` is off, like servers before 2024).
One worker runs one prompt at a time and sends its events only to the websockets whose ``clientId`` is the
prompt's ``client_id``: ``execution_start``, ``executing``, ``progress`` per step, binary previews (type 1, or
type 4 with metadata once the client sent the ``supports_preview_metadata`` feature flag), ``executed``,
``execution_success`` (not on ``old_server``), then ``/history`` is written, then ``executing`` with
``node: null``. ``execution_error`` (knob ``fail_execution``) and ``/interrupt`` end a prompt early. Reconnecting
with the same clientId replays the current ``executing``. Routes are also served under ``/api``.

Standalone: ``python -m tests.fakes.comfyui --port 8188 [--delay 1]`` (``--delay``: seconds per prompt).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes._common import FakeServer, make_image, pop_failure, run_standalone

CHECKPOINTS = ["sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors"]
SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m"]
SCHEDULERS = ["normal", "karras"]


def object_info(checkpoints: list[str]) -> dict[str, Any]:
    """The node classes the built-in workflow uses, with ComfyUI's input spec shapes."""

    def node(required: dict[str, Any], optional: dict[str, Any] | None = None, output: bool = False):
        return {
            "input": {"required": required, **({"optional": optional} if optional else {})},
            "output_node": output,
        }

    return {
        "CheckpointLoaderSimple": node({"ckpt_name": [checkpoints, {}]}),
        "CLIPTextEncode": node({"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}),
        "EmptyLatentImage": node(
            {
                "width": ["INT", {"default": 512, "min": 16}],
                "height": ["INT", {"default": 512, "min": 16}],
                "batch_size": ["INT", {"default": 1, "min": 1, "max": 4096}],
            }
        ),
        "KSampler": node(
            {
                "model": ["MODEL"],
                "seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}],
                "steps": ["INT", {"default": 20, "min": 1}],
                "cfg": ["FLOAT", {"default": 8.0}],
                # Newer servers describe choices as COMBO with options; accept both shapes in the client.
                "sampler_name": ["COMBO", {"options": SAMPLERS}],
                "scheduler": [SCHEDULERS, {}],
                "positive": ["CONDITIONING"],
                "negative": ["CONDITIONING"],
                "latent_image": ["LATENT"],
                "denoise": ["FLOAT", {"default": 1.0}],
            }
        ),
        "VAEDecode": node({"samples": ["LATENT"], "vae": ["VAE"]}),
        "SaveImage": node(
            {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}, output=True
        ),
        "PreviewImage": node({"images": ["IMAGE"]}, output=True),
    }


def preview_image(number: int) -> bytes:
    """The preview frame of the prompt queued as ``number`` (so tests can tell whose preview it is)."""
    return make_image(1000 + number, 16, 16)


def _choices(spec: Any) -> list[Any] | None:
    if isinstance(spec, list) and spec:
        if isinstance(spec[0], list):
            return spec[0]
        if spec[0] == "COMBO":
            return spec[1].get("options")
    return None


@dataclass
class ComfyState:
    # counters and records
    prompts_submitted: int = 0
    prompts_refused: int = 0
    prompt_ids: list[str] = field(default_factory=list)
    last_prompt: dict[str, Any] | None = None
    last_client_id: str | None = None
    deletes: list[str] = field(default_factory=list)
    interrupts: list[Any] = field(default_factory=list)  # the body's prompt_id, or None for "whatever runs"
    ws_connects: int = 0
    ws_client_ids: list[str] = field(default_factory=list)
    feature_flags: list[dict[str, Any]] = field(default_factory=list)
    views: int = 0
    history_calls: int = 0
    queue_calls: int = 0
    authorizations: list[str | None] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    # knobs
    steps: int = 4
    step_delay: float = 0.01
    previews: bool = True
    preview_metadata: bool = True  # off: type-1 frames only, like servers before the feature flag
    honour_prompt_id: bool = True
    old_server: bool = False  # no execution_success; the end is executing null
    fail_execution: str | None = None  # exception message for the next prompt's KSampler
    fail_next: list[Any] = field(default_factory=list)  # (status, body) for the next /prompt
    require_auth: str | None = None  # exact Authorization header wanted
    checkpoints: list[str] = field(default_factory=lambda: list(CHECKPOINTS))
    hold: bool = False  # prompts wait before running until released (cancel while pending / running)
    hold_running: bool = False  # the running prompt waits at its first step until released
    drop_sockets_at_step: int | None = None  # close every websocket when the running prompt reaches it
    refuse_websocket: bool = False  # a proxy that does not pass websockets on
    argv: list[str] = field(default_factory=lambda: ["main.py", "--preview-method", "auto"])


@dataclass
class _Prompt:
    prompt_id: str
    number: int
    graph: dict[str, Any]
    client_id: str | None
    interrupted: bool = False


class FakeComfyUI(FakeServer):
    KNOBS: ClassVar[frozenset[str]] = frozenset(
        {
            "steps",
            "step_delay",
            "previews",
            "preview_metadata",
            "honour_prompt_id",
            "old_server",
            "fail_execution",
            "fail_next",
            "require_auth",
            "checkpoints",
            "hold",
            "hold_running",
            "drop_sockets_at_step",
            "argv",
            "refuse_websocket",
        }
    )

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, **knobs: Any) -> None:
        self.state = ComfyState()
        super().__init__(host=host, port=port)
        self.configure(**knobs)
        self.pending: list[_Prompt] = []
        self.running: _Prompt | None = None
        self.history: dict[str, Any] = {}
        self.files: dict[str, bytes] = {}
        self.sockets: dict[str, list[tuple[web.WebSocketResponse, dict[str, bool]]]] = {}
        self._number = 0
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None

    def setup_routes(self, app: web.Application) -> None:
        for prefix in ("", "/api"):
            app.router.add_post(f"{prefix}/prompt", self.post_prompt)
            app.router.add_get(f"{prefix}/queue", self.get_queue)
            app.router.add_post(f"{prefix}/queue", self.post_queue)
            app.router.add_post(f"{prefix}/interrupt", self.post_interrupt)
            app.router.add_get(f"{prefix}/history/{{prompt_id}}", self.get_history)
            app.router.add_get(f"{prefix}/view", self.get_view)
            app.router.add_get(f"{prefix}/object_info", self.get_object_info)
            app.router.add_get(f"{prefix}/object_info/{{node_class}}", self.get_object_info_class)
            app.router.add_get(f"{prefix}/system_stats", self.get_system_stats)
            app.router.add_get(f"{prefix}/ws", self.websocket)

    async def start(self) -> None:
        await super().start()
        self._worker = asyncio.create_task(self._work(), name="fake-comfyui-worker")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for sockets in list(self.sockets.values()):
            for ws, _ in list(sockets):
                with contextlib.suppress(Exception):
                    await ws.close()
        await super().close()

    def release(self) -> None:
        """Let held prompts run (``hold``) and a held running prompt go on (``hold_running``)."""
        self.state.hold = False
        self.state.hold_running = False
        self._wake.set()

    async def drop_sockets(self) -> None:
        for sockets in list(self.sockets.values()):
            for ws, _ in list(sockets):
                await ws.close()

    # -- auth ------------------------------------------------------------------------------------------------
    def _denied(self, request: web.Request) -> web.Response | None:
        header = request.headers.get("Authorization")
        self.state.authorizations.append(header)
        if self.state.require_auth and header != self.state.require_auth:
            return web.Response(status=401, text="401: Unauthorized")
        return None

    # -- HTTP ------------------------------------------------------------------------------------------------
    def _validate(self, graph: Any) -> dict[str, Any]:
        info = object_info(self.state.checkpoints)
        errors: dict[str, Any] = {}
        if not isinstance(graph, dict):
            return {"": {"errors": [{"message": "bad graph", "details": ""}], "class_type": ""}}
        for node_id, node in graph.items():
            class_type = node.get("class_type") if isinstance(node, dict) else None
            if class_type not in info:
                errors[node_id] = {
                    "errors": [{"type": "invalid_prompt", "message": "Cannot execute because node "
                                f"{class_type} does not exist.", "details": f"Node ID '#{node_id}'"}],
                    "class_type": class_type,
                }  # fmt: skip
                continue
            problems = []
            required = info[class_type]["input"]["required"]
            for name, spec in required.items():
                value = node.get("inputs", {}).get(name)
                if value is None:
                    problems.append({"type": "required_input_missing", "message": "Required input is missing",
                                     "details": name})  # fmt: skip
                    continue
                if isinstance(value, list):
                    continue  # a link
                choices = _choices(spec)
                if choices is not None and value not in choices:
                    problems.append({"type": "value_not_in_list", "message": "Value not in list",
                                     "details": f"{name}: '{value}' not in {choices}"})  # fmt: skip
                elif spec[0] == "INT" and not (isinstance(value, int) and not isinstance(value, bool)):
                    problems.append({"type": "invalid_input_type", "message": "Failed to convert an input value "
                                     "to a INT value", "details": f"{name}, {value}"})  # fmt: skip
                elif spec[0] == "FLOAT" and not isinstance(value, int | float):
                    problems.append({"type": "invalid_input_type", "message": "Failed to convert an input value "
                                     "to a FLOAT value", "details": f"{name}, {value}"})  # fmt: skip
            if problems:
                errors[node_id] = {"errors": problems, "dependent_outputs": [], "class_type": class_type}
        return errors

    async def post_prompt(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        body = await request.json()
        self.state.last_prompt = body
        if (failure := pop_failure(self.state.fail_next)) is not None:
            self.state.prompts_refused += 1
            return failure
        node_errors = self._validate(body.get("prompt"))
        if node_errors:
            self.state.prompts_refused += 1
            return web.json_response(
                {
                    "error": {
                        "type": "prompt_outputs_failed_validation",
                        "message": "Prompt outputs failed validation",
                        "details": "",
                        "extra_info": {},
                    },
                    "node_errors": node_errors,
                },
                status=400,
            )
        self.state.prompts_submitted += 1
        asked = body.get("prompt_id")
        prompt_id = str(asked) if asked and self.state.honour_prompt_id else str(uuid.uuid4())
        self.state.prompt_ids.append(prompt_id)
        self.state.last_client_id = body.get("client_id")
        self._number += 1
        self.pending.append(_Prompt(prompt_id, self._number, body["prompt"], body.get("client_id")))
        self._wake.set()
        return web.json_response({"prompt_id": prompt_id, "number": self._number, "node_errors": {}})

    async def get_queue(self, request: web.Request) -> web.Response:
        self.state.queue_calls += 1
        if (denied := self._denied(request)) is not None:
            return denied

        def item(p: _Prompt) -> list[Any]:
            return [p.number, p.prompt_id, p.graph, {"client_id": p.client_id}, ["9"]]

        return web.json_response(
            {
                "queue_running": [item(self.running)] if self.running else [],
                "queue_pending": [item(p) for p in self.pending],
            }
        )

    async def post_queue(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        body = await request.json()
        for prompt_id in body.get("delete") or []:
            self.state.deletes.append(prompt_id)
            self.pending = [p for p in self.pending if p.prompt_id != prompt_id]
        if body.get("clear"):
            self.pending.clear()
        return web.Response(status=200)

    async def post_interrupt(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        try:
            body = await request.json()
        except ValueError:
            body = {}
        target = body.get("prompt_id") if isinstance(body, dict) else None
        self.state.interrupts.append(target)
        if self.running is not None and target in (None, self.running.prompt_id):
            self.running.interrupted = True
            self._wake.set()
        return web.Response(status=200)

    async def get_history(self, request: web.Request) -> web.Response:
        self.state.history_calls += 1
        if (denied := self._denied(request)) is not None:
            return denied
        prompt_id = request.match_info["prompt_id"]
        entry = self.history.get(prompt_id)
        return web.json_response({prompt_id: entry} if entry else {})

    async def get_view(self, request: web.Request) -> web.Response:
        self.state.views += 1
        if (denied := self._denied(request)) is not None:
            return denied
        key = f"{request.query.get('type')}/{request.query.get('subfolder', '')}/{request.query.get('filename')}"
        data = self.files.get(key)
        if data is None:
            return web.Response(status=404)
        return web.Response(body=data, content_type="image/png")

    async def get_object_info(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return web.json_response(object_info(self.state.checkpoints))

    async def get_object_info_class(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        name = request.match_info["node_class"]
        info = object_info(self.state.checkpoints)
        return web.json_response({name: info[name]} if name in info else {})

    async def get_system_stats(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return web.json_response(
            {"system": {"os": "posix", "comfyui_version": "0.3.60", "argv": self.state.argv}, "devices": []}
        )

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        if (denied := self._denied(request)) is not None:
            return denied
        if self.state.refuse_websocket:
            return web.Response(status=403, text="websockets are not allowed here")
        client_id = request.query.get("clientId") or uuid.uuid4().hex
        ws = web.WebSocketResponse(heartbeat=None)
        await ws.prepare(request)
        self.state.ws_connects += 1
        self.state.ws_client_ids.append(client_id)
        flags: dict[str, bool] = {}
        entry = (ws, flags)
        self.sockets.setdefault(client_id, []).append(entry)
        try:
            await ws.send_json(
                {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": len(self.pending)}},
                                            "sid": client_id}}
            )  # fmt: skip
            if self.running is not None and self.running.client_id == client_id:
                # ComfyUI replays the current node to a reconnecting client.
                await ws.send_json(
                    {"type": "executing", "data": {"node": "3", "display_node": "3",
                                                   "prompt_id": self.running.prompt_id}}
                )  # fmt: skip
            async for message in ws:
                with contextlib.suppress(ValueError, AttributeError):
                    data = json.loads(message.data)
                    if data.get("type") == "feature_flags":
                        self.state.feature_flags.append(data.get("data") or {})
                        flags["metadata"] = bool((data.get("data") or {}).get("supports_preview_metadata"))
        finally:
            self.sockets[client_id].remove(entry)
        return ws

    # -- the worker ------------------------------------------------------------------------------------------
    async def _send(self, prompt: _Prompt, kind: str, data: dict[str, Any]) -> None:
        for ws, _ in list(self.sockets.get(prompt.client_id or "", [])):
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_json({"type": kind, "data": {**data, "prompt_id": prompt.prompt_id}})

    async def _send_preview(self, prompt: _Prompt) -> None:
        image = preview_image(prompt.number)
        for ws, flags in list(self.sockets.get(prompt.client_id or "", [])):
            if flags.get("metadata") and self.state.preview_metadata:
                meta = json.dumps({"node_id": "3", "prompt_id": prompt.prompt_id, "display_node_id": "3",
                                   "real_node_id": "3", "image_type": "image/png"}).encode()  # fmt: skip
                frame = struct.pack(">II", 4, len(meta)) + meta + image
            else:
                frame = struct.pack(">II", 1, 2) + image
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_bytes(frame)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once on an interrupt."""
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _work(self) -> None:
        while True:
            while not self.pending or self.state.hold:
                self._wake.clear()
                await self._wake.wait()
            prompt = self.pending.pop(0)
            self.running = prompt
            try:
                await self._run(prompt)
            finally:
                self.running = None

    def _finish(self, prompt: _Prompt, status: str, messages: list[Any], outputs: dict[str, Any]) -> None:
        self.history[prompt.prompt_id] = {
            "prompt": [prompt.number, prompt.prompt_id, prompt.graph, {}, ["9"]],
            "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages},
            "meta": {},
        }
        self.state.completed.append(prompt.prompt_id)

    async def _run(self, prompt: _Prompt) -> None:
        await self._send(prompt, "execution_start", {"timestamp": 0})
        await self._send(prompt, "execution_cached", {"nodes": [], "timestamp": 0})
        for node in ("4", "6", "7", "5"):
            await self._send(prompt, "executing", {"node": node, "display_node": node})
        await self._send(prompt, "executing", {"node": "3", "display_node": "3"})
        steps = max(1, self.state.steps)
        for step in range(1, steps + 1):
            while self.state.hold_running and not prompt.interrupted:
                await self._pause(0.05)
            if step == self.state.drop_sockets_at_step:
                self.state.drop_sockets_at_step = None
                await self.drop_sockets()
            await self._pause(self.state.step_delay)
            if prompt.interrupted:
                await asyncio.sleep(0.02)  # ComfyUI notices the interrupt at its next step
                data = {"node_id": "3", "node_type": "KSampler", "executed": ["4", "6", "7", "5"]}
                await self._send(prompt, "execution_interrupted", data)
                self._finish(
                    prompt, "error", [["execution_interrupted", {**data, "prompt_id": prompt.prompt_id}]], {}
                )
                await self._send(prompt, "executing", {"node": None})
                return
            await self._send(prompt, "progress", {"value": step, "max": steps, "node": "3"})
            if self.state.previews:
                await self._send_preview(prompt)
            if self.state.fail_execution and step == 1:
                message, self.state.fail_execution = self.state.fail_execution, None
                data = {"node_id": "3", "node_type": "KSampler", "executed": [], "exception_message": message,
                        "exception_type": "RuntimeError", "traceback": ["Traceback (most recent call last):\n",
                        '  File "execution.py", line 1\n'], "current_inputs": {}, "current_outputs": {}}  # fmt: skip
                await self._send(prompt, "execution_error", data)
                self._finish(
                    prompt, "error", [["execution_error", {**data, "prompt_id": prompt.prompt_id}]], {}
                )
                await self._send(prompt, "executing", {"node": None})
                return
        images = []
        latent = next((n for n in prompt.graph.values() if n.get("class_type") == "EmptyLatentImage"), None)
        sampler = next((n for n in prompt.graph.values() if n.get("class_type") == "KSampler"), None)
        batch = int(latent["inputs"].get("batch_size", 1)) if latent else 1
        seed = int(sampler["inputs"].get("seed", 0)) if sampler else 0
        for i in range(batch):
            name = f"imagine_{self._number:05d}_{i}.png"
            self.files[f"output//{name}"] = make_image(seed + i, 64, 64)
            images.append({"filename": name, "subfolder": "", "type": "output"})
        await self._send(prompt, "executing", {"node": "9", "display_node": "9"})
        await self._send(prompt, "executed", {"node": "9", "display_node": "9", "output": {"images": images}})
        if not self.state.old_server:
            await self._send(prompt, "execution_success", {"timestamp": 0})
            await asyncio.sleep(0.01)  # ComfyUI writes /history a moment after execution_success
        self._finish(prompt, "success", [["execution_success", {"prompt_id": prompt.prompt_id}]],
                     {"9": {"images": images}})  # fmt: skip
        await self._send(prompt, "executing", {"node": None})


if __name__ == "__main__":
    run_standalone(
        lambda args: FakeComfyUI(host=args.host, port=args.port, step_delay=args.delay / 4),
        "Fake ComfyUI server",
    )
