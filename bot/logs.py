"""Logging set up in one place: one line per event, ``key=value`` fields (or JSON), secrets scrubbed.

Modules log through ``logging.getLogger(__name__)`` and pass fields as ``extra={"job": job.id, ...}``.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

#: The job a task works for. Set in each job's task; tasks it starts (its generation, backend polls) inherit
#: it, so their log lines carry the job id too without every function passing it along.
current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_job", default=None)

#: Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


def _format_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


class KeyValueFormatter(logging.Formatter):
    """``2026-11-25T14:00:00Z INFO bot.engine.manager job queued job=ab12 guild=1``."""

    def format(self, record: logging.LogRecord) -> str:
        timestamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{timestamp}.{int(record.msecs):03d}Z", record.levelname, record.name, record.getMessage()]
        parts.extend(f"{key}={_format_value(value)}" for key, value in _fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(
            {k: v if isinstance(v, int | float | bool) else str(v) for k, v in _fields(record).items()}
        )
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


class JobContextFilter(logging.Filter):
    """Adds ``job=<id>`` to lines logged on behalf of a job that did not name it themselves."""

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = current_job.get()
        if job_id is not None and not hasattr(record, "job"):
            record.job = job_id
        return True


#: Secrets at least this long are removed wherever they appear; shorter ones only as a whole token, so that a
#: one-letter password does not turn every "p" of a line into "[redacted]".
_ANYWHERE_FROM = 6


def redact(text: str, secrets: Iterable[str | None], mark: str = "[redacted]") -> str:
    """``text`` with every secret replaced by ``mark`` (the one scrubber: logs, ``check``, errors shown)."""
    for secret in secrets:
        if not secret:
            continue
        if len(secret) >= _ANYWHERE_FROM:
            text = text.replace(secret, mark)
        elif secret in text:
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", mark, text)
    return text


#: Discord interaction tokens start with base64("interaction:").
_INTERACTION_TOKEN = re.compile(r"aW50ZXJhY3Rpb246[A-Za-z0-9_\-.=]+")


class RedactingFilter(logging.Filter):
    """Replaces secrets wherever they would appear: message, arguments, fields, tracebacks."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def _scrub(self, text: str) -> str:
        text = redact(text, self.secrets)
        # Interaction tokens (15-minute credentials for a job's message) are not known up front: match them.
        return _INTERACTION_TOKEN.sub("[redacted]", text)

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._scrub(record.getMessage())
        record.args = None
        for key, value in _fields(record).items():
            if isinstance(value, str):
                setattr(record, key, self._scrub(value))
        if record.exc_info:
            # Format now, scrub, and carry the text instead of the live exception.
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
            record.exc_text = None
            record.msg = f"{record.msg}\n{self._scrub(text)}"
        return True


def configure_logging(level: str = "INFO", fmt: str = "text", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(JobContextFilter())
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level)
    # discord.py's gateway chatter is useful at DEBUG only.
    logging.getLogger("discord").setLevel(max(logging.INFO, logging.getLevelName(level)))
    # aiosqlite logs every statement with its parameters at DEBUG: prompts and live interaction tokens.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, logging.getLevelName(level)))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
