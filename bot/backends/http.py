"""Shared HTTP plumbing for the backends: one retry policy, readable errors, no secrets in messages or logs.

Retry rules, in one place so every backend behaves alike:

* a connection that never got established (refused, DNS, connect timeout) is retried: nothing was sent;
* 502/503/504 and rate limits that ask for a retry (``rate_limit_exceeded``, Horde ``TooManyPrompts``) are
  retried, honouring ``Retry-After`` (seconds); a 504 on a request that creates work is *not* retried, because
  the gateway may already have handed it on;
* everything else fails at once. In particular a request that creates work (a txt2img POST) is never sent
  twice: a 500, a read timeout or a dropped connection after sending is a failure, not a retry.

A request that creates work and fails *before the server took it* (its connection never came up, or it was
answered 429 or 503) raises an error marked ``not_accepted``: a pool may hand that job to another backend.

Retries are bounded (attempts and total wait), back off exponentially with jitter, and sleep through an
injectable ``sleep`` so tests run instantly.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import inspect
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from bot.engine.backend import ProgressCallback
from bot.engine.errors import SERVICE_DOWN, FailureReason, GenerationError
from bot.engine.models import Progress
from bot.logs import redact

log = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]
ErrorMapper = Callable[["HttpReply"], GenerationError]

#: Statuses that mean "the server did not take the request; try again shortly".
RETRY_STATUSES = frozenset({502, 503, 504})
#: Answers to a submit that mean the server did not take the work (a pool may try another backend).
REFUSED_STATUSES = frozenset({429, 503})
#: Replies larger than this are refused (a hostile or broken backend must not exhaust memory).
MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_MESSAGE_CHARS = 300
#: An ETA beyond a day is noise (and ``inf`` seconds cannot be shown): clamp to it.
MAX_ETA_S = 86_400.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter; ``Retry-After`` wins when the server sends one."""

    attempts: int = 3
    base_delay_s: float = 1.0
    max_delay_s: float = 10.0
    max_total_wait_s: float = 30.0
    jitter: float = 0.25

    def backoff(self, attempt: int) -> float:
        delay = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return delay * (1 + self.jitter * random.random())


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON, or ``None`` when it is not JSON (proxies answer HTML error pages)."""
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None

    def json_object(self) -> dict[str, Any]:
        data = self.json()
        return data if isinstance(data, dict) else {}


def normalise_base_url(url: str, suffix: str) -> str:
    """Drop a trailing API ``suffix`` (and any prefix of it made of whole segments) from ``url``.

    ``normalise_base_url("http://h:1337/v1", "/v1") == "http://h:1337"``; also accepts the bare root.
    """
    url = url.strip().rstrip("/")
    parts = [p for p in suffix.strip("/").split("/") if p]
    for n in range(len(parts), 0, -1):
        tail = "/" + "/".join(parts[:n])
        if url.lower().endswith(tail.lower()):
            return url[: -len(tail)]
    return url


def safe_url(url: str) -> str:
    """A URL fit for logs: no user:password, no query string (signed links carry secrets there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<url>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


TRACEBACK_MARKER = "Traceback (most recent call last)"


def drop_traceback(text: str) -> str:
    """Python servers (gpt4free, SD.Next) answer a crash with its traceback: users get only its last line.

    A traceback already flattened onto one line has no clean last line, so all of it goes.
    """
    head, marker, tail = text.partition(TRACEBACK_MARKER)
    if not marker:
        return text
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    last = lines[-1] if len(lines) > 1 else ""
    head = head.strip().rstrip(":").strip()
    return ": ".join(part for part in (head, last) if part) or "The image backend crashed."


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Remove secrets (and tracebacks) from text that may reach a user or a log, and bound its length."""
    text = redact(text, secrets, "***")
    text = " ".join(drop_traceback(text).split())
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 1] + "…"
    return text


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # HTTP-dates are rare for these APIs; fall back to our own backoff
    return max(0.0, seconds)


def decode_base64_image(text: Any) -> bytes:
    """Decode a base64 image (optionally a ``data:`` URL); garbage is an INVALID_IMAGE failure."""
    if not isinstance(text, str) or not text:
        raise GenerationError(FailureReason.INVALID_IMAGE, "The backend returned an empty image.")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise GenerationError(
            FailureReason.INVALID_IMAGE, "The backend returned something that is not an image."
        ) from None


def _finite(value: float | None, low: float, high: float) -> float | None:
    """``value`` clamped to ``[low, high]``; ``None`` ("unknown") for NaN, an infinity and a non-number: an
    infinite ETA or fraction says nothing a user could be shown."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    return min(high, max(low, float(value)))


def clamp_progress(progress: Progress) -> Progress:
    """Progress as the rest of the bot may trust it: a fraction in ``[0, 1]``, an ETA and a queue position
    that are finite and never negative. A backend's JSON can say ``NaN`` or ``Infinity`` (Python's and
    A1111's encoders emit them); one such value used to make every later progress edit fail.
    """
    fraction = _finite(progress.fraction, 0.0, 1.0)
    eta = _finite(progress.eta_s, 0.0, MAX_ETA_S)
    position = progress.queue_position
    if position is not None:
        position = None if isinstance(position, bool) or not isinstance(position, int) else max(0, position)
    if (fraction, eta, position) == (progress.fraction, progress.eta_s, progress.queue_position):
        return progress
    return dataclasses.replace(progress, fraction=fraction, eta_s=eta, queue_position=position)


def report(on_progress: ProgressCallback, progress: Progress) -> None:
    """Call a progress callback with clamped values (:func:`clamp_progress`): every backend's progress passes
    through here, so this is the one boundary. The callback's bugs must never fail a generation."""
    try:
        on_progress(clamp_progress(progress))
    except Exception as exc:
        log.warning("progress callback failed: %s", type(exc).__name__)


async def maybe_await(value: Any) -> None:
    if inspect.isawaitable(value):
        await value


_cleanup_tasks: set[asyncio.Task[None]] = set()


async def run_cleanup(coro: Coroutine[Any, Any, Any], *, limit_s: float, what: str) -> None:
    """Run remote cleanup (interrupt, DELETE) after a cancel: shielded from a second cancel, bounded in time.

    Failures are logged, never raised: the caller is about to re-raise ``CancelledError`` anyway.
    """

    async def bounded() -> None:
        try:
            async with asyncio.timeout(limit_s):
                await coro
        except TimeoutError:
            log.warning("%s took longer than %.0fs; gave up", what, limit_s)
        except GenerationError as exc:
            log.warning("%s failed: %s", what, exc.message)
        except Exception as exc:
            log.warning("%s failed: %s", what, type(exc).__name__)

    task = asyncio.create_task(bounded(), name=what)
    _cleanup_tasks.add(task)
    task.add_done_callback(_cleanup_tasks.discard)
    await asyncio.shield(task)


def make_timeout(
    total: float | None, *, connect: float = 10.0, read: float | None = None
) -> aiohttp.ClientTimeout:
    """A per-request timeout; ``connect`` is separate so a dead host fails fast (and is safely retried)."""
    return aiohttp.ClientTimeout(total=total, connect=connect, sock_read=read)


async def _send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    max_bytes: int,
    **kwargs: Any,
) -> HttpReply:
    async with session.request(method, url, raise_for_status=False, **kwargs) as resp:
        length = resp.content_length
        if length is not None and length > max_bytes:
            raise GenerationError(FailureReason.UNAVAILABLE, "The image backend sent a reply far too large.")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(256 * 1024):
            size += len(chunk)
            if size > max_bytes:
                raise GenerationError(
                    FailureReason.UNAVAILABLE, "The image backend sent a reply far too large."
                )
            chunks.append(chunk)
        return HttpReply(resp.status, resp.headers, b"".join(chunks))


async def request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    what: str,
    map_error: ErrorMapper,
    retry: RetryPolicy,
    sleep: Sleep,
    client_timeout: aiohttp.ClientTimeout,
    creates_work: bool = False,
    secrets: Iterable[str | None] = (),
    json: Any = None,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
    max_bytes: int = MAX_BODY_BYTES,
) -> HttpReply:
    """Send one request under the retry rules; return a 2xx reply or raise a readable GenerationError.

    ``what`` names the call for logs and messages ("A1111 txt2img"). ``creates_work`` marks a request that
    must never be sent twice once it may have reached the server.
    """
    secrets = tuple(secrets)
    kwargs: dict[str, Any] = {"timeout": client_timeout, "headers": headers, "params": params}
    if json is not None:
        kwargs["json"] = json
    waited = 0.0
    attempt = 0
    while True:
        attempt += 1
        retry_after: float | None = None
        try:
            reply = await _send(session, method, url, max_bytes=max_bytes, **kwargs)
        except aiohttp.ClientConnectorCertificateError:
            raise GenerationError(
                FailureReason.UNAVAILABLE,
                SERVICE_DOWN,
                advice=f"{what}: the TLS certificate of {safe_url(url)} was not accepted; check "
                "IMAGE_BACKEND_URL (and the server's certificate).",
            ) from None
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            # The connection never came up, so nothing was sent: always safe to try again.
            log.info("%s: cannot connect to %s (%s)", what, safe_url(url), type(exc).__name__)
            failure = GenerationError(
                FailureReason.UNAVAILABLE,
                f"{what}: could not connect to the image backend.",
                advice=f"{what}: cannot connect to {safe_url(url)} ({type(exc).__name__}); check that the "
                "image backend is running and IMAGE_BACKEND_URL points at it.",
            )
            can_retry = True
            failure.not_accepted = creates_work
        except TimeoutError:
            failure = GenerationError(
                FailureReason.TIMEOUT, f"{what}: the image backend did not answer in time."
            )
            can_retry = False
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
            log.info("%s: connection lost (%s)", what, type(exc).__name__)
            failure = GenerationError(
                FailureReason.UNAVAILABLE,
                f"{what}: the image backend closed the connection before answering.",
            )
            can_retry = not creates_work
        except aiohttp.ClientError as exc:
            log.info("%s: HTTP error %s", what, type(exc).__name__)
            failure = GenerationError(
                FailureReason.UNAVAILABLE, f"{what}: the request to the image backend failed."
            )
            can_retry = False
        else:
            if reply.status < 400:
                return reply
            mapped = map_error(reply)
            retry_after = parse_retry_after(reply.headers)
            failure = GenerationError(
                mapped.reason,
                scrub(mapped.message, secrets),
                advice=scrub(mapped.advice, secrets) if mapped.advice else None,
                retry_after=retry_after,
                not_accepted=creates_work and reply.status in REFUSED_STATUSES,
            )
            transient = reply.status in RETRY_STATUSES and not (creates_work and reply.status == 504)
            can_retry = transient or failure.reason is FailureReason.RATE_LIMITED
            log.info("%s: HTTP %d (%s)", what, reply.status, failure.reason.value)
        if not can_retry or attempt >= retry.attempts:
            raise failure
        delay = retry_after if retry_after is not None else retry.backoff(attempt)
        if waited + delay > retry.max_total_wait_s:
            log.info("%s: would wait %.1fs more than allowed; giving up", what, delay)
            raise failure
        log.info("%s: retrying in %.1fs (attempt %d of %d)", what, delay, attempt + 1, retry.attempts)
        await sleep(delay)
        waited += delay


class RateLimiter:
    """A token bucket shared by all polls of one backend instance, so concurrent jobs do not multiply calls."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int = 1,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            while True:
                now = self._clock()
                self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate_per_s)
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await self._sleep((1 - self._tokens) / self.rate_per_s)


def error_detail(data: Any, *keys: str) -> str:
    """The first non-empty string among ``keys`` of a JSON error body (FastAPI lists flattened)."""
    if not isinstance(data, dict):
        return ""
    for key in keys:
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
        if isinstance(value, list) and value:
            parts = []
            for item in value[:3]:
                if isinstance(item, dict):
                    loc = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
                    parts.append(f"{loc}: {item.get('msg', '')}".strip(": "))
                else:
                    parts.append(str(item))
            return "; ".join(parts)
        if isinstance(value, dict):
            inner = error_detail(value, "message", "detail")
            if inner:
                return inner
    return ""


_SAFE_TEXT = re.compile(r"[^\x20-\x7e]+")


def plain_text(body: bytes, limit: int = 120) -> str:
    """A short printable excerpt of a non-JSON body (e.g. a proxy's error page), for messages."""
    text = _SAFE_TEXT.sub(" ", body[:2000].decode("utf-8", "replace"))
    text = re.sub(r"<[^>]+>", " ", text)
    return " ".join(text.split())[:limit]
