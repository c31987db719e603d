"""A TCP proxy on 127.0.0.1 in front of a real server, for outages a test can switch on and off at once.

``cut()`` drops every forwarded connection (as a server that died would) and, until ``mend()``, answers each
new connection by closing it straight away. ``freeze()`` is a lost host instead: from then on nothing gets
through either way and nothing is closed, so neither side hears of it (PostgreSQL keeps such a client's
sessions, and their locks); a new connection is accepted and left hanging. ``cut()`` ends a freeze. Every
connection that reaches the proxy is counted (``accepted``), forwarded or not: how many times a client tried
to connect, seen on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.host = "127.0.0.1"
        self.port = 0
        self.accepted = 0
        self.is_cut = False
        self.is_frozen = False
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._pumps: set[asyncio.Task[None]] = set()

    def url(self, dsn: str) -> str:
        """``dsn`` (postgresql://user:pass@host:port/db) pointed at the proxy instead."""
        target = f"@{self.target[0]}:{self.target[1]}/"
        assert target in dsn, dsn
        return dsn.replace(target, f"@{self.host}:{self.port}/")

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        self._thaw()
        self._drop_all()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def cut(self) -> None:
        self.is_cut = True
        self._thaw()
        self._drop_all()

    def freeze(self) -> None:
        self.is_frozen = True
        self._thawed.clear()

    def _thaw(self) -> None:
        self.is_frozen = False
        self._thawed.set()

    def mend(self) -> None:
        self.is_cut = False

    def _drop_all(self) -> None:
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.is_frozen:
            await self._thawed.wait()  # a lost host: the connection never gets anywhere
        if self.is_cut or self.is_frozen:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._open.update((writer, up_writer))
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._pumps.update(pumps)
        try:
            await asyncio.gather(*pumps, return_exceptions=True)
        finally:
            self._pumps.difference_update(pumps)
            for w in (writer, up_writer):
                self._open.discard(w)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                if self.is_frozen:
                    continue  # lost on the way
                writer.write(data)
                await writer.drain()
        await self._thawed.wait()  # frozen, a close is not passed on either
        writer.transport.abort()
