"""/metrics: values and labels after real jobs through the real bot; bounded labels; one registry per bot."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.engine.errors import FailureReason
from bot.engine.manager import JobEvent
from bot.engine.models import ImageRequest, Job, JobState
from bot.service.metrics import DISCORD_STATUS_BUCKETS, Metrics, discord_status_bucket, failure_reason_label
from tests.frontend.conftest import embed_author, is_done, running_bot

REFUSED = (
    400,
    {
        "error": {
            "message": "Your request was rejected by our safety system.",
            "type": "invalid_request_error",
            "param": None,
            "code": "content_policy_violation",
        }
    },
)
ALLOWED_LABELS = {
    "state": {s.value for s in JobState},
    "reason": {r.value for r in FailureReason} | {"other"},
    "status": set(DISCORD_STATUS_BUCKETS),
    "backend": {"openai"},  # the configured backends only (a pool of one is named after its kind)
    "outcome": {"succeeded", "failed", "failed_over", "stopped"},
    "le": None,  # histogram buckets: numbers
}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from the Prometheus text format."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def scrape_until(base: str, done, timeout: float = 10.0) -> dict:
    """Scrape /metrics until ``done(parsed)``; the last scrape is returned (with its raw text under "text")."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"{base}/metrics") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
                text = await response.text()
            parsed = samples(text)
            if done(parsed) or loop.time() > deadline:
                return {**parsed, "text": text}
            await asyncio.sleep(0.05)


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


async def test_metrics_after_real_jobs(fake_discord, fake_openai, tmp_path) -> None:
    async with running_bot(fake_discord, tmp_path, backend_url=fake_openai.url) as h:
        user = fake_discord.add_member(h.guild.id)
        prompt = "a lighthouse at dusk"
        first = await h.imagine(user.id, prompt)
        await first.wait_until(is_done, timeout=10)

        again = await h.imagine(user.id, prompt)  # served from the cache
        message = await again.wait_until(is_done, timeout=10)
        assert "from cache" in embed_author(message)

        fake_openai.configure(fail_next=[REFUSED])
        # The failed job's final edit is refused by Discord: one 403 counted, by status only.
        fake_discord.inject_error(
            "PATCH", r"/messages/@original", 403, {"message": "Missing Access", "code": 50001}
        )
        await h.imagine(user.id, "a forbidden thing")
        parsed = await scrape_until(
            h.service.web.url,
            lambda p: (
                value(p, "imagine_jobs_finished_total", state="failed") == 1
                and value(p, "imagine_discord_api_errors_total", status="403") == 1
            ),
        )
        text = parsed.pop("text")
        job_ids = [job.id for job in await h.bot.engine.store.list_jobs()]
        assert len(job_ids) == 3

    assert value(parsed, "imagine_jobs_finished_total", state="succeeded") == 2
    assert value(parsed, "imagine_jobs_finished_total", state="failed") == 1
    assert value(parsed, "imagine_jobs_finished_total", state="cancelled") == 0
    # One generation timed: the cache hit never started a generation.
    assert value(parsed, "imagine_generation_seconds_count") == 1
    assert 0 < value(parsed, "imagine_generation_seconds_sum") < 10
    assert value(parsed, "imagine_generation_seconds_bucket", le="600.0") == 1
    assert value(parsed, "imagine_backend_errors_total", reason="content_refused") == 1
    assert sum(v for (name, _), v in parsed.items() if name == "imagine_backend_errors_total") == 1
    assert value(parsed, "imagine_discord_api_errors_total", status="403") == 1
    assert value(parsed, "imagine_discord_api_errors_total", status="5xx") == 0
    assert value(parsed, "imagine_cache_hits_total") >= 1
    assert value(parsed, "imagine_cache_misses_total") >= 2
    assert value(parsed, "imagine_cache_entries") >= 1
    assert value(parsed, "imagine_jobs", state="queued") == 0
    assert value(parsed, "imagine_jobs", state="running") == 0
    assert value(parsed, "imagine_queue_depth") == 0
    # Per backend: the two generations (one refused by the content policy), none holding a slot now.
    assert value(parsed, "imagine_backend_generations_total", backend="openai", outcome="succeeded") == 1
    assert value(parsed, "imagine_backend_generations_total", backend="openai", outcome="failed") == 1
    assert value(parsed, "imagine_backend_slots_busy", backend="openai") == 0
    assert value(parsed, "imagine_backend_slots", backend="openai") == 4
    assert value(parsed, "imagine_backend_up", backend="openai") == 1

    # Bounded labels only: never a user, guild, channel, job id or a prompt.
    forbidden = [str(user.id), str(h.guild.id), h.channel_id, "lighthouse", "forbidden", *job_ids]
    for (_, labels), _v in parsed.items():
        for key, label in labels:
            assert key in ALLOWED_LABELS, key
            if ALLOWED_LABELS[key] is not None:
                assert label in ALLOWED_LABELS[key], (key, label)
            assert not any(f in label for f in forbidden), label
    assert not any(f in text for f in forbidden)


def _job(job_id: str, state: JobState, reason: str | None = None) -> Job:
    job = Job(id=job_id, request=ImageRequest(prompt="x"), guild_id=42, user_id=7)
    job.state, job.error_reason = state, reason
    return job


def test_each_metrics_has_its_own_registry_and_bounded_reasons() -> None:
    now = [0.0]
    one, two = Metrics(clock=lambda: now[0]), Metrics()
    job = _job("a", JobState.RUNNING)
    one.on_job_event(job, JobEvent.STARTED)
    now[0] = 12.5
    job.state = JobState.SUCCEEDED
    one.on_job_event(job, JobEvent.FINISHED)
    one.on_job_event(_job("b", JobState.TIMED_OUT, "timeout"), JobEvent.FINISHED)
    one.on_job_event(_job("c", JobState.FAILED, "some new reason"), JobEvent.FINISHED)
    one.on_job_event(_job("d", JobState.CANCELLED, "cancelled"), JobEvent.FINISHED)

    first, second = samples(one.render().decode()), samples(two.render().decode())
    assert value(first, "imagine_generation_seconds_sum") == 12.5
    assert value(first, "imagine_generation_seconds_bucket", le="10.0") == 0
    assert value(first, "imagine_generation_seconds_bucket", le="15.0") == 1
    assert value(first, "imagine_backend_errors_total", reason="timeout") == 1
    assert value(first, "imagine_backend_errors_total", reason="other") == 1  # unknown reasons do not leak
    assert sum(v for (n, _), v in first.items() if n == "imagine_backend_errors_total") == 2  # not cancels
    assert value(second, "imagine_generation_seconds_count") == 0
    assert value(second, "imagine_jobs_finished_total", state="succeeded") == 0
    assert not one._started  # nothing kept per job after it finished


@pytest.mark.parametrize(
    ("status", "bucket"),
    [
        (401, "401"),
        (403, "403"),
        (404, "404"),
        (413, "413"),
        (429, "429"),
        (500, "5xx"),
        (503, "5xx"),
        (400, "other"),
        (None, "other"),
    ],
)
def test_discord_status_buckets(status, bucket) -> None:
    assert discord_status_bucket(status) == bucket


def test_failure_reason_label_is_bounded() -> None:
    assert failure_reason_label("quota") == "quota"
    assert failure_reason_label("prompt about user 123") == "other"
    assert failure_reason_label(None) == "other"
