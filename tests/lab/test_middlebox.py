"""The TCP middlebox on real loopback sockets: real TLS (lab CA) to a lab origin through the
censor, one test per action, split ClientHellos against the reassembly modes, and no leaked fds.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from proxy.lab.ca import LabCA
from proxy.lab.clock import SystemClock
from proxy.lab.middlebox import FlowStats, Middlebox
from proxy.lab.origin import OriginServer, pattern_bytes
from proxy.lab.rules import (
    Action,
    ActionKind,
    CensorEngine,
    Destination,
    HttpHost,
    Penalty,
    ProtocolAllowList,
    Reassembly,
    Rule,
    Sni,
)
from proxy.protocols.tls_hello import parse_client_hello

NAMES = ("blocked.test", "fine.test", "hole.test", "cut.test")
ORIGIN_IP, PUBLIC_IP = "127.0.31.1", "127.0.31.2"


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


class Lab:
    def __init__(self, middlebox: Middlebox, origin: OriginServer, ca: LabCA) -> None:
        self.middlebox = middlebox
        self.engine = middlebox.engine
        self.origin = origin
        self.ca = ca

    @property
    def address(self) -> tuple[str, int]:
        assert self.middlebox.address is not None
        return self.middlebox.address


@asynccontextmanager
async def open_lab(
    ca: LabCA, *rules: Rule, tls: bool = True, real_refusal: bool = True
) -> AsyncIterator[Lab]:
    """An origin on ORIGIN_IP and a censoring middlebox in front of it on PUBLIC_IP."""
    origin = OriginServer("origin", tls=ca.issue(*NAMES).server_context() if tls else None)
    engine = CensorEngine(list(rules), clock=SystemClock())
    async with trio.open_nursery() as nursery:
        upstream = await nursery.start(origin.serve, ORIGIN_IP, 0)
        box = Middlebox(engine, listen=(PUBLIC_IP, 0), upstream=upstream, real_refusal=real_refusal)
        await nursery.start(box.serve)
        yield Lab(box, origin, ca)
        nursery.cancel_scope.cancel()


class Tap(trio.abc.Stream):
    """A client-side TCP stream that counts raw bytes received and can split its first send."""

    def __init__(
        self,
        inner: trio.SocketStream,
        cut: Callable[[bytes], int] | None = None,
        between: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.inner = inner
        self.received = 0
        self.cut = cut
        self.between = between

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.cut is None:
            await self.inner.send_all(data)
            return
        at, self.cut = self.cut(bytes(data)), None
        await self.inner.send_all(data[:at])
        if self.between is not None:
            await self.between()
        await self.inner.send_all(data[at:])

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.received += len(data)
        return bytes(data)

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def tls_client(
    lab: Lab, name: str, **tap: Callable[..., object]
) -> AsyncIterator[tuple[trio.SSLStream[Tap], Tap]]:
    raw = Tap(await trio.open_tcp_stream(*lab.address), **tap)  # type: ignore[arg-type]
    stream = trio.SSLStream(
        raw, lab.ca.client_context(), server_hostname=name, https_compatible=True
    )
    try:
        yield stream, raw
    finally:
        await trio.aclose_forcefully(stream)


def request(name: str, path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode()


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    out = bytearray()
    while data := await stream.receive_some(65536):
        out += data
    return bytes(out)


async def https_get(lab: Lab, name: str, path: str = "/", **tap: Callable[..., object]) -> bytes:
    async with tls_client(lab, name, **tap) as (stream, _):
        await stream.send_all(request(name, path))
        return await read_all(stream)


def body(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


# --- forwarding and the actions ----------------------------------------------------------------


async def test_middlebox_forwards_tls_without_rules(ca: LabCA) -> None:
    async with open_lab(ca) as lab:
        response = await https_get(lab, "fine.test")
        assert body(response) == b"hello from origin (host fine.test)\n"
        stats = lab.middlebox.flows[0]
        await stats.wait_closed()
        assert stats.c2s_forwarded > 0 and stats.s2c_forwarded > len(response)
        assert not stats.reset and lab.engine.hits() == []


async def test_middlebox_sni_reset(ca: LabCA) -> None:
    async with open_lab(ca, Rule("rst", Sni("blocked.test"), Action.reset())) as lab:
        with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
            await https_get(lab, "blocked.test")
        stats = await lab.middlebox.wait_flow(0)
        await stats.wait_closed()
        assert stats.reset and stats.c2s_forwarded == 0
        assert [h.rule for h in lab.engine.hits(action=ActionKind.RESET)] == ["rst"]
        # the twin: another name through the same censor is untouched
        assert body(await https_get(lab, "fine.test")).startswith(b"hello from origin")
        assert [r[1] for r in lab.origin.requests] == ["fine.test"]


async def test_middlebox_sni_blackhole_times_out_the_handshake(
    ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_lab(ca, Rule("bh", Sni("blocked.test"), Action.blackhole())) as lab:
        async with tls_client(lab, "blocked.test") as (stream, raw):
            with trio.move_on_after(30) as scope:
                await stream.do_handshake()
            assert scope.cancelled_caught and raw.received == 0
            stats = lab.middlebox.flows[0]
            assert not stats.closed and stats.action is ActionKind.BLACKHOLE
        await stats.wait_closed()  # the client gave up: the middlebox lets go too
        assert stats.c2s_forwarded == 0 and lab.origin.requests == []


async def timed_download(lab: Lab, name: str, size: int) -> float:
    start = trio.current_time()
    response = await https_get(lab, name, f"/bytes/{size}")
    assert body(response) == pattern_bytes(size)
    return trio.current_time() - start


async def test_middlebox_throttle_is_much_slower_than_control(ca: LabCA) -> None:
    rate = 256 * 1024
    rule = Rule("slow", Sni("blocked.test"), Action.throttle(rate, burst=16384))
    async with open_lab(ca, rule) as lab:
        size = 256 * 1024
        control = await timed_download(lab, "fine.test", size)
        throttled = await timed_download(lab, "blocked.test", size)
    # the bucket alone holds the bytes beyond the burst for (size - burst) / rate seconds
    assert throttled >= (size - 16384) / rate
    assert throttled >= 5 * control, (control, throttled)


async def test_middlebox_freeze_after_16k(
    ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    rule = Rule("cut", Sni("blocked.test"), Action.freeze_after(16384))
    async with open_lab(ca, rule) as lab, tls_client(lab, "blocked.test") as (stream, raw):
        if True:
            await stream.send_all(request("blocked.test", "/bytes/200000"))
            got = bytearray()
            with trio.move_on_after(60) as scope:
                while data := await stream.receive_some(65536):
                    got += data
            assert scope.cancelled_caught  # no EOF: the connection stays open
            assert raw.received == 16384
            stats = lab.middlebox.flows[0]
            assert stats.s2c_stopped and stats.s2c_forwarded == 16384 and not stats.closed
            assert 0 < len(got) < 16384


async def test_middlebox_static_refusal_is_a_real_connection_refused(ca: LabCA) -> None:
    rule = Rule("ip", Destination((PUBLIC_IP + "/32",)), Action.refuse())
    async with open_lab(ca, rule) as lab:
        with trio.socket.socket() as sock, pytest.raises(ConnectionRefusedError):
            await sock.connect(lab.address)
        [hit] = lab.engine.hits(action=ActionKind.REFUSE)
        assert hit.flow is None


async def test_middlebox_static_syn_drop_is_a_connect_timeout(
    ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    rule = Rule("ip", Destination((PUBLIC_IP + "/32",)), Action.drop_syn())
    async with open_lab(ca, rule) as lab:
        with trio.socket.socket() as sock:
            with trio.move_on_after(20) as scope:
                await sock.connect(lab.address)
            assert scope.cancelled_caught


async def test_middlebox_per_flow_refusal_resets_at_once(ca: LabCA) -> None:
    rule = Rule("ip", Destination((PUBLIC_IP + "/32",)), Action.refuse())
    async with open_lab(ca, rule, real_refusal=False) as lab:
        with trio.fail_after(2), pytest.raises(trio.BrokenResourceError):
            await https_get(lab, "fine.test")
        assert (await lab.middlebox.wait_flow(0)).reset
        assert len(lab.engine.hits(name="ip")) == 1


async def test_middlebox_http_host_blockpage(ca: LabCA) -> None:
    async with open_lab(
        ca, Rule("page", HttpHost("blocked.test"), Action.blockpage()), tls=False
    ) as lab:
        with trio.fail_after(2):
            stream = await trio.open_tcp_stream(*lab.address)
            async with stream:
                await stream.send_all(request("blocked.test"))
                response = await read_all(stream)
        assert response.startswith(b"HTTP/1.1 451 Unavailable For Legal Reasons\r\n")
        assert b"<iframe" in response and lab.origin.requests == []
        stream = await trio.open_tcp_stream(*lab.address)
        async with stream:
            await stream.send_all(request("fine.test"))
            assert body(await read_all(stream)) == b"hello from origin (host fine.test)\n"


async def test_middlebox_allow_list_drops_non_tls_first_bytes(
    ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    async with open_lab(ca, Rule("iran", ProtocolAllowList(), Action.drop_client())) as lab:
        stream = await trio.open_tcp_stream(*lab.address)
        async with stream:
            await stream.send_all(b"\x8a\x13random-looking first bytes")
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: fine.test\r\n\r\n")
            # nothing comes back (the origin, a TLS server, would give up after 10 s and close:
            # the censor only drops client -> server, so that FIN would pass)
            with trio.move_on_after(5) as scope:
                await stream.receive_some(100)
            assert scope.cancelled_caught
            stats = lab.middlebox.flows[0]
            assert stats.c2s_forwarded == 0 and stats.action is ActionKind.DROP_CLIENT
        # TLS passes the same filter
        assert body(await https_get(lab, "fine.test")).startswith(b"hello from origin")


async def test_middlebox_penalty_box_blocks_innocent_flows_until_it_expires(
    ca: LabCA, autojump_clock: trio.testing.MockClock
) -> None:
    rule = Rule("gfw", Sni("blocked.test"), Action.reset(), penalty=Penalty(90))
    async with open_lab(ca, rule) as lab:
        with pytest.raises(trio.BrokenResourceError):
            await https_get(lab, "blocked.test")
        [first] = lab.engine.hits()
        await trio.sleep_until(first.time + 89)
        async with tls_client(lab, "fine.test") as (stream, _):
            with trio.move_on_after(0.5) as scope:
                await stream.do_handshake()
            assert scope.cancelled_caught  # boxed: blackholed although the name is innocent
        await trio.sleep_until(first.time + 90)
        assert body(await https_get(lab, "fine.test")).startswith(b"hello from origin")
        assert [(h.rule, h.residual) for h in lab.engine.hits()] == [
            ("gfw", False),
            ("gfw", True),
        ]


# --- split ClientHellos ------------------------------------------------------------------------


def inside_sni(hello: bytes) -> int:
    parsed = parse_client_hello(hello)
    assert parsed is not None and parsed.sni_offset is not None
    return parsed.sni_offset + 3


@pytest.mark.parametrize(
    ("mode", "where", "blocked"),
    [
        (Reassembly.NONE, "sni", False),
        (Reassembly.FULL, "sni", True),
        (Reassembly.FIRST_RECORD, "sni", True),
        (Reassembly.FIRST_RECORD, "byte2", False),
    ],
)
async def test_middlebox_split_client_hello(
    ca: LabCA, mode: Reassembly, where: str, blocked: bool
) -> None:
    rule = Rule("sni", Sni("blocked.test"), Action.reset(), reassembly=mode)
    async with open_lab(ca, rule) as lab:
        flow: list[FlowStats] = []

        async def between() -> None:
            flow.append(await lab.middlebox.wait_flow(0))
            await flow[0].wait_segments(1)  # the first part was read on its own

        cut = inside_sni if where == "sni" else (lambda _: 2)
        with trio.fail_after(5):
            if blocked:
                with pytest.raises(trio.BrokenResourceError):
                    await https_get(lab, "blocked.test", cut=cut, between=between)
            else:
                response = await https_get(lab, "blocked.test", cut=cut, between=between)
                assert body(response) == b"hello from origin (host blocked.test)\n"
        assert flow[0].segments >= 2 or blocked
        assert len(lab.engine.hits()) == int(blocked)


# --- hygiene -----------------------------------------------------------------------------------


def test_middlebox_refuses_non_loopback_addresses() -> None:
    engine = CensorEngine([], clock=SystemClock())
    with pytest.raises(ValueError, match="loopback"):
        Middlebox(engine, listen=("0.0.0.0", 0), upstream=("127.0.0.1", 1))
    with pytest.raises(ValueError, match="loopback"):
        Middlebox(engine, listen=("127.0.0.1", 0), upstream=("192.0.2.1", 443))
    with pytest.raises(ValueError, match="IP literal"):
        Middlebox(engine, listen=("localhost", 0), upstream=("127.0.0.1", 1))
    Middlebox(engine, listen=("::1", 0), upstream=("127.0.0.1", 1))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
async def test_middlebox_leaks_no_fds(ca: LabCA) -> None:
    ssl.create_default_context()  # warm up anything ssl opens lazily
    before = open_fds()
    rules = [
        Rule("rst", Sni("blocked.test"), Action.reset()),
        Rule("bh", Sni("hole.test"), Action.blackhole()),
        Rule("cut", Sni("cut.test"), Action.freeze_after(4096)),
    ]
    async with open_lab(ca, *rules) as lab:
        assert body(await https_get(lab, "fine.test"))
        with pytest.raises(trio.BrokenResourceError):
            await https_get(lab, "blocked.test")
        async with trio.open_nursery() as nursery:
            # left hanging when the lab stops: a blackholed flow and a frozen one
            for name in ("hole.test", "cut.test"):
                nursery.start_soon(https_get, lab, name, "/bytes/100000")
            await lab.middlebox.wait_flow(3)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert open_fds() == before
