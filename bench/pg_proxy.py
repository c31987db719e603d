"""A PostgreSQL wire proxy that counts round trips, by the SQL they ran.

    python -m bench.pg_proxy --target 127.0.0.1:5432 --listen bot-0 [--listen bot-1 ...]

Why a proxy: a *round trip* is the client sending and then waiting for the server's answer, and only the wire
shows those. ``pg_stat_statements`` counts executions of statements: it cannot see asyncpg's prepare (Parse +
Describe, answered before the statement runs), and it counts a multi-statement simple query (the pool's reset on
every release) as four. ``log_statement=all`` logs statements, not waits, and slows the server. In the
frontend/backend protocol a client waits for an answer after exactly these messages:

- ``Query`` ('Q'): the simple protocol; asyncpg uses it for statements without parameters (``BEGIN``, the
  pool's ``SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;`` on every release);
- ``Sync`` ('S'): the end of an extended-protocol batch (asyncpg: Bind + Execute + Sync for every statement
  with parameters);
- ``Flush`` ('H'): asyncpg's prepare (Parse + Describe + Flush, then it waits for the description) the first
  time a connection sees a statement;
- the handshake: SSLRequest, StartupMessage and each password/SASL message ('p') wait for the server.

So the proxy parses the client-to-server stream into messages (a type byte and a 32-bit length; the first
messages of a connection have no type byte) and forwards every byte unchanged; the server-to-client stream is
forwarded unparsed. Each round trip is attributed to its SQL: a Query's text, a batch's Bind statement (the
proxy remembers each connection's Parse name -> SQL), ``(prepare) SQL`` for a prepare, ``(connect)`` for the
handshake. A client stream it cannot parse (TLS: the test cluster has ``ssl=off``, so it never happens there)
is forwarded but counted under ``unparsed``, and the benchmark refuses such a figure.

Each ``--listen NAME`` is its own port, so each bot process gets its own counters. The proxy prints one JSON
line ``{"listen": {NAME: PORT}}`` once it listens; every line ``stats`` on its stdin is answered with one JSON
line ``{NAME: {"round_trips", "connections", "unparsed", "by_sql": {SQL: n}}}``; end of stdin stops it.
It runs as a process of its own so that its parsing does not share an event loop (or a GIL) with the fake
Discord; its CPU is reported by the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
#: Message types a client may send after start-up (PostgreSQL 15's protocol 3.0).
CLIENT_TYPES = frozenset(b"QPBEDCSHXpdcfF")
#: Client messages after which the client waits for the server.
WAITS = frozenset(b"QSH")
CONNECT = "(connect)"


def sql_key(sql: str) -> str:
    """The statement on one line (whitespace collapsed): the same statement counts under one key."""
    return " ".join(sql.split())


@dataclass
class Counters:
    round_trips: int = 0
    connections: int = 0
    #: Connections whose client stream could not be parsed: their round trips are missing from the count.
    unparsed: int = 0
    by_sql: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {
            "round_trips": self.round_trips,
            "connections": self.connections,
            "unparsed": self.unparsed,
            "by_sql": dict(self.by_sql.most_common()),
        }


class ClientStream:
    """One connection's client-to-server bytes, cut into messages; every wait for the server is counted."""

    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.buffer = bytearray()
        self.startup = True  # the first messages have no type byte
        self.opaque = False
        self.statements: dict[str, str] = {}  # prepared statement name -> SQL (this connection's)
        self.parsed: str | None = None  # SQL of a Parse in the current batch
        self.bound: str | None = None  # SQL of the Bind in the current batch

    def feed(self, data: bytes) -> None:
        if self.opaque:
            return
        buffer = self.buffer
        buffer += data
        while True:
            if self.startup:
                if len(buffer) < 8:
                    return
                length = int.from_bytes(buffer[0:4], "big")
                if len(buffer) < length:
                    return
                code = int.from_bytes(buffer[4:8], "big")
                del buffer[:length]
                self.count(CONNECT)
                # After SSLRequest/GSSENCRequest (answered 'N') comes the StartupMessage, also untyped.
                self.startup = code in (SSL_REQUEST, GSSENC_REQUEST)
                continue
            if len(buffer) < 5:
                return
            kind = buffer[0]
            if kind not in CLIENT_TYPES:
                self.opaque = True
                self.counters.unparsed += 1
                buffer.clear()
                return
            end = 1 + int.from_bytes(buffer[1:5], "big")
            if len(buffer) < end:
                return
            self.message(kind, bytes(buffer[5:end]))
            del buffer[:end]

    def message(self, kind: int, body: bytes) -> None:
        if kind == ord("P"):
            name, query = body.split(b"\0", 2)[:2]
            sql = query.decode(errors="replace")
            self.statements[name.decode(errors="replace")] = sql
            self.parsed = sql
        elif kind == ord("B"):
            statement = body.split(b"\0", 2)[1].decode(errors="replace")
            self.bound = self.statements.get(statement, "(unknown prepared statement)")
        elif kind == ord("p"):
            self.count(CONNECT)
        elif kind in WAITS:
            if kind == ord("Q"):
                self.count(body.rstrip(b"\0").decode(errors="replace"))
            elif self.bound is not None:
                self.count(self.bound)
            elif self.parsed is not None:
                self.count(f"(prepare) {self.parsed}")
            else:
                self.count("(sync)")
            self.parsed = self.bound = None

    def count(self, sql: str) -> None:
        self.counters.round_trips += 1
        self.counters.by_sql[sql_key(sql)] += 1


async def pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: ClientStream | None
) -> None:
    try:
        while data := await reader.read(65536):
            if stream is not None:
                stream.feed(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


class Proxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.counters: dict[str, Counters] = {}
        self.servers: list[asyncio.Server] = []

    async def listen(self, name: str) -> int:
        counters = self.counters[name] = Counters()

        async def accept(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
            counters.connections += 1
            try:
                server_reader, server_writer = await asyncio.open_connection(*self.target)
            except OSError:
                client_writer.close()
                return
            await asyncio.gather(
                pump(client_reader, server_writer, ClientStream(counters)),
                pump(server_reader, client_writer, None),
            )

        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def stats(self) -> dict[str, Any]:
        return {name: counters.to_json() for name, counters in self.counters.items()}

    async def close(self) -> None:
        for server in self.servers:
            server.close()
            await server.wait_closed()


async def serve(options: argparse.Namespace) -> None:
    host, _, port = options.target.rpartition(":")
    proxy = Proxy(host, int(port))
    ports = {name: await proxy.listen(name) for name in options.listen}
    print(json.dumps({"listen": ports}), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    try:
        while line := await stdin.readline():
            if line.strip() == b"stats":
                print(json.dumps(proxy.stats()), flush=True)
    finally:
        await proxy.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pg_proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="HOST:PORT of the PostgreSQL server")
    parser.add_argument(
        "--listen", action="append", required=True, help="a name: one port and one set of counters"
    )
    asyncio.run(serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
