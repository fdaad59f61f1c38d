"""The DNS service: cache hits without upstream, coalesced misses, serve-stale, SERVFAIL,
prefetch, and the dispatcher's resolve() through the same cache.

Upstreams are real: PlainResolver over loopback to a lab DnsServer, and the system resolver.
Tests that move time use a lab Zone answering in-process (``ZoneUpstream``) under trio's
autojump clock, because an autojump clock would also skip over real socket waits.
"""

from __future__ import annotations

import ipaddress

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import trio
import trio.testing

from proxy.config import DnsConfig, parse_config
from proxy.errors import ResolveError
from proxy.lab.dnsserver import DnsMode, DnsPolicy, DnsServer, QueryContext, Zone
from proxy.resolve.cache import DnsCache
from proxy.resolve.plain import PlainResolver
from proxy.resolve.service import DnsService, screen_query
from proxy.resolve.system import SYSTEM_TTL, SystemResolver


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def zone() -> Zone:
    z = Zone("lab", ttl=300, negative_ttl=60)
    z.add("www.lab", "127.60.0.1", "::1")
    z.add("v4only.lab", "127.60.0.2")
    z.add("short.lab", "127.60.0.3", ttl=30)
    return z


def wire(name: str = "www.lab.", rdtype: str = "A", msg_id: int = 1, **kw: object) -> bytes:
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    q.id = msg_id
    return q.to_wire()


class ZoneUpstream:
    """Answers from a lab zone in-process; ``fail`` makes it raise, ``gate`` holds answers."""

    def __init__(self, z: Zone) -> None:
        self.zone = z
        self.queries: list[str] = []
        self.fail = False
        self.gate: trio.Event | None = None

    async def forward(self, query: dns.message.Message) -> dns.message.Message:
        self.queries.append(query.question[0].name.to_text(True).lower())
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise ResolveError("lab upstream is down")
        return self.zone.answer(query, QueryContext(("127.0.0.1", 0), "test"))

    async def resolve(self, host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        raise AssertionError("not used when the service has a cache")


async def lab_server(nursery: trio.Nursery) -> DnsServer:
    server = DnsServer(zone(), ("127.53.1.1", 0))
    await nursery.start(server.serve)
    return server


def plain_service(server: DnsServer, clock: FakeClock | None = None, **kw: object) -> DnsService:
    assert server.address is not None
    cache = DnsCache(clock=clock or FakeClock(), negative_ttl_default=0)
    return DnsService(PlainResolver([server.address], timeout=1), cache, timeout=1, **kw)  # type: ignore[arg-type]


async def test_service_miss_then_hit_asks_upstream_once(nursery: trio.Nursery) -> None:
    server = await lab_server(nursery)
    service = plain_service(server)
    first = await service.answer(wire(msg_id=11))
    assert first is not None
    m = dns.message.from_wire(first)
    assert m.id == 11 and m.rcode() == dns.rcode.NOERROR
    assert [r.address for r in m.answer[0]] == ["127.60.0.1"]
    # the second asker gets its own ID and letter case back, and upstream hears nothing
    second = await service.answer(wire("WwW.LaB.", msg_id=12))
    assert second is not None
    m2 = dns.message.from_wire(second)
    assert m2.id == 12 and m2.question[0].name.to_text() == "WwW.LaB."
    assert server.queries == 1 and service.upstream_queries == 1
    assert service.cache is not None and service.cache.hits == 1


async def test_service_hit_is_answered_now_without_parsing(nursery: trio.Nursery) -> None:
    server = await lab_server(nursery)
    service = plain_service(server)
    await service.answer(wire())
    now = service.answer_now(wire(msg_id=77))
    assert isinstance(now, bytes) and now[:2] == b"\x00\x4d"
    miss = service.answer_now(wire("v4only.lab.", msg_id=78))
    assert isinstance(miss, dns.message.Message)  # the parsed query, for answer_miss


async def test_service_coalesces_identical_misses(nursery: trio.Nursery) -> None:
    server = await lab_server(nursery)
    service = plain_service(server)
    replies: dict[int, bytes | None] = {}

    async def ask(i: int) -> None:
        replies[i] = await service.answer(wire("V4ONLY.lab." if i % 2 else "v4only.lab.", msg_id=i))

    async with trio.open_nursery() as n:
        for i in range(20):
            n.start_soon(ask, i)
    assert server.queries == 1
    assert service.coalesced == 19
    for i, reply in replies.items():
        assert reply is not None
        m = dns.message.from_wire(reply)
        assert m.id == i
        assert m.question[0].name.to_text() == ("V4ONLY.lab." if i % 2 else "v4only.lab.")
        assert [r.address for r in m.answer[0]] == ["127.60.0.2"]


async def test_service_negative_answers_are_cached_and_capped(nursery: trio.Nursery) -> None:
    server = await lab_server(nursery)
    clock = FakeClock()
    assert server.address is not None
    cache = DnsCache(clock=clock, max_negative_ttl=10)
    service = DnsService(PlainResolver([server.address], timeout=1), cache, timeout=1)
    reply = await service.answer(wire("missing.lab."))
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.NXDOMAIN
    again = await service.answer(wire("missing.lab."))
    assert again is not None and dns.message.from_wire(again).rcode() == dns.rcode.NXDOMAIN
    assert dns.message.from_wire(again).authority[0].ttl == 10  # the SOA shows what is left
    assert server.queries == 1
    clock.now += 10  # the zone's SOA says 60 s, the cap says 10
    await service.answer(wire("missing.lab."))
    assert server.queries == 2


async def test_service_serves_stale_when_upstream_fails(nursery: trio.Nursery) -> None:
    server = await lab_server(nursery)
    clock = FakeClock()
    service = plain_service(server, clock)
    await service.answer(wire(msg_id=1))
    await service.resolve("www.lab")  # EDNS queries: entries of their own
    clock.now += 301  # expired
    server.policy = DnsPolicy({".": DnsMode.SERVFAIL})
    stale = await service.answer(wire(msg_id=2))
    assert stale is not None
    m = dns.message.from_wire(stale)
    assert m.id == 2 and m.rcode() == dns.rcode.NOERROR
    assert m.answer[0].ttl == 30  # RFC 8767's stale TTL
    assert service.cache is not None and service.cache.stale_hits == 1
    # the dispatcher's path gets the stale addresses too
    got = await service.resolve("www.lab")
    assert set(got) == {ipaddress.ip_address("127.60.0.1"), ipaddress.ip_address("::1")}


async def test_service_servfail_without_stale_and_error_text_for_resolve(
    nursery: trio.Nursery,
) -> None:
    server = await lab_server(nursery)
    server.policy = DnsPolicy({".": DnsMode.TIMEOUT})
    service = plain_service(server)
    reply = await service.answer(wire(msg_id=5))
    assert reply is not None
    m = dns.message.from_wire(reply)
    assert m.id == 5 and m.rcode() == dns.rcode.SERVFAIL
    assert m.question[0].name.to_text() == "www.lab."
    assert service.failures == 1
    with pytest.raises(ResolveError, match="no answer"):
        await service.resolve("www.lab")
    # an upstream's own SERVFAIL is passed on (and not cached)
    server.policy = DnsPolicy({".": DnsMode.SERVFAIL})
    reply = await service.answer(wire(msg_id=6))
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL
    before = server.queries
    await service.answer(wire(msg_id=7))
    assert server.queries == before + 1


async def test_service_resolve_shares_the_cache_with_the_server_path(
    nursery: trio.Nursery,
) -> None:
    server = await lab_server(nursery)
    service = plain_service(server)
    got = await service.resolve("www.lab")
    assert set(got) == {ipaddress.ip_address("127.60.0.1"), ipaddress.ip_address("::1")}
    assert server.queries == 2  # A and AAAA
    assert await service.resolve("www.lab.") == got
    reply = await service.answer(wire("www.lab.", "AAAA", use_edns=0, payload=1232))
    assert reply is not None and server.queries == 2  # the server path hits the same entries
    assert await service.resolve("127.0.0.9") == [ipaddress.ip_address("127.0.0.9")]
    with pytest.raises(ResolveError, match="NXDOMAIN"):
        await service.resolve("missing.lab")


async def test_service_without_cache_forwards_everything(nursery: trio.Nursery) -> None:
    server = await lab_server(nursery)
    assert server.address is not None
    plain = PlainResolver([server.address], timeout=1)
    service = DnsService(plain, None, timeout=1)
    for i in range(3):
        assert await service.answer(wire(msg_id=i)) is not None
    assert server.queries == 3
    assert await service.resolve("v4only.lab") == [ipaddress.ip_address("127.60.0.2")]


@pytest.mark.parametrize(
    ("rdtype", "rcode"),
    [("AXFR", dns.rcode.REFUSED), ("IXFR", dns.rcode.REFUSED), ("MAILB", dns.rcode.NOTIMP)],
)
def test_service_screen_refuses_transfers_and_meta_types(rdtype: str, rcode: int) -> None:
    reply = screen_query(wire(rdtype=rdtype, msg_id=9))
    assert isinstance(reply, bytes)
    m = dns.message.from_wire(reply)
    assert (m.id, m.rcode()) == (9, rcode)


def test_service_screen_answers_any_per_rfc8482() -> None:
    reply = screen_query(wire("www.lab.", "ANY", msg_id=3))
    assert isinstance(reply, bytes)
    m = dns.message.from_wire(reply)
    assert m.id == 3 and m.rcode() == dns.rcode.NOERROR
    (rrset,) = m.answer
    assert rrset.rdtype == dns.rdatatype.HINFO
    assert rrset[0].cpu == b"RFC8482" and rrset[0].os == b""


def test_service_screen_malformed_and_odd_messages() -> None:
    assert screen_query(b"\x12\x34") is None  # no header
    response = dns.message.make_response(dns.message.from_wire(wire()))
    assert screen_query(response.to_wire()) is None  # never answer a response
    formerr = screen_query(b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x07broken")
    assert isinstance(formerr, bytes)
    m = dns.message.from_wire(formerr)
    assert (m.id, m.rcode(), m.flags & dns.flags.RD) == (0xABCD, dns.rcode.FORMERR, dns.flags.RD)
    notify = dns.message.from_wire(wire())
    notify.set_opcode(dns.opcode.NOTIFY)
    reply = screen_query(notify.to_wire())
    assert isinstance(reply, bytes) and dns.message.from_wire(reply).rcode() == dns.rcode.NOTIMP
    badvers = dns.message.make_query("www.lab.", "A", use_edns=1)
    reply = screen_query(badvers.to_wire())
    assert isinstance(reply, bytes) and dns.message.from_wire(reply).rcode() == dns.rcode.BADVERS


async def test_service_prefetches_popular_names_before_expiry(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ZoneUpstream(zone())
    cache = DnsCache(clock=trio.current_time)
    async with DnsService(upstream, cache, timeout=1) as service:
        await service.answer(wire("short.lab."))
        for i in range(3):  # popular: three hits
            assert service.answer_now(wire("short.lab.", msg_id=i)) is not None
        await service.answer(wire("v4only.lab."))  # asked once only: not prefetched
        await trio.sleep(25)  # short.lab's 30 s TTL is within the 10 s window by now
        assert upstream.queries.count("short.lab") == 2
        assert upstream.queries.count("v4only.lab") == 1
        assert service.prefetched == 1
        # the refreshed entry answers past the first answer's expiry without a miss
        await trio.sleep(10)
        assert isinstance(service.answer_now(wire("short.lab.")), bytes)
        assert upstream.queries.count("short.lab") == 2


async def test_service_stale_window_ends(autojump_clock: trio.testing.MockClock) -> None:
    upstream = ZoneUpstream(zone())
    cache = DnsCache(clock=trio.current_time, stale_ttl=100)
    service = DnsService(upstream, cache, timeout=1, prefetch=False)
    await service.answer(wire("short.lab."))
    upstream.fail = True
    await trio.sleep(31 + 50)
    reply = await service.answer(wire("short.lab."))
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.NOERROR
    await trio.sleep(60)  # 31 + 110 s: past TTL + stale window
    reply = await service.answer(wire("short.lab."))
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL


async def test_service_upstream_timeout_is_a_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    upstream = ZoneUpstream(zone())
    upstream.gate = trio.Event()  # never set: the upstream hangs
    service = DnsService(upstream, DnsCache(clock=trio.current_time), timeout=2, prefetch=False)
    reply = await service.answer(wire(msg_id=4))
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.SERVFAIL


# --- the system resolver as an upstream ------------------------------------------------------


async def test_system_forward_synthesises_a_and_aaaa() -> None:
    system = SystemResolver(timeout=5)
    q = dns.message.make_query("localhost.", "A", use_edns=0)
    r = await system.forward(q)
    assert r.id == q.id and r.rcode() == dns.rcode.NOERROR
    assert r.flags & dns.flags.QR and r.edns == 0
    (rrset,) = r.answer
    assert "127.0.0.1" in {rd.address for rd in rrset} and rrset.ttl == SYSTEM_TTL
    missing = await system.forward(dns.message.make_query("no-such-name.invalid.", "A"))
    assert missing.rcode() == dns.rcode.NXDOMAIN
    mx = await system.forward(dns.message.make_query("localhost.", "MX"))
    assert mx.rcode() == dns.rcode.NOTIMP and not mx.answer


async def test_system_forward_nodata_when_only_the_other_family_exists() -> None:
    system = SystemResolver(timeout=5)
    v4 = await system.forward(dns.message.make_query("localhost.", "A"))
    v6 = await system.forward(dns.message.make_query("localhost.", "AAAA"))
    # localhost has an IPv4 address everywhere; an AAAA question is NODATA or ::1, never NXDOMAIN
    assert v4.answer
    assert v6.rcode() == dns.rcode.NOERROR


async def test_service_from_config_caches_system_answers() -> None:
    config = parse_config("[dns]\nresolver = 'system'\n", "t")
    service = DnsService.from_config(config.dns, SystemResolver(timeout=5))
    assert service.cache is not None and service.cache.max_entries == 10000
    first = await service.resolve("localhost")
    assert ipaddress.ip_address("127.0.0.1") in first
    assert service.upstream_queries == 2
    assert await service.resolve("localhost") == first
    assert service.upstream_queries == 2
    off = DnsService.from_config(DnsConfig(cache_size=0), SystemResolver(timeout=5))
    assert off.cache is None
    assert ipaddress.ip_address("127.0.0.1") in await off.resolve("localhost")


async def test_cached_resolve_reads_the_cache_bytes_like_the_full_path() -> None:
    z = zone()
    z.add_cname("alias.lab", "www.lab")
    upstream = ZoneUpstream(z)
    service = DnsService(upstream, DnsCache(clock=FakeClock(), negative_ttl_default=0))
    for host in ("www.lab", "WWW.Lab.", "v4only.lab", "alias.lab"):
        full = await service.resolve(host)  # fills the cache through the full path
        asked = len(upstream.queries)
        # the fast path answers alone, from the cache, with the full path's answer
        assert service._cached_addresses(host) == full
        assert await service.resolve(host) == full
        assert len(upstream.queries) == asked
    assert service._cached_addresses("www.lab") == [
        ipaddress.ip_address("127.60.0.1"),
        ipaddress.ip_address("::1"),
    ]
    # a name that does not exist is never answered by the fast path: the full path raises
    with pytest.raises(ResolveError):
        await service.resolve("nowhere.lab")
    assert service._cached_addresses("nowhere.lab") is None
    with pytest.raises(ResolveError):
        await service.resolve("nowhere.lab")
    # names it cannot spell in wire form quickly go the full way
    assert service._cached_addresses("bücher.lab") is None
    assert service._cached_addresses("a..lab") is None
