"""Wire helpers shared by the fake's REST and interaction handlers: errors, bodies, JSON responses.

Discord answers errors as ``{"message", "code"[, "errors"]}`` with exact ``application/json`` (discord.py
parses nothing else as JSON); request bodies are JSON or ``multipart/form-data`` with ``payload_json`` and
``files[n]`` parts.
"""

from __future__ import annotations

import json
import mimetypes
import re
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

JSON = "application/json"


class ApiError(Exception):
    """A Discord error answer: HTTP status, message, JSON error code (and nested form errors)."""

    def __init__(self, status: int, message: str, code: int, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.errors = status, message, code, errors

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"message": self.message, "code": self.code}
        if self.errors:
            body["errors"] = self.errors
        return body


def form_error(path: str, code: str, message: str) -> ApiError:
    """Discord's 50035 "Invalid Form Body" with a nested errors object."""
    node: dict[str, Any] = {"_errors": [{"code": code, "message": message}]}
    for part in reversed(path.split(".")):
        node = {part: node}
    return ApiError(400, "Invalid Form Body", 50035, node)


@dataclass
class Upload:
    """One file part of a multipart request."""

    index: int
    filename: str
    content_type: str
    data: bytes


@dataclass
class Body:
    """A parsed request body (stored on the request by the REST middleware)."""

    json: Any = None
    uploads: list[Upload] = field(default_factory=list)


BODY_KEY = web.RequestKey("fake_discord_body", Body)


@dataclass
class Injection:
    """A canned answer for the next `count` requests matching method and path pattern."""

    method: str
    pattern: re.Pattern[str]
    count: int
    status: int
    body: Any
    headers: dict[str, str]

    def matches(self, method: str, path: str) -> bool:
        return self.count > 0 and self.method in ("*", method) and bool(self.pattern.search(path))


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """Exact `application/json` (no charset): discord.py only parses that as JSON."""
    resp = web.Response(body=json.dumps(data).encode(), status=status, headers=headers)
    resp.content_type = JSON
    return resp


async def read_body(request: web.Request) -> Body:
    """The request body as Discord reads it: JSON, or multipart with payload_json and files[n]."""
    if not request.body_exists:
        return Body()
    if request.content_type == "multipart/form-data":
        body = Body()
        reader = await request.multipart()
        next_index = 0
        while True:
            part = await reader.next()
            if part is None:
                break
            data = await part.read()  # type: ignore[union-attr]
            name = part.name or ""
            if name == "payload_json":
                body.json = json.loads(data)
                continue
            m = re.fullmatch(r"files\[(\d+)\]", name)
            index = int(m.group(1)) if m else next_index
            next_index = max(next_index, index + 1)
            filename = part.filename or f"file{index}"
            ctype = mimetypes.guess_type(filename)[0] or part.headers.get("Content-Type", "")
            body.uploads.append(Upload(index, filename, ctype or "application/octet-stream", bytes(data)))
        return body
    raw = await request.read()
    if not raw:
        return Body()
    try:
        return Body(json=json.loads(raw))
    except ValueError:
        raise ApiError(400, "400: Bad Request (body is not JSON)", 50109) from None
