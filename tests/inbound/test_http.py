"""Loopback tests for proxy.inbound.http: a real proxy, origin and echo server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import h11
import pytest
import trio
import trio.testing

from proxy.errors import ConnectRefused, NotAllowed
from proxy.inbound.base import InboundSettings, IPAddress, Replier, Request, Target
from proxy.inbound.http import handle_http

# --- the fake rest of sidestep -----------------------------------------------------------------


@dataclass
class FakeContext:
    """An InboundContext that really connects, without routing or strategies."""

    settings: InboundSettings
    tunnels: list[Request] = field(default_factory=list)
    connects: list[Target] = field(default_factory=list)
    blocked: set[str] = field(default_factory=set)

    async def tunnel(self, request: Request, replier: Replier) -> None:
        self.tunnels.append(request)
        if request.target.host in self.blocked:
            await replier.fail(NotAllowed("blocked by a rule"))
            return
        try:
            upstream = await trio.open_tcp_stream(request.target.host, request.target.port)
        except OSError as exc:
            await replier.fail(ConnectRefused(str(exc)))
            return
        async with upstream:
            await replier.succeed(None)
            if request.prefix:
                await upstream.send_all(request.prefix)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, request.stream, upstream)
                nursery.start_soon(_copy, upstream, request.stream)

    async def connect(self, target: Target, *, client: tuple[str, int]) -> trio.SocketStream:
        self.connects.append(target)
        try:
            return await trio.open_tcp_stream(target.host, target.port)
        except OSError as exc:
            raise ConnectRefused(f"{target}: {exc}") from exc

    async def resolve(self, host: str) -> Sequence[IPAddress]:
        raise NotImplementedError


async def _copy(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
        if isinstance(sink, trio.SocketStream):
            await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


# --- local servers -----------------------------------------------------------------------------


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        await _copy(stream, stream)


@dataclass
class Origin:
    port: int = 0
    connections: int = 0


BIG_CHUNK = b"x" * 16384
BIG_CHUNKS = 64


async def _origin(stream: trio.abc.Stream, origin: Origin) -> None:
    origin.connections += 1
    number = origin.connections
    conn = h11.Connection(h11.SERVER)
    async with stream:
        try:
            while True:
                request: h11.Request | None = None
                body = b""
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        continue
                    if isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        return
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                assert request is not None
                path = request.target.decode()
                if path == "/eof":
                    # an old-style response whose body ends when the connection does
                    await stream.send_all(b"HTTP/1.0 200 OK\r\nX-Old: 1\r\n\r\n" + b"e" * 5000)
                    return
                if path == "/big":
                    out = conn.send(h11.Response(status_code=200, headers=[]))
                    await stream.send_all(out or b"")
                    for _ in range(BIG_CHUNKS):
                        await stream.send_all(conn.send(h11.Data(data=BIG_CHUNK)) or b"")
                elif path == "/drop":
                    # answer as if keep-alive, then go away (an origin's idle timeout)
                    headers = [("Content-Length", "4")]
                    await stream.send_all(
                        conn.send(h11.Response(status_code=200, headers=headers)) or b""
                    )
                    await stream.send_all(conn.send(h11.Data(data=b"drop")) or b"")
                    await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                    return
                elif path == "/empty":
                    out = conn.send(h11.Response(status_code=204, headers=[]))
                    await stream.send_all(out or b"")
                else:
                    payload = json.dumps(
                        {
                            "method": request.method.decode(),
                            "path": path,
                            "headers": [[k.decode(), v.decode()] for k, v in request.headers],
                            "body": body.decode("latin-1"),
                            "connection": number,
                        }
                    ).encode()
                    headers = [("Content-Length", str(len(payload))), ("Connection", "keep-alive")]
                    out = conn.send(h11.Response(status_code=200, headers=headers))
                    await stream.send_all(out or b"")
                    if request.method != b"HEAD":
                        await stream.send_all(conn.send(h11.Data(data=payload)) or b"")
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            return


def _port(listeners: list[trio.SocketListener]) -> int:
    return int(listeners[0].socket.getsockname()[1])


@dataclass
class Lab:
    proxy_port: int
    echo_port: int
    origin: Origin
    ctx: FakeContext
    dead_port: int


async def _start(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return _port(listeners)


async def _dead_port() -> int:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = _port(listeners)
    for listener in listeners:
        await listener.aclose()
    return port


@pytest.fixture
def settings() -> InboundSettings:
    return InboundSettings(name="http-test", handshake_timeout=5.0, idle_timeout=5.0)


@pytest.fixture
async def lab(settings: InboundSettings) -> AsyncIterator[Lab]:
    ctx = FakeContext(settings)
    origin = Origin()

    async def serve_proxy(stream: trio.SocketStream) -> None:
        # like the listener: the first read happens before the handler is picked
        async with stream:
            first = await stream.receive_some(4096)
            if first:
                await handle_http(stream, first, ("127.0.0.1", 1), ctx)

    async def serve_origin(stream: trio.SocketStream) -> None:
        await _origin(stream, origin)

    async with trio.open_nursery() as nursery:
        echo_port = await _start(nursery, _echo)
        origin.port = await _start(nursery, serve_origin)
        proxy_port = await _start(nursery, serve_proxy)
        yield Lab(proxy_port, echo_port, origin, ctx, await _dead_port())
        nursery.cancel_scope.cancel()


# --- client helpers ----------------------------------------------------------------------------


async def _read_head(stream: trio.abc.Stream) -> tuple[bytes, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


async def _read_all(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


class Client:
    """A raw client speaking HTTP/1.1 through the proxy, parsing replies with h11."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.CLIENT)

    async def request(self, raw: bytes, method: bytes = b"GET") -> tuple[h11.Response, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        # tell h11 which method we used, so it frames the response (HEAD has no body)
        self.conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        self.conn.send(h11.EndOfMessage())
        await self.stream.send_all(raw)
        response: h11.Response | None = None
        body = b""
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert response is not None
                return response, body
            else:
                raise AssertionError(f"unexpected {event!r}")


async def _connect(lab: Lab) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", lab.proxy_port)


def _get(lab: Lab, path: str, extra: bytes = b"", method: bytes = b"GET") -> bytes:
    authority = f"127.0.0.1:{lab.origin.port}".encode()
    return (
        method + b" http://" + authority + path.encode() + b" HTTP/1.1\r\n"
        b"Host: " + authority + b"\r\n" + extra + b"\r\n"
    )


# --- CONNECT -----------------------------------------------------------------------------------


async def test_http_connect_tunnel_echoes(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as client:
            head = f"CONNECT 127.0.0.1:{lab.echo_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            # the first tunnelled bytes travel in the same packet as the CONNECT head
            await client.send_all(head + b"early ")
            reply, rest = await _read_head(client)
            assert reply == b"HTTP/1.1 200 Connection established"
            await client.send_all(b"late")
            echoed = rest
            while len(echoed) < len(b"early late"):
                echoed += await client.receive_some(100)
            assert echoed == b"early late"
    (request,) = lab.ctx.tunnels
    assert request.protocol == "http-connect"
    assert request.target == Target("127.0.0.1", lab.echo_port)
    assert request.inbound == "http-test"


async def test_http_connect_failure_replies_502(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as client:
            await client.send_all(
                f"CONNECT 127.0.0.1:{lab.dead_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            reply = await _read_all(client)
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


async def test_http_connect_not_allowed_replies_403(lab: Lab) -> None:
    lab.ctx.blocked.add("blocked.example")
    with trio.fail_after(5):
        async with await _connect(lab) as client:
            await client.send_all(b"CONNECT blocked.example:443 HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = await _read_all(client)
    assert reply.startswith(b"HTTP/1.1 403 Forbidden\r\n")


# --- forwarding --------------------------------------------------------------------------------


async def test_http_forward_keep_alive_reuses_one_upstream(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            client = Client(stream)
            response, body = await client.request(
                _get(lab, "/one?x=1", b"Proxy-Connection: keep-alive\r\nX-Test: a\r\n")
            )
            assert response.status_code == 200
            first = json.loads(body)
            response, body = await client.request(_get(lab, "/two"))
            second = json.loads(body)
    assert (first["path"], second["path"]) == ("/one?x=1", "/two")
    assert first["connection"] == second["connection"] == 1
    assert lab.origin.connections == 1
    names = [name.lower() for name, _ in first["headers"]]
    assert "proxy-connection" not in names
    assert ["x-test", "a"] in first["headers"]
    assert ["host", f"127.0.0.1:{lab.origin.port}"] in first["headers"]
    # hop-by-hop headers of the origin's answer did not reach the client
    assert all(name.lower() != b"connection" for name, _ in response.headers)


async def test_http_forward_post_with_content_length(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            raw = _get(lab, "/post", b"Content-Length: 11\r\n", b"POST") + b"hello world"
            _, body = await Client(stream).request(raw, b"POST")
    echoed = json.loads(body)
    assert (echoed["method"], echoed["body"]) == ("POST", "hello world")
    assert ["content-length", "11"] in echoed["headers"]


async def test_http_forward_post_chunked_then_get(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            client = Client(stream)
            raw = _get(lab, "/chunked", b"Transfer-Encoding: chunked\r\n", b"POST")
            raw += b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            _, body = await client.request(raw, b"POST")
            echoed = json.loads(body)
            assert echoed["body"] == "hello world"
            assert ["transfer-encoding", "chunked"] in echoed["headers"]
            _, body = await client.request(_get(lab, "/after"))
            assert json.loads(body)["path"] == "/after"


async def test_http_forward_expect_continue(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            head = _get(lab, "/put", b"Content-Length: 4\r\nExpect: 100-continue\r\n", b"PUT")
            await stream.send_all(head)
            interim, _ = await _read_head(stream)
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"data")
            reply, _ = await _read_head(stream)
            assert reply.startswith(b"HTTP/1.1 200 ")


async def test_http_forward_streams_a_large_chunked_response(lab: Lab) -> None:
    with trio.fail_after(10):
        async with await _connect(lab) as stream:
            client = Client(stream)
            response, body = await client.request(_get(lab, "/big"))
            assert response.status_code == 200
            assert body == BIG_CHUNK * BIG_CHUNKS
            _, body = await client.request(_get(lab, "/small"))
            assert json.loads(body)["path"] == "/small"


async def test_http_forward_response_ending_at_eof(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            client = Client(stream)
            response, body = await client.request(_get(lab, "/eof"))
            assert response.status_code == 200
            assert (b"x-old", b"1") in response.headers
            assert body == b"e" * 5000
            # the client connection survives (re-framed chunked); the origin one does not
            _, body = await client.request(_get(lab, "/next"))
            assert json.loads(body)["connection"] == 2


async def test_http_forward_head_and_204(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            client = Client(stream)
            response, body = await client.request(_get(lab, "/head", method=b"HEAD"), b"HEAD")
            assert response.status_code == 200 and body == b""
            assert any(name == b"content-length" for name, _ in response.headers)
            response, body = await client.request(_get(lab, "/empty"))
            assert response.status_code == 204 and body == b""
            _, body = await client.request(_get(lab, "/last"))
            assert json.loads(body)["connection"] == 1


async def test_http_forward_retries_a_stale_upstream_connection(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            client = Client(stream)
            _, body = await client.request(_get(lab, "/drop"))
            assert body == b"drop"
            _, body = await client.request(_get(lab, "/again"))
            assert json.loads(body)["connection"] == 2
    assert lab.origin.connections == 2


async def test_http_forward_dead_upstream_is_502(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            await stream.send_all(
                f"GET http://127.0.0.1:{lab.dead_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            reply = await _read_all(stream)
    assert reply.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"Connection: close" in reply


async def test_http_forward_connection_close_from_client(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            await stream.send_all(_get(lab, "/bye", b"Connection: close\r\n"))
            reply = await _read_all(stream)  # the proxy closes after the answer
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert reply.endswith(b"}")


# --- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"\x00\x01garbage\r\n\r\n", 400),
        (b"GET /status HTTP/1.1\r\nHost: proxy\r\n\r\n", 400),
        (b"GET https://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n", 400),
        (b"CONNECT example.com HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 needs Host
    ],
)
async def test_http_refuses_bad_requests(lab: Lab, raw: bytes, status: int) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            await stream.send_all(raw)
            reply = await _read_all(stream)
    assert reply.startswith(f"HTTP/1.1 {status} ".encode())
    assert lab.ctx.tunnels == [] and lab.ctx.connects == []


async def test_http_refuses_upgrade_with_501(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            extra = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
            await stream.send_all(_get(lab, "/ws", extra))
            reply = await _read_all(stream)
    assert reply.startswith(b"HTTP/1.1 501 ")
    assert lab.ctx.connects == []


@pytest.mark.parametrize(
    "settings",
    [InboundSettings(name="http-auth", users={"alice": "wonder:land"}, handshake_timeout=5.0)],
)
async def test_http_proxy_authentication(lab: Lab) -> None:
    with trio.fail_after(5):
        async with await _connect(lab) as stream:
            await stream.send_all(
                f"CONNECT 127.0.0.1:{lab.echo_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            )
            reply = await _read_all(stream)
        assert reply.startswith(b"HTTP/1.1 407 ")
        assert b'Proxy-Authenticate: Basic realm="sidestep"' in reply

        async with await _connect(lab) as stream:
            wrong = b"Proxy-Authorization: Basic YWxpY2U6bm8=\r\n"  # alice:no
            await stream.send_all(_get(lab, "/", wrong))
            assert (await _read_all(stream)).startswith(b"HTTP/1.1 407 ")

        async with await _connect(lab) as stream:
            good = b"Proxy-Authorization: Basic YWxpY2U6d29uZGVyOmxhbmQ=\r\n"
            response, body = await Client(stream).request(_get(lab, "/secret", good))
            assert response.status_code == 200
            echoed = json.loads(body)
            assert echoed["path"] == "/secret"
            assert all(name != "proxy-authorization" for name, _ in echoed["headers"])

        async with await _connect(lab) as stream:
            head = f"CONNECT 127.0.0.1:{lab.echo_port} HTTP/1.1\r\nHost: x\r\n".encode()
            await stream.send_all(head + good + b"\r\nping")
            reply, rest = await _read_head(stream)
            assert reply == b"HTTP/1.1 200 Connection established"
            while len(rest) < 4:
                rest += await stream.receive_some(10)
            assert rest == b"ping"
    assert len(lab.ctx.tunnels) == 1


# --- timeouts (virtual clock, memory streams) --------------------------------------------------


async def test_http_slowloris_head_is_cut_off(autojump_clock: trio.testing.MockClock) -> None:
    ctx = FakeContext(InboundSettings(name="slow", handshake_timeout=0.3))
    client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def serve() -> None:
            await handle_http(server, b"GET http://a.example/ HTTP/1.1\r\n", ("1.2.3.4", 5), ctx)
            nursery.cancel_scope.cancel()

        nursery.start_soon(serve)
        for _ in range(100):
            await client.send_all(b"X-Slow: 1\r\n")
            await trio.sleep(0.1)
    elapsed = trio.current_time() - start
    assert 0.3 <= elapsed < 0.45
    assert ctx.connects == []


@dataclass
class MemoryContext(FakeContext):
    """Upstream connections are memory streams to an in-process origin."""

    nursery: trio.Nursery | None = None
    origin: Origin = field(default_factory=Origin)

    async def connect(self, target: Target, *, client: tuple[str, int]) -> trio.SocketStream:
        assert self.nursery is not None
        ours, theirs = trio.testing.memory_stream_pair()
        self.nursery.start_soon(_origin, theirs, self.origin)
        return ours  # type: ignore[return-value]


async def test_http_idle_keep_alive_client_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = InboundSettings(name="idle", handshake_timeout=1.0, idle_timeout=30.0)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        ctx = MemoryContext(settings, nursery=nursery)
        done = trio.Event()

        async def serve() -> None:
            await handle_http(server, b"", ("1.2.3.4", 5), ctx)
            done.set()

        nursery.start_soon(serve)
        _, body = await Client(client).request(
            b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\n\r\n"
        )
        assert json.loads(body)["path"] == "/a"
        answered = trio.current_time()
        # a keep-alive client may idle much longer than the handshake timeout...
        await trio.sleep(20)
        assert not done.is_set()
        # ...but not longer than the idle timeout
        await done.wait()
        assert trio.current_time() - answered == pytest.approx(30.0, abs=0.1)
        assert ctx.connects == []  # MemoryContext.connect does not record
        nursery.cancel_scope.cancel()


async def test_http_idle_then_slow_head_gets_handshake_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    settings = InboundSettings(name="idle", handshake_timeout=1.0, idle_timeout=30.0)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        ctx = MemoryContext(settings, nursery=nursery)
        done = trio.Event()

        async def serve() -> None:
            await handle_http(server, b"", ("1.2.3.4", 5), ctx)
            done.set()

        nursery.start_soon(serve)
        await Client(client).request(
            b"GET http://origin.test/a HTTP/1.1\r\nHost: origin.test\r\n\r\n"
        )
        await trio.sleep(10)
        await client.send_all(b"GET http://origin.test/b HTTP/1.1\r\n")
        started = trio.current_time()
        await done.wait()
        assert trio.current_time() - started == pytest.approx(1.0, abs=0.1)
        nursery.cancel_scope.cancel()
