"""DNS over TLS (RFC 7858): one reused TLS connection with pipelined queries.

A :class:`DotResolver` talks to ``server_name`` on port 853 at its *bootstrap* IPs (the name is
never looked up in plaintext). Queries are framed as in DNS over TCP (a two-byte length
prefix, RFC 7766), many may be in flight at once, and answers may come back in any order: each
query gets a random ID unused among those pending, and an answer is matched by ID and question.
Queries are EDNS(0)-padded to a multiple of 128 octets (RFC 8467).

The connection is opened lazily, reused while it lives, and replaced by the next query once the
server closes it (servers close idle DoT connections freely, RFC 7766 6.2.3); a query caught by
the close is sent once more on the new connection. TLS settings (CA bundle, SPKI pins, SNI
override) are those of the DoH resolver.
"""

from __future__ import annotations

import logging
import secrets
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import dns.exception
import dns.message
import dns.name
import trio

from proxy.errors import ResolveError
from proxy.inbound.base import IPAddress
from proxy.resolve.doh import (
    PooledConnectionOwner,
    normalize_pins,
    parse_bootstrap,
    secure_context,
)

logger = logging.getLogger("sidestep.resolve")

_MAX_PENDING = 256  # queries in flight on one connection


class _Lost(Exception):
    """The connection ended before the answer came: ask again on a new one."""


@dataclass(slots=True)
class _Pending:
    query: dns.message.Message
    done: trio.Event = field(default_factory=trio.Event)
    response: dns.message.Message | None = None


class _DotConnection:
    """One TLS stream, its reader task and the queries waiting on it."""

    def __init__(self, stream: trio.abc.Stream, label: str) -> None:
        self.stream = stream
        self.label = label
        self.pending: dict[int, _Pending] = {}
        self.send_lock = trio.Lock()
        self.dead: str | None = None
        self.scope = trio.CancelScope()

    @property
    def usable(self) -> bool:
        return self.dead is None and len(self.pending) < _MAX_PENDING

    def die(self, reason: str) -> None:
        if self.dead is None:
            self.dead = reason
        for entry in self.pending.values():
            entry.done.set()  # without a response: the asker sees the connection is gone
        self.pending.clear()
        self.scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                task_status.started()
                await self._read_loop()
        finally:
            self.die("connection closed")
            await trio.aclose_forcefully(self.stream)

    async def _read_loop(self) -> None:
        buf = bytearray()
        while True:
            try:
                data = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.die(f"connection broken ({exc.__cause__ or exc})")
                return
            if not data:
                self.die("server closed the connection")
                return
            buf += data
            while len(buf) >= 2:
                size = int.from_bytes(buf[:2], "big")
                if len(buf) < 2 + size:
                    break
                wire = bytes(buf[2 : 2 + size])
                del buf[: 2 + size]
                self._on_message(wire)

    def _on_message(self, wire: bytes) -> None:
        try:
            response = dns.message.from_wire(wire)
        except dns.exception.DNSException as exc:
            logger.debug("dot %s: unparseable answer ignored (%s)", self.label, exc)
            return
        entry = self.pending.get(response.id)
        if entry is None or not entry.query.is_response(response):
            logger.debug("dot %s: answer matching no question ignored", self.label)
            return
        del self.pending[response.id]
        entry.response = response
        entry.done.set()

    async def ask(self, query: dns.message.Message) -> dns.message.Message:
        if self.dead is not None:
            raise _Lost(self.dead)
        query_id = secrets.randbelow(1 << 16)
        while query_id in self.pending:
            query_id = secrets.randbelow(1 << 16)
        query.id = query_id
        entry = self.pending[query_id] = _Pending(query)
        wire = query.to_wire()
        try:
            async with self.send_lock:
                try:
                    await self.stream.send_all(len(wire).to_bytes(2, "big") + wire)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self.die(f"send failed ({exc.__cause__ or exc})")
                except BaseException:
                    self.die("send interrupted")  # a partial TLS write: the stream is unusable
                    raise
            await entry.done.wait()
        finally:
            if self.pending.get(query_id) is entry:
                del self.pending[query_id]
        if entry.response is None:
            raise _Lost(self.dead or "connection closed")
        return entry.response


class DotResolver(PooledConnectionOwner):
    """An RFC 7858 endpoint: ``server_name`` at ``bootstrap`` IPs, port ``port``.

    TLS options as for :class:`~proxy.resolve.doh.DohResolver`; ``sni`` overrides the name
    sent as SNI and checked in the certificate (default ``server_name``; "" sends none).
    """

    transport: ClassVar[str] = "DoT"

    def __init__(
        self,
        server_name: str,
        bootstrap: Sequence[str],
        port: int = 853,
        *,
        timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        cadata: str | bytes | None = None,
        pin_sha256: str | Sequence[str] | None = None,
        sni: str | None = None,
    ) -> None:
        self.server_name = server_name
        self.port = port
        self.timeout = timeout
        self.bootstrap: list[IPAddress] = parse_bootstrap(bootstrap, server_name)
        self.sni = server_name if sni is None else sni
        self.pins = normalize_pins(pin_sha256)
        self._ssl = secure_context(
            ssl_context=ssl_context,
            cafile=cafile,
            cadata=cadata,
            pins=self.pins,
            alpn=("dot",),
            check_hostname=bool(self.sni),
        )
        self.label = f"tls://{server_name}:{port}"
        self._conn: _DotConnection | None = None
        self._init_pool()

    async def aclose(self) -> None:
        """Close the connection; queries after this fail."""
        await trio.lowlevel.checkpoint()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.die("closed by us")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _exchange(self, query: dns.message.Message) -> dns.message.Message:
        qname = query.question[0].name.to_text(True)
        with trio.move_on_after(self.timeout):
            for attempt in (1, 2):
                conn = await self._connection()
                try:
                    return await conn.ask(query)
                except _Lost as exc:
                    if attempt == 2:
                        raise ResolveError(f"{qname}: {self.label}: {exc}") from None
                    logger.debug("dot %s: %s; asking again", self.label, exc)
        raise ResolveError(f"{qname}: {self.label}: no answer within {self.timeout:g} s")

    def _tls_name(self) -> str:
        return self.sni

    async def _start(
        self, nursery: trio.Nursery, stream: trio.SSLStream[trio.abc.Stream]
    ) -> _DotConnection:
        conn = _DotConnection(stream, self.label)
        await nursery.start(conn.run)
        return conn
