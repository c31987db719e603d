"""Host-side driver for the container end-to-end check in ``.ci/docker-check`` (stdlib only).

Talks to the fake Discord's control endpoints (``tests/fakes/discord``):
  ready FILE TIMEOUT             wait for the fake's first stdout line (one JSON object) and print it compactly
  field JSON KEY...              print the first of KEY... present in the JSON object (for bash)
  wait-command BASE NAME TIMEOUT poll BASE/_fake/state until the bot has synced the slash command NAME
  invoke BASE READY_JSON PROMPT  POST BASE/_fake/invoke for an /imagine; print the interaction id
  post URL JSON                  POST a JSON body (a fake's /_fake/config knobs, say) and print the answer
  wait-count URL KEY N TIMEOUT   poll a fake's JSON state at URL until the number at KEY is at least N
  wait-image BASE ID TIMEOUT     poll BASE/_fake/interactions/ID until the original response carries an image,
                                 fetch its bytes and check they are a PNG/JPEG/WebP/GIF
Exit status 0 on success, 1 with one line on stderr otherwise.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")


class DriverError(Exception):
    pass


def _http(method: str, url: str, body: Any = None, timeout: float = 10.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise DriverError(f"{method} {url}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DriverError(f"{method} {url}: {exc}") from None
    return json.loads(raw) if raw.strip() else None


def ready(path: str, timeout: str) -> None:
    deadline = time.monotonic() + float(timeout)
    file = Path(path)
    while time.monotonic() < deadline:
        text = file.read_text() if file.exists() else ""
        if "\n" in text:
            line = text.splitlines()[0]
            try:
                print(json.dumps(json.loads(line)))
            except json.JSONDecodeError:
                raise DriverError(f"first line of {path} is not JSON: {line[:200]!r}") from None
            return
        time.sleep(0.2)
    raise DriverError(f"no ready line in {path} after {timeout}s")


def field(obj: str, *keys: str) -> None:
    data = json.loads(obj)
    for key in keys:
        if data.get(key) not in (None, ""):
            print(data[key])
            return
    raise DriverError(f"none of {keys} in {obj[:300]}")


def wait_command(base: str, name: str, timeout: str) -> None:
    deadline = time.monotonic() + float(timeout)
    state: Any = None
    while time.monotonic() < deadline:
        state = _http("GET", f"{base}/_fake/state")
        commands = state.get("commands") if isinstance(state, dict) else None
        # {"<scope: global or a guild id>": [names...]}
        if isinstance(commands, dict) and any(name in names for names in commands.values()):
            print(json.dumps(commands))
            return
        time.sleep(0.5)
    commands = state.get("commands") if isinstance(state, dict) else state
    raise DriverError(f"/{name} not synced after {timeout}s; commands: {json.dumps(commands)[:300]}")


def post(url: str, body: str) -> None:
    print(json.dumps(_http("POST", url, json.loads(body))))


def wait_count(url: str, key: str, minimum: str, timeout: str) -> None:
    deadline = time.monotonic() + float(timeout)
    value: Any = None
    while time.monotonic() < deadline:
        state = _http("GET", url)
        value = state.get(key) if isinstance(state, dict) else None
        if isinstance(value, int | float) and value >= float(minimum):
            print(value)
            return
        time.sleep(0.1)
    raise DriverError(f"{key} at {url} is {value!r}, not >= {minimum}, after {timeout}s")


def invoke(base: str, ready_json: str, prompt: str) -> None:
    info = json.loads(ready_json)
    body = {
        "guild_id": info["guild_id"],
        "channel_id": info["channel_id"],
        "user_id": info["user_id"],
        "name": "imagine",
        "options": {"prompt": prompt},
    }
    reply = _http("POST", f"{base}/_fake/invoke", body)
    for key in ("id", "interaction_id"):
        if isinstance(reply, dict) and reply.get(key):
            print(reply[key])
            return
    raise DriverError(f"/_fake/invoke answered without an interaction id: {str(reply)[:300]}")


def _attachments(state: Any) -> list[dict[str, Any]]:
    """Attachments of the interaction's original response (the message /imagine edits)."""
    original = state.get("original") if isinstance(state, dict) else None
    return list(original.get("attachments") or []) if isinstance(original, dict) else []


IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF", b"GIF8")


def _check_image_bytes(base: str, message_id: str, index: int) -> None:
    url = f"{base}/_fake/attachments/{message_id}/{index}"
    try:
        with _OPENER.open(url, timeout=10) as response:
            head = response.read(16)
    except (urllib.error.URLError, OSError) as exc:
        raise DriverError(f"GET {url}: {exc}") from None
    if not head.startswith(IMAGE_MAGIC):
        raise DriverError(f"attachment {url} is not an image (starts {head!r})")


def _is_image(attachment: dict[str, Any]) -> bool:
    content_type = str(attachment.get("content_type") or "")
    filename = str(attachment.get("filename") or "").lower()
    return content_type.startswith("image/") or filename.endswith(IMAGE_SUFFIXES)


def wait_image(base: str, interaction_id: str, timeout: str) -> None:
    deadline = time.monotonic() + float(timeout)
    state: Any = None
    while time.monotonic() < deadline:
        state = _http("GET", f"{base}/_fake/interactions/{interaction_id}")
        images = [(i, a) for i, a in enumerate(_attachments(state)) if _is_image(a)]
        if images:
            index, attachment = images[0]
            _check_image_bytes(base, state["original"]["id"], index)
            print(json.dumps(attachment))
            return
        time.sleep(0.5)
    raise DriverError(f"no image attachment after {timeout}s; last state: {json.dumps(state)[:800]}")


def main(argv: list[str]) -> int:
    commands = {
        "ready": ready,
        "field": field,
        "wait-command": wait_command,
        "invoke": invoke,
        "post": post,
        "wait-count": wait_count,
        "wait-image": wait_image,
    }
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        commands[argv[0]](*argv[1:])
    except (DriverError, KeyError, TypeError, ValueError) as exc:
        print(f"e2e_driver {argv[0]}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
