"""The HTTP/2 client connection against the lab's DoH server (real TLS on loopback)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import dns.message
import pytest
import trio

from proxy.lab.ca import LabCA
from proxy.lab.dnsserver import Zone
from proxy.lab.dohserver import DohFaults, DohServer
from proxy.net.h2client import H2ClientConnection, H2ConnectionLost, H2StreamReset

NAME = "doh.small.lab"
CTYPE = "application/dns-message"


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


async def start_server(
    nursery: trio.Nursery, ca: LabCA, faults: DohFaults | None = None
) -> DohServer:
    zone = Zone().add("www.site.lab", "127.60.0.1")
    server = DohServer(zone, ca.issue(NAME), ("127.53.2.1", 0), faults=faults or DohFaults())
    await nursery.start(server.serve)
    return server


@asynccontextmanager
async def connect(server: DohServer, ca: LabCA) -> AsyncIterator[H2ClientConnection]:
    assert server.address is not None
    tcp = await trio.open_tcp_stream(*server.address)
    ctx = ca.client_context()
    ctx.set_alpn_protocols(["h2"])
    stream = trio.SSLStream(tcp, ctx, server_hostname=NAME)
    await stream.do_handshake()
    conn = H2ClientConnection(stream, f"{NAME}:{server.address[1]}")
    async with trio.open_nursery() as nursery:
        await nursery.start(conn.run)
        yield conn
        await conn.aclose()


def query_body(name: str = "www.site.lab") -> bytes:
    query = dns.message.make_query(name, "A")
    query.id = 0
    return query.to_wire()


async def post(conn: H2ClientConnection, body: bytes | None = None) -> tuple[int, bytes]:
    status, _headers, data = await conn.request(
        "POST", "/dns-query", [("content-type", CTYPE)], query_body() if body is None else body
    )
    return status, data


async def test_h2client_get_and_post(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start_server(nursery, ca)
    async with connect(server, ca) as conn:
        status, data = await post(conn)
        assert status == 200
        assert "127.60.0.1" in dns.message.from_wire(data).answer[0].to_text()
        encoded = base64.urlsafe_b64encode(query_body()).rstrip(b"=").decode()
        status, headers, data = await conn.request("GET", f"/dns-query?dns={encoded}")
        assert status == 200
        assert dict(headers)["content-type"] == CTYPE
        assert conn.open_streams == 0


async def test_h2client_respects_max_concurrent_streams(nursery: trio.Nursery, ca: LabCA) -> None:
    # the lab server allows 100 streams; 150 at once must queue rather than break the connection
    server = await start_server(nursery, ca, DohFaults(answer_delay=0.05))
    statuses: list[int] = []
    async with connect(server, ca) as conn:

        async def one() -> None:
            statuses.append((await post(conn))[0])

        async with trio.open_nursery() as inner:
            for _ in range(150):
                inner.start_soon(one)
        assert conn.usable
    assert statuses == [200] * 150
    assert len({entry.client for entry in server.log}) == 1


async def test_h2client_sends_bodies_larger_than_the_window(
    nursery: trio.Nursery, ca: LabCA
) -> None:
    server = await start_server(nursery, ca)
    async with connect(server, ca) as conn:
        status, _ = await post(conn, b"\0" * 200_000)  # over the 65535 initial window
        assert status == 413  # the server read it all, then refused it
        assert (await post(conn))[0] == 200


async def test_h2client_reset_fails_only_that_stream(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start_server(nursery, ca, DohFaults(reset_requests=frozenset({1})))
    async with connect(server, ca) as conn:
        with pytest.raises(H2StreamReset) as info:
            await post(conn)
        assert not info.value.retryable  # INTERNAL_ERROR: the server may have processed it
        assert (await post(conn))[0] == 200
        assert conn.usable


async def test_h2client_goaway_fails_later_streams_retryably(
    nursery: trio.Nursery, ca: LabCA
) -> None:
    server = await start_server(nursery, ca, DohFaults(goaway_after=1, answer_delay=0.05))
    results: list[object] = []
    async with connect(server, ca) as conn:

        async def one() -> None:
            try:
                results.append((await post(conn))[0])
            except H2ConnectionLost as exc:
                assert exc.retryable
                results.append("lost")

        async with trio.open_nursery() as inner:
            for _ in range(3):
                inner.start_soon(one)
                await trio.sleep(0.01)  # keep the stream order predictable
        assert sorted(map(str, results)) == ["200", "lost", "lost"]
        assert conn.goaway is not None
        assert not conn.usable
        with pytest.raises(H2ConnectionLost):
            await post(conn)


async def test_h2client_server_disconnect_fails_pending(nursery: trio.Nursery, ca: LabCA) -> None:
    server = await start_server(nursery, ca, DohFaults(close_after=1, answer_delay=0.05))
    outcomes: list[str] = []
    async with connect(server, ca) as conn:

        async def one() -> None:
            try:
                await post(conn)
                outcomes.append("ok")
            except H2ConnectionLost:
                outcomes.append("lost")

        async with trio.open_nursery() as inner:
            inner.start_soon(one)
            await trio.sleep(0.01)
            inner.start_soon(one)
        assert sorted(outcomes) == ["lost", "lost"] or sorted(outcomes) == ["lost", "ok"]
        assert "lost" in outcomes
        assert not conn.usable


async def test_h2client_cancelled_request_leaves_connection_usable(
    nursery: trio.Nursery, ca: LabCA
) -> None:
    server = await start_server(nursery, ca, DohFaults(answer_delay=0.2))
    async with connect(server, ca) as conn:
        with trio.move_on_after(0.05):
            await post(conn)
        assert conn.usable
        assert conn.open_streams == 0
        assert (await post(conn))[0] == 200
