from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import ConnectRefused, ConnectTimeout, Unreachable, UpstreamError
from proxy.inbound.base import IPAddress
from proxy.net.dial import interleave_families, map_connect_error, open_tcp


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port where nothing listens (kept bound so nobody else takes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


class FakeStream:
    def __init__(self, address: IPAddress) -> None:
        self.address = address
        self.closed = False

    async def aclose(self) -> None:
        self.closed = True


class FakeNet:
    """A scripted connect function: per address, a delay then success or an errno."""

    def __init__(self, script: dict[str, tuple[float | None, int | None]]) -> None:
        self.script = script
        self.gate = trio.Event()  # a delay of None waits for the gate instead
        self.started: list[tuple[str, float]] = []
        self.cancelled: list[str] = []
        self.made: list[FakeStream] = []

    async def connect(self, address: IPAddress, port: int) -> FakeStream:
        self.started.append((str(address), trio.current_time()))
        delay, err = self.script[str(address)]
        try:
            if delay is None:
                await self.gate.wait()
            else:
                await trio.sleep(delay)
        except trio.Cancelled:
            self.cancelled.append(str(address))
            raise
        if err is not None:
            raise OSError(err, "scripted")
        stream = FakeStream(address)
        self.made.append(stream)
        return stream


FOREVER = 1e9


# -- real loopback ---------------------------------------------------------------------------


async def test_dial_connects_single_address() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stream = await open_tcp([ip("127.0.0.1")], port)
    server = await listeners[0].accept()
    assert stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await stream.send_all(b"ping")
    assert await server.receive_some(10) == b"ping"
    for item in (stream, server, *listeners):
        await item.aclose()


async def test_dial_nodelay_false_leaves_nagle_on() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    stream = await open_tcp([ip("127.0.0.1")], port, nodelay=False)
    assert not stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await stream.aclose()
    await listeners[0].aclose()


async def test_dial_refused_port_raises_connect_refused(closed_port: int) -> None:
    with pytest.raises(ConnectRefused, match=re.escape(f"127.0.0.1:{closed_port}")):
        await open_tcp([ip("127.0.0.1")], closed_port)


async def test_dial_all_refused_lists_every_address(closed_port: int) -> None:
    with pytest.raises(ConnectRefused) as info:
        await open_tcp([ip("127.0.0.2"), ip("127.0.0.3")], closed_port)
    assert "127.0.0.2" in str(info.value) and "127.0.0.3" in str(info.value)


async def test_dial_falls_through_refusal_without_waiting() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    # ::1 and 127.0.0.2 refuse (the listener is bound to 127.0.0.1 only); a long attempt delay
    # proves the next attempt starts as soon as the previous one fails
    with trio.fail_after(5):
        stream = await open_tcp(
            [ip("::1"), ip("127.0.0.2"), ip("127.0.0.1")], port, attempt_delay=30
        )
    assert stream.socket.getpeername()[0] == "127.0.0.1"
    await stream.aclose()
    await listeners[0].aclose()


async def test_dial_no_addresses_is_unreachable() -> None:
    with pytest.raises(Unreachable):
        await open_tcp([], 80)


# -- racing with a scripted network and a mock clock -----------------------------------------


async def test_dial_staggers_attempts_and_first_success_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet(
        {"192.0.2.1": (FOREVER, None), "2001:db8::1": (1.0, None), "192.0.2.2": (0.1, None)}
    )
    start = trio.current_time()
    stream = await open_tcp(
        [ip("192.0.2.1"), ip("192.0.2.2"), ip("2001:db8::1")],
        443,
        _connect=net.connect,  # type: ignore[arg-type]
    )
    # families interleave: v4, v6, v4; each attempt 0.25 s after the previous one
    assert [(a, round(t - start, 6)) for a, t in net.started] == [
        ("192.0.2.1", 0.0),
        ("2001:db8::1", 0.25),
        ("192.0.2.2", 0.5),
    ]
    assert str(stream.address) == "192.0.2.2"  # type: ignore[attr-defined]
    assert trio.current_time() - start == pytest.approx(0.6)
    assert sorted(net.cancelled) == ["192.0.2.1", "2001:db8::1"]


async def test_dial_failure_starts_next_attempt_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({"192.0.2.1": (0.05, errno.ECONNREFUSED), "192.0.2.2": (0.0, None)})
    start = trio.current_time()
    await open_tcp([ip("192.0.2.1"), ip("192.0.2.2")], 443, _connect=net.connect)  # type: ignore[arg-type]
    assert net.started[1][1] - start == pytest.approx(0.05)


async def test_dial_overall_timeout(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({"192.0.2.1": (FOREVER, None), "192.0.2.2": (FOREVER, None)})
    start = trio.current_time()
    with pytest.raises(ConnectTimeout) as info:
        await open_tcp([ip("192.0.2.1"), ip("192.0.2.2")], 443, timeout=3, _connect=net.connect)  # type: ignore[arg-type]
    assert trio.current_time() - start == pytest.approx(3)
    assert "192.0.2.1" in str(info.value) and "192.0.2.2" in str(info.value)
    assert sorted(net.cancelled) == ["192.0.2.1", "192.0.2.2"]


async def test_dial_single_address_timeout(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({"192.0.2.1": (FOREVER, None)})
    with pytest.raises(ConnectTimeout, match=re.escape("192.0.2.1:443")):
        await open_tcp([ip("192.0.2.1")], 443, timeout=2, _connect=net.connect)  # type: ignore[arg-type]
    assert net.cancelled == ["192.0.2.1"]


async def test_dial_mixed_failures_prefer_refusal(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({"2001:db8::1": (0.0, errno.ENETUNREACH), "192.0.2.1": (0.1, errno.ECONNREFUSED)})
    with pytest.raises(ConnectRefused) as info:
        await open_tcp([ip("2001:db8::1"), ip("192.0.2.1")], 443, _connect=net.connect)  # type: ignore[arg-type]
    text = str(info.value)
    assert "2001:db8::1" in text and "unreachable" in text and "refused" in text


async def test_dial_silence_beats_unreachable(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({"2001:db8::1": (0.0, errno.EHOSTUNREACH), "192.0.2.1": (FOREVER, None)})
    with pytest.raises(ConnectTimeout, match="unreachable"):
        await open_tcp([ip("2001:db8::1"), ip("192.0.2.1")], 443, timeout=1, _connect=net.connect)  # type: ignore[arg-type]


async def test_dial_all_unreachable(autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet({"2001:db8::1": (0.0, errno.ENETUNREACH), "192.0.2.1": (0.0, errno.EHOSTUNREACH)})
    with pytest.raises(Unreachable):
        await open_tcp([ip("2001:db8::1"), ip("192.0.2.1")], 443, _connect=net.connect)  # type: ignore[arg-type]


async def test_dial_simultaneous_successes_close_the_loser(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({"192.0.2.1": (None, None), "192.0.2.2": (None, None)})

    async def open_gate() -> None:
        await trio.sleep(1)
        net.gate.set()  # both attempts complete in the same scheduler batch

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_gate)
        stream = await open_tcp([ip("192.0.2.1"), ip("192.0.2.2")], 443, _connect=net.connect)  # type: ignore[arg-type]
    assert len(net.made) == 2
    assert [s.closed for s in net.made if s is not stream] == [True]
    assert not stream.closed  # type: ignore[attr-defined]


async def test_dial_outer_cancel_leaves_nothing_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    net = FakeNet({"192.0.2.1": (5, None), "192.0.2.2": (5, None)})
    with trio.move_on_after(1):
        await open_tcp([ip("192.0.2.1"), ip("192.0.2.2")], 443, _connect=net.connect)  # type: ignore[arg-type]
    assert net.made == []
    assert sorted(net.cancelled) == ["192.0.2.1", "192.0.2.2"]


# -- pure parts ------------------------------------------------------------------------------


def test_interleave_starts_with_first_family_then_alternates() -> None:
    given_order = [ip(a) for a in ["2001:db8::1", "2001:db8::2", "2001:db8::3", "192.0.2.1"]]
    assert [str(a) for a in interleave_families(given_order)] == [
        "2001:db8::1",
        "192.0.2.1",
        "2001:db8::2",
        "2001:db8::3",
    ]


_addresses = st.lists(
    st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(
        lambda a: ipaddress.ip_address(str(a))
    ),
    max_size=12,
)


@given(_addresses)
def test_interleave_is_an_alternating_permutation(addresses: list[IPAddress]) -> None:
    ordered = interleave_families(addresses)
    unique = list(dict.fromkeys(addresses))
    assert sorted(ordered, key=str) == sorted(unique, key=str)
    if unique:
        assert ordered[0] == unique[0]
    for version in (4, 6):
        assert [a for a in ordered if a.version == version] == [
            a for a in unique if a.version == version
        ]
    # the families alternate until one of them runs out
    versions = [a.version for a in ordered]
    minority = min(versions.count(4), versions.count(6))
    head = versions[: 2 * minority]
    assert all(head[i] != head[i + 1] for i in range(len(head) - 1))


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (OSError(errno.ECONNREFUSED, "refused"), ConnectRefused),
        (OSError(errno.ENETUNREACH, "no route"), Unreachable),
        (OSError(errno.EHOSTUNREACH, "no route"), Unreachable),
        (OSError(errno.ETIMEDOUT, "timed out"), ConnectTimeout),
        (trio.TooSlowError(), ConnectTimeout),
        (OSError(errno.EIO, "io"), UpstreamError),
        (ValueError("odd"), UpstreamError),
    ],
)
def test_map_connect_error(exc: BaseException, kind: type[UpstreamError]) -> None:
    mapped = map_connect_error(exc, ip("2001:db8::1"), 443)
    assert type(mapped) is kind
    assert "[2001:db8::1]:443" in str(mapped)


def test_map_connect_error_unwraps_trio_broken_resource() -> None:
    broken = trio.BrokenResourceError("broken")
    broken.__cause__ = ConnectionRefusedError(errno.ECONNREFUSED, "refused")
    assert isinstance(map_connect_error(broken), ConnectRefused)
    already = Unreachable("x")
    assert map_connect_error(already) is already


async def test_dial_single_real_address_times_out_when_the_handshake_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A listener whose accept queue is full drops new SYNs: the connect has to wait, and the
    # deadline (armed only then) turns the silence into ConnectTimeout without a leaked socket.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    queued = []
    try:
        for _ in range(4):  # fill the queue (its length is the kernel's business)
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            queued.append(sock)
        with pytest.raises(ConnectTimeout, match=re.escape(f"127.0.0.1:{port}: no answer")):
            await open_tcp([ip("127.0.0.1")], port, timeout=2)
    finally:
        for sock in queued:
            sock.close()
        listener.close()
