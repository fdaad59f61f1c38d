"""The bridge strategy against a real bridge server on loopback (no censor lab needed)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from proxy.bridge.config import parse_bridge_config
from proxy.bridge.identity import BridgeURI, generate_identity
from proxy.bridge.server import BridgeServer
from proxy.errors import UpstreamError
from proxy.inbound.base import Target
from proxy.protocols.bridge import BridgeConnection, ConnectionState, ResetCode
from proxy.strategies.bridge import BridgeStrategy

LOOPBACK_OK = '[destinations]\nallow_networks = ["127.0.0.0/8"]\n'


async def serve_echo(*, task_status: trio.TaskStatus[int]) -> None:
    async def echo(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while data := await stream.receive_some(65536):
                    await stream.send_all(data)
                await stream.send_eof()
            except trio.BrokenResourceError:
                pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, echo, listeners)
        task_status.started(port)


@asynccontextmanager
async def bridge_and_echo(
    config_text: str = LOOPBACK_OK,
) -> AsyncIterator[tuple[BridgeServer, BridgeStrategy, int]]:
    config = parse_bridge_config(
        "[bridge]\nprobe_close_delay = [0.0, 0.01]\n" + config_text, "<test>"
    )
    identity = generate_identity()
    server = BridgeServer(config, identity)
    async with trio.open_nursery() as nursery:
        listening = await nursery.start(server.serve, "127.0.0.1:0")
        echo_port = await nursery.start(serve_echo)
        host, port = listening.addresses[0]
        uri = BridgeURI(
            short_id=identity.short_id, public_key=identity.public_key,
            secret=identity.secret, carrier="raw", host=host, port=port,
        )  # fmt: skip
        strategy = BridgeStrategy("b", uri)
        try:
            yield server, strategy, echo_port
        finally:
            await strategy.aclose()
            nursery.cancel_scope.cancel()


async def echo_once(strategy: BridgeStrategy, port: int, payload: bytes) -> bytes:
    stream = await strategy.connect(Target("127.0.0.1", port), [], payload[:10])
    async with stream:
        received = bytearray()

        async def send_rest() -> None:
            await stream.send_all(payload[10:])
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_rest)  # read while sending: the echo needs both
            while chunk := await stream.receive_some():
                received += chunk
        return bytes(received)


async def test_bridge_strategy_carries_500_concurrent_streams_over_one_session() -> None:
    async with bridge_and_echo() as (server, strategy, port):
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            results[i] = await echo_once(strategy, port, f"stream {i} ".encode() * (i % 50 + 3))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for i in range(500):
                    nursery.start_soon(one, i)
        assert all(results[i] == f"stream {i} ".encode() * (i % 50 + 3) for i in range(500))
        assert server.sessions_opened == 1
        assert strategy.sessions_opened == 1


async def test_bridge_strategy_moves_megabytes_both_ways_with_flow_control() -> None:
    async with bridge_and_echo() as (_, strategy, port):
        payload = os.urandom(6 * 1024 * 1024)  # beyond both the stream and session windows
        with trio.fail_after(60):
            assert await echo_once(strategy, port, payload) == payload


async def test_bridge_refuses_loopback_destinations_by_default() -> None:
    async with bridge_and_echo("") as (_, strategy, port):
        stream = await strategy.connect(Target("127.0.0.1", port), [], b"hi")
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="NOT_ALLOWED"):
            await stream.receive_some()
        assert stream.reset_code is ResetCode.NOT_ALLOWED  # type: ignore[attr-defined]
        await stream.aclose()
        # the session survives a refused stream
        assert not (await strategy.session()).dead


@pytest.mark.parametrize(
    ("deny", "target"),
    [('deny = ["127.0.0.0/8"]', "127.0.0.1"), ('deny = ["localhost"]', "localhost")],
)
async def test_bridge_deny_list_refuses_networks_and_names(deny: str, target: str) -> None:
    async with bridge_and_echo(LOOPBACK_OK + deny + "\n") as (_, strategy, port):
        stream = await strategy.connect(Target(target, port), [], b"hi")
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError, match="NOT_ALLOWED"):
            await stream.receive_some()


async def test_bridge_rate_limits_new_sessions_per_client() -> None:
    async with bridge_and_echo() as (server, strategy, port):
        server.rate.per_minute = 1
        assert await echo_once(strategy, port, b"first session works") == b"first session works"
        await (await strategy.session()).aclose()
        with trio.fail_after(10), pytest.raises(UpstreamError, match="handshake failed"):
            await strategy.session()
        assert server.sessions_opened == 1
        assert server.probes_silenced == 1


async def test_bridge_closes_a_session_whose_record_was_tampered_with() -> None:
    async with bridge_and_echo() as (server, strategy, port):
        carrier = await trio.open_tcp_stream(*strategy.uri_address())
        async with carrier:
            conn = BridgeConnection.client(strategy.uri.line(), rng=os.urandom, now=time.time())
            await carrier.send_all(conn.data_to_send())
            with trio.fail_after(10):
                while conn.state is ConnectionState.HANDSHAKE:
                    conn.receive_data(await carrier.receive_some())
            conn.open_stream("127.0.0.1", port)
            record = bytearray(conn.data_to_send())
            record[-1] ^= 0x01  # one flipped bit in the tag
            await carrier.send_all(bytes(record))
            with trio.fail_after(10):
                assert await carrier.receive_some() == b""  # closed, nothing said
        assert server.sessions_opened == 1


def test_bridge_strategy_repr_hides_the_secret() -> None:
    identity = generate_identity()
    uri = BridgeURI(
        short_id=identity.short_id, public_key=identity.public_key, secret=identity.secret,
        carrier="raw", host="192.0.2.1", port=443,
    )  # fmt: skip
    strategy = BridgeStrategy("b", uri)
    assert str(uri).split("secret=")[1][:20] not in repr(strategy)
    assert strategy.remote_dns is True
