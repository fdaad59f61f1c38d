"""Bulk data through a bridge session's streams: whole chunks, split reads, joined small
writes, and the window bounding what waits unread. Real loopback TCP as the carrier."""

from __future__ import annotations

import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from proxy.bridge.session import BridgeSession, MuxStream
from proxy.protocols.bridge import BridgeConnection, BridgeLine, ReplayCache
from proxy.protocols.bridge.mux import INITIAL_WINDOW

PRIVATE = X25519PrivateKey.generate()
LINE = BridgeLine(PRIVATE.public_key().public_bytes_raw(), bytes(range(32)), bytes(8))


@asynccontextmanager
async def sessions(
    on_open: Callable[[MuxStream], Awaitable[None]],
) -> AsyncIterator[tuple[BridgeSession, BridgeSession]]:
    """A client and a server session over one loopback connection, handshake done."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client_tcp = await trio.open_tcp_stream("127.0.0.1", port)
    server_tcp = await listeners[0].accept()
    client = BridgeConnection.client(LINE, rng=os.urandom, now=time.time())
    server = BridgeConnection.server(LINE, PRIVATE, ReplayCache(), rng=os.urandom)
    await client_tcp.send_all(client.data_to_send())
    server_events = server.receive_data(await server_tcp.receive_some(65536), time.time())
    await server_tcp.send_all(server.data_to_send())
    client_events = client.receive_data(await client_tcp.receive_some(65536))
    near, far = BridgeSession(client, client_tcp), BridgeSession(server, server_tcp)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(far.run, on_open, server_events)
        nursery.start_soon(near.run, None, client_events)
        yield near, far
        nursery.cancel_scope.cancel()
    await listeners[0].aclose()


def blob(size: int) -> bytes:
    return random.Random(size).randbytes(size)


async def read_exactly(stream: MuxStream, size: int, step: int | None) -> bytes:
    got = bytearray()
    while len(got) < size:
        data = await stream.receive_some(step)
        assert data, f"stream ended after {len(got)} of {size} bytes"
        assert step is None or len(data) <= step
        got += data
    return bytes(got)


async def test_bulk_stream_arrives_whole_with_reads_of_any_size() -> None:
    payload = blob(3 * 1024 * 1024 + 12345)

    async def serve(stream: MuxStream) -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with sessions(serve) as (near, _):
        for step in (None, 1000, 100_000):
            stream = near.open_stream("bulk.example", 443)
            await near.flush()
            assert await read_exactly(stream, len(payload), step) == payload
            assert await stream.receive_some() == b""
            await stream.aclose()


async def test_small_writes_are_read_together_and_uploads_arrive_whole() -> None:
    pieces = [blob(n) for n in range(1, 300)]
    received = trio.Event()
    uploaded = bytearray()

    async def serve(stream: MuxStream) -> None:
        while data := await stream.receive_some():
            uploaded.extend(data)
        received.set()
        for piece in pieces:  # many small frames, queued faster than the client reads
            await stream.send_all(piece)
        await stream.send_eof()

    async with sessions(serve) as (near, _):
        stream = near.open_stream("small.example", 443)
        upload = blob(2 * 1024 * 1024)
        await stream.send_all(memoryview(upload))
        await stream.send_eof()
        await received.wait()
        assert bytes(uploaded) == upload
        total = sum(map(len, pieces))
        while stream._buffered < total:  # let every piece arrive before the first read
            await trio.sleep(0.01)
        first = await stream.receive_some(1 << 20)
        assert len(first) > len(pieces[0])  # joined, not one tiny chunk per read
        rest = await read_exactly(stream, total - len(first), None)
        assert first + rest == b"".join(pieces)


async def test_an_unread_stream_holds_at_most_its_window() -> None:
    sent = 0
    stalled = trio.Event()

    async def serve(stream: MuxStream) -> None:
        nonlocal sent
        chunk = bytes(256 * 1024)
        while True:
            with trio.move_on_after(0.5) as scope:
                await stream.send_all(chunk)
            if scope.cancelled_caught:  # no credit left: the reader has not read
                stalled.set()
                await trio.sleep_forever()
            sent += len(chunk)

    async with sessions(serve) as (near, _):
        stream = near.open_stream("slow.example", 443)
        await near.flush()
        await stalled.wait()
        assert stream._buffered <= INITIAL_WINDOW
        assert sent <= INITIAL_WINDOW
        got = await read_exactly(stream, stream._buffered, None)
        assert got == bytes(len(got))
