from __future__ import annotations

import functools
import gc
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from proxy.net.alarm import clocks
from proxy.net.relay import RelayStats, relay

MiB = 1 << 20


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """Two connected loopback TCP streams (client end, server end)."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    try:
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listeners[0].accept()
    finally:
        await listeners[0].aclose()
    return client, server


@asynccontextmanager
async def relayed_tcp() -> AsyncIterator[tuple[trio.SocketStream, ...]]:
    """``x <-> a`` and ``b <-> y`` over loopback; the test relays ``a`` and ``b``."""
    x, a = await tcp_pair()
    b, y = await tcp_pair()
    try:
        yield x, a, b, y
    finally:
        for stream in (x, a, b, y):
            await stream.aclose()


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    chunks = []
    while data := await stream.receive_some(MiB):
        chunks.append(data)
    return b"".join(chunks)


async def run_relay(
    a: trio.abc.Stream, b: trio.abc.Stream, out: list[RelayStats], splice: bool = True
) -> None:
    out.append(await relay(a, b, idle_timeout=30.0, splice=splice))


def reset_on_close(stream: trio.SocketStream) -> None:
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- real TCP (descriptor fast path) ---------------------------------------------------------


async def test_relay_moves_bytes_both_ways_and_half_closes_from_a() -> None:
    async with relayed_tcp() as (x, a, b, y):
        out: list[RelayStats] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, a, b, out)
            await x.send_all(b"hello")
            assert await y.receive_some(100) == b"hello"
            await x.send_eof()
            assert await y.receive_some(100) == b""  # the FIN reached the far side
            # the other direction still works after the half-close
            await y.send_all(b"world, still here")
            assert await x.receive_some(100) == b"world, still here"
            await y.send_eof()
            assert await x.receive_some(100) == b""
    stats = out[0]
    assert (stats.a_to_b, stats.b_to_a) == (5, 17)
    assert stats.first_closed == "a"
    assert not stats.reset and not stats.idle_timeout
    assert stats.spliced == 0  # short flows never create a pipe


async def test_relay_half_close_from_b_first() -> None:
    async with relayed_tcp() as (x, a, b, y):
        out: list[RelayStats] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, a, b, out)
            await y.send_all(b"banner")
            await y.send_eof()
            assert await receive_all(x) == b"banner"
            await x.send_all(b"late request")
            assert await y.receive_some(100) == b"late request"
            await x.send_eof()
            assert await y.receive_some(100) == b""
    assert out[0].first_closed == "b"
    assert (out[0].a_to_b, out[0].b_to_a) == (12, 6)


async def _bulk(x: trio.SocketStream, y: trio.SocketStream, size: int) -> tuple[str, str]:
    """Send ``size`` pseudo-random bytes x -> y and y -> x at once; return both digests."""
    block = os.urandom(MiB)
    sent = hashlib.sha256()
    for _ in range(size // MiB):
        sent.update(block)
    results: dict[str, str] = {}

    async def send(stream: trio.SocketStream) -> None:
        for _ in range(size // MiB):
            await stream.send_all(block)
        await stream.send_eof()

    async def receive(stream: trio.SocketStream, key: str) -> None:
        digest = hashlib.sha256()
        while data := await stream.receive_some(MiB):
            digest.update(data)
        results[key] = digest.hexdigest()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send, x)
        nursery.start_soon(send, y)
        nursery.start_soon(receive, y, "x_to_y")
        nursery.start_soon(receive, x, "y_to_x")
    assert results == {"x_to_y": sent.hexdigest(), "y_to_x": sent.hexdigest()}
    return results["x_to_y"], results["y_to_x"]


@pytest.mark.parametrize("splice", [True, False])
async def test_relay_large_transfer_intact(splice: bool) -> None:
    size = 32 * MiB
    async with relayed_tcp() as (x, a, b, y):
        out: list[RelayStats] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, a, b, out, splice)
            await _bulk(x, y, size)
    stats = out[0]
    assert stats.a_to_b == stats.b_to_a == size
    assert not stats.reset
    if splice and hasattr(os, "splice"):
        assert stats.spliced == 2
    else:
        assert stats.spliced == 0


async def test_relay_peer_reset_ends_both_and_resets_other_side() -> None:
    async with relayed_tcp() as (x, a, b, y):
        out: list[RelayStats] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, a, b, out)
            await x.send_all(b"request")
            assert await y.receive_some(100) == b"request"
            reset_on_close(y)
            await y.aclose()  # RST to b
        assert out[0].reset and out[0].first_closed == "b"
        await a.aclose()  # the relay armed a reset on close
        with pytest.raises(trio.BrokenResourceError):
            await receive_all(x)


async def test_relay_idle_timeout_on_sockets(autojump_clock: trio.testing.MockClock) -> None:
    async with relayed_tcp() as (x, a, b, y):
        await x.send_all(b"queued before the relay starts")
        start = trio.current_time()
        stats = await relay(a, b, idle_timeout=60)
        assert stats.idle_timeout and not stats.reset
        # never early; late by at most the refresh slack (1 s) and one tick of the clock (1 s)
        assert 60 <= trio.current_time() - start <= 62.5
        assert stats.a_to_b == 30
        assert await y.receive_some(100) == b"queued before the relay starts"


async def test_relay_no_descriptor_leak() -> None:
    def count() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def one(i: int) -> None:
        async with relayed_tcp() as (x, a, b, y):
            out: list[RelayStats] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_relay, a, b, out)
                if i % 3 == 0:
                    await _bulk(x, y, 2 * MiB)  # creates pipes
                elif i % 3 == 1:
                    await x.send_all(b"x")
                    await y.receive_some(10)
                    reset_on_close(y)
                    await y.aclose()
                else:
                    await x.send_eof()
                    await y.send_eof()

    await one(0)  # warm up anything created once
    before = count()
    for i in range(30):
        await one(i)
    assert count() == before


# -- generic streams (memory streams, mixed pairs) -------------------------------------------


async def test_relay_memory_streams_both_ways_with_half_close() -> None:
    x, a = trio.testing.memory_stream_pair()
    b, y = trio.testing.memory_stream_pair()
    out: list[RelayStats] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_relay, a, b, out)
        await x.send_all(b"abc")
        assert await y.receive_some(10) == b"abc"
        await y.send_all(b"defg")
        assert await x.receive_some(10) == b"defg"
        await y.send_eof()
        assert await x.receive_some(10) == b""
        await x.send_all(b"more")
        assert await y.receive_some(10) == b"more"
        await x.send_eof()
    assert (out[0].a_to_b, out[0].b_to_a, out[0].first_closed) == (7, 4, "b")


async def test_relay_idle_timeout_is_shared(autojump_clock: trio.testing.MockClock) -> None:
    x, a = trio.testing.memory_stream_pair()
    b, y = trio.testing.memory_stream_pair()
    start = trio.current_time()
    out: list[RelayStats] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_relay, a, b, out)
        # traffic one way only keeps the whole relay alive
        for _ in range(10):
            await trio.sleep(20)
            await x.send_all(b".")
            assert await y.receive_some(10) == b"."
        last = trio.current_time()
    end = trio.current_time()
    assert last - start == pytest.approx(200)
    assert out[0].idle_timeout and out[0].first_closed is None
    assert 30 <= end - last <= 31.5


async def test_relay_mixed_pair_reset_ends_relay() -> None:
    x, a = trio.testing.memory_stream_pair()
    b, y = await tcp_pair()
    out: list[RelayStats] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_relay, a, b, out)
        await x.send_all(b"hi")
        assert await y.receive_some(10) == b"hi"
        reset_on_close(y)
        await y.aclose()
    assert out[0].reset and out[0].first_closed == "b"
    await b.aclose()


async def test_relay_rejects_bad_arguments() -> None:
    x, a = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError):
        await relay(x, a, idle_timeout=0)
    with pytest.raises(ValueError):
        await relay(x, a, idle_timeout=1, buffer_size=0)


async def test_relay_closing_leaves_the_last_fin_to_the_callers_close() -> None:
    async with relayed_tcp() as (x, a, b, y):
        out: list[RelayStats] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_closing_relay, a, b, out)
            await x.send_all(b"ping")
            await x.send_eof()
            assert await receive_all(y) == b"ping"
            await y.send_all(b"pong")
            await y.send_eof()
        # the relay is over; the FIN towards x comes from closing a, as the dispatcher does
        assert out[0].b_to_a == 4
        await a.aclose()
        assert await receive_all(x) == b"pong"


async def run_closing_relay(a: trio.abc.Stream, b: trio.abc.Stream, out: list[RelayStats]) -> None:
    out.append(await relay(a, b, idle_timeout=30.0, closing=True))


async def _until_fin_arrived(stream: trio.SocketStream) -> None:
    with trio.fail_after(5):
        while stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) != bytes([8]):
            await trio.sleep(0.005)


async def test_relay_of_two_finished_peers_leaves_both_fins_to_the_callers_close() -> None:
    async with relayed_tcp() as (x, a, b, y):
        await x.send_eof()
        await y.send_eof()
        await _until_fin_arrived(a)
        await _until_fin_arrived(b)
        stats = await relay(a, b, idle_timeout=30.0, closing=True)
        assert (stats.a_to_b, stats.b_to_a, stats.reset, stats.idle_timeout) == (0, 0, False, False)
        # nothing was shut down by the relay: each peer gets its FIN from the caller's close
        with trio.move_on_after(0.2) as quiet:
            await x.receive_some(1)
        assert quiet.cancelled_caught
        await a.aclose()
        await b.aclose()
        assert await x.receive_some(1) == b"" and await y.receive_some(1) == b""


async def test_relay_of_two_finished_peers_without_closing_passes_both_fins_on() -> None:
    async with relayed_tcp() as (x, a, b, y):
        await x.send_eof()
        await y.send_eof()
        await _until_fin_arrived(a)
        await _until_fin_arrived(b)
        stats = await relay(a, b, idle_timeout=30.0)
        assert not stats.reset and not stats.idle_timeout
        with trio.fail_after(5):  # a and b still open: the FINs came from the relay
            assert await x.receive_some(1) == b"" and await y.receive_some(1) == b""


# -- the in-line monitor ----------------------------------------------------------------------


def _tls_record(length: int) -> bytes:
    return bytes([23, 3, 3]) + length.to_bytes(2, "big") + b"r" * length


@pytest.mark.parametrize("splice", [True, False])
async def test_relay_monitor_cuts_a_frozen_flow_with_a_reset(
    splice: bool, autojump_clock: trio.testing.MockClock
) -> None:
    from proxy.net.monitor import Degradation, LinkMonitor, MonitorSettings, RecordTracker

    settings = MonitorSettings(freeze_min=14_000, freeze_max=22_000, freeze_stall=2.0)
    seen: list[Degradation] = []

    def degraded(what: Degradation) -> bool:
        seen.append(what)
        return True

    async with relayed_tcp() as (x, a, b, y):
        monitor = LinkMonitor(settings, trio.current_time(), records=RecordTracker())
        out: list[RelayStats] = []

        async def run() -> None:
            out.append(
                await relay(
                    a, b, idle_timeout=60, splice=splice, monitor=monitor, on_degraded=degraded
                )
            )
            # as the dispatcher does: close both at once, which sends the resets
            await a.aclose()
            await b.aclose()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await x.send_all(b"GET")
            await y.send_all(_tls_record(30_000)[:16_384])  # then the "censor" drops the rest
            got = 0
            with pytest.raises(trio.BrokenResourceError):
                while data := await x.receive_some(65536):
                    got += len(data)
            assert got == 16_384
    assert seen == [Degradation.FROZEN]
    stats = out[0]
    assert stats.cut and stats.reset and stats.degraded is Degradation.FROZEN
    assert stats.b_to_a == 16_384


async def test_relay_monitor_leaves_a_finished_answer_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from proxy.net.monitor import LinkMonitor, MonitorSettings, RecordTracker

    settings = MonitorSettings(freeze_min=14_000, freeze_max=22_000, freeze_stall=2.0)
    async with relayed_tcp() as (x, a, b, y):
        monitor = LinkMonitor(settings, trio.current_time(), records=RecordTracker())
        out: list[RelayStats] = []

        async def run() -> None:
            out.append(await relay(a, b, idle_timeout=60, monitor=monitor))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            answer = _tls_record(8000) + _tls_record(8000)
            await y.send_all(answer)
            got = b""
            while len(got) < len(answer):
                got += await x.receive_some(65536)
            await trio.sleep(30)  # idle keep-alive, far past the stall time
            await x.send_eof()
            await y.send_eof()
    assert out[0].degraded is None and not out[0].cut


async def test_relay_with_a_monitor_ends_when_both_directions_do(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # the watcher shares the relay's nursery: the second direction to end stops it, and that
    # is not mistaken for an idle timeout
    from proxy.net.monitor import LinkMonitor, MonitorSettings

    async with relayed_tcp() as (x, a, b, y):
        monitor = LinkMonitor(MonitorSettings(interval=0.5), trio.current_time())
        out: list[RelayStats] = []

        async def run() -> None:
            out.append(await relay(a, b, idle_timeout=60, monitor=monitor))

        with trio.fail_after(30):  # a watcher left running would keep the relay open
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                await x.send_all(b"q")
                assert await y.receive_some(10) == b"q"
                await y.send_all(b"a")
                assert await x.receive_some(10) == b"a"
                await x.send_eof()
                await y.send_eof()
    stats = out[0]
    assert (stats.a_to_b, stats.b_to_a) == (1, 1)
    assert not stats.idle_timeout and not stats.reset and stats.degraded is None


async def test_relay_counts_live_while_it_runs() -> None:
    async with relayed_tcp() as (x, a, b, y):
        stats_seen: list[int] = []
        from proxy.net.monitor import LinkMonitor, MonitorSettings

        class Peek(LinkMonitor):
            def tick(self, down: int, now: float, **kw: bool) -> None:  # type: ignore[override]
                stats_seen.append(down)
                return None

        monitor = Peek(MonitorSettings(interval=0.01), trio.current_time())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(relay, a, b, idle_timeout=30, monitor=monitor))
            await y.send_all(b"x" * 1000)
            assert await x.receive_some(2000) == b"x" * 1000
            while not stats_seen or stats_seen[-1] != 1000:
                await trio.sleep(0.01)
            await x.send_eof()
            await y.send_eof()


async def test_relay_raises_what_the_monitors_callback_raised(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from proxy.net.monitor import Degradation, LinkMonitor, MonitorSettings, RecordTracker

    settings = MonitorSettings(freeze_min=14_000, freeze_max=22_000, freeze_stall=2.0)

    def degraded(what: Degradation) -> bool:
        raise OSError("the evidence log is on a full disk")

    async with relayed_tcp() as (_x, a, b, y):
        monitor = LinkMonitor(settings, trio.current_time(), records=RecordTracker())
        await y.send_all(_tls_record(30_000)[:16_384])  # frozen inside a record
        with trio.fail_after(30), pytest.raises(OSError, match="full disk"):
            await relay(a, b, idle_timeout=60, monitor=monitor, on_degraded=degraded)


async def test_relay_monitors_of_concurrent_relays_tick_on_their_own_intervals(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # one shared task ticks every monitored relay, each at its own interval
    from proxy.net.monitor import LinkMonitor, MonitorSettings

    ticks: dict[float, list[float]] = {0.5: [], 2.0: []}

    class Counting(LinkMonitor):
        def tick(self, down: int, now: float, **kw: bool) -> None:  # type: ignore[override]
            ticks[self.settings.interval].append(now)
            return None

    async with relayed_tcp() as (x1, a1, b1, y1), relayed_tcp() as (x2, a2, b2, y2):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for interval, (a, b) in ((0.5, (a1, b1)), (2.0, (a2, b2))):
                monitor = Counting(MonitorSettings(interval=interval), start)
                nursery.start_soon(functools.partial(relay, a, b, idle_timeout=60, monitor=monitor))
            await trio.sleep(4.1)
            for x, y in ((x1, y1), (x2, y2)):
                await x.send_eof()
                await y.send_eof()
        ended = trio.current_time()
        await trio.sleep(10)  # relays over: nothing ticks any more
    assert [round(t - start, 1) for t in ticks[0.5]] == [0.5 * i for i in range(1, 9)]
    assert [round(t - start, 1) for t in ticks[2.0]] == [2.0, 4.0]
    assert all(t <= ended for t in ticks[0.5] + ticks[2.0])


async def test_an_idle_relay_keeps_no_exception_alive_while_it_waits() -> None:
    # a coroutine parked inside an ``except BlockingIOError`` clause would keep the
    # exception and its traceback: about 1.5 KiB per idle connection
    async with relayed_tcp() as (x, a, b, y):
        out: list[RelayStats] = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay, a, b, out)
            await x.send_all(b"hello")
            assert await y.receive_some(10) == b"hello"
            await trio.testing.wait_all_tasks_blocked()
            kept = [o for o in gc.get_objects() if isinstance(o, BlockingIOError)]
            assert kept == []
            await x.send_eof()
            await y.send_eof()


async def test_relay_makes_its_monitor_only_when_the_server_still_sends() -> None:
    from proxy.net.monitor import LinkMonitor, MonitorSettings

    made: list[LinkMonitor] = []

    def make() -> LinkMonitor:
        made.append(LinkMonitor(MonitorSettings(), trio.current_time()))
        return made[-1]

    async with relayed_tcp() as (x, a, b, y):  # the server answered and closed: nothing to watch
        await y.send_eof()
        await _until_fin_arrived(b)
        await x.send_eof()
        await relay(a, b, idle_timeout=30.0, monitor=make)
    assert made == []
    async with relayed_tcp() as (x, a, b, y):  # the server is still there
        out: list[RelayStats] = []
        async with trio.open_nursery() as nursery:

            async def run() -> None:
                out.append(await relay(a, b, idle_timeout=30.0, monitor=make))

            nursery.start_soon(run)
            await y.send_all(b"data")
            assert await x.receive_some(10) == b"data"
            await x.send_eof()
            await y.send_eof()
    assert len(made) == 1 and out[0].b_to_a == 4


class _Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


async def test_a_relay_whose_server_already_closed_runs_in_the_callers_task_alone() -> None:
    async with relayed_tcp() as (x, a, b, y):  # x: the client, y: the server
        await y.send_all(b"answer")
        await y.send_eof()
        assert await b.receive_some() == b"answer"  # the first answer, read by an attempt
        await _until_fin_arrived(b)
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
