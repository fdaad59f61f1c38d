"""FastStream (proxy/net/stream.py) beyond what the relay and dial tests already cover, and
its time limits (alarms, proxy/net/alarm.py)."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from proxy.net.alarm import COARSE, FINE, clocks
from proxy.net.stream import FastStream, limited


async def _pair() -> tuple[FastStream, FastStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await client.connect(("127.0.0.1", port))
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return FastStream(client), FastStream(server.socket)


async def test_fast_stream_send_nowait_sends_what_fits_and_never_waits() -> None:
    ours, peer = await _pair()
    async with peer:
        big = b"z" * (32 << 20)
        sent = ours.send_nowait(big)
        assert 0 < sent < len(big)  # the buffers filled up: a short count, no wait
        assert ours.send_nowait(big) == 0
        got = 0
        while got < sent:
            got += len(await peer.receive_some(1 << 20))
        assert got == sent
        await ours.aclose()


async def test_fast_stream_trusts_a_callers_word_that_the_socket_is_tcp() -> None:
    ours, peer = await _pair()
    async with peer:
        assert ours.tcp
        told = FastStream(ours.socket, tcp=True)
        assert told.tcp
        assert told.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await told.aclose()


async def test_fast_stream_send_all_waits_for_room_and_sends_every_byte_in_order() -> None:
    ours, peer = await _pair()
    big = bytes(range(256)) * (64 << 10)  # 16 MiB: far more than the socket buffers hold
    got = bytearray()

    async def read_slowly() -> None:
        while len(got) < len(big):
            got.extend(await peer.receive_some(1 << 16))
            await trio.lowlevel.checkpoint()

    async with peer:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            await ours.send_all(memoryview(big)[1:])  # a view, not starting at 0
            await ours.send_all(big[:1])
        assert bytes(got) == big[1:] + big[:1]
        await ours.aclose()


# -- time limits (alarms) ----------------------------------------------------------------------


@pytest.mark.parametrize(("seconds", "tick"), [(0.3, FINE), (3.0, FINE), (10.0, COARSE)])
async def test_a_limited_read_ends_no_earlier_than_its_limit_and_at_most_a_tick_later(
    autojump_clock: trio.testing.MockClock, seconds: float, tick: float
) -> None:
    ours, peer = await _pair()
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await limited(ours, seconds, ours.receive_some())
    took = trio.current_time() - start
    assert seconds <= took <= seconds + tick + 1e-6
    # nothing was closed: the stream still works, and without a limit nothing rings
    await trio.sleep(30)
    await peer.send_all(b"late but welcome")
    assert await ours.receive_some() == b"late but welcome"
    await ours.aclose()
    await peer.aclose()


async def test_a_read_answered_in_time_disarms_its_alarm(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, peer = await _pair()
    await peer.send_all(b"in time")
    assert await limited(ours, 1.0, ours.receive_some()) == b"in time"
    assert not clocks().fine.armed
    await trio.sleep(5)  # long past the limit: a later wait is not cut short

    async def answer_later() -> None:
        await trio.sleep(3)
        await peer.send_all(b"three seconds later")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_later)
        assert await ours.receive_some() == b"three seconds later"
    await ours.aclose()
    await peer.aclose()


async def test_a_limit_counts_from_the_first_wait_and_covers_the_later_ones(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, peer = await _pair()
    ours.time_limit(1.0)
    await trio.sleep(5)  # not waiting on the stream: the limit has not started
    await peer.send_all(b"a")
    assert await ours.receive_some() == b"a"  # no wait, still not started

    async def answer_later() -> None:
        await trio.sleep(0.6)
        await peer.send_all(b"b")

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_later)
        assert await ours.receive_some() == b"b"  # the first wait: the limit starts here
        await trio.sleep(1)  # the alarm rings while nobody waits on the socket
        with pytest.raises(trio.TooSlowError):  # ... and the next wait ends at once
            await ours.receive_some()
    assert trio.current_time() - start == pytest.approx(1.6)
    ours.no_time_limit()
    await peer.send_all(b"x")
    assert await ours.receive_some() == b"x"
    await ours.aclose()
    await peer.aclose()


async def test_an_alarm_wakes_waits_of_another_task_on_any_of_its_sockets(
    autojump_clock: trio.testing.MockClock,
) -> None:
    one, peer_one = await _pair()
    two, peer_two = await _pair()
    alarm = clocks().alarm(one.socket, two.socket)
    woken: list[str] = []

    async def wait_on(name: str, sock: trio.socket.SocketType) -> None:
        with pytest.raises(trio.ClosedResourceError):
            await trio.lowlevel.wait_readable(sock)
        woken.append(name)

    alarm.arm(0.5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_on, "one", one.socket)
        nursery.start_soon(wait_on, "two", two.socket)
    assert sorted(woken) == ["one", "two"] and alarm.rang
    for stream in (one, two, peer_one, peer_two):
        await stream.aclose()


async def test_an_idle_clock_parks_and_wakes_for_the_next_alarm(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, peer = await _pair()

    async def answer_soon() -> None:
        await trio.sleep(0.1)
        await peer.send_all(b"quick")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_soon)
        assert await limited(ours, 0.5, ours.receive_some()) == b"quick"
    await trio.sleep(10)  # 200 ticks with nothing armed
    fine = clocks().fine
    assert fine.parked is not None  # asleep until the next arm, not ticking
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await limited(ours, 0.5, ours.receive_some())
    assert 0.5 <= trio.current_time() - start <= 0.5 + 2 * FINE
    await ours.aclose()
    await peer.aclose()


async def test_limited_gives_other_streams_a_cancel_scope(
    autojump_clock: trio.testing.MockClock,
) -> None:
    left, right = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await limited(left, 2.0, left.receive_some())
    assert trio.current_time() - start == pytest.approx(2.0)
    await right.send_all(b"still open")
    assert await left.receive_some() == b"still open"


async def test_close_now_closes_the_socket_and_a_new_one_on_its_number_works() -> None:
    ours, peer = await _pair()
    fd = ours.socket.fileno()
    ours.close_now()
    assert ours.socket.fileno() == -1
    assert await peer.receive_some() == b""  # the peer saw the FIN
    ours.close_now()  # twice is harmless
    # the descriptor number comes back for the next socket; trio waits on it as on any
    again, peer_again = await _pair()
    assert fd in (again.socket.fileno(), peer_again.socket.fileno())

    async def answer_later() -> None:
        await trio.sleep(0.05)
        await peer_again.send_all(b"ok")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer_later)
        assert await again.receive_some() == b"ok"  # a wait that had to park in epoll
    for stream in (peer, again, peer_again):
        await stream.aclose()
