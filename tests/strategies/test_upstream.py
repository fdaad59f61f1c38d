"""Loopback tests for proxy.strategies.upstream.

The upstream is a real sidestep inbound (listener, dispatcher, resolver) on 127.0.0.1, in the
test's nursery; origins are tiny trio servers. Where a test needs the upstream to misbehave in a
precise way (bytes right behind its reply, silence, a recorded request) a small scripted
upstream built on the same sans-IO code stands in for it.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import h11
import pytest
import trio
import trio.testing

from proxy.errors import (
    ConfigError,
    ConnectRefused,
    ConnectTimeout,
    NotAllowed,
    ResolveError,
    UpstreamError,
)
from proxy.inbound.base import InboundSettings, IPAddress, Target
from proxy.inbound.listener import InboundServer, open_listeners
from proxy.protocols.socks5 import (
    AddressType,
    Command,
    CommandRequested,
    Reply,
    ReplyCode,
    Socks5ServerConnection,
)
from proxy.resolve.system import SystemResolver
from proxy.route.dispatcher import Dispatcher, DispatchSettings
from proxy.strategies.base import Strategy
from proxy.strategies.upstream import (
    HttpConnectStrategy,
    PrefixedStream,
    Socks5Strategy,
    UpstreamNotAllowed,
    UpstreamProxyError,
    connect_authority,
    socks5_reply_error,
    tor_strategy,
)

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
#: a name only the upstream's resolver knows: resolving it here would fail
HIDDEN = "only-upstream-knows.invalid"

# ------------------------------------------------------------------------------------- fixtures


class RecordingResolver:
    """The upstream's resolver: the system's, plus :data:`HIDDEN`, and a log of every name."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.system = SystemResolver(timeout=5.0)

    async def resolve(self, host: str) -> list[IPAddress]:
        self.asked.append(host)
        if host == HIDDEN:
            await trio.lowlevel.checkpoint()
            return [LOOPBACK]
        return await self.system.resolve(host)


@dataclass
class Upstream:
    server: InboundServer
    resolver: RecordingResolver

    @property
    def address(self) -> tuple[str, int]:
        return self.server.bound


StartUpstream = Callable[..., Awaitable[Upstream]]


@pytest.fixture
def start_upstream(nursery: trio.Nursery) -> StartUpstream:
    """Start a sidestep inbound (``protocol``, optional ``users``) on 127.0.0.1:0."""

    async def start(protocol: str = "mixed", users: dict[str, str] | None = None) -> Upstream:
        resolver = RecordingResolver()
        dispatcher = Dispatcher(DispatchSettings(first_flight_wait=0.05), resolver)
        settings = InboundSettings(name="upstream", users=users or {})
        server = InboundServer(
            name="upstream",
            protocol=protocol,
            ctx=dispatcher.context(settings),
            allow=(ipaddress.ip_network("127.0.0.0/8"),),
        )
        listeners = await open_listeners("127.0.0.1", 0)
        server.bind_info(listeners)
        nursery.start_soon(server.serve, listeners)
        return Upstream(server, resolver)

    return start


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def _serve(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


@pytest.fixture
async def echo_port(nursery: trio.Nursery) -> int:
    return await _serve(nursery, _echo)


def closed_port() -> int:
    """A loopback port nothing listens on (bound once, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _round_trip(stream: trio.abc.Stream, sent: bytes, expected: bytes) -> bytes:
    """Read from ``stream`` until ``expected`` bytes arrived (what ``sent`` should echo to)."""
    got = b""
    with trio.fail_after(5):
        while len(got) < len(expected):
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed after {got!r}"
            got += chunk
    return got


# --------------------------------------------------------------------------- scripted upstreams


@dataclass
class Scripted:
    """A scripted upstream: records what it was asked, answers as told."""

    #: bytes sent right behind a successful reply (in the same write)
    extra: bytes = b""
    #: never answer at all
    silent: bool = False
    #: the raw HTTP answer of the HTTP variant
    http_answer: bytes = b"HTTP/1.1 200 Connection established\r\n\r\n"
    requests: list[object] = field(default_factory=list)
    port: int = 0

    async def socks5(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.silent:
                await trio.sleep_forever()
            conn = Socks5ServerConnection(require_auth=False)
            while True:
                data = await stream.receive_some(4096)
                events = conn.receive_data(data) if data else conn.receive_eof()
                await stream.send_all(conn.data_to_send())
                for event in events:
                    if isinstance(event, CommandRequested):
                        self.requests.append(event)
                        conn.send(Reply(ReplyCode.SUCCEEDED, "127.0.0.1", 1))
                        await stream.send_all(conn.data_to_send() + self.extra)
                        await _echo_rest(stream, conn.trailing_data)
                        return

    async def http(self, stream: trio.SocketStream) -> None:
        async with stream:
            if self.silent:
                await trio.sleep_forever()
            server = h11.Connection(h11.SERVER)
            while True:
                event = server.next_event()
                if event is h11.NEED_DATA:
                    server.receive_data(await stream.receive_some(4096))
                    continue
                if isinstance(event, h11.Request):
                    self.requests.append(event)
                    continue
                if isinstance(event, h11.EndOfMessage):
                    await stream.send_all(self.http_answer + self.extra)
                    await _echo_rest(stream, server.trailing_data[0])
                    return


async def _echo_rest(stream: trio.SocketStream, already: bytes) -> None:
    try:
        if already:
            await stream.send_all(already)
        while data := await stream.receive_some(65536):
            await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def start_scripted(nursery: trio.Nursery, kind: str, **options: object) -> Scripted:
    script = Scripted(**options)  # type: ignore[arg-type]
    script.port = await _serve(nursery, script.socks5 if kind == "socks5" else script.http)
    return script


# ------------------------------------------------------------------------------ socks5 upstream


def test_strategies_satisfy_the_protocol() -> None:
    strategies: list[Strategy] = [
        Socks5Strategy("s", ("127.0.0.1", 1080)),
        HttpConnectStrategy("h", ("127.0.0.1", 3128)),
        tor_strategy(),
    ]
    assert [s.remote_dns for s in strategies] == [True, True, True]


async def test_socks5_without_credentials_tunnels_and_delivers_first_flight(
    start_upstream: StartUpstream, echo_port: int
) -> None:
    upstream = await start_upstream("socks5")
    strategy = Socks5Strategy("up", upstream.address, remote_dns=False)
    target = Target("127.0.0.1", echo_port)
    async with await strategy.connect(target, [LOOPBACK], b"first flight") as stream:
        assert await _round_trip(stream, b"", b"first flight") == b"first flight"
        await stream.send_all(b"more")
        assert await _round_trip(stream, b"", b"more") == b"more"


async def test_socks5_with_credentials_tunnels(
    start_upstream: StartUpstream, echo_port: int
) -> None:
    upstream = await start_upstream("socks5", users={"alice": "s3cret"})
    strategy = Socks5Strategy("up", upstream.address, username="alice", password="s3cret")
    async with await strategy.connect(Target("127.0.0.1", echo_port), [], b"hi") as stream:
        assert await _round_trip(stream, b"", b"hi") == b"hi"


async def test_socks5_wrong_password_is_not_allowed(
    start_upstream: StartUpstream, echo_port: int
) -> None:
    upstream = await start_upstream("socks5", users={"alice": "s3cret"})
    strategy = Socks5Strategy("up", upstream.address, username="alice", password="wrong")
    with pytest.raises(UpstreamNotAllowed, match="rejected") as info:
        await strategy.connect(Target("127.0.0.1", echo_port), [], b"")
    assert isinstance(info.value, NotAllowed)
    assert isinstance(info.value, UpstreamError)
    assert f"via socks5 upstream 127.0.0.1:{upstream.address[1]}" in str(info.value)


async def test_socks5_missing_credentials_is_not_allowed(
    start_upstream: StartUpstream, echo_port: int
) -> None:
    upstream = await start_upstream("socks5", users={"alice": "s3cret"})
    strategy = Socks5Strategy("up", upstream.address)
    with pytest.raises(UpstreamNotAllowed, match="requires authentication"):
        await strategy.connect(Target("127.0.0.1", echo_port), [], b"")


async def test_socks5_remote_dns_sends_the_name_without_local_lookup(
    start_upstream: StartUpstream, echo_port: int
) -> None:
    upstream = await start_upstream("socks5")
    strategy = Socks5Strategy("up", upstream.address)
    # HIDDEN does not resolve here (.invalid, RFC 6761): only the upstream knows it, and it is
    # asked for it by name, so the strategy cannot have looked it up itself
    async with await strategy.connect(Target(HIDDEN, echo_port), [], b"hidden") as stream:
        assert await _round_trip(stream, b"", b"hidden") == b"hidden"
    assert upstream.resolver.asked == [HIDDEN]


async def test_socks5_remote_dns_localhost_with_no_addresses(
    start_upstream: StartUpstream, echo_port: int
) -> None:
    upstream = await start_upstream("socks5")
    strategy = Socks5Strategy("up", upstream.address)
    async with await strategy.connect(Target("localhost", echo_port), [], b"x") as stream:
        assert await _round_trip(stream, b"", b"x") == b"x"
    assert upstream.resolver.asked == ["localhost"]


async def test_socks5_without_remote_dns_sends_the_resolved_address(
    nursery: trio.Nursery,
) -> None:
    script = await start_scripted(nursery, "socks5")
    strategy = Socks5Strategy("up", ("127.0.0.1", script.port), remote_dns=False)
    async with await strategy.connect(Target("example.test", 443), [LOOPBACK], b""):
        pass
    assert script.requests == [
        CommandRequested(Command.CONNECT, "127.0.0.1", 443, AddressType.IPV4)
    ]


async def test_socks5_without_remote_dns_needs_addresses() -> None:
    strategy = Socks5Strategy("up", ("127.0.0.1", closed_port()), remote_dns=False)
    with pytest.raises(ResolveError, match="remote_dns is off"):
        await strategy.connect(Target("example.test", 443), [], b"")


async def test_socks5_ipv6_literal_target_goes_as_ipv6(nursery: trio.Nursery) -> None:
    script = await start_scripted(nursery, "socks5")
    strategy = Socks5Strategy("up", ("127.0.0.1", script.port))
    async with await strategy.connect(Target.parse("[2001:db8::1]", 443), [], b""):
        pass
    (request,) = script.requests
    assert isinstance(request, CommandRequested)
    assert (request.host, request.port, request.address_type) == (
        "2001:db8::1",
        443,
        AddressType.IPV6,
    )


async def test_socks5_upstream_down_names_the_upstream() -> None:
    port = closed_port()
    strategy = Socks5Strategy("up", ("127.0.0.1", port))
    with pytest.raises(UpstreamProxyError) as info:
        await strategy.connect(Target("example.test", 443), [], b"")
    assert (
        str(info.value) == f"socks5 upstream 127.0.0.1:{port} cannot be reached: connection refused"
    )
    assert isinstance(info.value.__cause__, ConnectRefused)


async def test_socks5_target_refused_at_the_upstream(start_upstream: StartUpstream) -> None:
    upstream = await start_upstream("socks5")
    strategy = Socks5Strategy("up", upstream.address)
    with pytest.raises(ConnectRefused) as info:
        await strategy.connect(Target("127.0.0.1", closed_port()), [], b"")
    assert not isinstance(info.value, UpstreamProxyError)
    assert str(info.value).startswith(
        f"via socks5 upstream 127.0.0.1:{upstream.address[1]}: connection refused"
    )


async def test_socks5_bytes_behind_the_reply_come_first(nursery: trio.Nursery) -> None:
    script = await start_scripted(nursery, "socks5", extra=b"220 banner\r\n")
    strategy = Socks5Strategy("up", ("127.0.0.1", script.port))
    stream = await strategy.connect(Target("example.test", 25), [], b"EHLO me\r\n")
    async with stream:
        assert isinstance(stream, PrefixedStream)
        want = b"220 banner\r\nEHLO me\r\n"
        assert await _round_trip(stream, b"", want) == want


async def test_socks5_silent_upstream_times_out(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0.02
    script = await start_scripted(nursery, "socks5", silent=True)
    strategy = Socks5Strategy("up", ("127.0.0.1", script.port), handshake_timeout=7)
    start = trio.current_time()
    with pytest.raises(ConnectTimeout, match=f"via socks5 upstream 127.0.0.1:{script.port}"):
        await strategy.connect(Target("example.test", 443), [], b"")
    assert trio.current_time() - start == pytest.approx(7, abs=0.5)


async def test_socks5_upstream_hanging_up_is_an_upstream_proxy_error(
    nursery: trio.Nursery,
) -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(100)

    port = await _serve(nursery, hang_up)
    strategy = Socks5Strategy("up", ("127.0.0.1", port))
    with pytest.raises(UpstreamProxyError, match="closed the connection during the SOCKS5"):
        await strategy.connect(Target("example.test", 443), [], b"")


@pytest.mark.parametrize(
    ("code", "kind", "text"),
    [
        (ReplyCode.GENERAL_FAILURE, UpstreamError, "general failure"),
        (ReplyCode.NOT_ALLOWED, UpstreamNotAllowed, "connection not allowed"),
        (ReplyCode.NETWORK_UNREACHABLE, UpstreamError, "network unreachable"),
        (ReplyCode.HOST_UNREACHABLE, UpstreamError, "host unreachable"),
        (ReplyCode.CONNECTION_REFUSED, ConnectRefused, "connection refused"),
        (ReplyCode.TTL_EXPIRED, ConnectTimeout, "TTL expired"),
        (ReplyCode.COMMAND_NOT_SUPPORTED, UpstreamProxyError, "CONNECT not supported"),
    ],
)
def test_socks5_reply_codes_map_to_errors(
    code: ReplyCode, kind: type[UpstreamError], text: str
) -> None:
    error = socks5_reply_error(code, "via socks5 upstream 127.0.0.1:9050")
    assert isinstance(error, kind)
    assert str(error).startswith(f"via socks5 upstream 127.0.0.1:9050: {text}")


def test_socks5_server_must_be_an_ip_literal() -> None:
    with pytest.raises(ConfigError, match="IP address"):
        Socks5Strategy("up", ("proxy.example", 1080))
    with pytest.raises(ConfigError, match="out of range"):
        Socks5Strategy("up", ("127.0.0.1", 0))
    with pytest.raises(ConfigError, match="needs a username"):
        Socks5Strategy("up", ("127.0.0.1", 1080), password="x")


def test_socks5_password_is_not_in_repr() -> None:
    strategy = Socks5Strategy("up", ("127.0.0.1", 1080), username="alice", password="s3cret")
    assert "s3cret" not in repr(strategy)


def test_tor_preset_resolves_remotely() -> None:
    tor = tor_strategy()
    assert (tor.name, tor.server, tor.remote_dns) == ("tor", ("127.0.0.1", 9050), True)
    assert tor.via == "via socks5 upstream 127.0.0.1:9050"
    assert tor_strategy("tor2", ("::1", 9150)).via == "via socks5 upstream [::1]:9150"


# -------------------------------------------------------------------------------- http upstream


async def test_http_connect_without_credentials(
    start_upstream: StartUpstream, echo_port: int
) -> None:
    upstream = await start_upstream("http")
    strategy = HttpConnectStrategy("up", upstream.address)
    async with await strategy.connect(Target("localhost", echo_port), [], b"ping") as stream:
        assert await _round_trip(stream, b"", b"ping") == b"ping"
    assert upstream.resolver.asked == ["localhost"]


async def test_http_connect_with_credentials(start_upstream: StartUpstream, echo_port: int) -> None:
    upstream = await start_upstream("http", users={"bob": "pässword"})
    strategy = HttpConnectStrategy("up", upstream.address, username="bob", password="pässword")
    async with await strategy.connect(Target("127.0.0.1", echo_port), [], b"ping") as stream:
        assert await _round_trip(stream, b"", b"ping") == b"ping"


async def test_http_connect_407_is_not_allowed(
    start_upstream: StartUpstream, echo_port: int
) -> None:
    upstream = await start_upstream("http", users={"bob": "pw"})
    target = Target("127.0.0.1", echo_port)
    anonymous = HttpConnectStrategy("up", upstream.address)
    with pytest.raises(UpstreamNotAllowed, match=r"requires authentication \(407\)"):
        await anonymous.connect(target, [], b"")
    wrong = HttpConnectStrategy("up", upstream.address, username="bob", password="nope")
    with pytest.raises(UpstreamNotAllowed, match=r"rejected \(407\)") as info:
        await wrong.connect(target, [], b"")
    assert str(info.value).startswith(f"via http upstream 127.0.0.1:{upstream.address[1]}")


async def test_http_connect_target_refused_reports_the_status(
    start_upstream: StartUpstream,
) -> None:
    upstream = await start_upstream("http")
    strategy = HttpConnectStrategy("up", upstream.address)
    with pytest.raises(UpstreamError, match="CONNECT answered 502") as info:
        await strategy.connect(Target("127.0.0.1", closed_port()), [], b"")
    assert not isinstance(info.value, UpstreamProxyError | NotAllowed)


@pytest.mark.parametrize(
    ("answer", "kind", "text"),
    [
        (b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", UpstreamNotAllowed, "forbidden"),
        (b"HTTP/1.1 504 Gateway Timeout\r\n\r\n", ConnectTimeout, "timed out"),
        (b"HTTP/1.1 503 Busy\r\n\r\n", UpstreamError, "answered 503 Busy"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", UpstreamProxyError, "bad HTTP response"),
    ],
)
async def test_http_connect_error_statuses(
    nursery: trio.Nursery, answer: bytes, kind: type[UpstreamError], text: str
) -> None:
    script = await start_scripted(nursery, "http", http_answer=answer)
    strategy = HttpConnectStrategy("up", ("127.0.0.1", script.port))
    with pytest.raises(kind, match=text):
        await strategy.connect(Target("example.test", 443), [], b"")


async def test_http_connect_bytes_behind_the_head_come_first(nursery: trio.Nursery) -> None:
    script = await start_scripted(
        nursery,
        "http",
        http_answer=b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        extra=b"early",
    )
    strategy = HttpConnectStrategy("up", ("127.0.0.1", script.port))
    stream = await strategy.connect(Target("example.test", 443), [], b"+flight")
    async with stream:
        assert isinstance(stream, PrefixedStream)
        assert await _round_trip(stream, b"", b"early+flight") == b"early+flight"


async def test_http_connect_request_for_ipv6_and_auth(nursery: trio.Nursery) -> None:
    script = await start_scripted(nursery, "http")
    strategy = HttpConnectStrategy("up", ("127.0.0.1", script.port), username="u", password="p")
    async with await strategy.connect(Target.parse("[2001:db8::1]", 8443), [], b""):
        pass
    (request,) = script.requests
    assert isinstance(request, h11.Request)
    assert (request.method, request.target) == (b"CONNECT", b"[2001:db8::1]:8443")
    headers = dict(request.headers)
    assert headers[b"host"] == b"[2001:db8::1]:8443"
    assert headers[b"proxy-authorization"] == b"Basic dTpw"


async def test_http_connect_without_remote_dns_sends_the_address(nursery: trio.Nursery) -> None:
    script = await start_scripted(nursery, "http")
    strategy = HttpConnectStrategy("up", ("127.0.0.1", script.port), remote_dns=False)
    v6 = ipaddress.IPv6Address("2001:db8::2")
    async with await strategy.connect(Target("example.test", 443), [v6, LOOPBACK], b""):
        pass
    (request,) = script.requests
    assert isinstance(request, h11.Request)
    assert request.target == b"[2001:db8::2]:443"


async def test_http_connect_silent_upstream_times_out(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0.02
    script = await start_scripted(nursery, "http", silent=True)
    strategy = HttpConnectStrategy("up", ("127.0.0.1", script.port), handshake_timeout=3)
    with pytest.raises(ConnectTimeout, match="no answer within 3 s"):
        await strategy.connect(Target("example.test", 443), [], b"")


async def test_http_upstream_down_names_the_upstream() -> None:
    port = closed_port()
    strategy = HttpConnectStrategy("up", ("127.0.0.1", port))
    with pytest.raises(UpstreamProxyError, match=f"http upstream 127.0.0.1:{port} cannot be"):
        await strategy.connect(Target("example.test", 443), [], b"")


def test_connect_authority_brackets_ipv6_and_punycodes_idns() -> None:
    assert connect_authority("::1") == "[::1]"
    assert connect_authority("example.com") == "example.com"
    assert connect_authority("bücher.example") == "xn--bcher-kva.example"


# ------------------------------------------------------------------------------ prefixed stream


async def test_prefixed_stream_conforms_to_the_stream_contract() -> None:
    async def fresh() -> tuple[PrefixedStream, PrefixedStream]:
        a, b = trio.testing.memory_stream_pair()
        return PrefixedStream(a, b""), PrefixedStream(b, b"")

    async def clogged() -> tuple[PrefixedStream, PrefixedStream]:
        a, b = trio.testing.lockstep_stream_pair()
        return PrefixedStream(a, b""), PrefixedStream(b, b"")

    await trio.testing.check_half_closeable_stream(fresh, clogged)


async def test_prefixed_stream_gives_the_prefix_first_in_pieces() -> None:
    a, b = trio.testing.memory_stream_pair()
    stream = PrefixedStream(a, b"abcdef")
    await b.send_all(b"ghi")
    assert await stream.receive_some(4) == b"abcd"
    assert stream.pending == b"ef"
    assert await stream.receive_some() == b"ef"
    assert await stream.receive_some(10) == b"ghi"
    await stream.send_all(b"out")
    assert await b.receive_some() == b"out"
    await stream.send_eof()
    assert await b.receive_some() == b""
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.receive_some()
    with pytest.raises(ValueError, match="max_bytes"):
        await stream.receive_some(0)
    await b.aclose()


async def test_prefixed_stream_refuses_concurrent_receives() -> None:
    a, b = trio.testing.memory_stream_pair()
    stream = PrefixedStream(a, b"")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.receive_some)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await stream.receive_some()
        nursery.cancel_scope.cancel()
    await stream.aclose()
    await b.aclose()
