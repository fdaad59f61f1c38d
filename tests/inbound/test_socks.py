"""Loopback tests for proxy.inbound.socks: real trio sockets, a fake pipeline, echo servers."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import pytest
import trio

from proxy.errors import ConnectRefused, ResolveError
from proxy.inbound.base import InboundSettings, IPAddress, Replier, Request, Target
from proxy.inbound.socks import handle_socks4, handle_socks5
from proxy.protocols import socks4, socks5

# ------------------------------------------------------------------------------------- fixtures


@dataclass
class FakeContext:
    """An InboundContext whose pipeline really connects (direct) and relays."""

    settings: InboundSettings
    names: dict[str, list[IPAddress]] = field(
        default_factory=lambda: {"localhost": [ipaddress.IPv4Address("127.0.0.1")]}
    )
    requests: list[Request] = field(default_factory=list)
    finished: int = 0
    finished_event: trio.Event = field(default_factory=trio.Event)

    async def tunnel(self, request: Request, replier: Replier) -> None:
        self.requests.append(request)
        try:
            upstream = await trio.open_tcp_stream(request.target.host, request.target.port)
        except OSError as exc:
            await replier.fail(ConnectRefused(str(exc)))
            return
        async with upstream:
            await replier.succeed(upstream.socket.getsockname()[:2])
            if request.prefix:
                await upstream.send_all(request.prefix)
            async with trio.open_nursery() as nursery:

                async def copy(source: trio.abc.Stream, sink: trio.abc.Stream) -> None:
                    try:
                        while data := await source.receive_some(65536):
                            await sink.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(copy, request.stream, upstream)
                nursery.start_soon(copy, upstream, request.stream)

    async def connect(self, target: Target, *, client: tuple[str, int]) -> trio.SocketStream:
        raise NotImplementedError

    async def resolve(self, host: str) -> Sequence[IPAddress]:
        if host not in self.names:
            raise ResolveError(host)
        return self.names[host]


async def _serve_client(ctx: FakeContext, stream: trio.SocketStream) -> None:
    """What the mixed listener does: sniff the first bytes, pass them on as the prefix."""
    peer = stream.socket.getpeername()
    async with stream:
        try:
            first = await stream.receive_some(4096)
            if first[:1] == b"\x05":
                await handle_socks5(stream, first, (peer[0], peer[1]), ctx)
            elif first[:1] == b"\x04":
                await handle_socks4(stream, first, (peer[0], peer[1]), ctx)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            ctx.finished += 1
            ctx.finished_event.set()


async def _echo_tcp(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


StartProxy = Callable[..., Awaitable[tuple[FakeContext, int]]]


@pytest.fixture
def start_proxy(nursery: trio.Nursery) -> StartProxy:
    async def start(**settings: object) -> tuple[FakeContext, int]:
        ctx = FakeContext(InboundSettings(name="test", **settings))  # type: ignore[arg-type]

        async def handler(stream: trio.SocketStream) -> None:
            await _serve_client(ctx, stream)

        listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        return ctx, listeners[0].socket.getsockname()[1]

    return start


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, _echo_tcp, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


def _ipv6_loopback_works() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


async def _recv_exactly(stream: trio.abc.Stream, n: int) -> bytes:
    data = b""
    with trio.fail_after(5):
        while len(data) < n:
            chunk = await stream.receive_some(n - len(data))
            if not chunk:
                raise AssertionError(f"EOF after {data!r}, wanted {n} bytes")
            data += chunk
    return data


async def _recv_until_eof(stream: trio.abc.Stream) -> bytes:
    data = b""
    with trio.fail_after(5):
        try:
            while chunk := await stream.receive_some(4096):
                data += chunk
        except trio.BrokenResourceError:
            pass
    return data


async def _socks5_connect(
    port: int, host: str, target_port: int, *, auth: tuple[str, str] | None = None
) -> tuple[trio.SocketStream, socks5.Reply]:
    """Handshake through the proxy with the sans-IO client; return stream and reply."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = socks5.Socks5ClientConnection(
        username=auth[0] if auth else None, password=auth[1] if auth else None
    )
    reply: socks5.Reply | None = None
    with trio.fail_after(5):
        await stream.send_all(client.data_to_send())
        while reply is None:
            data = await stream.receive_some(4096)
            events = client.receive_data(data) if data else client.receive_eof()
            for event in events:
                if isinstance(event, socks5.Reply):
                    reply = event
                elif client.state is socks5.ClientState.READY:
                    client.send(
                        socks5.CommandRequested(
                            socks5.Command.CONNECT,
                            host,
                            target_port,
                            socks5.address_type_of(host),
                        )
                    )
                elif client.state is socks5.ClientState.CLOSED:
                    raise AssertionError(f"refused: {event}")
            await stream.send_all(client.data_to_send())
    assert client.trailing_data == b""
    return stream, reply


# ----------------------------------------------------------------------------- SOCKS5 CONNECT


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_socks5_connect_relays(start_proxy: StartProxy, echo_port: int, host: str) -> None:
    ctx, port = await start_proxy()
    stream, reply = await _socks5_connect(port, host, echo_port)
    async with stream:
        assert reply.code is socks5.ReplyCode.SUCCEEDED
        assert reply.bind_host == "127.0.0.1" and reply.bind_port != 0
        await stream.send_all(b"ping")
        assert await _recv_exactly(stream, 4) == b"ping"
    (request,) = ctx.requests
    assert request.target == Target(host, echo_port)
    assert request.protocol == "socks5" and request.inbound == "test"
    assert request.client[0] == "127.0.0.1"


async def test_socks5_connect_ipv6(start_proxy: StartProxy, nursery: trio.Nursery) -> None:
    if not _ipv6_loopback_works():
        pytest.skip("no IPv6 loopback")
    listeners = await nursery.start(partial(trio.serve_tcp, _echo_tcp, 0, host="::1"))
    echo6 = listeners[0].socket.getsockname()[1]
    _, port = await start_proxy()
    stream, reply = await _socks5_connect(port, "::1", echo6)
    async with stream:
        assert reply.code is socks5.ReplyCode.SUCCEEDED
        assert reply.bind_host == "::1"
        await stream.send_all(b"six")
        assert await _recv_exactly(stream, 3) == b"six"


async def test_socks5_pipelined_payload_reaches_upstream(
    start_proxy: StartProxy, echo_port: int
) -> None:
    ctx, port = await start_proxy()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        request = b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo_port.to_bytes(2, "big")
        await stream.send_all(b"\x05\x01\x00" + request + b"early bytes")
        assert await _recv_exactly(stream, 2) == b"\x05\x00"
        reply = await _recv_exactly(stream, 10)
        assert reply[:2] == b"\x05\x00"
        assert await _recv_exactly(stream, 11) == b"early bytes"
    assert ctx.requests[0].prefix == b"early bytes"


async def test_socks5_connect_refused(start_proxy: StartProxy) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    _, port = await start_proxy()
    stream, reply = await _socks5_connect(port, "127.0.0.1", closed_port)
    async with stream:
        assert reply.code is socks5.ReplyCode.CONNECTION_REFUSED
        assert await _recv_until_eof(stream) == b""


async def test_socks5_bind_is_not_supported(start_proxy: StartProxy) -> None:
    _, port = await start_proxy()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"\x05\x01\x00\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50")
        data = await _recv_until_eof(stream)
    assert data == b"\x05\x00" + socks5.build_reply(socks5.ReplyCode.COMMAND_NOT_SUPPORTED)


async def test_socks5_unknown_command_gets_reply_7(start_proxy: StartProxy) -> None:
    _, port = await start_proxy()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"\x05\x01\x00\x05\x09\x00\x01")
        data = await _recv_until_eof(stream)
    assert data == b"\x05\x00" + socks5.build_reply(socks5.ReplyCode.COMMAND_NOT_SUPPORTED)


# ---------------------------------------------------------------------------------------- auth


async def test_socks5_auth_success(start_proxy: StartProxy, echo_port: int) -> None:
    _, port = await start_proxy(users={"alice": "s3cret"})
    stream, reply = await _socks5_connect(port, "127.0.0.1", echo_port, auth=("alice", "s3cret"))
    async with stream:
        assert reply.code is socks5.ReplyCode.SUCCEEDED
        await stream.send_all(b"hi")
        assert await _recv_exactly(stream, 2) == b"hi"


async def test_socks5_auth_failure(start_proxy: StartProxy) -> None:
    ctx, port = await start_proxy(users={"alice": "s3cret"})
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"\x05\x01\x02\x01\x05alice\x05wrong")
        assert await _recv_until_eof(stream) == b"\x05\x02\x01\x01"
    assert ctx.requests == []


async def test_socks5_rejects_unknown_auth_method(start_proxy: StartProxy) -> None:
    ctx, port = await start_proxy(users={"alice": "s3cret"})
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"\x05\x01\x00")
        assert await _recv_until_eof(stream) == b"\x05\xff"
    assert ctx.requests == []


async def test_socks5_handshake_timeout_stops_slowloris(start_proxy: StartProxy) -> None:
    ctx, port = await start_proxy(handshake_timeout=0.3)
    handshake = b"\x05\x01\x00\x05\x01\x00\x03\x09localhost\x00\x50"
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        start = trio.current_time()

        async def dribble() -> None:
            try:
                for i in range(len(handshake)):
                    await stream.send_all(handshake[i : i + 1])
                    await trio.sleep(0.05)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(dribble)
            data = await _recv_until_eof(stream)
            nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - start
    assert data == b"\x05\x00"  # the method choice, then nothing: no request completed
    assert 0.25 <= elapsed < 0.9
    assert ctx.requests == []


# -------------------------------------------------------------------------------------- SOCKS4


async def _socks4(port: int, wire: bytes) -> tuple[socks4.Reply | None, trio.SocketStream]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(wire)
    data = b""
    with trio.fail_after(5):
        while len(data) < 8:
            chunk = await stream.receive_some(8 - len(data))
            if not chunk:
                break
            data += chunk
    return socks4.parse_reply(data), stream


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_socks4_connect_relays(start_proxy: StartProxy, echo_port: int, host: str) -> None:
    ctx, port = await start_proxy()
    wire = socks4.build_request(socks4.Command.CONNECT, host, echo_port, "bob") + b"early"
    reply, stream = await _socks4(port, wire)
    async with stream:
        assert reply is not None and reply.code is socks4.ReplyCode.GRANTED
        assert reply.bind_host == "127.0.0.1"
        assert await _recv_exactly(stream, 5) == b"early"
    (request,) = ctx.requests
    assert request.target == Target(host, echo_port)
    assert request.protocol == "socks4" and request.prefix == b"early"


async def test_socks4_rejected_when_auth_required(start_proxy: StartProxy, echo_port: int) -> None:
    ctx, port = await start_proxy(users={"alice": "s3cret"})
    reply, stream = await _socks4(
        port, socks4.build_request(socks4.Command.CONNECT, "127.0.0.1", echo_port, "alice")
    )
    async with stream:
        assert reply is not None and reply.code is socks4.ReplyCode.REJECTED
        assert await _recv_until_eof(stream) == b""
    assert ctx.requests == []


async def test_socks4_bind_and_failures_are_rejected(start_proxy: StartProxy) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    _, port = await start_proxy()
    for wire in [
        socks4.build_request(socks4.Command.BIND, "127.0.0.1", 80),
        socks4.build_request(socks4.Command.CONNECT, "127.0.0.1", closed_port),
        b"\x04\x07\x00\x50\x7f\x00\x00\x01\x00",  # unknown command
    ]:
        reply, stream = await _socks4(port, wire)
        async with stream:
            assert reply is not None and reply.code is socks4.ReplyCode.REJECTED


async def test_socks4_handshake_timeout(start_proxy: StartProxy) -> None:
    ctx, port = await start_proxy(handshake_timeout=0.3)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"\x04\x01\x00\x50")
        assert await _recv_until_eof(stream) == b""
    assert ctx.requests == []


# ----------------------------------------------------------------------------- UDP ASSOCIATE


@dataclass
class UdpEcho:
    sock: trio.socket.SocketType
    port: int
    seen: list[bytes]
    sources: list[tuple[str, int]] = field(default_factory=list)


@pytest.fixture
async def udp_echo(nursery: trio.Nursery) -> UdpEcho:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    echo = UdpEcho(sock, sock.getsockname()[1], [])

    async def serve() -> None:
        with sock:
            while True:
                data, addr = await sock.recvfrom(65535)
                echo.seen.append(data)
                echo.sources.append(addr[:2])
                await sock.sendto(data, addr)

    nursery.start_soon(serve)
    return echo


async def _associate(port: int) -> tuple[trio.SocketStream, tuple[str, int]]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(b"\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
    assert await _recv_exactly(stream, 2) == b"\x05\x00"
    reply = await _recv_exactly(stream, 10)
    assert reply[:4] == b"\x05\x00\x00\x01"
    relay = (str(ipaddress.IPv4Address(reply[4:8])), int.from_bytes(reply[8:10], "big"))
    return stream, relay


async def _udp_socket(ip: str = "127.0.0.1") -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((ip, 0))
    return sock


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_socks5_udp_associate_round_trip(
    start_proxy: StartProxy, udp_echo: UdpEcho, host: str
) -> None:
    ctx, port = await start_proxy()
    stream, relay = await _associate(port)
    async with stream:
        assert relay[0] == "127.0.0.1"
        with await _udp_socket() as client:
            for payload in [b"one", b"two"]:
                await client.sendto(socks5.build_udp_datagram(host, udp_echo.port, payload), relay)
                with trio.fail_after(5):
                    data, source = await client.recvfrom(65535)
                assert source[:2] == relay
                assert socks5.parse_udp_datagram(data) == socks5.UdpDatagram(
                    0, "127.0.0.1", udp_echo.port, payload
                )
    with trio.fail_after(5):  # the association ends with the control connection
        await ctx.finished_event.wait()


async def test_socks5_udp_ignores_foreign_and_fragmented_datagrams(
    start_proxy: StartProxy, udp_echo: UdpEcho
) -> None:
    _, port = await start_proxy()
    stream, relay = await _associate(port)
    async with stream:
        with (
            await _udp_socket() as client,
            await _udp_socket("127.0.0.2") as foreign,
            await _udp_socket() as other_port,
        ):
            await foreign.sendto(socks5.build_udp_datagram("127.0.0.1", udp_echo.port, b"f"), relay)
            wire = socks5.build_udp_datagram("127.0.0.1", udp_echo.port, b"frag", frag=1)
            await client.sendto(wire, relay)  # also teaches the relay the client's port
            wire = socks5.build_udp_datagram("127.0.0.1", udp_echo.port, b"other port")
            await other_port.sendto(wire, relay)
            await client.sendto(b"\x00\x00\x00\x09garbage", relay)
            await client.sendto(socks5.build_udp_datagram("nx.invalid", 9, b"nx"), relay)
            await client.sendto(socks5.build_udp_datagram("127.0.0.1", udp_echo.port, b"ok"), relay)
            with trio.fail_after(5):
                data, _ = await client.recvfrom(65535)
            assert socks5.parse_udp_datagram(data).payload == b"ok"
    assert udp_echo.seen == [b"ok"]


async def test_socks5_udp_ignores_replies_from_strangers(
    start_proxy: StartProxy, udp_echo: UdpEcho
) -> None:
    _, port = await start_proxy()
    stream, relay = await _associate(port)
    async with stream:
        with await _udp_socket() as client, await _udp_socket() as stranger:
            await client.sendto(socks5.build_udp_datagram("127.0.0.1", udp_echo.port, b"a"), relay)
            with trio.fail_after(5):
                await client.recvfrom(65535)
            # the echo server saw the relay's outbound socket: a stranger writes to it
            await stranger.sendto(b"spoof", udp_echo.sources[0])
            await client.sendto(socks5.build_udp_datagram("127.0.0.1", udp_echo.port, b"b"), relay)
            with trio.fail_after(5):
                data, _ = await client.recvfrom(65535)
            assert socks5.parse_udp_datagram(data).payload == b"b"


async def test_socks5_udp_idle_timeout_ends_association(
    start_proxy: StartProxy, udp_echo: UdpEcho
) -> None:
    ctx, port = await start_proxy(udp_idle_timeout=0.3)
    stream, relay = await _associate(port)
    async with stream:
        with await _udp_socket() as client:
            await client.sendto(socks5.build_udp_datagram("127.0.0.1", udp_echo.port, b"x"), relay)
            with trio.fail_after(5):
                await client.recvfrom(65535)
            with trio.fail_after(5):
                await ctx.finished_event.wait()
            assert await _recv_until_eof(stream) == b""


async def test_socks5_udp_disabled(start_proxy: StartProxy) -> None:
    _, port = await start_proxy(udp=False)
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
        await stream.send_all(b"\x05\x01\x00\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")
        data = await _recv_until_eof(stream)
    assert data == b"\x05\x00" + socks5.build_reply(socks5.ReplyCode.COMMAND_NOT_SUPPORTED)
