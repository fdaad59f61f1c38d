"""``[destinations] tor``: the bridge sends its clients' streams on through a local Tor client.

A small SOCKS5 server on loopback stands in for Tor: it records what it was asked for and
connects every request to an echo service on 127.0.0.1, so a name nobody can resolve still
works (the bridge must not look names up itself when Tor is configured).
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from proxy.bridge.config import parse_bridge_config
from proxy.bridge.identity import BridgeURI, generate_identity
from proxy.bridge.server import BridgeServer
from proxy.errors import ConfigError
from proxy.inbound.base import Target
from proxy.strategies.bridge import BridgeStrategy


async def _exactly(stream: trio.SocketStream, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        if not chunk:
            raise trio.BrokenResourceError("closed")
        data += chunk
    return data


class FakeTor:
    """A SOCKS5 server (no auth, CONNECT) that sends every request to ``echo_port``."""

    def __init__(self, echo_port: int) -> None:
        self.echo_port = echo_port
        self.asked: list[tuple[str, int]] = []
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            greeting = await _exactly(client, 2)
            await _exactly(client, greeting[1])
            await client.send_all(b"\x05\x00")
            head = await _exactly(client, 4)
            if head[3] == 3:
                host = (await _exactly(client, (await _exactly(client, 1))[0])).decode()
            else:
                size = 4 if head[3] == 1 else 16
                host = str(
                    trio.socket.inet_ntop(2 if size == 4 else 10, await _exactly(client, size))
                )
            (port,) = struct.unpack("!H", await _exactly(client, 2))
            self.asked.append((host, port))
            upstream = await trio.open_tcp_stream("127.0.0.1", self.echo_port)
            async with upstream:
                await client.send_all(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", 1))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pipe, client, upstream)
                    await _pipe(upstream, client)


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _serve_echo(*, task_status: trio.TaskStatus[int]) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            await _pipe(stream, stream)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, echo, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


@asynccontextmanager
async def bridge_with_tor(extra: str = "") -> AsyncIterator[tuple[BridgeStrategy, FakeTor]]:
    async with trio.open_nursery() as nursery:
        tor = FakeTor(await nursery.start(_serve_echo))
        await nursery.start(tor.serve)
        config = parse_bridge_config(
            "[bridge]\nprobe_close_delay = [0.0, 0.01]\n"
            f'[destinations]\ntor = "127.0.0.1:{tor.port}"\n{extra}',
            "<test>",
        )
        identity = generate_identity()
        server = BridgeServer(config, identity)
        listening = await nursery.start(server.serve, "127.0.0.1:0")
        host, port = listening.addresses[0]
        uri = BridgeURI(
            short_id=identity.short_id, public_key=identity.public_key, secret=identity.secret,
            carrier="raw", host=host, port=port,
        )  # fmt: skip
        strategy = BridgeStrategy("b", uri, handshake_timeout=5.0)
        try:
            yield strategy, tor
        finally:
            await strategy.aclose()
            nursery.cancel_scope.cancel()


async def _echo(strategy: BridgeStrategy, target: Target, payload: bytes) -> bytes:
    stream = await strategy.connect(target, [], b"")
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        received = b""
        while data := await stream.receive_some(65536):
            received += data
    return received


async def test_bridge_streams_go_through_tor_which_resolves_the_names() -> None:
    async with bridge_with_tor() as (strategy, tor):
        payload = bytes(range(256)) * 400
        got = await _echo(strategy, Target("news.unresolvable.invalid", 443), payload)
        assert got == payload
        assert tor.asked == [("news.unresolvable.invalid", 443)]


async def test_bridge_with_tor_still_applies_its_destination_lists() -> None:
    async with bridge_with_tor('deny = ["blocked.example"]\n') as (strategy, tor):
        stream = await strategy.connect(Target("www.blocked.example", 80), [], b"")
        async with stream:
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"x")
                while await stream.receive_some(100):
                    pass
        # a private address is refused before it reaches Tor, as without Tor
        stream = await strategy.connect(Target("10.1.2.3", 80), [], b"")
        async with stream:
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"x")
                while await stream.receive_some(100):
                    pass
        assert tor.asked == []


@pytest.mark.parametrize("value", ['"localhost:9050"', '"127.0.0.1"', '"127.0.0.1:0"', "9050"])
def test_bridge_config_refuses_a_bad_tor_address(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bridge_config(f"[destinations]\ntor = {value}\n", "bridge.toml")
    assert str(caught.value).startswith("bridge.toml:2: destinations.tor: ")
