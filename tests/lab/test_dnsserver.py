"""The lab's plain DNS: zone, honest server, lying ISP resolver, on-path injector.

Clients are dnspython (``dns.query.udp``/``tcp`` in a worker thread) or raw trio UDP sockets when
the number and order of datagrams matter. Silence is shown without waiting: the servers handle
datagrams in order, so when a later query's answer arrives first the earlier query got none.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from proxy.lab.dnsinject import DnsInjector, InjectionPolicy
from proxy.lab.dnsserver import (
    Address,
    DnsMode,
    DnsPolicy,
    DnsRule,
    DnsServer,
    QueryContext,
    Zone,
    require_loopback,
)

SITE_V4 = "127.60.0.1"
SITE_V6 = "::1"
BIG_COUNT = 100


def lab_zone() -> Zone:
    zone = Zone(ttl=300, negative_ttl=60)
    zone.add("www.site.lab", SITE_V4, SITE_V6)
    zone.add("blocked.lab", "127.61.0.1", ttl=120)
    zone.add("www.blocked.lab", "127.61.0.2")
    zone.add("ok.blocked.lab", "127.61.0.3")
    zone.add_cname("alias.site.lab", "www.site.lab")
    zone.add("deep.tree.site.lab", "127.60.0.9")  # tree.site.lab exists without records
    zone.add("big.site.lab", *(f"127.70.{i // 256}.{i % 256}" for i in range(BIG_COUNT)))
    return zone


async def udp(addr: Address, name: str, rdtype: str = "A", **make: object) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype, **make)  # type: ignore[arg-type]
    fn = partial(dns.query.udp, query, addr[0], port=addr[1], timeout=3)
    return await trio.to_thread.run_sync(fn)


async def tcp(addr: Address, name: str, rdtype: str = "A") -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    fn = partial(dns.query.tcp, query, addr[0], port=addr[1], timeout=3)
    return await trio.to_thread.run_sync(fn)


def addresses(response: dns.message.Message) -> list[str]:
    return sorted(
        rd.to_text() for rrset in response.answer for rd in rrset if rrset.rdtype in (1, 28)
    )


@asynccontextmanager
async def udp_client(host: str = "127.0.0.1") -> AsyncIterator[trio.socket.SocketType]:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind((host, 0))
        yield sock


async def recv_message(sock: trio.socket.SocketType) -> dns.message.Message:
    with trio.fail_after(3):
        wire = await sock.recv(65535)
    return dns.message.from_wire(wire)


def query_wire(
    name: str, rdtype: str = "A", qid: int | None = None, edns: int = -1
) -> tuple[int, bytes]:
    query = dns.message.make_query(name, rdtype, use_edns=edns)
    if qid is not None:
        query.id = qid
    return query.id, query.to_wire()


@pytest.fixture
async def honest(nursery: trio.Nursery) -> DnsServer:
    server = DnsServer(lab_zone(), ("127.53.0.1", 0))
    await nursery.start(server.serve)
    return server


def addr_of(server: DnsServer | DnsInjector) -> Address:
    assert server.address is not None
    return server.address


# --- zone and honest answers -------------------------------------------------------------


async def test_dnsserver_answers_a_and_aaaa(honest: DnsServer) -> None:
    a = await udp(addr_of(honest), "www.site.lab", "A")
    aaaa = await udp(addr_of(honest), "WWW.Site.Lab", "AAAA")
    assert a.rcode() == dns.rcode.NOERROR and addresses(a) == [SITE_V4]
    assert aaaa.rcode() == dns.rcode.NOERROR and addresses(aaaa) == [SITE_V6]
    assert a.answer[0].ttl == 300
    assert a.flags & dns.flags.RA
    assert honest.log == []  # honest answers are not lies


async def test_dnsserver_unknown_name_is_nxdomain_with_soa(honest: DnsServer) -> None:
    r = await udp(addr_of(honest), "nope.site.lab")
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert r.answer == []
    assert r.authority[0].rdtype == dns.rdatatype.SOA and r.authority[0].ttl == 60


async def test_dnsserver_existing_name_without_type_is_nodata(honest: DnsServer) -> None:
    for name, rdtype in [("blocked.lab", "AAAA"), ("tree.site.lab", "A"), ("www.site.lab", "TXT")]:
        r = await udp(addr_of(honest), name, rdtype)
        assert (r.rcode(), r.answer) == (dns.rcode.NOERROR, []), name


async def test_dnsserver_follows_cname_inside_zone(honest: DnsServer) -> None:
    r = await udp(addr_of(honest), "alias.site.lab")
    assert [rrset.rdtype for rrset in r.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert addresses(r) == [SITE_V4]


def test_zone_refuses_names_outside_its_apexes() -> None:
    zone = Zone("site.lab").add("www.site.lab", SITE_V4)
    assert zone.lookup("www.other.lab", "A")[0] == dns.rcode.REFUSED
    assert zone.lookup("www.site.lab", "A")[0] == dns.rcode.NOERROR
    with pytest.raises(ValueError, match="outside"):
        zone.add("x.other.lab", SITE_V4)
    with pytest.raises(ValueError, match="CNAME"):
        zone.add_cname("www.site.lab", "elsewhere.lab")


def test_zone_cname_loop_is_servfail() -> None:
    zone = Zone().add_cname("a.lab", "b.lab").add_cname("b.lab", "a.lab")
    assert zone.lookup("a.lab", "A")[0] == dns.rcode.SERVFAIL


async def test_dnsserver_answers_over_tcp(honest: DnsServer) -> None:
    r = await tcp(addr_of(honest), "www.site.lab")
    assert addresses(r) == [SITE_V4]
    big = await tcp(addr_of(honest), "big.site.lab")
    assert len(addresses(big)) == BIG_COUNT and not big.flags & dns.flags.TC


async def test_dnsserver_tcp_answers_pipelined_queries_in_order(honest: DnsServer) -> None:
    q1 = dns.message.make_query("www.site.lab", "A")
    q2 = dns.message.make_query("blocked.lab", "A")
    data = q1.to_wire(prepend_length=True) + q2.to_wire(prepend_length=True)
    stream = await trio.open_tcp_stream(*addr_of(honest))
    async with stream:
        # one write holding two messages, then a third split across writes
        await stream.send_all(data)
        q3 = dns.message.make_query("nope.lab", "A").to_wire(prepend_length=True)
        await stream.send_all(q3[:3])
        await stream.send_all(q3[3:])
        buf = b""
        replies = []
        with trio.fail_after(3):
            while len(replies) < 3:
                buf += await stream.receive_some(65536)
                while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                    n = int.from_bytes(buf[:2], "big")
                    replies.append(dns.message.from_wire(buf[2 : 2 + n]))
                    buf = buf[2 + n :]
    assert [r.id for r in replies[:2]] == [q1.id, q2.id]
    assert replies[2].rcode() == dns.rcode.NXDOMAIN


async def test_dnsserver_sets_tc_when_udp_answer_exceeds_client_payload(honest: DnsServer) -> None:
    small = await udp(addr_of(honest), "big.site.lab")  # no EDNS: 512 bytes
    assert small.flags & dns.flags.TC
    assert small.answer == []
    roomy = await udp(addr_of(honest), "big.site.lab", use_edns=0, payload=4096)
    assert not roomy.flags & dns.flags.TC
    assert len(addresses(roomy)) == BIG_COUNT


async def test_dnsserver_formerr_for_garbage_and_keeps_serving(honest: DnsServer) -> None:
    async with udp_client() as sock:
        await sock.sendto(b"\x12\x34garbage that is no dns", addr_of(honest))
        formerr = await recv_message(sock)
        assert formerr.id == 0x1234 and formerr.rcode() == dns.rcode.FORMERR
        # one byte and a "response" get no reply at all; the next query is answered first
        await sock.sendto(b"\x01", addr_of(honest))
        await sock.sendto(b"\x00\x01\x80" + b"\x00" * 20, addr_of(honest))
        qid, wire = query_wire("www.site.lab")
        await sock.sendto(wire, addr_of(honest))
        reply = await recv_message(sock)
        assert reply.id == qid and addresses(reply) == [SITE_V4]
    stream = await trio.open_tcp_stream(*addr_of(honest))
    async with stream:
        await stream.send_all(b"\x00\x05\xab\xcd\x00\x00\x00")
        with trio.fail_after(3):
            data = await stream.receive_some(65536)
        assert dns.message.from_wire(data[2:]).rcode() == dns.rcode.FORMERR
    assert addresses(await udp(addr_of(honest), "www.site.lab")) == [SITE_V4]


async def test_dnsserver_multiple_questions_formerr_and_other_opcodes_notimp(
    honest: DnsServer,
) -> None:
    two = dns.message.make_query("www.site.lab", "A")
    two.question.append(dns.rrset.RRset(dns.name.from_text("blocked.lab"), 1, 1))
    notify = dns.message.make_query("www.site.lab", "SOA")
    notify.set_opcode(dns.opcode.NOTIFY)
    r1 = await trio.to_thread.run_sync(
        partial(dns.query.udp, two, "127.53.0.1", port=addr_of(honest)[1], timeout=3)
    )
    r2 = await trio.to_thread.run_sync(
        partial(dns.query.udp, notify, "127.53.0.1", port=addr_of(honest)[1], timeout=3)
    )
    assert r1.rcode() == dns.rcode.FORMERR
    assert r2.rcode() == dns.rcode.NOTIMP


@given(st.binary(max_size=600))
def test_dnsserver_handle_wire_replies_only_with_valid_dns(wire: bytes) -> None:
    server = DnsServer(lab_zone(), ("127.53.0.1", 0))
    reply = server.handle_wire(wire, QueryContext(("127.0.0.1", 1), "udp"))
    if reply is not None:
        message = dns.message.from_wire(reply)
        assert message.flags & dns.flags.QR
        assert len(reply) <= 65535


async def test_dnsserver_serves_on_ipv6_loopback(nursery: trio.Nursery) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    server = DnsServer(lab_zone(), ("::1", 0))
    try:
        addr = await nursery.start(server.serve)
    except OSError:
        pytest.skip("::1 is not configured")
    assert addresses(await udp(addr, "www.site.lab")) == [SITE_V4]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.1", "::", "2001:db8::1", "localhost"])
def test_lab_servers_refuse_non_loopback_addresses(host: str) -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8|IP literal"):
        require_loopback(host)
    with pytest.raises(ValueError):
        DnsServer(lab_zone(), (host, 0))
    with pytest.raises(ValueError):
        DnsInjector(InjectionPolicy({"x.lab": ["127.9.9.9"]}), (host, 0))


def test_lab_servers_accept_any_127_address() -> None:
    for host in ("127.0.0.1", "127.53.8.8", "127.255.255.254", "::1"):
        require_loopback(host)


# --- the lying ISP resolver ---------------------------------------------------------------


ISP_POLICY = DnsPolicy(
    {
        "blockpage.lab": DnsMode.BLOCKPAGE_IP,
        "bogon.lab": DnsMode.BOGON,
        "localhost-bogon.lab": DnsRule(DnsMode.BOGON, ("127.0.0.1",)),
        "zero-bogon.lab": DnsRule(DnsMode.BOGON, ("0.0.0.0",)),
        "nx.lab": DnsMode.NXDOMAIN,
        "servfail.lab": DnsMode.SERVFAIL,
        "refused.lab": DnsMode.REFUSED,
        "empty.lab": DnsMode.NOERROR_EMPTY,
        "timeout.lab": DnsMode.TIMEOUT,
        "blocked.lab": DnsMode.NXDOMAIN,
        "ok.blocked.lab": DnsMode.HONEST,  # a longer suffix exempts a subtree
    },
    blockpage_ips=("127.5.3.17",),
)


@pytest.fixture
async def isp(nursery: trio.Nursery) -> DnsServer:
    zone = lab_zone()
    for name in ("blockpage", "bogon", "localhost-bogon", "zero-bogon", "nx", "servfail"):
        zone.add(f"www.{name}.lab", "127.62.0.1", "::1")
    for name in ("refused", "empty", "timeout"):
        zone.add(f"www.{name}.lab", "127.62.0.1")
    server = DnsServer(zone, ("127.53.0.2", 0), policy=ISP_POLICY)
    await nursery.start(server.serve)
    return server


@pytest.mark.parametrize(
    ("name", "rdtype", "rcode", "expected", "mode"),
    [
        ("www.blockpage.lab", "A", dns.rcode.NOERROR, ["127.5.3.17"], DnsMode.BLOCKPAGE_IP),
        ("www.blockpage.lab", "AAAA", dns.rcode.NOERROR, [], DnsMode.BLOCKPAGE_IP),
        ("www.bogon.lab", "A", dns.rcode.NOERROR, ["10.10.34.35"], DnsMode.BOGON),
        ("www.bogon.lab", "AAAA", dns.rcode.NOERROR, ["d0::11"], DnsMode.BOGON),
        ("www.localhost-bogon.lab", "A", dns.rcode.NOERROR, ["127.0.0.1"], DnsMode.BOGON),
        ("www.zero-bogon.lab", "A", dns.rcode.NOERROR, ["0.0.0.0"], DnsMode.BOGON),
        ("www.nx.lab", "A", dns.rcode.NXDOMAIN, [], DnsMode.NXDOMAIN),
        ("www.servfail.lab", "A", dns.rcode.SERVFAIL, [], DnsMode.SERVFAIL),
        ("www.refused.lab", "A", dns.rcode.REFUSED, [], DnsMode.REFUSED),
        ("www.empty.lab", "A", dns.rcode.NOERROR, [], DnsMode.NOERROR_EMPTY),
        ("blocked.lab", "A", dns.rcode.NXDOMAIN, [], DnsMode.NXDOMAIN),
        ("www.blocked.lab", "A", dns.rcode.NXDOMAIN, [], DnsMode.NXDOMAIN),
    ],
)
async def test_isp_resolver_lies_per_mode(
    isp: DnsServer, name: str, rdtype: str, rcode: int, expected: list[str], mode: DnsMode
) -> None:
    r = await udp(addr_of(isp), name, rdtype)
    assert r.rcode() == rcode
    assert addresses(r) == expected
    assert [(e.qname, e.qtype, e.mode, e.transport) for e in isp.log] == [
        (name, rdtype, mode, "udp")
    ]
    assert isp.log[0].client[0] == "127.0.0.1"


async def test_isp_resolver_lies_over_tcp_too(isp: DnsServer) -> None:
    r = await tcp(addr_of(isp), "www.bogon.lab")
    assert addresses(r) == ["10.10.34.35"]
    assert [(e.mode, e.transport) for e in isp.log] == [(DnsMode.BOGON, "tcp")]


async def test_isp_resolver_is_honest_outside_and_below_exemptions(isp: DnsServer) -> None:
    assert addresses(await udp(addr_of(isp), "www.site.lab")) == [SITE_V4]
    assert addresses(await udp(addr_of(isp), "ok.blocked.lab")) == ["127.61.0.3"]
    assert (await udp(addr_of(isp), "nope.site.lab")).rcode() == dns.rcode.NXDOMAIN
    assert isp.log == []
    assert isp.queries == 3


async def test_isp_resolver_timeout_is_silent(isp: DnsServer) -> None:
    async with udp_client() as sock:
        _, silent = query_wire("www.timeout.lab", qid=1)
        _, answered = query_wire("www.site.lab", qid=2)
        await sock.sendto(silent, addr_of(isp))
        await sock.sendto(answered, addr_of(isp))
        first = await recv_message(sock)
    # handled in order: had the first query been answered, its reply would have come first
    assert first.id == 2
    assert [(e.qname, e.mode) for e in isp.log] == [("www.timeout.lab", DnsMode.TIMEOUT)]


async def test_isp_resolver_timeout_over_tcp_keeps_connection_open(isp: DnsServer) -> None:
    q1 = dns.message.make_query("www.timeout.lab", "A")
    q2 = dns.message.make_query("www.site.lab", "A")
    stream = await trio.open_tcp_stream(*addr_of(isp))
    async with stream:
        await stream.send_all(q1.to_wire(prepend_length=True) + q2.to_wire(prepend_length=True))
        with trio.fail_after(3):
            data = await stream.receive_some(65536)
    assert dns.message.from_wire(data[2:]).id == q2.id


async def test_isp_resolver_nxdomain_hijack(nursery: trio.Nursery) -> None:
    policy = DnsPolicy(
        {".": DnsMode.NXDOMAIN_HIJACK, "ads.lab": DnsRule(DnsMode.NXDOMAIN_HIJACK, ("127.66.0.2",))}
    )
    server = DnsServer(lab_zone(), ("127.53.0.3", 0), policy=policy)
    addr = await nursery.start(server.serve)
    assert addresses(await udp(addr, "typo.site.lab")) == ["127.66.6.6"]
    assert addresses(await udp(addr, "missing.ads.lab")) == ["127.66.0.2"]
    assert addresses(await udp(addr, "www.site.lab")) == [SITE_V4]  # existing names: honest
    nodata = await udp(addr, "blocked.lab", "AAAA")  # NODATA is not NXDOMAIN: untouched
    assert (nodata.rcode(), nodata.answer) == (dns.rcode.NOERROR, [])
    assert [(e.qname, e.mode) for e in server.log] == [
        ("typo.site.lab", DnsMode.NXDOMAIN_HIJACK),
        ("missing.ads.lab", DnsMode.NXDOMAIN_HIJACK),
    ]


async def test_isp_resolver_log_uses_injected_clock(nursery: trio.Nursery) -> None:
    server = DnsServer(lab_zone(), ("127.53.0.4", 0), policy=ISP_POLICY, now=lambda: 1234.5)
    addr = await nursery.start(server.serve)
    await udp(addr, "www.nx.lab")
    assert server.log[0].time == 1234.5


def test_dns_policy_validates_rules() -> None:
    with pytest.raises(ValueError):
        DnsPolicy({"x.lab": DnsRule(DnsMode.BOGON, ("not-an-ip",))})
    with pytest.raises(ValueError):
        DnsPolicy({"x.lab": DnsMode.INJECT_RACE})
    policy = DnsPolicy({"lab": DnsMode.NXDOMAIN, "a.b.lab": DnsMode.SERVFAIL})
    assert policy.rule_for("x.a.b.lab") == DnsRule(DnsMode.SERVFAIL)
    assert policy.rule_for("b.lab") == DnsRule(DnsMode.NXDOMAIN)
    assert policy.rule_for("notlab") is None
    assert policy.rule_for("xlab") is None  # suffixes match whole labels only


def test_dnsserver_accepts_an_answer_function() -> None:
    def always_refused(query: dns.message.Message, ctx: QueryContext) -> dns.message.Message:
        r = dns.message.make_response(query)
        r.set_rcode(dns.rcode.REFUSED)
        return r

    server = DnsServer(always_refused, ("127.53.0.5", 0))
    _, wire = query_wire("anything.lab")
    reply = server.handle_wire(wire, QueryContext(("127.0.0.1", 5), "tcp"))
    assert reply is not None and dns.message.from_wire(reply).rcode() == dns.rcode.REFUSED


# --- on-path injection --------------------------------------------------------------------


INJECT = InjectionPolicy(
    {"blocked.lab": ["127.31.13.1", "127.31.13.2", "127.31.13.3"], "v6.lab": ["2001:db8::1"]},
    count=2,
    relay_delay=0.02,
)


async def start_injector(
    nursery: trio.Nursery,
    policy: InjectionPolicy = INJECT,
    upstream: Address | None = None,
    **kw: object,
) -> DnsInjector:
    injector = DnsInjector(policy, ("127.53.8.8", 0), upstream=upstream, **kw)  # type: ignore[arg-type]
    await nursery.start(injector.serve)
    return injector


async def test_injector_forged_answers_arrive_before_the_real_one(
    nursery: trio.Nursery, honest: DnsServer
) -> None:
    injector = await start_injector(nursery, upstream=addr_of(honest))
    async with udp_client() as sock:
        qid, wire = query_wire("www.blocked.lab", edns=0)
        await sock.sendto(wire, addr_of(injector))
        first, second, real = [await recv_message(sock) for _ in range(3)]
    assert {m.id for m in (first, second, real)} == {qid}
    assert addresses(first) == ["127.31.13.1"] and addresses(second) == ["127.31.13.2"]
    assert [first.answer[0].ttl, second.answer[0].ttl] == [60, 173]
    assert first.flags != second.flags  # each forgery has its own fingerprint
    assert first.edns < 0 and real.edns >= 0  # forgeries carry no EDNS; the real answer does
    assert addresses(real) == ["127.61.0.2"] and real.answer[0].ttl == 300
    assert [(e.qname, e.qtype, e.mode) for e in injector.log] == [
        ("www.blocked.lab", "A", DnsMode.INJECT_RACE)
    ]


async def test_injector_pool_cycles_between_queries(nursery: trio.Nursery) -> None:
    policy = InjectionPolicy(
        {"blocked.lab": ["127.31.13.1", "127.31.13.2", "127.31.13.3"]}, count=1
    )
    injector = await start_injector(nursery, policy)
    seen = []
    async with udp_client() as sock:
        for _ in range(4):
            await sock.sendto(query_wire("blocked.lab")[1], addr_of(injector))
            seen += addresses(await recv_message(sock))
    assert seen == ["127.31.13.1", "127.31.13.2", "127.31.13.3", "127.31.13.1"]


async def test_injector_without_resolver_behind_sends_only_forgeries(nursery: trio.Nursery) -> None:
    injector = await start_injector(nursery)
    async with udp_client() as sock:
        _, q1 = query_wire("www.blocked.lab", qid=1)
        _, q2 = query_wire("www.site.lab", qid=2)  # unlisted: silence
        _, q3 = query_wire("v6.lab", "AAAA", qid=3)
        for q in (q1, q2, q3):
            await sock.sendto(q, addr_of(injector))
        got = [await recv_message(sock) for _ in range(4)]
    # the injector works in order and nothing is forwarded: forgeries for 1, none for 2, then 3
    assert [m.id for m in got] == [1, 1, 3, 3]
    assert addresses(got[2]) == ["2001:db8::1"]
    assert [e.qname for e in injector.log] == ["www.blocked.lab", "v6.lab"]


async def test_injector_passes_unlisted_names_through_honestly(
    nursery: trio.Nursery, honest: DnsServer
) -> None:
    injector = await start_injector(nursery, upstream=addr_of(honest))
    r = await udp(addr_of(injector), "www.site.lab")
    assert addresses(r) == [SITE_V4]
    # a listed name whose type has no forged address is passed through as well
    r6 = await udp(addr_of(injector), "www.blocked.lab", "AAAA")
    assert (r6.rcode(), r6.answer) == (dns.rcode.NOERROR, [])
    assert injector.log == []


async def test_injector_boxes_the_udp_source_port_after_an_injection(nursery: trio.Nursery) -> None:
    clock = [100.0]
    policy = InjectionPolicy({"blocked.lab": ["127.31.13.1"]}, count=1, penalty=90.0)
    injector = await start_injector(nursery, policy, now=lambda: clock[0])
    async with udp_client() as boxed, udp_client() as fresh:
        await boxed.sendto(query_wire("blocked.lab", qid=1)[1], addr_of(injector))
        assert (await recv_message(boxed)).id == 1
        await boxed.sendto(query_wire("blocked.lab", qid=2)[1], addr_of(injector))
        # another source port is not boxed; its forgery proves query 2 was handled (dropped)
        await fresh.sendto(query_wire("blocked.lab", qid=3)[1], addr_of(injector))
        assert (await recv_message(fresh)).id == 3
        clock[0] += 90.0
        await boxed.sendto(query_wire("blocked.lab", qid=4)[1], addr_of(injector))
        assert (await recv_message(boxed)).id == 4  # nothing for query 2 ever came
    modes = [(e.mode, e.time) for e in injector.log]
    assert modes == [
        (DnsMode.INJECT_RACE, 100.0),
        (DnsMode.PENALTY_DROP, 100.0),
        (DnsMode.INJECT_RACE, 100.0),
        (DnsMode.INJECT_RACE, 190.0),
    ]


def test_injection_policy_validates() -> None:
    with pytest.raises(ValueError):
        InjectionPolicy({"x.lab": ["127.1.1.1"]}, count=4)
    with pytest.raises(ValueError):
        InjectionPolicy({"x.lab": ["127.1.1.1"]}, count=2, ttls=(60, 60))
    with pytest.raises(ValueError):
        InjectionPolicy({"x.lab": []})
    with pytest.raises(ValueError):
        InjectionPolicy({"x.lab": ["nope"]})


async def test_public_resolver_address_injects_on_udp_and_answers_honestly_on_tcp(
    nursery: trio.Nursery, honest: DnsServer
) -> None:
    # the lab's "public resolver": the injector owns UDP, a TCP-only server shares its port
    injector = await start_injector(nursery, upstream=addr_of(honest))
    tcp_side = DnsServer(lab_zone(), addr_of(injector), udp=False)
    await nursery.start(tcp_side.serve)
    assert addr_of(tcp_side) == addr_of(injector)
    assert addresses(await udp(addr_of(injector), "www.blocked.lab"))[0].startswith("127.31.13.")
    assert addresses(await tcp(addr_of(injector), "www.blocked.lab")) == ["127.61.0.2"]
    with pytest.raises(ValueError, match="UDP or TCP"):
        DnsServer(lab_zone(), ("127.53.0.9", 0), udp=False, tcp=False)
