"""Alarms (proxy/net/alarm.py): time limits on socket waits without a cancel scope each."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from proxy.net.alarm import COARSE, FINE, clocks
from proxy.net.relay import relay
from proxy.net.stream import FastStream, limited


async def _pair() -> tuple[FastStream, FastStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await client.connect(("127.0.0.1", port))
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return FastStream(client), FastStream(server.socket)


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


class _Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


async def test_a_relay_whose_server_already_closed_runs_in_the_callers_task_alone() -> None:
    x, a = await _pair()  # x: the client, a: its accepted end
    b, y = await _pair()  # b: our upstream, y: the server
    await y.send_all(b"answer")
    await y.send_eof()
    assert await b.receive_some() == b"answer"  # the first answer, read by an attempt
    with trio.move_on_after(5):  # let the FIN arrive
        while b.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) != bytes([8]):
            await trio.sleep(0.005)
    clocks().coarse.start()  # the clock's own task starts once per run, on first use
    spawns = _Spawns()
    trio.lowlevel.add_instrument(spawns)
    try:
        async with trio.open_nursery() as nursery:

            async def client() -> None:
                assert await x.receive_some() == b""  # the server's FIN, passed on
                await x.send_all(b"one more thing")
                await x.send_eof()

            nursery.start_soon(client)
            spawns.count = 0
            stats = await relay(a, b, idle_timeout=30)
    finally:
        trio.lowlevel.remove_instrument(spawns)
    assert spawns.count == 0
    assert (stats.a_to_b, stats.b_to_a, stats.first_closed) == (14, 0, "b")
    assert await y.receive_some() == b"one more thing"
    assert await y.receive_some() == b""
    for stream in (x, a, b, y):
        await stream.aclose()
