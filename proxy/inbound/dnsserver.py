"""sidestep's local DNS server: UDP and TCP on one address, answers from the DNS service.

Devices and programs that cannot use a proxy for their name lookups point their DNS at this
server and get the same answers sidestep itself uses (secure upstreams, cache, serve-stale).

Who is answered:

* only clients inside ``allow`` (loopback alone when the config names none, and the config
  refuses a non-loopback address without an allow list): anybody else gets nothing at all, so
  sidestep is never an open resolver;
* each client address may send ``rate`` queries per second with bursts of ``burst`` (a token
  bucket). Over the limit a UDP query is dropped without a reply (a reply, even REFUSED, would
  still reflect traffic at a forged source address); a TCP query, whose source is proven by the
  handshake, gets REFUSED.

How it serves:

* UDP: the loop reads the socket without blocking until it is empty (``EAGAIN``) each time it
  wakes, answers cache hits and everything that needs no upstream right there, and starts a
  task only for misses (at most :data:`MAX_PENDING` at once; beyond that misses are dropped and
  the client retries). Replies larger than the client can take (512 bytes without EDNS, its
  advertised size with EDNS) are cut to the header and question with TC set, so it asks again
  over TCP.
* TCP (RFC 7766): two-byte length prefixes, any number of queries per connection, pipelined
  queries answered as they complete (misses concurrently, so answers may come out of order),
  the connection closed after ``idle_timeout`` seconds without a query and once the answers in
  flight are sent; at most :data:`MAX_TCP_CLIENTS` connections.
* What the service answers without upstream (FORMERR, NOTIMP, ANY as RFC 8482 says, ...) is
  described in :mod:`proxy.resolve.service`. No message, however malformed, stops the server.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import dns.message
import trio

from proxy.config import DnsServerConfig
from proxy.inbound.listener import Admission, Network, client_allowed
from proxy.protocols.dnswire import TYPE_OPT, question_key, walk_records
from proxy.resolve.service import DnsService, header_reply, screen_query

log = logging.getLogger("sidestep.dnsserver")

#: bytes read per datagram: queries are far smaller; a longer one is cut and gets FORMERR
UDP_RECEIVE = 4096
#: UDP misses being answered at once, at most
MAX_PENDING = 1024
#: DNS-over-TCP connections at once, at most
MAX_TCP_CLIENTS = 256
#: datagrams handled before letting other tasks run
UDP_BATCH = 64
#: RFC 1035 section 4.2.1: the UDP size a client without EDNS accepts
CLASSIC_UDP = 512

_RCODE_REFUSED = 5
#: a TCP client that went away
_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError)
_HEADER = struct.Struct(">HHHHHH")


class RateLimiter:
    """Token buckets per client address: ``rate`` tokens a second, at most ``burst`` saved.

    Memory is bounded: beyond ``max_clients`` addresses, the buckets that are full again (their
    clients went quiet) are forgotten.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 4096,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._max_clients = max_clients
        #: client -> [tokens, time of the last refill]
        self._buckets: dict[str, list[float]] = {}
        self.dropped = 0

    def allow(self, client: str) -> bool:
        """Take one token for ``client``; False when it has none left."""
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= self._max_clients:
                self._forget_quiet(now)
            self._buckets[client] = [self.burst - 1, now]
            return True
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            self.dropped += 1
            return False
        bucket[0] = tokens - 1
        return True

    def _forget_quiet(self, now: float) -> None:
        full = [
            c
            for c, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate >= self.burst
        ]
        for client in full or list(self._buckets)[: len(self._buckets) // 2]:
            del self._buckets[client]


def client_udp_size(query: bytes) -> int:
    """The largest UDP reply the sender of ``query`` accepts: 512, or its EDNS payload size."""
    qk = question_key(query)
    if qk is None or not qk.edns:
        return CLASSIC_UDP
    records = walk_records(query, qk.end) or []
    for record in records:
        if record.rtype == TYPE_OPT:
            return max(CLASSIC_UDP, record.rclass)
    return CLASSIC_UDP


def fit_udp(query: bytes, reply: bytes) -> bytes:
    """``reply`` when it fits the client's UDP size, else its truncated form (TC set)."""
    if len(reply) <= CLASSIC_UDP or len(reply) <= client_udp_size(query):
        return reply
    return truncate(reply)


def truncate(reply: bytes) -> bytes:
    """Header (TC set, counts adjusted) and question of ``reply``, plus its OPT record."""
    qk = question_key(reply)
    msg_id, flags = struct.unpack_from(">HH", reply)
    flags |= 0x0200
    if qk is None:
        return _HEADER.pack(msg_id, flags, 0, 0, 0, 0)
    opt = b""
    for record in walk_records(reply, qk.end) or []:
        if record.rtype == TYPE_OPT:
            opt = reply[record.start : record.rdata_end]
            break
    return _HEADER.pack(msg_id, flags, 1, 0, 0, 1 if opt else 0) + reply[12 : qk.end] + opt


@dataclass(slots=True)
class DnsSockets:
    """A bound UDP socket and a listening TCP socket on the same address."""

    udp: socket.socket
    tcp: socket.socket

    @property
    def address(self) -> tuple[str, int]:
        name = self.udp.getsockname()
        return name[0], name[1]

    def close(self) -> None:
        for sock in (self.udp, self.tcp):
            try:
                trio.lowlevel.notify_closing(sock)  # wake the loops waiting on it
            except RuntimeError:
                pass  # not inside trio: nobody can be waiting
            sock.close()


def open_dns_sockets(host: str, port: int) -> DnsSockets:
    """Bind UDP and TCP on ``host:port``; port 0 picks one port free for both."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _attempt in range(20):
        tcp = socket.socket(family, socket.SOCK_STREAM)
        udp = socket.socket(family, socket.SOCK_DGRAM)
        try:
            for sock in (tcp, udp):
                sock.setblocking(False)
                if family == socket.AF_INET6:
                    sock.setsockopt(
                        socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1
                    )
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((host, port))
            udp.bind((host, tcp.getsockname()[1]))
            tcp.listen(128)
            return DnsSockets(udp, tcp)
        except OSError as exc:
            tcp.close()
            udp.close()
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue  # that TCP port is taken for UDP: try another
            raise
    raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host}")


@dataclass(slots=True)
class LocalDnsServer:
    """The DNS server inbound. ``service``, ``allow`` and ``limiter`` may be swapped on reload."""

    service: DnsService
    allow: tuple[Network, ...]
    limiter: RateLimiter | None = None
    idle_timeout: float = 10.0
    name: str = "dns"
    #: TCP connections plus UDP misses being answered (for drain)
    active: int = 0
    #: clients outside ``allow`` whose messages were ignored
    refused: int = 0
    bound: tuple[str, int] = ("", 0)
    _pending: int = 0
    _tcp_clients: int = 0
    #: cancelled to stop reading the sockets (possibly before :meth:`serve` starts)
    _listening: trio.CancelScope = field(default_factory=trio.CancelScope)

    def stop_accepting(self) -> None:
        """Close the sockets: no new queries; answers in flight and TCP clients carry on."""
        self._listening.cancel()

    async def serve(self, sockets: DnsSockets) -> None:
        """Serve until :meth:`stop_accepting`, then wait for answers in flight."""
        self.bound = sockets.address
        try:
            async with trio.open_nursery() as work:
                with self._listening:
                    async with trio.open_nursery() as loops:
                        loops.start_soon(self._serve_udp, sockets.udp, work)
                        loops.start_soon(self._serve_tcp, sockets.tcp, work)
        finally:
            sockets.close()

    # -- messages ----------------------------------------------------------------------------

    def _admit(self, client: str) -> bool:
        if not client_allowed(client, self.allow):
            self.refused += 1
            return False
        return True

    async def handle_datagram(self, data: bytes, client: str) -> bytes | None:
        """The UDP reply to ``data`` from ``client`` (None: send nothing); the loop's logic in
        one call, for tests."""
        if not self._admit(client) or (self.limiter is not None and not self.limiter.allow(client)):
            return None
        now = self.service.answer_now(data)
        if now is None or isinstance(now, bytes):
            return None if now is None else fit_udp(data, now)
        reply, _ = await self.service.answer_miss(data, now)
        return fit_udp(data, reply)

    # -- UDP ---------------------------------------------------------------------------------

    async def _serve_udp(self, sock: socket.socket, work: trio.Nursery) -> None:
        # The hot path: everything a cache hit needs is looked up once, outside the loop, and
        # the allow list's verdict is remembered per client address (Admission).
        recvfrom = sock.recvfrom
        sendto = sock.sendto
        allows = Admission().allows
        handled = 0
        while True:
            try:
                data, peer = recvfrom(UDP_RECEIVE)
            except BlockingIOError:
                data = None  # waited for below: a handler keeps its exception while it waits
            except OSError as exc:  # an ICMP error for an earlier reply, say
                log.debug("%s: udp receive: %s", self.name, exc)
                continue
            if data is None:
                handled = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            handled += 1
            if handled >= UDP_BATCH:
                handled = 0
                await trio.lowlevel.checkpoint()
            client = peer[0]
            if not allows(client, self.allow):
                self.refused += 1
                continue
            limiter = self.limiter
            if limiter is not None and not limiter.allow(client):
                continue
            cache = self.service.cache
            reply = cache.lookup(data) if cache is not None else None
            if reply is not None:
                if len(reply) > CLASSIC_UDP:
                    reply = fit_udp(data, reply)
                try:
                    sendto(reply, peer)
                except OSError as exc:  # a full send buffer drops the reply, as a network would
                    log.debug("%s: udp reply to %s: %s", self.name, client, exc)
                continue
            try:
                now = screen_query(data)
            except Exception:  # the top level of one message: log it, keep serving
                log.exception("%s: unexpected error answering %s", self.name, client)
                continue
            if now is None:
                continue
            if isinstance(now, bytes):
                _send_udp(sock, fit_udp(data, now), peer)
            elif self._pending < MAX_PENDING:
                self._pending += 1
                self.active += 1
                work.start_soon(self._answer_udp_miss, sock, data, now, peer)

    async def _answer_udp_miss(
        self, sock: socket.socket, data: bytes, query: dns.message.Message, peer: tuple[str, int]
    ) -> None:
        try:
            reply, _ = await self.service.answer_miss(data, query)
            _send_udp(sock, fit_udp(data, reply), peer)
        except Exception:
            log.exception("%s: unexpected error answering %s", self.name, peer[0])
        finally:
            self._pending -= 1
            self.active -= 1

    # -- TCP ---------------------------------------------------------------------------------

    async def _serve_tcp(self, sock: socket.socket, work: trio.Nursery) -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except BlockingIOError:
                conn = None  # waited for below, outside the handler
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("%s: accept failed (%s); retrying", self.name, exc.strerror)
                    await trio.sleep(0.1)
                continue
            if conn is None:
                await trio.lowlevel.wait_readable(sock)
                continue
            if not self._admit(peer[0]) or self._tcp_clients >= MAX_TCP_CLIENTS:
                conn.close()
                continue
            self._tcp_clients += 1
            self.active += 1
            work.start_soon(
                self._serve_tcp_client,
                trio.SocketStream(trio.socket.from_stdlib_socket(conn)),
                peer[0],
            )

    async def _serve_tcp_client(self, stream: trio.SocketStream, client: str) -> None:
        send_lock = trio.Lock()

        async def send(reply: bytes) -> None:
            async with send_lock:
                await stream.send_all(len(reply).to_bytes(2, "big") + reply)

        try:
            async with trio.open_nursery() as misses:
                try:
                    await self._read_tcp_queries(stream, client, send, misses)
                except _GONE:
                    pass
        except Exception:  # the top level of one connection: log it, keep serving
            log.exception("%s: unexpected error serving %s over TCP", self.name, client)
        finally:
            self._tcp_clients -= 1
            self.active -= 1
            stream.socket.close()

    async def _read_tcp_queries(
        self,
        stream: trio.SocketStream,
        client: str,
        send: Callable[[bytes], Awaitable[None]],
        misses: trio.Nursery,
    ) -> None:
        """Answer length-prefixed queries until EOF or ``idle_timeout`` without one."""
        buf = bytearray()
        while True:
            with trio.move_on_after(self.idle_timeout) as idle:
                chunk = await stream.receive_some(65536)
            if idle.cancelled_caught or not chunk:
                return  # the caller closes once the answers in flight are sent
            buf += chunk
            while len(buf) >= 2:
                size = int.from_bytes(buf[:2], "big")
                if len(buf) < 2 + size:
                    break
                data = bytes(buf[2 : 2 + size])
                del buf[: 2 + size]
                limiter = self.limiter
                if limiter is not None and not limiter.allow(client):
                    if len(data) >= 12 and not data[2] & 0x80:
                        await send(header_reply(data, _RCODE_REFUSED))
                    continue
                now = self.service.answer_now(data)
                if isinstance(now, bytes):
                    await send(now)
                elif now is not None:
                    misses.start_soon(_answer_tcp_miss, self.service, data, now, send)


async def _answer_tcp_miss(
    service: DnsService,
    data: bytes,
    query: dns.message.Message,
    send: Callable[[bytes], Awaitable[None]],
) -> None:
    try:
        reply, _ = await service.answer_miss(data, query)
        await send(reply)
    except _GONE:
        pass


def _send_udp(sock: socket.socket, reply: bytes, peer: tuple[str, int]) -> None:
    try:
        sock.sendto(reply, peer)
    except OSError as exc:  # a full send buffer drops the reply, as the network would
        log.debug("dns udp reply to %s: %s", peer[0], exc)


class DnsServerRunner:
    """The app's DNS server across reloads: binds before serving, swaps settings in place.

    A reload that keeps ``listen`` keeps the sockets and only swaps the service, allow list and
    rate limit; a new ``listen`` binds the new address first (so a refusal changes nothing) and
    then retires the old server, whose answers in flight still go out.
    """

    def __init__(self) -> None:
        self.server: LocalDnsServer | None = None
        self.listen: str | None = None
        self._retired: list[LocalDnsServer] = []

    def bind(self, config: DnsServerConfig) -> DnsSockets | None:
        """New sockets when ``config`` needs them (raises OSError), else None."""
        if not config.enabled or (self.server is not None and config.listen == self.listen):
            return None
        host, port = config.address
        return open_dns_sockets("127.0.0.1" if host == "localhost" else host, port)

    def apply(
        self,
        config: DnsServerConfig,
        service: DnsService,
        sockets: DnsSockets | None,
        nursery: trio.Nursery,
    ) -> None:
        """Start, update or stop the server as ``config`` says (``sockets`` from :meth:`bind`)."""
        if not config.enabled or sockets is not None:
            self._retire()
        if not config.enabled:
            return
        limiter = None
        if config.rate_limit:
            old = self.server.limiter if self.server is not None else None
            same = old is not None and (old.rate, old.burst) == (config.rate_limit, config.burst)
            limiter = old if same else RateLimiter(config.rate_limit, config.burst)
        if sockets is not None:
            self.server = LocalDnsServer(service, config.effective_allow)
            self.server.bound = sockets.address
            self.listen = config.listen
            nursery.start_soon(self.server.serve, sockets)
        assert self.server is not None
        self.server.service = service
        self.server.allow = config.effective_allow
        self.server.limiter = limiter
        self.server.idle_timeout = config.tcp_idle_timeout

    def _retire(self) -> None:
        if self.server is not None:
            self.server.stop_accepting()
            self._retired.append(self.server)
        self.server = None
        self.listen = None

    def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.stop_accepting()

    @property
    def active(self) -> int:
        """TCP clients and UDP answers in flight, retired servers included."""
        self._retired = [s for s in self._retired if s.active]
        current = self.server.active if self.server is not None else 0
        return current + sum(s.active for s in self._retired)

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound address (port 0 in the config gets a real one), when serving."""
        return self.server.bound if self.server is not None else None
