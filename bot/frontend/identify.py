"""When a gateway shard may send IDENTIFY: Discord's session start limit, kept per rate-limit key.

Discord's rule (``session_start_limit`` in GET /gateway/bot): shards whose ``shard_id % max_concurrency``
differ are in different rate-limit keys and may IDENTIFY at the same time; within one key, one IDENTIFY per
5 seconds. An IDENTIFY that comes sooner is answered with op 9 (invalid session) and must be sent again.
``max_concurrency`` is 1 for most bots and 16 or more for bots under "large bot sharding".

discord.py's own ``before_identify_hook`` sleeps 5 s before every IDENTIFY but the process's first, whatever
``max_concurrency`` says: 16 shards that may all start at once take 75 s. The gate decides instead::

    max_concurrency known:    wait until 5.5 s after this key's last IDENTIFY from this process;
                              the key's first IDENTIFY (and one long after the last) goes at once
    max_concurrency unknown:  discord.py's rule: 5 s before every IDENTIFY but the initial one

Why 5.5: Discord measures the 5 s between arrivals. An IDENTIFY let go exactly 5 s after the last may arrive
sooner than 5 s after it when the last one was slower on the wire or sent late by a busy loop. (discord.py's
5 s sleep runs after the next connection's handshake, which gives it a margin of its own.)

Only this process's IDENTIFYs are known to it. Processes started together whose shards share a key (SHARD_IDS
0 and 1 with ``max_concurrency`` 1) may still collide; Discord then invalidates one session and discord.py
identifies it again, through this gate, 5 s later.

The clock and the sleep are injected, so tests see which shards waited and for how long without waiting.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

log = logging.getLogger(__name__)

#: Discord's window: one IDENTIFY per rate-limit key per this many seconds (between arrivals).
DISCORD_IDENTIFY_WINDOW_S = 5.0
#: What the gate keeps between two IDENTIFYs of one key: the window and a margin for the wire.
IDENTIFY_INTERVAL_S = DISCORD_IDENTIFY_WINDOW_S + 0.5


def max_concurrency_of(session_start_limit: Mapping[str, Any] | None) -> int | None:
    """``max_concurrency`` from GET /gateway/bot's ``session_start_limit``; None when absent or not a positive
    integer (the gate then keeps discord.py's rule)."""
    if not session_start_limit:
        return None
    value = session_start_limit.get("max_concurrency")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None
    return value


class IdentifyGate:
    """Holds each shard's IDENTIFY back until Discord's session start limit allows it (module docstring)."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        interval: float = IDENTIFY_INTERVAL_S,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.interval = interval
        self._max_concurrency: int | None = None
        #: Per rate-limit key, when this process last let an IDENTIFY go (by ``clock``).
        self._last: dict[int, float] = {}
        self._locks: dict[int, asyncio.Lock] = {}

    @property
    def max_concurrency(self) -> int | None:
        return self._max_concurrency

    def configure(self, max_concurrency: int | None) -> None:
        """Set what GET /gateway/bot said (None: unknown). A different value regroups the keys: what was
        remembered under the old grouping no longer applies."""
        if max_concurrency is not None and max_concurrency < 1:
            max_concurrency = None
        if max_concurrency != self._max_concurrency:
            self._last.clear()
            self._locks.clear()
        self._max_concurrency = max_concurrency

    def key(self, shard_id: int | None) -> int | None:
        """The rate-limit key of a shard (None while ``max_concurrency`` is unknown)."""
        if self._max_concurrency is None:
            return None
        return (shard_id or 0) % self._max_concurrency

    @property
    def last_identify(self) -> Mapping[int, float]:
        """Per rate-limit key, when the last IDENTIFY of this process went (read-only view)."""
        return MappingProxyType(self._last)

    async def wait(self, shard_id: int | None, *, initial: bool = False) -> None:
        """Return when ``shard_id`` may send its IDENTIFY (called right before it is sent)."""
        key = self.key(shard_id)
        if key is None:
            if not initial:
                log.debug("identify: waiting (max_concurrency unknown)", extra={"shard": shard_id})
                await self._sleep(DISCORD_IDENTIFY_WINDOW_S)
            return
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # two shards of one key wait in turn, not both for the same slot
            last = self._last.get(key)
            if last is not None:
                delay = last + self.interval - self._clock()
                if delay > 0:
                    log.debug(
                        "identify: waiting for the rate-limit key",
                        extra={"shard": shard_id, "key": key, "wait_s": round(delay, 2)},
                    )
                    await self._sleep(delay)
            self._last[key] = self._clock()
