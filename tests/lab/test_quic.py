"""QUIC in the censor lab: the :class:`QuicInitial` trigger on the engine alone, the UDP
middlebox and echo service (:mod:`proxy.lab.udpbox`) on real loopback sockets, and "QUIC off"
under ``ru-tspu`` seen by a plain UDP client and through sidestep's SOCKS5 UDP ASSOCIATE, each
against its no-censorship twin (profile ``none``, and non-QUIC datagrams under ``ru-tspu``).

Seeing that a datagram got *no* answer takes a real wait (``NO_ANSWER``); every such wait is
paired with the lab's own log saying the censor dropped it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial

import dns.message
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from proxy.app import App
from proxy.config import default_config
from proxy.lab import world
from proxy.lab.clock import ManualClock
from proxy.lab.profiles import FREEZE_LIMIT, get_profile, predict_udp
from proxy.lab.rules import Action, ActionKind, CensorEngine, Flow, Rule
from proxy.lab.scenarios import LabOnlyResolver, lab_config
from proxy.lab.triggers import QuicInitial, build_quic_initial
from proxy.lab.udpbox import ECHO_PREFIX, UdpEchoServer, UdpMiddlebox
from proxy.lab.world import Lab
from proxy.protocols import socks5

profile = partial(pytest.mark.parametrize, "lab_profile")

Address = tuple[str, int]

#: how long a test waits to conclude that a datagram will not be answered (wall clock)
NO_ANSWER = 0.5
#: how long a test waits for an answer that must come
ANSWER = 5.0


def varint(value: int) -> bytes:
    """A QUIC variable-length integer (RFC 9000 16), in the shortest form."""
    for size, prefix in ((1, 0x00), (2, 0x40), (4, 0x80), (8, 0xC0)):
        if value < 1 << (8 * size - 2):
            return (value | prefix << (8 * size - 8)).to_bytes(size, "big")
    raise ValueError(value)


def initial(
    size: int = 1200, version: int = 1, first: int = 0xC0 | 0x03, token: bytes = b""
) -> bytes:
    """A client Initial as RFC 9000 17.2.2 lays it out, padded to ``size`` bytes: header byte
    (long form, fixed bit, type Initial, packet number length 4), version, an 8-byte DCID and
    SCID, the token, then Length covering a 4-byte packet number and the (zero) payload."""
    head = bytes([first]) + version.to_bytes(4, "big")
    head += bytes([8]) + b"\x83" * 8 + bytes([8]) + b"\x5c" * 8
    head += varint(len(token)) + token
    rest = size - len(head) - 2
    return head + varint(rest).rjust(2, b"\x40") + bytes(4) + bytes(rest - 4)


def short_header(size: int = 1200) -> bytes:
    """A 1-RTT packet: short header (form bit clear, fixed bit set), then ciphertext."""
    return bytes([0x40 | 0x03]) + b"\x83" * 8 + bytes(size - 9)


def dns_query() -> bytes:
    return dns.message.make_query(world.OPEN, "A").to_wire()


def udp_flow(port: int = 443, proto: str = "udp", client_port: int = 40000) -> Flow:
    return Flow("127.0.0.1", client_port, "127.60.0.1", port, proto)


def verdict(trigger: QuicInitial, data: bytes, flow: Flow | None = None) -> ActionKind:
    engine = CensorEngine([Rule("quic", trigger, Action.blackhole())], clock=ManualClock())
    return engine.on_datagram(flow or udp_flow(), data).kind


DROP, PASS = ActionKind.BLACKHOLE, ActionKind.FORWARD


# --- the trigger, on the engine alone ----------------------------------------------------------


def test_quic_initial_matches_a_padded_client_initial() -> None:
    datagram = initial()
    assert len(datagram) == 1200
    engine = CensorEngine([Rule("quic", QuicInitial(), Action.blackhole())], clock=ManualClock())
    assert not engine.on_datagram(udp_flow(), datagram).forward
    assert engine.log[0].trigger == "quic initial version 0x1, 1200 bytes"
    assert verdict(QuicInitial(), initial(token=b"t" * 40)) is DROP  # after a Retry
    assert verdict(QuicInitial(), initial(first=0xC0)) is DROP  # packet number length 1
    assert verdict(QuicInitial(), initial(1350)) is DROP


@pytest.mark.parametrize(
    "datagram",
    [
        pytest.param(short_header(), id="short-header"),
        pytest.param(initial(1199), id="under-1200"),
        pytest.param(initial()[:200], id="small"),
        pytest.param(dns_query(), id="dns"),
        pytest.param(dns_query().ljust(1200, b"\0"), id="dns-padded"),
        pytest.param(initial(first=0xE3), id="handshake-packet"),
        pytest.param(initial(first=0xF3), id="retry-packet"),
        pytest.param(initial(version=0), id="version-negotiation"),
        pytest.param(initial(first=0x83), id="fixed-bit-clear"),
        pytest.param(b"h3:" + initial(), id="not-at-the-start"),
        pytest.param(initial()[:7], id="header-cut"),
        pytest.param(b"", id="empty"),
    ],
)
def test_quic_initial_ignores_other_datagrams(datagram: bytes) -> None:
    assert verdict(QuicInitial(), datagram) is PASS


def test_quic_initial_reads_udp_flows_only() -> None:
    assert verdict(QuicInitial(), initial(), udp_flow(proto="tcp")) is PASS


def test_quic_initial_parameters() -> None:
    assert verdict(QuicInitial(min_size=1001), initial(1001)) is DROP
    assert verdict(QuicInitial(min_size=1001), initial(1000)) is PASS
    draft29 = initial(version=0xFF00001D)
    assert verdict(QuicInitial(), draft29) is DROP  # any version by default
    assert verdict(QuicInitial(versions=(1,)), draft29) is PASS
    assert verdict(QuicInitial(versions=(1,)), initial()) is DROP
    v2 = initial(version=0x6B3343CF, first=0xD3)  # QUIC v2 numbers Initial as type 1
    assert verdict(QuicInitial(), v2) is DROP
    assert verdict(QuicInitial(), initial(version=0x6B3343CF)) is PASS  # type 0 is 0-RTT in v2
    assert verdict(QuicInitial(ports=(443,)), initial()) is DROP
    assert verdict(QuicInitial(ports=(443,)), initial(), udp_flow(8443)) is PASS


def test_build_quic_initial_is_what_the_trigger_matches() -> None:
    assert verdict(QuicInitial(), build_quic_initial()) is DROP
    assert len(build_quic_initial(1350)) == 1350
    assert verdict(QuicInitial(versions=(1,)), build_quic_initial(version=2)) is PASS


@given(st.binary(max_size=1400))
def test_quic_initial_never_raises_on_garbage(data: bytes) -> None:
    assert verdict(QuicInitial(min_size=0), data) in (DROP, PASS)


@given(st.integers(min_value=0, max_value=1200))
def test_quic_initial_cut_anywhere_in_its_header_does_not_match(cut: int) -> None:
    datagram = initial()
    header = 1 + 4 + 1 + 8 + 1 + 8 + 1 + 2
    expected = DROP if cut >= header else PASS
    assert verdict(QuicInitial(min_size=0), datagram[:cut]) is expected


# --- the profiles ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("none", "pass"),
        ("ru-2021", "pass"),
        ("ru-tspu", "drop [tspu-quic]"),
        ("ru-2025", "drop [tspu-quic]"),
        ("cn", "pass"),  # the GFW reads the SNI of QUIC (CN-5); the lab does not decrypt
        ("ir", "drop [ir-protocols, then 60 s residual]"),
        ("allowlist", "drop [deny]"),
    ],
)
def test_predict_udp_per_profile(name: str, expected: str) -> None:
    assert predict_udp(get_profile(name), ("127.60.0.1", 443)) == expected


def test_ru_2025_drops_quic_to_foreign_hosting_and_freezes_its_tcp() -> None:
    engine = get_profile("ru-2025").engine(ManualClock())
    udp = Flow("127.0.0.1", 40000, "127.62.0.1", 443, "udp")
    assert engine.on_datagram(udp, initial()).rule == "tspu-quic"
    tcp = Flow("127.0.0.1", 40001, "127.62.0.1", 443)
    assert engine.on_connect(tcp).kind is ActionKind.FREEZE_AFTER
    assert engine.on_server_bytes(tcp, FREEZE_LIMIT + 1).stop


def test_ru_tspu_lets_other_udp_through() -> None:
    engine = get_profile("ru-tspu").engine(ManualClock())
    assert engine.on_datagram(udp_flow(), dns_query()).forward
    assert engine.on_datagram(udp_flow(client_port=40001), short_header()).forward
    assert engine.log == []


# --- the UDP middlebox on its own --------------------------------------------------------------


def test_udpbox_binds_loopback_only() -> None:
    engine = CensorEngine([], clock=ManualClock())
    with pytest.raises(ValueError, match="loopback"):
        UdpMiddlebox(engine, listen=("0.0.0.0", 0), upstream=("127.0.0.1", 1))
    with pytest.raises(ValueError, match="loopback"):
        UdpMiddlebox(engine, listen=("127.0.0.1", 0), upstream=("192.0.2.1", 443))
    with pytest.raises(ValueError, match="IP literal"):
        UdpMiddlebox(engine, listen=("localhost", 0), upstream=("127.0.0.1", 1))


async def test_udp_echo_binds_loopback_only() -> None:
    with pytest.raises(ValueError, match="loopback"):
        await UdpEchoServer("x").serve("0.0.0.0", 0)


@asynccontextmanager
async def udp_client(ip: str = "127.0.0.1") -> AsyncIterator[trio.socket.SocketType]:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind((ip, 0))
        yield sock


async def exchange(sock: trio.socket.SocketType, to: Address, data: bytes) -> bytes | None:
    """Send ``data``; the answer, or None when none came within :data:`NO_ANSWER` seconds."""
    await sock.sendto(data, to)
    with trio.move_on_after(NO_ANSWER):
        return await sock.recv(65535)
    return None


async def test_udpbox_relays_per_client_and_forgets_idle_flows(
    mock_clock: trio.testing.MockClock,
) -> None:
    # the mock clock never moves by itself: only the jump below ends the idle flows
    engine = CensorEngine([Rule("quic", QuicInitial(), Action.blackhole())], clock=ManualClock())
    echo = UdpEchoServer("echo")
    async with trio.open_nursery() as nursery:
        upstream = await nursery.start(echo.serve, "127.0.0.1", 0)
        box = UdpMiddlebox(engine, listen=("127.0.0.2", 0), upstream=upstream, idle_timeout=30)
        public = await nursery.start(box.serve)
        async with udp_client() as first, udp_client() as second:
            with trio.fail_after(ANSWER):  # a mock clock: this deadline is never reached
                await first.sendto(b"one", public)
                assert await first.recv(100) == ECHO_PREFIX + b"one"
                await second.sendto(b"two", public)
                assert await second.recv(100) == ECHO_PREFIX + b"two"
                await first.sendto(b"three", public)
                assert await first.recv(100) == ECHO_PREFIX + b"three"
            await trio.testing.wait_all_tasks_blocked()  # the box counts after it sent
            flows = [s.flow.client_port for s in box.flows]
            assert flows == [first.getsockname()[1], second.getsockname()[1]]
            stats = box.flows[0]
            assert (stats.datagrams, stats.c2s_forwarded, stats.s2c_forwarded) == (2, 8, 14)
            assert all(s.flow.proto == "udp" and not s.closed for s in box.flows)
            mock_clock.jump(31)
            await trio.testing.wait_all_tasks_blocked()
            assert all(s.closed for s in box.flows)
            await first.sendto(b"four", public)  # the same address again: a new flow
            with trio.fail_after(ANSWER):
                assert await first.recv(100) == ECHO_PREFIX + b"four"
            assert len(box.flows) == 3
        nursery.cancel_scope.cancel()


# --- the lab, on real sockets ------------------------------------------------------------------


async def test_lab_quic_reaches_open_lab_uncensored(lab: Lab) -> None:
    address = lab.udp_address(world.OPEN)
    assert address == lab.address(world.OPEN)  # the HTTPS port number, on UDP
    assert "quic: pass" in lab.describe(world.OPEN)
    async with udp_client() as sock:
        datagram = initial()
        with trio.fail_after(ANSWER):
            await sock.sendto(datagram, address)
            assert await sock.recv(65535) == ECHO_PREFIX + datagram
    assert lab.udp_servers[world.OPEN].answered == 1
    assert lab.events() == []
    with pytest.raises(KeyError):
        lab.udp_address(world.HTTP_BLOCKED)  # plain HTTP only: no HTTP/3 either


@profile(["ru-tspu"])
async def test_lab_ru_tspu_drops_quic_but_not_other_udp(lab: Lab) -> None:
    address = lab.udp_address(world.OPEN)
    assert "quic: drop [tspu-quic]" in lab.describe(world.OPEN)
    box = lab.udp_boxes[address]
    async with udp_client() as quic:
        assert await exchange(quic, address, initial()) is None
        hits = lab.engine.hits("tspu-quic", ActionKind.BLACKHOLE)
        assert len(hits) == 1 and hits[0].flow == box.flows[0].flow
        assert box.flows[0].c2s_dropped == 1200 and box.flows[0].c2s_forwarded == 0
        (event,) = lab.events(world.OPEN)
        assert (event.layer, event.action) == ("udp", "blackhole")
        # the flow stays dropped, like a TCP flow after an SNI match
        assert await exchange(quic, address, b"ping") is None
    async with udp_client() as other:  # a fresh flow that is not QUIC: the twin
        with trio.fail_after(ANSWER):
            await other.sendto(short_header(), address)
            assert await other.recv(65535) == ECHO_PREFIX + short_header()
    assert len(lab.engine.log) == len(lab.engine.hits()) == 3  # 2 static tspu-ip + the drop


# --- through sidestep's SOCKS5 UDP ASSOCIATE ---------------------------------------------------


@asynccontextmanager
async def open_udp_sidestep(lab: Lab) -> AsyncIterator[Address]:
    """Sidestep in the lab, as :func:`~proxy.lab.scenarios.open_sidestep` starts it, but with
    UDP ASSOCIATE allowed (``lab_config`` turns it off for the scenario table)."""
    config = lab_config(default_config(), lab)
    inbound = replace(config.inbound[0], udp=True)
    app = App(replace(config, inbound=(inbound,)))
    app.dispatcher.resolver = LabOnlyResolver(app.dispatcher.resolver)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.run)
        await app.ready.wait()
        try:
            yield app.addresses()[inbound.name]
        finally:
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def udp_associate(proxy: Address) -> AsyncIterator[tuple[trio.socket.SocketType, Address]]:
    """A SOCKS5 UDP association: the client's UDP socket and the relay address to send to."""
    async with udp_client() as sock, await trio.open_tcp_stream(*proxy) as control:
        conn = socks5.Socks5ClientConnection()
        with trio.fail_after(ANSWER):
            await control.send_all(conn.data_to_send())
            reply: socks5.Reply | None = None
            while reply is None:
                for event in conn.receive_data(await control.receive_some(1024)):
                    if isinstance(event, socks5.MethodSelected):
                        port = sock.getsockname()[1]
                        conn.send(
                            socks5.CommandRequested(
                                socks5.Command.UDP_ASSOCIATE,
                                "127.0.0.1",
                                port,
                                socks5.AddressType.IPV4,
                            )
                        )
                        await control.send_all(conn.data_to_send())
                    elif isinstance(event, socks5.Reply):
                        reply = event
        assert reply.code is socks5.ReplyCode.SUCCEEDED, reply
        yield sock, (reply.bind_host, reply.bind_port)


async def through_socks(lab: Lab, payload: bytes) -> bytes | None:
    """Send ``payload`` to open.lab's UDP service through sidestep; the echoed payload, if any."""
    target = lab.udp_address(world.OPEN)
    async with open_udp_sidestep(lab) as proxy, udp_associate(proxy) as (sock, relay):
        answer = await exchange(sock, relay, socks5.build_udp_datagram(*target, payload))
    if answer is None:
        return None
    datagram = socks5.parse_udp_datagram(answer)
    assert (datagram.host, datagram.port) == target
    return datagram.payload


@pytest.mark.parametrize("lab_profile", ["none", "ru-tspu"])
async def test_socks5_udp_associate_carries_quic_unless_censored(lab: Lab) -> None:
    datagram = initial(1250)
    got = await through_socks(lab, datagram)
    drops = lab.engine.hits("tspu-quic")
    if lab.profile.name == "none":
        assert got == ECHO_PREFIX + datagram
        assert lab.events() == []
    else:
        assert got is None
        assert len(drops) == 1 and drops[0].flow is not None and drops[0].flow.proto == "udp"
        assert [e.layer for e in lab.events(world.OPEN)] == ["udp"]
        # the twin: the same path carries UDP that is not QUIC
        assert await through_socks(lab, b"not quic") == ECHO_PREFIX + b"not quic"
