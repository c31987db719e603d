"""Fair admission to the backend: per-guild limits, round-robin across guilds, and across users inside a guild.

Two gates, checked together on every dispatch: a guild may run at most ``guild_limit(guild)`` generations,
and the backend at most ``backend_limit``. Whenever a slot frees, the next ticket is taken from the next guild in
rotation that is under its limit, and inside that guild from the next user in rotation. So one guild's backlog
never delays another guild, one member's five jobs never delay the next member, and limits are not only
respected but reached: while work waits, ``min(sum of guild limits, backend_limit)`` slots are busy.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(eq=False, slots=True)
class Ticket:
    """One unit of work waiting for (or holding) a slot."""

    guild_id: int
    user_id: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    holding: bool = False


class _GuildQueue:
    """A guild's waiting tickets, kept per user so users take turns.

    The user served longest ago goes next (users never served first, in arrival order), so a member who
    queued five jobs does not make the next member wait behind all five.
    """

    __slots__ = ("_tick", "last_served", "running", "users")

    def __init__(self) -> None:
        self.users: dict[int, deque[Ticket]] = {}
        self.last_served: dict[int, int] = {}
        self.running = 0
        self._tick = 0

    def __len__(self) -> int:
        return sum(len(q) for q in self.users.values())

    def push(self, ticket: Ticket) -> None:
        self.users.setdefault(ticket.user_id, deque()).append(ticket)

    def _next_user(self, users: dict[int, deque[Ticket]], last_served: dict[int, int]) -> int:
        return min(users, key=lambda user_id: last_served.get(user_id, -1))

    def pop_next(self) -> Ticket:
        user_id = self._next_user(self.users, self.last_served)
        tickets = self.users[user_id]
        ticket = tickets.popleft()
        if not tickets:
            del self.users[user_id]
        self._tick += 1
        self.last_served[user_id] = self._tick
        return ticket

    def remove(self, ticket: Ticket) -> bool:
        tickets = self.users.get(ticket.user_id)
        if not tickets or ticket not in tickets:
            return False
        tickets.remove(ticket)
        if not tickets:
            del self.users[ticket.user_id]
        return True

    def order(self) -> list[Ticket]:
        """The order tickets would start in if nothing else arrived."""
        users = {user_id: deque(tickets) for user_id, tickets in self.users.items()}
        last_served = dict(self.last_served)
        tick = self._tick
        result: list[Ticket] = []
        while users:
            user_id = self._next_user(users, last_served)
            result.append(users[user_id].popleft())
            if not users[user_id]:
                del users[user_id]
            tick += 1
            last_served[user_id] = tick
        return result


class FairScheduler:
    def __init__(self, backend_limit: int, guild_limit: Callable[[int], int]) -> None:
        self.backend_limit = backend_limit
        self._guild_limit = guild_limit
        self._guilds: dict[int, _GuildQueue] = {}
        self._rotation: list[int] = []  # guilds with waiting tickets, in arrival order
        self._last_served: dict[int, int] = {}
        self._tick = 0
        self.running = 0
        #: Called with the guild id whenever that guild's queue order changes (for position updates).
        self.on_queue_change: Callable[[int], None] | None = None

    # -- inspection ------------------------------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return sum(len(g) for g in self._guilds.values())

    def running_in(self, guild_id: int) -> int:
        queue = self._guilds.get(guild_id)
        return queue.running if queue else 0

    def waiting_in(self, guild_id: int) -> int:
        queue = self._guilds.get(guild_id)
        return len(queue) if queue else 0

    def positions(self, guild_id: int) -> dict[Ticket, int]:
        """1-based places of every waiting ticket of a guild, in one pass."""
        queue = self._guilds.get(guild_id)
        if queue is None:
            return {}
        return {ticket: index for index, ticket in enumerate(queue.order(), start=1)}

    def position(self, ticket: Ticket) -> int | None:
        """1-based place in its guild's queue, or None when it holds a slot (or is gone)."""
        queue = self._guilds.get(ticket.guild_id)
        if queue is None or ticket.holding:
            return None
        for index, waiting in enumerate(queue.order(), start=1):
            if waiting is ticket:
                return index
        return None

    # -- acquire / release ------------------------------------------------------------------------------------
    def new_ticket(self, guild_id: int, user_id: int) -> Ticket:
        return Ticket(guild_id, user_id)

    async def acquire(self, ticket: Ticket) -> None:
        """Wait for a slot. Cancelling the wait withdraws the ticket (or gives back a slot granted meanwhile)."""
        queue = self._guilds.setdefault(ticket.guild_id, _GuildQueue())
        queue.push(ticket)
        if ticket.guild_id not in self._rotation:
            self._rotation.append(ticket.guild_id)
        self._dispatch()
        if not ticket.granted.done():
            self._notify(ticket.guild_id)
        try:
            await ticket.granted
        except asyncio.CancelledError:
            if ticket.holding:
                self.release(ticket)
            elif queue.remove(ticket):
                self._forget_if_idle(ticket.guild_id)
                self._notify(ticket.guild_id)
            raise

    def release(self, ticket: Ticket) -> None:
        if not ticket.holding:
            return
        ticket.holding = False
        self.running -= 1
        queue = self._guilds[ticket.guild_id]
        queue.running -= 1
        self._forget_if_idle(ticket.guild_id)
        self._dispatch()

    def set_backend_limit(self, limit: int) -> None:
        self.backend_limit = limit
        self._dispatch()

    def limits_changed(self) -> None:
        """Call after a guild's limit was raised so waiting work can start at once."""
        self._dispatch()

    # -- internals --------------------------------------------------------------------------------------------
    def _dispatch(self) -> None:
        changed: set[int] = set()
        while self.running < self.backend_limit:
            # The guild served longest ago goes next (never-served guilds first): true round-robin, even for
            # guilds that join while another guild's backlog is being worked through.
            eligible = [
                guild_id
                for guild_id in self._rotation
                if self._guilds[guild_id].running < max(1, self._guild_limit(guild_id))
            ]
            if not eligible:
                break  # every guild with waiting work is at its own limit
            guild_id = min(eligible, key=lambda g: self._last_served.get(g, -1))
            queue = self._guilds[guild_id]
            ticket = queue.pop_next()
            if not queue.users:
                self._rotation.remove(guild_id)
            if ticket.granted.done():
                continue  # its waiter was cancelled a moment ago and has not cleaned up yet
            self._tick += 1
            self._last_served[guild_id] = self._tick
            ticket.holding = True
            queue.running += 1
            self.running += 1
            ticket.granted.set_result(None)
            changed.add(guild_id)
        for guild_id in changed:
            self._notify(guild_id)

    def _forget_if_idle(self, guild_id: int) -> None:
        queue = self._guilds.get(guild_id)
        if queue is not None and not queue.users and queue.running == 0:
            del self._guilds[guild_id]
            if guild_id in self._rotation:
                self._rotation.remove(guild_id)
            # Keep the guild's last-served mark only while it is informative (bounded memory).
            if len(self._last_served) > 10_000:
                self._last_served.pop(guild_id, None)

    def _notify(self, guild_id: int) -> None:
        if self.on_queue_change is not None:
            self.on_queue_change(guild_id)
