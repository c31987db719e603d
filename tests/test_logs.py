"""Logging as ``configure_logging`` sets it up: the token never reaches the output, JSON is one object per line."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator

import pytest

from bot.logs import configure_logging, redact

TOKEN = "MTIz.secret-token-value.abcdef123456"


@pytest.fixture
def stderr(capsys) -> Iterator[Callable[[], str]]:
    """What the configured handler wrote (it writes to ``sys.stderr``, which capsys holds during the test);
    the root logger is restored afterwards."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("discord").level)
    yield lambda: capsys.readouterr().err
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    logging.getLogger("discord").setLevel(saved[2])


def log_the_token_everywhere() -> None:
    log = logging.getLogger("bot.test")
    log.info("logging in with %s", TOKEN)
    log.warning(f"token in the message itself: {TOKEN}")
    log.info("token in a field", extra={"job": "ab12", "auth": f"Bot {TOKEN}"})
    try:
        raise RuntimeError(f"401 for Authorization: Bot {TOKEN}")
    except RuntimeError:
        log.exception("request failed", extra={"job": "ab12"})


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_token_never_appears(stderr, fmt) -> None:
    configure_logging("INFO", fmt, [TOKEN])
    log_the_token_everywhere()
    output = stderr()
    assert TOKEN not in output
    assert "secret-token-value" not in output
    assert output.count("[redacted]") >= 4
    assert "RuntimeError" in output  # the traceback is kept, only scrubbed
    assert "job=ab12" in output or '"job": "ab12"' in output


def test_json_is_one_object_per_line(stderr) -> None:
    configure_logging("INFO", "json", [TOKEN])
    log_the_token_everywhere()
    logging.getLogger("bot.test").info('quotes " and\nnewlines', extra={"count": 3, "ok": True})
    lines = stderr().splitlines()
    assert len(lines) == 5  # the multi-line traceback stays inside its record's line
    records = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert records[2]["job"] == "ab12" and records[2]["auth"] == "Bot [redacted]"
    assert "Traceback" in records[3]["msg"] or "Traceback" in records[3].get("exc", "")
    assert records[4]["count"] == 3 and records[4]["ok"] is True
    assert records[4]["msg"] == 'quotes " and\nnewlines'


def test_access_logs_stay_quiet(stderr) -> None:
    configure_logging("INFO", "text", [])
    assert not logging.getLogger("aiohttp.access").isEnabledFor(logging.INFO)


async def test_lines_logged_for_a_job_carry_its_id(stderr) -> None:
    """A backend logging inside a job's generation names the job without being told it."""
    import asyncio

    from bot.engine.manager import JobManager
    from bot.engine.models import ImageRequest
    from tests.helpers import ControlledBackend

    configure_logging("INFO", "text")

    class ChattyBackend(ControlledBackend):
        async def generate(self, request, on_progress=lambda _: None):
            logging.getLogger("bot.backends.chatty").info("talking to the backend")
            return await super().generate(request, on_progress)

    manager = JobManager(ChattyBackend(auto_release=True))
    job = await manager.submit(ImageRequest(prompt="g1:x"), guild_id=1, user_id=1)
    await manager.wait(job.id)
    await manager.shutdown(0)
    await asyncio.sleep(0)
    (line,) = [line for line in stderr().splitlines() if "talking to the backend" in line]
    assert line.endswith(f"job={job.id}")


def test_interaction_tokens_are_redacted_too(stderr) -> None:
    configure_logging("INFO", "text")  # no secrets known up front
    token = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDpzZWNyZXQ.abc_DEF-123"
    logging.getLogger("bot.test").warning("PATCH /webhooks/1/%s/messages/@original failed", token)
    out = stderr()
    assert token not in out and "aW50ZXJhY3Rpb246" not in out
    assert "/webhooks/1/[redacted]/messages/@original" in out


def test_the_database_password_never_appears(stderr, monkeypatch: pytest.MonkeyPatch) -> None:
    """DATABASE_URL's password is scrubbed like the token, as written (percent-encoded) and decoded."""
    from bot.__main__ import log_secrets
    from bot.settings import load_settings

    url = "postgresql://bot:p%40ss-w0rd-xyz@db:5432/imagine"
    monkeypatch.setenv("DATABASE_URL", url)
    configure_logging("INFO", "text", log_secrets(load_settings(env_file=None)))
    log = logging.getLogger("bot.test")
    log.warning("connecting to %s", url)
    log.warning("driver said: password p@ss-w0rd-xyz rejected")
    output = stderr()
    assert "p%40ss-w0rd-xyz" not in output and "p@ss-w0rd-xyz" not in output
    assert output.count("[redacted]") == 2


def test_a_short_secret_is_redacted_as_a_whole_token_only() -> None:
    # A one-letter database password must not turn every "p" of a line into "[redacted]" (nor leak itself).
    text = "database: problem: password authentication failed for user=u password=p at postgresql://u:p@db/x"
    out = redact(text, ["p"])
    assert "problem" in out and "postgresql" in out
    assert "password=[redacted]" in out and "u:[redacted]@db" in out
    assert redact("hunter2-secret in the middle", ["hunter2-secret"]) == "[redacted] in the middle"
    assert redact("xhunter22x", ["hunter22"]) == "x[redacted]x"  # long ones go wherever they appear
