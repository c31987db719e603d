"""``python -m bot imagine``: the engine without Discord, as a real process against a local A1111 server."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from pathlib import Path

from PIL import Image

from tests.fakes.a1111 import FakeA1111

ROOT = Path(__file__).resolve().parents[2]


async def run_cli(tmp_path: Path, backend_url: str, *args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISCORD_", "IMAGE_", "CACHE_"))}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "IMAGE_BACKEND": "a1111",
            "IMAGE_BACKEND_URL": backend_url,
            "DATA_DIR": str(tmp_path / "data"),
            "LOG_LEVEL": "WARNING",
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        "imagine",
        *args,
        cwd=str(tmp_path),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_same_prompt_twice_makes_one_backend_call(tmp_path: Path) -> None:
    async with FakeA1111() as backend:
        first = await run_cli(tmp_path, backend.url, "a quiet harbour", "--out", str(tmp_path / "one.png"))
        second = await run_cli(tmp_path, backend.url, "a quiet harbour", "--out", str(tmp_path / "two.png"))
        assert first[0] == 0, first
        assert second[0] == 0, second
        assert backend.state.txt2img_calls == 1
        assert "from=a1111" in first[1]
        assert "from=cache" in second[1]
        assert (tmp_path / "one.png").read_bytes() == (tmp_path / "two.png").read_bytes()
        with Image.open(io.BytesIO((tmp_path / "two.png").read_bytes())) as image:
            image.load()
        # --fresh bypasses the cache.
        third = await run_cli(
            tmp_path, backend.url, "a quiet harbour", "--fresh", "--out", str(tmp_path / "three.png")
        )
        assert third[0] == 0, third
        assert backend.state.txt2img_calls == 2


async def test_count_writes_numbered_files(tmp_path: Path) -> None:
    async with FakeA1111() as backend:
        status, _, err = await run_cli(
            tmp_path,
            backend.url,
            "two boats",
            "--count",
            "2",
            "--seed",
            "7",
            "--out",
            str(tmp_path / "boats.png"),
        )
        assert status == 0, err
        assert (tmp_path / "boats-1.png").is_file() and (tmp_path / "boats-2.png").is_file()
        assert backend.state.last_payload["seed"] == 7
        assert backend.state.last_payload["batch_size"] == 2


async def test_failures_exit_non_zero_with_one_clear_line(tmp_path: Path) -> None:
    async with FakeA1111(return_garbage=True) as backend:
        status, _, err = await run_cli(
            tmp_path, backend.url, "garbage please", "--out", str(tmp_path / "x.png")
        )
    assert status == 1
    assert err.strip().splitlines() == ["error: The backend returned something that is not an image."], err
    assert not (tmp_path / "x.png").exists()

    # Nobody listens on this port any more: the backend is down.
    status, _out, err = await run_cli(tmp_path, backend.url, "nobody home", "--out", str(tmp_path / "y.png"))
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err

    status, _, err = await run_cli(
        tmp_path, backend.url, "bad size", "--size", "big", "--out", str(tmp_path / "z.png")
    )
    assert status == 2
    assert err.strip().splitlines() == ["error: Size 'big' is not WIDTHxHEIGHT, for example 512x512."]


async def test_a_corrupt_database_stops_start_up_with_one_line(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "bot.sqlite3").write_bytes(b"this is not a database" * 100)
    async with FakeA1111() as backend:
        status, _, err = await run_cli(tmp_path, backend.url, "anything", "--out", str(tmp_path / "x.png"))
        assert backend.state.txt2img_calls == 0
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "bot.sqlite3" in lines[0], err
    assert "Traceback" not in err
    moved = [p.name for p in data.iterdir() if p.name.startswith("bot.sqlite3.corrupt-")]
    assert len(moved) == 1  # renamed aside, never deleted
    assert (data / moved[0]).read_bytes() == b"this is not a database" * 100
