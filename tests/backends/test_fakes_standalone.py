"""The fakes run as processes too (``python -m tests.fakes.<name>``), steerable through /_fake/*."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("module", "path", "counter"),
    [
        ("tests.fakes.a1111", "/sdapi/v1/sd-models", "txt2img_calls"),
        ("tests.fakes.horde", "/api/v2/status/models", "submits"),
        ("tests.fakes.openai_api", "/v1/models", "generations"),
    ],
)
async def test_standalone_fake_serves_and_exposes_control_api(
    session, module: str, path: str, counter: str
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, "--port", "0", "--delay", "0.1",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line
        url = match.group(1)
        async with session.get(url + path) as reply:
            assert reply.status == 200
        async with session.post(url + "/_fake/config", json={"return_garbage": True}) as reply:
            assert reply.status == 200
        async with session.post(url + "/_fake/config", json={"no_such_knob": 1}) as reply:
            assert reply.status == 400
        async with session.get(url + "/_fake/state") as reply:
            state = await reply.json()
        assert state["return_garbage"] is True
        assert state[counter] == 0
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
