"""The fake Discord's gateway: HELLO, heartbeats, IDENTIFY/READY/GUILD_CREATE, RESUME, dispatches.

Sessions outlive their socket (RESUME replays what was missed, up to 1,000 events); every server-side close
records the code it sent, so tests can tell "the fake closed with 4004" from "discord.py closed with 4000".
Plain TEXT JSON frames: discord.py only decompresses BINARY ones.

Sharding, as Discord does it: an IDENTIFY with ``shard: [id, count]`` makes a session of that shard; its
READY and GUILD_CREATEs carry only the guilds it owns (``(guild_id >> 22) % count == id``), and every event
about a guild goes only to the session of the shard owning it; events without a guild (DMs) go to shard 0.
A session that identified without ``shard`` is unsharded and receives everything, as before.

Session start limit (when ``FakeDiscord.enforce_identify_limit``): shards whose ``shard_id %
max_concurrency`` differ may IDENTIFY at once; within one such rate-limit key (an unsharded session is shard
0) one IDENTIFY per ``identify_interval_s`` (5 s) by the fake's clock. One that comes sooner gets op 9
(invalid session, ``d: false``) and no session, as Discord answers it. Every IDENTIFY, accepted or not, is
recorded in ``Gateway.identifies`` with its time, so a test can check the spacing itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web

from .model import bot_member_payload, guild_create_payload, member_payload, shard_of
from .wire import json_response

if TYPE_CHECKING:
    from .fake import FakeDiscord


@dataclass
class Session:
    """Resumable gateway session state (survives the socket)."""

    session_id: str
    identify: dict[str, Any]
    seq: int = 0
    events: list[tuple[int, str, Any]] = field(default_factory=list)
    ws: web.WebSocketResponse | None = None
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    heartbeats: list[float] = field(default_factory=list)
    disconnected_at: float | None = None
    #: ``(shard_id, shard_count)`` from IDENTIFY; None for an unsharded session (it owns every guild).
    shard: tuple[int, int] | None = None

    def owns(self, guild_id: int | str | None) -> bool:
        """Whether this session receives the events of ``guild_id`` (None: a guild-less event, e.g. a DM)."""
        if self.shard is None:
            return True
        shard_id, shard_count = self.shard
        if guild_id is None:
            return shard_id == 0
        return shard_of(guild_id, shard_count) == shard_id


@dataclass(frozen=True)
class IdentifyAttempt:
    """One IDENTIFY as the fake saw it: the shard it named, its rate-limit key, when, and the answer."""

    shard: tuple[int, int] | None
    key: int
    at: float
    accepted: bool


def event_guild_id(event: str, data: Any) -> str | None:
    """The guild an event is about: ``guild_id`` in its payload, or the guild itself for GUILD_* events."""
    if not isinstance(data, dict):
        return None
    if event in ("GUILD_CREATE", "GUILD_UPDATE", "GUILD_DELETE"):
        return str(data["id"])
    guild_id = data.get("guild_id")
    return str(guild_id) if guild_id else None


def parse_shard(value: Any) -> tuple[int, int] | None:
    """IDENTIFY's ``shard`` field, or None when absent; a malformed one raises ValueError (close 4010)."""
    if value is None:
        return None
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(part, int) for part in value)
        or not 0 <= value[0] < value[1]
    ):
        raise ValueError(f"invalid shard {value!r}")
    return int(value[0]), int(value[1])


class Gateway:
    """Gateway sockets and sessions, and the counters tests assert on (identify, resume, ready, closes)."""

    def __init__(self, fake: FakeDiscord) -> None:
        self.fake = fake
        self.sessions: dict[str, Session] = {}
        self.sockets: set[web.WebSocketResponse] = set()
        self._server_close_codes: dict[int, int] = {}
        self.available = True
        self.identify_count = 0
        self.resume_count = 0
        self.ready_count = 0
        self.refused_connections = 0
        self.close_codes: list[int | None] = []
        self.presence_updates: list[dict[str, Any]] = []
        self.acks_pending = 0  # heartbeats whose (delayed) ACK is not sent yet
        #: The ``shard`` of every accepted IDENTIFY, in order (None for an unsharded one).
        self.identified_shards: list[tuple[int, int] | None] = []
        #: Every well-formed IDENTIFY with a valid token, accepted or refused for the session start limit.
        self.identifies: list[IdentifyAttempt] = []

    def add_routes(self, app: web.Application) -> None:
        api = "/api/v{version:\\d+}"
        app.router.add_get("/gateway", self.handler)
        app.router.add_get(f"{api}/gateway", self.h_gateway)
        app.router.add_get(f"{api}/gateway/bot", self.h_gateway)

    @property
    def rate_limited_identifies(self) -> list[IdentifyAttempt]:
        """The IDENTIFYs answered with op 9 for coming too soon after their key's last one."""
        return [attempt for attempt in self.identifies if not attempt.accepted]

    def _identify_too_soon(self, key: int, now: float) -> bool:
        if not self.fake.enforce_identify_limit:
            return False
        window = self.fake.identify_interval_s
        return any(a.accepted and a.key == key and now - a.at < window for a in self.identifies)

    @property
    def last_close_code(self) -> int | None:
        return self.close_codes[-1] if self.close_codes else None

    @property
    def connected_sessions(self) -> list[Session]:
        return [s for s in self.sessions.values() if s.ws is not None]

    @property
    def connected_shards(self) -> list[tuple[int, int] | None]:
        """The shard of each connected session, sorted (None for unsharded ones, first)."""
        return sorted((s.shard for s in self.connected_sessions), key=lambda shard: shard or (-1, 0))

    @property
    def heartbeats(self) -> list[float]:
        return [t for s in self.sessions.values() for t in s.heartbeats]

    async def _ack_after(self, ws: web.WebSocketResponse, delay: float) -> None:
        """HEARTBEAT_ACK after a round trip's worth of delay, unless the socket closed meanwhile."""
        try:
            await asyncio.sleep(delay)
            if not ws.closed:
                with contextlib.suppress(ConnectionResetError):
                    await ws.send_str(json.dumps({"op": 11}))
        finally:
            self.acks_pending -= 1
            self.fake.notify()

    async def disconnect(self, code: int | None = None, *, shard: int | None = None) -> None:
        """Close every gateway socket (default 4000, resumable) — for reconnect tests.

        ``shard``: close only the sockets of that shard's sessions (the others stay connected).
        """
        if shard is None:
            sockets = list(self.sockets)
        else:
            sockets = [
                s.ws for s in self.connected_sessions if s.ws is not None and s.shard and s.shard[0] == shard
            ]
        for ws in sockets:
            await self.close_ws(ws, code or 4000, b"fake disconnect")

    async def close_ws(self, ws: web.WebSocketResponse, code: int, message: bytes) -> None:
        """Server-initiated close; the code we sent is what `close_codes` records for this socket."""
        self._server_close_codes[id(ws)] = code
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code=code, message=message), 2.0)

    def set_available(self, available: bool) -> None:
        """False: refuse new gateway upgrades with 503 (an outage); existing sockets are untouched."""
        self.available = available

    async def dispatch(self, event: str, data: Any) -> None:
        """Send a dispatch to the connected sessions that own its guild (see the module docstring); buffer
        it for the latest such session if none is connected (it gets it on RESUME)."""
        guild_id = event_guild_id(event, data)
        owners = [s for s in self.sessions.values() if s.owns(guild_id)]
        targets = [s for s in owners if s.ws is not None]
        if not targets:
            if not owners:
                where = f"shard owning guild {guild_id}" if guild_id else "shard 0"
                raise RuntimeError(f"cannot dispatch {event}: no gateway session for the {where}")
            latest = max(owners, key=lambda s: s.disconnected_at or 0)
            targets = [latest]
        for session in targets:
            await self.send_dispatch(session, event, data)

    async def send_dispatch(self, session: Session, event: str, data: Any) -> None:
        async with session.send_lock:
            session.seq += 1
            session.events.append((session.seq, event, data))
            del session.events[:-1000]
            if session.ws is not None and not session.ws.closed:
                await session.ws.send_str(json.dumps({"op": 0, "t": event, "s": session.seq, "d": data}))

    async def h_gateway(self, request: web.Request) -> web.Response:
        data: dict[str, Any] = {"url": self.fake.gateway_url}
        if request.path.endswith("/bot"):
            shards = self.fake.recommended_shards
            data |= {
                "url": self.fake.gateway_bot_url or self.fake.gateway_url,
                "shards": shards,
                # Unless max_concurrency is set, as Discord sizes it for a bot of this many shards (all
                # may IDENTIFY at once).
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 86400000,
                    "max_concurrency": self.fake.session_start_concurrency,
                },
            }
        return json_response(data)

    async def handler(self, request: web.Request) -> web.StreamResponse:
        if not self.available:
            self.refused_connections += 1
            self.fake.notify()
            return json_response({"message": "Service Unavailable", "code": 0}, 503)
        ws = web.WebSocketResponse(max_msg_size=0, compress=False, timeout=2.0)
        await ws.prepare(request)
        self.sockets.add(ws)
        session: Session | None = None
        try:
            await ws.send_str(
                json.dumps({"op": 10, "d": {"heartbeat_interval": self.fake.heartbeat_interval_ms}})
            )
            async for msg in ws:
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                try:
                    frame = json.loads(msg.data)
                    op = frame["op"]
                except (ValueError, KeyError, TypeError):
                    await self.close_ws(ws, 4002, b"Error while decoding payload.")
                    break
                session = await self.on_op(ws, session, op, frame.get("d"))
                self.fake.notify()
        finally:
            self.sockets.discard(ws)
            if session is not None and session.ws is ws:
                session.ws = None
                session.disconnected_at = time.monotonic()
            self.close_codes.append(self._server_close_codes.pop(id(ws), None) or ws.close_code)
            self.fake.notify()
        return ws

    async def on_op(
        self, ws: web.WebSocketResponse, session: Session | None, op: int, d: Any
    ) -> Session | None:
        if op == 1:  # heartbeat
            if session is not None:
                session.heartbeats.append(self.fake.clock())
            delay = self.fake.heartbeat_ack_delay_s
            if delay > 0:
                # Not answered inline: see heartbeat_ack_delay_s in FakeDiscord. Spawned, so the frames
                # after the heartbeat (IDENTIFY follows the first one at once) are not held up.
                self.acks_pending += 1
                self.fake.spawn(self._ack_after(ws, delay))
            else:
                await ws.send_str(json.dumps({"op": 11}))
            return session
        if op == 2:  # identify
            if session is not None:
                await self.close_ws(ws, 4005, b"Already authenticated.")
                return session
            if not isinstance(d, dict) or d.get("token") != self.fake.token:
                await self.close_ws(ws, 4004, b"Authentication failed.")
                return None
            try:
                shard = parse_shard(d.get("shard"))
            except ValueError:
                await self.close_ws(ws, 4010, b"Invalid shard.")
                return None
            key = (shard[0] if shard else 0) % self.fake.session_start_concurrency
            now = self.fake.clock()
            too_soon = self._identify_too_soon(key, now)
            self.identifies.append(IdentifyAttempt(shard, key, now, accepted=not too_soon))
            if too_soon:  # Discord's answer: invalid session, not resumable; identify again later
                await ws.send_str(json.dumps({"op": 9, "d": False}))
                return None
            self.identify_count += 1
            self.identified_shards.append(shard)
            session = Session(session_id=secrets.token_hex(16), identify=d, ws=ws, shard=shard)
            self.sessions[session.session_id] = session
            owned = [guild for guild in self.fake.guilds.values() if session.owns(guild.id)]
            ready: dict[str, Any] = {
                "v": self.fake.api_version,
                "user": {**self.fake.bot_user.payload(), "verified": True, "mfa_enabled": False},
                "guilds": [{"id": guild.id, "unavailable": True} for guild in owned],
                "session_id": session.session_id,
                "session_type": "normal",
                "resume_gateway_url": self.fake.gateway_url,
                "application": {"id": self.fake.app_id, "flags": 0},
                "private_channels": [],
                "relationships": [],
                "presences": [],
                "guild_join_requests": [],
                "geo_ordered_rtc_regions": [],
                "user_settings": {},
            }
            if shard is not None:
                ready["shard"] = list(shard)
            await self.send_dispatch(session, "READY", ready)
            self.ready_count += 1
            for guild in owned:
                await self.send_dispatch(
                    session, "GUILD_CREATE", guild_create_payload(guild, self.fake.bot_user)
                )
            return session
        if op == 6:  # resume
            old = self.sessions.get((d or {}).get("session_id", ""))
            if session is not None:
                await self.close_ws(ws, 4005, b"Already authenticated.")
                return session
            if (d or {}).get("token") != self.fake.token:
                await self.close_ws(ws, 4004, b"Authentication failed.")
                return None
            if old is None or old.ws is not None:
                await ws.send_str(json.dumps({"op": 9, "d": False}))
                return None
            self.resume_count += 1
            old.ws = ws
            async with old.send_lock:
                seq = int(d.get("seq") or 0)
                for s, event, data in old.events:
                    if s > seq:
                        await ws.send_str(json.dumps({"op": 0, "t": event, "s": s, "d": data}))
            await self.send_dispatch(old, "RESUMED", {})
            return old
        if session is None:
            if op in (3, 4, 8):
                await self.close_ws(ws, 4003, b"Not authenticated.")
                return None
            await self.close_ws(ws, 4001, b"Unknown opcode.")
            return None
        if op == 3:
            self.presence_updates.append(d)
            return session
        if op == 4:  # voice state: accepted, ignored
            return session
        if op == 8:  # request guild members
            guild = self.fake.guilds.get(str((d or {}).get("guild_id")))
            if guild is not None:
                members = [bot_member_payload(guild, self.fake.bot_user)] + [
                    member_payload(guild, self.fake.users[uid], m.permissions, with_user=True)
                    for uid, m in guild.members.items()
                ]
                chunk = {
                    "guild_id": guild.id,
                    "members": members,
                    "chunk_index": 0,
                    "chunk_count": 1,
                    "nonce": (d or {}).get("nonce"),
                }
                await self.send_dispatch(session, "GUILD_MEMBERS_CHUNK", chunk)
            return session
        await self.close_ws(ws, 4001, b"Unknown opcode.")
        return session
