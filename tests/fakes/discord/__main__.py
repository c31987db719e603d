"""Standalone fake Discord: ``python -m tests.fakes.discord --port N [--host H] [--token T] [--shards S]``.

Prints one JSON line (urls, token, app id, the seeded guild, channels and user) once listening, serves the
control API under ``/_fake/``, and stops cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from collections.abc import Sequence

from .fake import FakeDiscord


async def _serve(args: argparse.Namespace) -> None:
    fake = FakeDiscord(
        token=args.token,
        heartbeat_interval_ms=args.heartbeat_interval_ms,
        heartbeat_ack_delay_s=args.heartbeat_ack_delay_ms / 1000,
        recommended_shards=args.shards,
    )
    await fake.start(port=args.port, host=args.host)
    user = fake.add_user(username="tester")
    guild = fake.add_guild(
        name="Fake Guild",
        channels=[{"name": "general"}, {"name": "nsfw-art", "nsfw": True}],
        owner_id=user.id,
    )
    info = {
        "message": f"ready on {fake.base_url}",
        "url": fake.base_url,
        "api_base": fake.api_base,
        "gateway_url": fake.gateway_url,
        "token": fake.token,
        "app_id": fake.app_id,
        "guild_id": guild.id,
        "channel_id": guild.channels[0].id,
        "nsfw_channel_id": guild.channels[1].id,
        "user_id": user.id,
        "owner_id": fake.app_owner.id,
        "recommended_shards": fake.recommended_shards,
        "pid": os.getpid(),
    }
    print(json.dumps(info), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fake Discord (REST + gateway) for tests.")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--token", default="test-token")
    parser.add_argument("--heartbeat-interval-ms", type=int, default=41250)
    parser.add_argument(
        "--heartbeat-ack-delay-ms", type=int, default=100, help="the round trip a HEARTBEAT_ACK takes"
    )
    parser.add_argument(
        "--shards", type=int, default=1, help="the shard count GET /gateway/bot recommends (default 1)"
    )
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error("--shards must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
