"""ComfyUI (``IMAGE_BACKEND=comfyui``): the admin's own API-format workflow, filled in and queued.

Modules: :mod:`.workflow` (placeholders and checks, no I/O), :mod:`.events` (the one websocket and the routing
of its events), :mod:`.backend` (submit, follow, fetch, cancel).

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
  a refusal that names the node. While a prompt waits in ComfyUI's queue (shared with its web UI), its
  position there is reported.
* **End.** ``execution_success`` or ``executing`` with ``node: null`` ends a prompt; outputs come from
  ``/history/{id}`` then ``/view``. ``execution_error`` / ``execution_interrupted`` end it as a failure, the
  exception message cut to one line.
* **Cancel.** A pending prompt is deleted from the queue (``POST /queue {"delete": [id]}``); a running one is
  interrupted (``POST /interrupt {"prompt_id": id}``) only while ``GET /queue`` shows it running, because older
  servers ignore the body and stop whatever runs.
* Operator hints (``--preview-method auto``, installing node packs) go to logs and ``check``, never to members.
"""

from bot.backends.comfyui.backend import SIZES, ComfyUIBackend, auth_headers, map_error
from bot.backends.comfyui.workflow import BUILTIN_WORKFLOW, DEFAULTS, PLACEHOLDERS, Workflow

__all__ = [
    "BUILTIN_WORKFLOW",
    "DEFAULTS",
    "PLACEHOLDERS",
    "SIZES",
    "ComfyUIBackend",
    "Workflow",
    "auth_headers",
    "map_error",
]
