"""An in-process TCP proxy for outages: a client connected through it loses its server on cue.

``async with TcpProxy(host, port) as proxy`` listens on ``127.0.0.1:proxy.port``;
``await proxy.cut()`` drops every open connection and refuses new ones (the port stops
listening) until ``await proxy.restore()``. The shared server behind it never notices more
than clients going away, so tests can break connections without stopping a service.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

_CHUNK = 65536


class TcpProxy:
    """Forwards 127.0.0.1:``port`` (chosen when entered) to ``host``:``target_port``."""

    def __init__(self, host: str, target_port: int) -> None:
        self.host = host
        self.target_port = target_port
        self.port = 0
        self.connections_made = 0
        self._server: asyncio.Server | None = None
        self._open: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    @property
    def is_cut(self) -> bool:
        return self._server is None

    async def __aenter__(self) -> TcpProxy:
        await self._listen()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.cut()

    async def cut(self) -> None:
        """Drop every connection (abruptly, like a failed network) and stop listening."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for client, upstream in list(self._open):
            client.transport.abort()
            upstream.transport.abort()
        self._open.clear()
        if server is not None:
            await server.wait_closed()

    async def restore(self) -> None:
        """Listen again, on the same port."""
        if self._server is None:
            await self._listen()

    async def _listen(self) -> None:
        # reuse_address (asyncio's default on POSIX) lets the port be bound again after a cut.
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        try:
            up_reader, upstream = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            client.transport.abort()
            return
        if self.is_cut:  # cut while this connection was being made
            client.transport.abort()
            upstream.transport.abort()
            return
        pair = (client, upstream)
        self._open.add(pair)
        self.connections_made += 1
        try:
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, client))
        finally:
            self._open.discard(pair)
            client.transport.abort()
            upstream.transport.abort()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while chunk := await source.read(_CHUNK):
            sink.write(chunk)
            await sink.drain()
    # One side is gone: so is the other, as a real connection would be.
    sink.transport.abort()
