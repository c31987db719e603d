"""ComfyUI's websocket: one per backend instance, its events routed to the prompts being followed.

:class:`EventSocket` opens ``/ws?clientId=...`` once, reconnects with backoff, and keeps the client id in a file
so a restarted bot is the same client (ComfyUI sends a prompt's events only to its ``client_id``, and replays the
current ``executing`` to a client that comes back). A follower :meth:`~EventSocket.watch`-es a prompt id and
reads :class:`Event`-s from its queue. JSON events carry a ``prompt_id``; a type-1 binary preview carries none
and belongs to the prompt of the last ``executing``. After every (re)connect every watch gets a ``recheck``
event, so a prompt that ended while the socket was down is looked up in ``/history`` instead of waited on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bot.backends import http
from bot.engine.errors import FailureReason, GenerationError

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # progress | preview | executing | done | failed | interrupted | recheck
    fraction: float | None = None
    preview: bytes | None = None
    message: str = ""


RECHECK = Event("recheck")


@dataclass
class Watch:
    """One followed prompt: the events routed to it, and what its follower remembers between them."""

    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    fraction: float | None = None
    last_preview_at: float = float("-inf")
    announced: bool = False


def one_line(text: Any, limit: int = 200) -> str:
    """The first non-empty line of an exception message, bounded (tracebacks never reach members)."""
    for line in str(text or "").splitlines():
        if line.strip():
            line = " ".join(line.split())
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def execution_error(data: Mapping[str, Any]) -> str:
    """``execution_error``'s data as one sentence: the node type and the exception's first line."""
    node = data.get("node_type") or data.get("node_id") or "a node"
    message = one_line(data.get("exception_message")) or one_line(data.get("exception_type")) or "an error"
    return f"ComfyUI failed in {node}: {message}"


class EventSocket:
    """The one websocket of a ComfyUI backend instance."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        ws_root: str,
        *,
        headers: Mapping[str, str],
        client_id_path: Path | None,
        reconnect_min_s: float = 0.5,
        reconnect_max_s: float = 30.0,
        connect_wait_s: float = 5.0,
    ) -> None:
        self._session = session
        self._ws_root = ws_root
        self._headers = dict(headers)
        self._client_id_path = client_id_path
        self._reconnect = (reconnect_min_s, reconnect_max_s)
        self._connect_wait_s = connect_wait_s
        self.client_id: str | None = None
        #: How many times the socket came up (a public probe for tests and logs).
        self.connections = 0
        self._watches: dict[str, Watch] = {}
        self._running_prompt: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._connected = asyncio.Event()
        self._closed = False

    # -- watches -----------------------------------------------------------------------------------------------
    def watch(self, prompt_id: str) -> Watch:
        return self._watches.setdefault(prompt_id, Watch())

    def rename(self, old: str, new: str) -> Watch:
        """An older server chose its own id: the watch moves to it (its follower re-checks what it missed)."""
        watch = self._watches.pop(old)
        self._watches[new] = watch
        return watch

    def unwatch(self, prompt_id: str, watch: Watch | None = None) -> None:
        if watch is None or self._watches.get(prompt_id) is watch:
            self._watches.pop(prompt_id, None)

    # -- lifecycle ---------------------------------------------------------------------------------------------
    async def ensure(self, *, wait: bool = True) -> None:
        """Start the socket if it is not running; with ``wait``, give it a moment to connect.

        Events sent before we listen are lost (a prompt's end is still found through /history), hence the wait.
        """
        async with self._lock:
            if self._closed:
                raise GenerationError(FailureReason.UNAVAILABLE, "The ComfyUI backend is shutting down.")
            if self.client_id is None:
                self.client_id = await asyncio.to_thread(self._load_client_id)
            if self._task is None or self._task.done():
                self._task = asyncio.create_task(self._run(), name="comfyui-websocket")
                self._task.add_done_callback(_log_end)
        if wait and not self._connected.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._connect_wait_s):  # not wait_for: it can lose a cancel (3.11)
                    await self._connected.wait()

    async def aclose(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _load_client_id(self) -> str:
        """The persisted client id (blocking file I/O: run in a thread)."""
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

    async def _run(self) -> None:
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
                    log.info("ComfyUI websocket connected (%s)", http.safe_url(url))
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

    # -- routing -----------------------------------------------------------------------------------------------
    def _recheck_all(self) -> None:
        for watch in self._watches.values():
            watch.events.put_nowait(RECHECK)

    def _route(self, prompt_id: Any, event: Event) -> None:
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
                self._route(prompt_id, Event("done"))
            else:
                self._running_prompt = prompt_id
                self._route(prompt_id, Event("executing"))
        elif kind == "execution_start":
            self._running_prompt = prompt_id
            self._route(prompt_id, Event("executing"))
        elif kind == "progress":
            value, maximum = data.get("value"), data.get("max")
            if isinstance(value, int | float) and isinstance(maximum, int | float) and maximum > 0:
                self._route(prompt_id, Event("progress", fraction=min(1.0, max(0.0, value / maximum))))
        elif kind == "execution_success":
            self._route(prompt_id, Event("done"))
        elif kind == "execution_error":
            self._route(prompt_id, Event("failed", message=execution_error(data)))
        elif kind == "execution_interrupted":
            self._route(prompt_id, Event("interrupted"))

    def _on_binary(self, data: bytes) -> None:
        if len(data) < 8:
            return
        event_type = int.from_bytes(data[:4], "big")
        if event_type == 1:  # preview: image type, then the bytes; it belongs to whatever runs
            self._route(self._running_prompt, Event("preview", preview=bytes(data[8:])))
        elif event_type == 4:  # preview with metadata: length, JSON, bytes
            length = int.from_bytes(data[4:8], "big")
            try:
                meta = json.loads(data[8 : 8 + length])
            except ValueError:
                return
            if isinstance(meta, dict):
                prompt_id = meta.get("prompt_id") or self._running_prompt
                self._route(prompt_id, Event("preview", preview=bytes(data[8 + length :])))


def _log_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("ComfyUI websocket task stopped: %r", task.exception())
