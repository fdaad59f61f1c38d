"""The DoH resolver against the lab's DoH server: real TLS and HTTP/2 on loopback."""

from __future__ import annotations

import ipaddress

import dns.edns
import dns.message
import dns.rcode
import pytest
import trio

from proxy.errors import ResolveError
from proxy.lab.ca import LabCA
from proxy.lab.dnsserver import Answerer, QueryContext, Zone
from proxy.lab.dohserver import DohFaults, DohServer
from proxy.resolve.doh import QUERY_BLOCK, DohResolver, spki_sha256

FAMOUS = "dns.famous.lab"  # no resolver anywhere knows this name: only the bootstrap IP works
BOOT = "127.53.3.1"
V4 = ipaddress.ip_address("127.60.0.1")
V6 = ipaddress.ip_address("::1")


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


def zone() -> Zone:
    return Zone().add("www.site.lab", "127.60.0.1", "::1").add("v4.site.lab", "127.60.0.2")


async def start(
    nursery: trio.Nursery,
    ca: LabCA,
    faults: DohFaults | None = None,
    answer: Zone | Answerer | None = None,
) -> DohServer:
    server = DohServer(answer or zone(), ca.issue(FAMOUS), (BOOT, 0), faults=faults or DohFaults())
    await nursery.start(server.serve)
    return server


def resolver(server: DohServer, ca: LabCA, **kwargs: object) -> DohResolver:
    options: dict[object, object] = {"cadata": ca.cert_pem, "timeout": 5.0}
    options.update(kwargs)
    return DohResolver(server.url, [BOOT], **options)  # type: ignore[arg-type]


def connections(server: DohServer) -> int:
    return len({entry.client for entry in server.log})


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_doh_resolves_a_and_aaaa(nursery: trio.Nursery, ca: LabCA, method: str) -> None:
    server = await start(nursery, ca)
    async with resolver(server, ca, method=method) as doh:
        assert await doh.resolve("www.site.lab") == [V4, V6]
        assert await doh.resolve("v4.site.lab") == [ipaddress.ip_address("127.60.0.2")]
        assert await doh.resolve("192.0.2.7") == [ipaddress.ip_address("192.0.2.7")]
    assert {entry.method for entry in server.log} == {method}
    assert {entry.qtype for entry in server.log} == {"A", "AAAA"}
    assert server.url.startswith(f"https://{FAMOUS}:")  # reached through the bootstrap IP only


async def test_doh_nxdomain_is_a_resolve_error(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start(nursery, ca)
    async with resolver(server, ca) as doh:
        with pytest.raises(ResolveError, match="NXDOMAIN"):
            await doh.resolve("nope.site.lab")
        response = await doh.query("nope.site.lab", "A")
        assert response.rcode() == dns.rcode.NXDOMAIN


async def test_doh_concurrent_queries_share_one_connection(
    nursery: trio.Nursery, ca: LabCA
) -> None:
    server = await start(nursery, ca, DohFaults(answer_delay=0.05))
    async with resolver(server, ca) as doh:
        results: list[list[object]] = []

        async def one() -> None:
            results.append(list(await doh.resolve("www.site.lab")))

        async with trio.open_nursery() as inner:
            for _ in range(10):
                inner.start_soon(one)
        assert doh.connections_opened == 1
    assert results == [[V4, V6]] * 10
    assert len(server.log) == 20
    assert connections(server) == 1


async def test_doh_query_is_padded_with_id_zero(nursery: trio.Nursery, ca: LabCA) -> None:
    seen: list[dns.message.Message] = []
    honest = zone()

    def recording(query: dns.message.Message, ctx: QueryContext) -> dns.message.Message:
        seen.append(query)
        return honest.answer(query, ctx)

    server = await start(nursery, ca, answer=recording)
    async with resolver(server, ca) as doh:
        await doh.resolve("www.site.lab")
        await doh.query("a-much-longer-name-to-change-the-size.www.site.lab", "TXT")
    assert len(seen) == 3
    for query in seen:
        assert query.id == 0
        assert any(o.otype == dns.edns.OptionType.PADDING for o in query.options)
        assert len(query.to_wire()) % QUERY_BLOCK == 0


async def test_doh_forward_keeps_the_client_id(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start(nursery, ca)
    client_query = dns.message.make_query("www.site.lab", "AAAA")  # no EDNS, random ID
    client_query.id = 4321
    async with resolver(server, ca, method="GET") as doh:
        response = await doh.forward(client_query)
    assert response.id == 4321
    assert client_query.is_response(response)
    assert "::1" in response.answer[0].to_text()


async def test_doh_goaway_moves_to_a_new_connection(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start(nursery, ca, DohFaults(goaway_after=2))
    async with resolver(server, ca) as doh:
        for _ in range(4):
            assert await doh.resolve("www.site.lab") == [V4, V6]
        assert doh.connections_opened >= 2
    assert connections(server) >= 2


async def test_doh_reset_stream_is_retried(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start(nursery, ca, DohFaults(reset_requests=frozenset({1})))
    async with resolver(server, ca) as doh:
        assert await doh.resolve("www.site.lab") == [V4, V6]
        assert doh.connections_opened == 1
    assert [entry.status for entry in server.log].count(0) == 1  # one reset, then answered


async def test_doh_resets_every_time_fail_cleanly(nursery: trio.Nursery, ca: LabCA) -> None:
    faults = DohFaults(reset_requests=frozenset({1, 2}))
    server = await start(nursery, ca, faults)
    async with resolver(server, ca) as doh:
        with pytest.raises(ResolveError, match="reset"):
            await doh.query("www.site.lab", "A")
        await doh.query("www.site.lab", "A")  # an innocent neighbour after the resets


async def test_doh_reconnects_after_the_server_closes(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start(nursery, ca, DohFaults(close_after=2))
    async with resolver(server, ca) as doh:
        for _ in range(3):
            assert await doh.resolve("www.site.lab") == [V4, V6]
        assert doh.connections_opened >= 3
    assert connections(server) >= 3


async def test_doh_rejects_a_certificate_from_another_ca(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start(nursery, ca)
    stranger = LabCA.create("some other CA")
    async with resolver(server, stranger) as doh:
        with pytest.raises(ResolveError, match="certificate"):
            await doh.resolve("www.site.lab")
    assert server.log == []


async def test_doh_checks_the_pin(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start(nursery, ca)
    wrong = "A" * 43 + "="
    async with resolver(server, ca, pin_sha256=wrong) as doh:
        with pytest.raises(ResolveError, match="pin"):
            await doh.resolve("www.site.lab")
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    leaf = x509.load_pem_x509_certificates(ca.issue(FAMOUS).cert_pem)[0]
    pin = spki_sha256(leaf.public_bytes(serialization.Encoding.DER))
    # the right pin alone is enough: a private resolver with a self-signed certificate
    async with DohResolver(server.url, [BOOT], pin_sha256=pin) as doh:
        assert await doh.resolve("www.site.lab") == [V4, V6]


async def test_doh_unreachable_bootstrap_is_a_resolve_error(ca: LabCA) -> None:
    url = f"https://{FAMOUS}:1/dns-query"
    async with DohResolver(url, ["127.53.3.9"], cadata=ca.cert_pem, timeout=2) as doh:
        with pytest.raises(ResolveError, match="refused"):
            await doh.resolve("www.site.lab")


def test_doh_needs_bootstrap_ips() -> None:
    with pytest.raises(ValueError, match="bootstrap"):
        DohResolver(f"https://{FAMOUS}/dns-query", [])
    with pytest.raises(ValueError, match="bootstrap"):
        DohResolver(f"https://{FAMOUS}/dns-query", [FAMOUS])
