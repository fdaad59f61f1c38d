"""Accepting clients: access control, protocol sniffing, one task per connection.

Every inbound listens on one address. A client whose address is outside the inbound's allow list
is closed before a single byte is read from it. A ``mixed`` inbound reads the first byte and
hands the connection to the SOCKS5 (0x05), SOCKS4/4a (0x04) or HTTP (a letter) handler; a
single-protocol inbound accepts only its own first byte.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import trio

from proxy.inbound.base import Handler, InboundContext
from proxy.inbound.http import handle_http
from proxy.inbound.socks import handle_socks4, handle_socks5
from proxy.inbound.transparent import handle_transparent
from proxy.net.stream import FastStream, limited

log = logging.getLogger("sidestep.inbound")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_ACCEPT_RETRY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
#: Linux passes a listening socket's TCP_NODELAY on to the sockets it accepts
_NODELAY_NOT_INHERITED = not sys.platform.startswith("linux")


def pick_handler(protocol: str, first: int) -> tuple[str, Handler] | None:
    """Which handler serves a client whose first byte is ``first`` on a ``protocol`` inbound."""
    if first == 0x05 and protocol in ("mixed", "socks5"):
        return "socks5", handle_socks5
    if first == 0x04 and protocol in ("mixed", "socks4"):
        return "socks4", handle_socks4
    if (0x41 <= first <= 0x5A or 0x61 <= first <= 0x7A) and protocol in ("mixed", "http"):
        return "http", handle_http
    return None


@functools.lru_cache(maxsize=4096)
def client_allowed(address: str, allow: tuple[Network, ...]) -> bool:
    """Is a client at ``address`` inside one of the ``allow`` networks?

    Cached: a household or a laptop has few client addresses, and parsing one costs more than
    the rest of accepting the connection.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in allow if net.version == ip.version)


class Admission:
    """An allow list's verdicts by client address, for one accept or receive loop.

    Clients come back from the same few addresses, and even the cached
    :func:`client_allowed` hashes the whole list (a Python-level hash per network) for its
    key. A different list (a reload) starts afresh, and so does a table of 4096 addresses.
    """

    __slots__ = ("_allow", "_verdicts")

    def __init__(self) -> None:
        self._allow: tuple[Network, ...] = ()
        self._verdicts: dict[str, bool] = {}

    def allows(self, address: str, allow: tuple[Network, ...]) -> bool:
        """Whether ``address`` is inside ``allow``."""
        if allow is not self._allow:
            self._allow = allow
            self._verdicts = {}
        verdicts = self._verdicts
        ok = verdicts.get(address)
        if ok is None:
            if len(verdicts) >= 4096:
                verdicts.clear()
            ok = verdicts[address] = client_allowed(address, allow)
        return ok


@dataclass(slots=True)
class InboundServer:
    """One listening inbound. ``ctx`` and ``allow`` may be swapped on reload."""

    name: str
    protocol: str
    ctx: InboundContext
    allow: tuple[Network, ...]
    #: open client connections (for drain and status)
    active: int = 0
    #: the first bound address, once serving (port 0 in the config becomes a real port)
    bound: tuple[str, int] = ("", 0)
    _accept_scopes: list[trio.CancelScope] = field(default_factory=list)

    def stop_accepting(self) -> None:
        """Close the listening sockets; clients already connected carry on."""
        for scope in self._accept_scopes:
            scope.cancel()

    def bind_info(self, listeners: Sequence[RawListener]) -> None:
        """Record the address actually bound (port 0 in a config gets a real port)."""
        if listeners:
            name = listeners[0].socket.getsockname()
            self.bound = (name[0], name[1])

    async def serve(self, listeners: Iterable[RawListener]) -> None:
        """Accept clients on ``listeners`` until :meth:`stop_accepting`, then wait for the
        clients still connected (cancel the caller's scope to cut them off)."""
        listeners = list(listeners)
        self.bind_info(listeners)
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener)

    async def _accept_loop(self, listener: RawListener) -> None:
        # Each client runs in its own task in this nursery so that closing the listener (stop
        # accepting) and cancelling the clients (end of drain) are separate steps.
        scope = trio.CancelScope()
        self._accept_scopes.append(scope)
        async with trio.open_nursery() as clients:
            with scope:
                try:
                    await self._accept_forever(listener.socket, clients)
                finally:
                    await listener.aclose()

    async def _accept_forever(self, sock: socket.socket, clients: trio.Nursery) -> None:
        # A non-blocking accept() straight on the socket: trio's accept() ends every success
        # with a scheduler pass, and a burst of clients can be taken in one wake-up.
        accepted = 0
        admission = Admission()
        while True:
            try:
                conn, peer = sock.accept()
            except BlockingIOError:
                conn = None
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    log.warning("%s: accept failed (%s); retrying", self.name, exc.strerror)
                    await trio.sleep(0.1)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while queued
                raise
            if conn is None:  # waited for outside the handler (which would keep the exception)
                accepted = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            if not admission.allows(peer[0], self.allow):
                log.warning("%s: refused client %s: not in the allow list", self.name, peer[0])
                conn.close()
                continue
            clients.start_soon(self._handle, trio.socket.from_stdlib_socket(conn), peer[:2])
            accepted += 1
            if accepted >= 32:  # let the clients we took run before taking more
                accepted = 0
                await trio.lowlevel.checkpoint()

    async def _handle(self, sock: trio.socket.SocketType, peer: tuple[str, int]) -> None:
        self.active += 1
        # accepted on an IPv4/IPv6 listener, which passed its TCP_NODELAY on (on Linux)
        stream = FastStream(sock, tcp=True, nodelay=_NODELAY_NOT_INHERITED)
        try:
            if self.protocol == "transparent":
                # redirected clients may wait for the server to speak: no first-byte gate
                await handle_transparent(stream, peer, self.ctx)
                return
            try:
                # with TCP_DEFER_ACCEPT the first bytes are usually here already: no timer
                first: bytes | None = os.read(sock.fileno(), 4096)
            except BlockingIOError:
                first = None
            if first is None:  # a slow client: wait, outside the handler (see the relay)
                try:
                    first = await limited(
                        stream, self.ctx.settings.handshake_timeout, stream.receive_some(4096)
                    )
                except trio.TooSlowError:
                    first = b""
            if not first:
                return
            picked = pick_handler(self.protocol, first[0])
            if picked is None:
                log.info(
                    "%s: %s:%d spoke an unknown protocol (first byte 0x%02x); closed",
                    self.name,
                    peer[0],
                    peer[1],
                    first[0],
                )
                return
            await picked[1](stream, first, peer, self.ctx)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            pass
        except Exception:
            # The per-connection top level: one bad client must never take the listener down.
            log.exception("%s: unexpected error serving %s:%d", self.name, peer[0], peer[1])
        finally:
            self.active -= 1
            # this task is done with the client (its relay too): close at once, no checkpoint
            stream.close_now()


@dataclass(slots=True)
class RawListener:
    """A listening socket we accept on directly (see ``_accept_forever``)."""

    socket: socket.socket

    async def aclose(self) -> None:
        trio.lowlevel.notify_closing(self.socket)
        self.socket.close()
        await trio.lowlevel.checkpoint()


async def open_listeners(host: str, port: int) -> list[RawListener]:
    """Bind ``host:port`` (an IP literal or ``localhost``) with SO_REUSEADDR."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # "::" means both families only when the sysctl says so; be explicit
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        sock.bind((host, port))
        # accepted sockets inherit it (Linux): replies and first flights go out at once
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if hasattr(socket, "TCP_DEFER_ACCEPT"):
            # Our clients always speak first: let the kernel hand us a connection only once its
            # first bytes are there. Saves a wake-up per connection, and silent clients cost
            # nothing until they send something (or the kernel gives up on them).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 10)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    await trio.lowlevel.checkpoint()
    return [RawListener(sock)]
