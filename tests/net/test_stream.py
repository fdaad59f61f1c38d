"""FastStream (proxy/net/stream.py) beyond what the relay and dial tests already cover."""

from __future__ import annotations

import socket

import trio

from proxy.net.stream import FastStream


async def _pair() -> tuple[FastStream, trio.SocketStream]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    await client.connect(("127.0.0.1", port))
    server = await listeners[0].accept()
    await listeners[0].aclose()
    return FastStream(client), server


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
