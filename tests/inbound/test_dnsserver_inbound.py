"""The local DNS server inbound on real loopback sockets, its rate limiter and UDP fitting,
and a fuzz test of its packet handler."""

from __future__ import annotations

import ipaddress
import socket

import dns.flags
import dns.message
import dns.rcode
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import LOOPBACK_NETWORKS
from proxy.errors import ResolveError
from proxy.inbound.dnsserver import (
    CLASSIC_UDP,
    LocalDnsServer,
    RateLimiter,
    client_udp_size,
    fit_udp,
    open_dns_sockets,
    truncate,
)
from proxy.lab.dnsserver import DnsServer, QueryContext, Zone
from proxy.resolve.cache import DnsCache
from proxy.resolve.plain import PlainResolver
from proxy.resolve.service import DnsService


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def zone() -> Zone:
    z = Zone("lab")
    z.add("www.lab", "127.60.0.1")
    z.add("big.lab", *[f"127.61.{i // 250}.{i % 250 + 1}" for i in range(100)])
    return z


#: built once: the fuzz tests make a server per example
ZONE = zone()


def query(name: str = "www.lab.", rdtype: str = "A", msg_id: int = 1, **kw: object) -> bytes:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    q.id = msg_id
    return q.to_wire()


class ZoneUpstream:
    """A lab zone answering in-process (no socket), for the fuzz test."""

    def __init__(self) -> None:
        self.zone = ZONE

    async def forward(self, q: dns.message.Message) -> dns.message.Message:
        await trio.lowlevel.checkpoint()
        if q.question[0].name.to_text().startswith("fail"):
            raise ResolveError("failing on purpose")
        return self.zone.answer(q, QueryContext(("127.0.0.1", 0), "test"))

    async def resolve(self, host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        raise AssertionError("unused")


# --- the packet handler, fuzzed ---------------------------------------------------------------


def _check_reply(data: bytes, reply: bytes | None) -> None:
    if reply is None:
        return
    m = dns.message.from_wire(reply)  # a valid DNS message ...
    assert m.id == int.from_bytes(data[:2], "big")  # ... answering this ID
    assert m.flags & dns.flags.QR
    assert len(reply) <= max(CLASSIC_UDP, client_udp_size(data))


def _handle(data: bytes) -> bytes | None:
    server = LocalDnsServer(
        DnsService(ZoneUpstream(), DnsCache(), timeout=1, prefetch=False), LOOPBACK_NETWORKS
    )
    return trio.run(server.handle_datagram, data, "127.0.0.1")


@given(st.binary(max_size=600))
def test_dnsserver_arbitrary_bytes_give_nothing_or_a_reply_with_their_id(data: bytes) -> None:
    _check_reply(data, _handle(data))


@st.composite
def damaged_queries(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(["www.lab.", "big.lab.", "nowhere.lab.", "fail.lab.", "x."]))
    rdtype = draw(st.sampled_from(["A", "AAAA", "ANY", "TXT", "AXFR", "OPT", "MX"]))
    edns = draw(st.sampled_from([False, 0, 1]))
    wire = bytearray(query(name, rdtype, msg_id=draw(st.integers(0, 0xFFFF)), use_edns=edns))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(wire) - 1))
        wire[pos] = draw(st.integers(0, 255))
    cut = draw(st.integers(12, len(wire)))
    return bytes(wire[:cut]) + draw(st.binary(max_size=8))


@given(damaged_queries())
def test_dnsserver_damaged_queries_give_nothing_or_a_reply_with_their_id(data: bytes) -> None:
    _check_reply(data, _handle(data))


# --- sizes ------------------------------------------------------------------------------------


def test_dnsserver_fit_udp_truncates_to_the_clients_size() -> None:
    q = dns.message.make_query("big.lab.", "A")
    r = zone().answer(q)
    big = r.to_wire(max_size=65535)
    assert len(big) > CLASSIC_UDP
    cut = fit_udp(q.to_wire(), big)
    m = dns.message.from_wire(cut)
    assert m.flags & dns.flags.TC and not m.answer and m.id == q.id
    assert m.question[0].name.to_text() == "big.lab."
    edns_q = dns.message.make_query("big.lab.", "A", use_edns=0, payload=4096)
    edns_r = zone().answer(edns_q).to_wire(max_size=65535)
    assert fit_udp(edns_q.to_wire(), edns_r) == edns_r  # fits 4096
    small_q = dns.message.make_query("big.lab.", "A", use_edns=0, payload=100)
    assert client_udp_size(small_q.to_wire()) == CLASSIC_UDP  # never below 512
    cut = fit_udp(small_q.to_wire(), zone().answer(small_q).to_wire(max_size=65535))
    m = dns.message.from_wire(cut)
    assert m.flags & dns.flags.TC and m.edns == 0  # the OPT record stays
    assert dns.message.from_wire(truncate(b"\x00\x07\x81\x80" + bytes(8))).id == 7


def test_dnsserver_rate_limiter_token_bucket() -> None:
    clock = FakeClock()
    limiter = RateLimiter(10, 5, clock=clock, max_clients=2)
    assert [limiter.allow("a") for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow("b")  # buckets are per client
    clock.now += 0.1  # one token back
    assert limiter.allow("a") and not limiter.allow("a")
    assert limiter.dropped == 2
    clock.now += 10
    assert limiter.allow("c")  # a third client: quiet (full) buckets are forgotten
    assert len(limiter._buckets) <= 2
    with pytest.raises(ValueError):
        RateLimiter(0, 1)


# --- real sockets -----------------------------------------------------------------------------


async def start(
    nursery: trio.Nursery, **kw: object
) -> tuple[LocalDnsServer, tuple[str, int], DnsServer]:
    lab = DnsServer(zone(), ("127.53.2.1", 0))
    await nursery.start(lab.serve)
    assert lab.address is not None
    service = DnsService(PlainResolver([lab.address], timeout=1), DnsCache(), timeout=1)
    server = LocalDnsServer(service, LOOPBACK_NETWORKS, **kw)  # type: ignore[arg-type]
    sockets = open_dns_sockets("127.0.0.1", 0)
    address = sockets.address
    nursery.start_soon(server.serve, sockets)
    return server, address, lab


def udp_client(source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((source, 0))
    return sock


async def recv(sock: socket.socket) -> dns.message.Message:
    while True:
        try:
            return dns.message.from_wire(sock.recv(65535))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


def pending(sock: socket.socket) -> int:
    """Datagrams waiting on ``sock`` (read and counted)."""
    count = 0
    while True:
        try:
            sock.recv(65535)
        except BlockingIOError:
            return count
        count += 1


async def test_dnsserver_udp_answers_misses_and_hits(nursery: trio.Nursery) -> None:
    _, address, lab = await start(nursery)
    with udp_client() as sock:
        sock.sendto(query(msg_id=1), address)
        m = await recv(sock)
        assert m.id == 1 and m.answer[0][0].address == "127.60.0.1"
        # a burst of hits all sent before the server runs: drained in one wake-up
        for i in range(2, 102):
            sock.sendto(query("WWW.lab.", msg_id=i), address)
        ids = {(await recv(sock)).id for _ in range(100)}
        assert ids == set(range(2, 102))
        assert lab.queries == 1
        # big answers are cut for UDP clients without EDNS
        sock.sendto(query("big.lab.", msg_id=200), address)
        m = await recv(sock)
        assert m.id == 200 and m.flags & dns.flags.TC
        # garbage with a header gets FORMERR, garbage without one nothing; then the server
        # still answers
        sock.sendto(b"\x00\x09\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0", address)
        sock.sendto(b"\x00", address)
        m = await recv(sock)
        assert (m.id, m.rcode()) == (9, dns.rcode.FORMERR)
        sock.sendto(query(msg_id=10), address)
        assert (await recv(sock)).id == 10
        assert pending(sock) == 0


async def test_dnsserver_ignores_clients_outside_allow(nursery: trio.Nursery) -> None:
    server, address, _ = await start(nursery)
    server.allow = (ipaddress.ip_network("127.0.0.1/32"),)
    with udp_client("127.0.0.7") as outsider, udp_client() as insider:
        insider.sendto(query(msg_id=2), address)
        assert (await recv(insider)).id == 2
        outsider.sendto(query(msg_id=1), address)
        insider.sendto(query(msg_id=3), address)  # a hit, answered inline after the outsider's
        assert (await recv(insider)).id == 3
        assert pending(outsider) == 0
    assert server.refused == 1
    # over TCP the connection is closed unread
    stream = await trio.open_tcp_stream(*address, local_address="127.0.0.7")
    async with stream:
        await stream.send_all(len(query()).to_bytes(2, "big") + query())
        try:
            data = await stream.receive_some(100)
        except trio.BrokenResourceError:
            data = b""
        assert data == b""


async def test_dnsserver_rate_limit_drops_a_flooder_only(nursery: trio.Nursery) -> None:
    server, address, _ = await start(nursery, limiter=RateLimiter(1, 10))
    with udp_client("127.0.0.2") as flooder, udp_client() as other:
        other.sendto(query(msg_id=1), address)
        await recv(other)  # cached now
        for i in range(200):
            flooder.sendto(query(msg_id=i), address)
        other.sendto(query(msg_id=2), address)
        assert (await recv(other)).id == 2
        answered = pending(flooder)
    assert 10 <= answered < 100
    assert server.limiter is not None and server.limiter.dropped >= 100


async def test_dnsserver_tcp_pipelined_queries_and_idle_close(nursery: trio.Nursery) -> None:
    server, address, _ = await start(nursery, idle_timeout=0.3)
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        frames = b""
        for i, name in enumerate(["www.lab.", "big.lab.", "nowhere.lab.", "www.lab."]):
            q = query(name, msg_id=i)
            frames += len(q).to_bytes(2, "big") + q
        garbage = b"\x00\x09\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0"
        frames += len(garbage).to_bytes(2, "big") + garbage[:3]  # split mid-message
        await stream.send_all(frames)
        await stream.send_all(garbage[3:])  # ... completed: a malformed message
        buf = b""
        replies: dict[int, dns.message.Message] = {}
        while len(replies) < 5:
            chunk = await stream.receive_some(65536)
            assert chunk
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                size = int.from_bytes(buf[:2], "big")
                m = dns.message.from_wire(buf[2 : 2 + size])
                replies[m.id] = m
                buf = buf[2 + size :]
        assert len(replies[1].answer[0]) == 100  # TCP: never truncated
        assert replies[2].rcode() == dns.rcode.NXDOMAIN
        assert replies[9].rcode() == dns.rcode.FORMERR
        # then nothing more: the server closes the idle connection
        assert await stream.receive_some(100) == b""
    assert server.active == 0


async def test_dnsserver_stop_accepting_closes_the_sockets(nursery: trio.Nursery) -> None:
    server, address, _ = await start(nursery)
    server.stop_accepting()
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(OSError):
        await trio.open_tcp_stream(*address)
    # the address is free again
    open_dns_sockets(*address).close()


def test_dnsserver_sockets_share_one_port() -> None:
    sockets = open_dns_sockets("127.0.0.1", 0)
    try:
        assert sockets.udp.getsockname() == sockets.tcp.getsockname()
        with pytest.raises(OSError):
            open_dns_sockets(*sockets.address)
    finally:
        sockets.close()
