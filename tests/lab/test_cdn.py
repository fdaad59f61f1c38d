"""The CDN edge over real loopback TLS: routing by Host whatever the SNI, keep-alive, large and
full-duplex bodies, WebSocket-style upgrades, and its own errors."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import h11
import pytest
import trio

from proxy.lab.ca import LabCA
from proxy.lab.cdn import CdnEdge
from proxy.lab.origin import OriginServer, pattern_bytes

FRONT, OTHER = "front.test", "also-front.test"
Address = tuple[str, int]


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


async def _next(conn: h11.Connection, stream: trio.abc.ReceiveStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


Handler = Callable[[h11.Connection, trio.SocketStream, h11.Request], Awaitable[None]]


async def serve_h11(handler: Handler, *, task_status: trio.TaskStatus[Address]) -> None:
    """A one-request-per-connection HTTP backend for special behaviours."""

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER)
            request = await _next(conn, stream)
            if isinstance(request, h11.Request):
                await handler(conn, stream, request)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(("127.0.0.1", listeners[0].socket.getsockname()[1]))
    await trio.serve_listeners(one, listeners)


seen_headers: list[dict[bytes, bytes]] = []


async def duplex_echo(conn: h11.Connection, stream: trio.SocketStream, req: h11.Request) -> None:
    """Answer at once, then echo each request-body chunk as it arrives."""
    seen_headers.append(dict(req.headers))
    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[])))
    while True:
        event = await _next(conn, stream)
        if isinstance(event, h11.Data):
            await stream.send_all(conn.send(h11.Data(data=event.data)))
        else:
            await stream.send_all(conn.send(h11.EndOfMessage()))
            return


async def upgrade_echo(conn: h11.Connection, stream: trio.SocketStream, req: h11.Request) -> None:
    """Switch protocols, then echo raw bytes upper-cased until the client closes."""
    await _next(conn, stream)  # EndOfMessage
    headers = [("Connection", "Upgrade"), ("Upgrade", "websocket")]
    await stream.send_all(conn.send(h11.InformationalResponse(status_code=101, headers=headers)))
    pending, _ = conn.trailing_data
    if pending:
        await stream.send_all(pending.upper())
    while data := await stream.receive_some(65536):
        await stream.send_all(data.upper())


@asynccontextmanager
async def edge_with(ca: LabCA, **routes: Address) -> AsyncIterator[CdnEdge]:
    async with trio.open_nursery() as nursery:
        a = await nursery.start(OriginServer("a.site").serve)
        b = await nursery.start(OriginServer("b.site").serve)
        table = {"a.site": a, "b.site": b, **{k.replace("_", "."): v for k, v in routes.items()}}
        edge = CdnEdge(ca.issue(FRONT, OTHER), table, ("127.70.9.1", 0))
        await nursery.start(edge.serve)
        yield edge
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def tls_to(edge: CdnEdge, ca: LabCA, sni: str = FRONT) -> AsyncIterator[trio.SSLStream]:
    assert edge.address is not None
    tcp = await trio.open_tcp_stream(*edge.address)
    stream = trio.SSLStream(tcp, ca.client_context(), server_hostname=sni, https_compatible=True)
    try:
        yield stream
    finally:
        await trio.aclose_forcefully(stream)


async def get(
    conn: h11.Connection, stream: trio.abc.Stream, host: str, target: str = "/", **kw: object
) -> tuple[int, bytes]:
    method = str(kw.get("method", "GET"))
    body = bytes(kw.get("body", b""))  # type: ignore[call-overload]
    headers = [("Host", host), *kw.get("headers", [])]  # type: ignore[misc]
    if body:
        headers.append(("Content-Length", str(len(body))))
    await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=headers)))
    if body:
        await stream.send_all(conn.send(h11.Data(data=body)))
    await stream.send_all(conn.send(h11.EndOfMessage()))
    status, out = 0, bytearray()
    while True:
        event = await _next(conn, stream)
        if isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            out += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, bytes(out)
        else:
            raise AssertionError(f"unexpected {event!r}")


async def test_cdn_routes_by_host_whatever_the_sni(ca: LabCA) -> None:
    async with edge_with(ca) as edge, tls_to(edge, ca, OTHER) as stream:
        conn = h11.Connection(h11.CLIENT)
        assert await get(conn, stream, "a.site") == (200, b"hello from a.site (host a.site)\n")
        conn.start_next_cycle()  # keep-alive: the next request may go elsewhere
        assert await get(conn, stream, "B.Site:443") == (
            200,
            b"hello from b.site (host B.Site:443)\n",
        )
    assert [(e.sni, e.host, e.status) for e in edge.log] == [
        (OTHER, "a.site", 200),
        (OTHER, "b.site", 200),
    ]


async def test_cdn_unknown_host_is_misdirected(ca: LabCA) -> None:
    async with edge_with(ca) as edge, tls_to(edge, ca) as stream:
        status, body = await get(h11.Connection(h11.CLIENT), stream, "elsewhere.test")
        assert status == 421 and b"elsewhere.test" in body
        assert await stream.receive_some(100) == b""  # and it closes


async def test_cdn_backend_down_is_bad_gateway(ca: LabCA) -> None:
    with trio.socket.socket() as unused:
        await unused.bind(("127.0.0.1", 0))
        dead = unused.getsockname()
    async with edge_with(ca, dead_site=dead) as edge, tls_to(edge, ca) as stream:
        status, _ = await get(h11.Connection(h11.CLIENT), stream, "dead.site")
    assert status == 502 and edge.log[-1].status == 502


async def hang_up(conn: h11.Connection, stream: trio.SocketStream, req: h11.Request) -> None:
    await trio.lowlevel.checkpoint()  # closes without a word


async def test_cdn_backend_hanging_up_is_bad_gateway(ca: LabCA) -> None:
    async with trio.open_nursery() as nursery:
        rude = await nursery.start(serve_h11, hang_up)
        async with edge_with(ca, rude_site=rude) as edge, tls_to(edge, ca) as stream:
            status, body = await get(h11.Connection(h11.CLIENT), stream, "rude.site")
        nursery.cancel_scope.cancel()
    assert (status, body) == (502, b"the backend hung up\n")


async def test_cdn_carries_large_bodies_both_ways(ca: LabCA) -> None:
    upload = bytes(range(256)) * 4096  # 1 MiB
    async with edge_with(ca) as edge, tls_to(edge, ca) as stream:
        conn = h11.Connection(h11.CLIENT)
        assert await get(conn, stream, "a.site", "/echo", method="POST", body=upload) == (
            200,
            upload,
        )
        conn.start_next_cycle()
        status, body = await get(conn, stream, "a.site", "/bytes/3000000")
    assert status == 200
    assert hashlib.sha256(body).digest() == hashlib.sha256(pattern_bytes(3_000_000)).digest()


async def test_cdn_streams_request_and_response_at_the_same_time(ca: LabCA) -> None:
    async with trio.open_nursery() as nursery:
        duplex = await nursery.start(serve_h11, duplex_echo)
        async with edge_with(ca, duplex_site=duplex) as edge, tls_to(edge, ca) as stream:
            conn = h11.Connection(h11.CLIENT)
            headers = [
                ("Host", "duplex.site"),
                ("Transfer-Encoding", "chunked"),
                ("Keep-Alive", "timeout=5"),
                ("Connection", "keep-alive, x-secret"),
                ("X-Secret", "hop"),
            ]
            request = h11.Request(method="POST", target="/tunnel", headers=headers)
            await stream.send_all(conn.send(request))
            assert isinstance(await _next(conn, stream), h11.Response)
            with trio.fail_after(5):
                for word in (b"one", b"two", b"three"):
                    # each echo comes back while the request body is still open
                    await stream.send_all(conn.send(h11.Data(data=word)))
                    event = await _next(conn, stream)
                    assert isinstance(event, h11.Data) and event.data == word
            await stream.send_all(conn.send(h11.EndOfMessage()))
            assert isinstance(await _next(conn, stream), h11.EndOfMessage)
        nursery.cancel_scope.cancel()
    headers_seen = seen_headers[-1]
    assert headers_seen[b"via"] == b"1.1 lab-cdn"
    assert headers_seen[b"x-forwarded-for"] == b"127.0.0.1"
    assert not {b"keep-alive", b"x-secret"} & set(headers_seen)


async def test_cdn_relays_a_websocket_upgrade(ca: LabCA) -> None:
    async with trio.open_nursery() as nursery:
        ws = await nursery.start(serve_h11, upgrade_echo)
        async with edge_with(ca, ws_site=ws) as edge, tls_to(edge, ca) as stream:
            head = (
                b"GET /chat HTTP/1.1\r\nHost: ws.site\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\nearly"
            )
            await stream.send_all(head)  # bytes right after the head ride along
            got = b""
            with trio.fail_after(5):
                while b"EARLY" not in got:
                    got += await stream.receive_some(65536)
                assert got.startswith(b"HTTP/1.1 101 ")
                assert b"upgrade: websocket" in got.lower()
                await stream.send_all(b"raw bytes now")
                echoed = b""
                while echoed != b"RAW BYTES NOW":
                    echoed += await stream.receive_some(65536)
        nursery.cancel_scope.cancel()
    assert edge.log[-1].status == 101 and edge.log[-1].host == "ws.site"
