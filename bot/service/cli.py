"""``python -m bot imagine``: the engine without Discord, for operators and scripts."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from bot.engine.errors import RequestRejected
from bot.engine.models import ImageRequest, JobState, parse_size
from bot.settings import Settings

CLI_GUILD_ID = 0
CLI_USER_ID = 0


def add_imagine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="what to draw")
    parser.add_argument(
        "--out", required=True, type=Path, help="file to write (a -N suffix is added for N>1)"
    )
    parser.add_argument("--negative", default="", help="what to keep out of the image")
    parser.add_argument("--size", default=None, help="WIDTHxHEIGHT, e.g. 512x512")
    parser.add_argument("--count", type=int, default=1, help="how many images (1-4)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--fresh", action="store_true", help="bypass the cache")


def output_paths(out: Path, count: int, extension: str) -> list[Path]:
    base = out if out.suffix else out.with_suffix(f".{extension}")
    if count == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{index}{base.suffix}") for index in range(1, count + 1)]


async def run_imagine(settings: Settings, args: argparse.Namespace) -> int:
    """Returns the exit status; prints one clear line on failure."""
    try:
        width, height = parse_size(args.size) if args.size else (0, 0)
    except RequestRejected as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    # Before generating: a result that cannot be written is a backend call (maybe paid) thrown away.
    problem = await asyncio.to_thread(output_problem, args.out)
    if problem is not None:
        print(f"error: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    from bot.service.runtime import open_engine

    # The operator's own command: any --model may be named, and no model list is fetched first. And the
    # operator's WARNING line would say again what the one error line below says.
    logging.getLogger("bot.engine.alerts").setLevel(logging.ERROR)
    async with open_engine(settings, restrict_models=False) as engine:
        if not args.size:
            width, height = engine.backend.capabilities.default_size
        request = ImageRequest(
            prompt=args.prompt,
            negative_prompt=args.negative,
            width=width,
            height=height,
            count=args.count,
            seed=args.seed,
            model=args.model,
            fresh=args.fresh,
        )
        try:
            job = await engine.manager.submit(request, guild_id=CLI_GUILD_ID, user_id=CLI_USER_ID)
        except RequestRejected as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 2
        await engine.manager.wait(job.id)
        if job.state is not JobState.SUCCEEDED or job.result is None:
            # Whoever runs the command line is the operator: the advice is for them.
            print(f"error: {job.error_advice or job.error_message or job.state.value}", file=sys.stderr)
            return 1
        images = job.result.images
        paths = output_paths(args.out, len(images), images[0].extension)
        try:
            await asyncio.to_thread(_write_all, paths, [image.data for image in images])
        except OSError as exc:  # the disk filled up, or the directory changed since the check
            print(f"error: cannot write {exc.filename or args.out}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        source = "cache" if job.result.from_cache else engine.backend.name
        for path, image in zip(paths, images, strict=True):
            seed = f" seed={image.seed}" if image.seed is not None else ""
            print(f"{path} {image.width}x{image.height}{seed} from={source}")
        return 0


def output_problem(out: Path) -> str | None:
    """Why ``out`` cannot be written (one short clause), or None when it can. Blocking: run in a thread.

    The file's directory is created if missing, as writing it would; an existing directory at ``out`` itself,
    or a parent that cannot be created or written, is a problem.
    """
    if out.is_dir():
        return "is a directory; give a file name"
    directory = out.parent
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create {directory} ({exc.strerror or exc})"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot write to {directory} (permission denied)"
    return None


def _write_all(paths: list[Path], blobs: list[bytes]) -> None:
    for path, data in zip(paths, blobs, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
