"""A bridge session outlives its carrier: cut connections, an expired resume window, BYE.

Real loopback sockets: the bridge server in-process, an echo service behind it, and a small TCP
forwarder between the client and the bridge whose connections the tests cut mid-transfer.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
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

_RESET = struct.pack("ii", 1, 0)


class Forwarder:
    """Forwards TCP connections to ``target``; :meth:`cut` resets every open one at once."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.address: tuple[str, int] = ("", 0)
        self.passed = 0  # bytes forwarded, both ways, all connections
        self.connections = 0
        self.cuts = 0
        #: a black hole: nothing passes any more and new connections hang (a vanished peer)
        self.frozen = False
        self._scopes: list[trio.CancelScope] = []

    async def serve(self, *, task_status: trio.TaskStatus[None]) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started()

    async def _handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        if self.frozen:
            await trio.sleep_forever()
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await client.aclose()
            return
        try:
            with trio.CancelScope() as scope:
                self._scopes.append(scope)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, upstream)
                    nursery.start_soon(self._pipe, upstream, client)
        finally:
            for stream in (client, upstream):
                if scope.cancelled_caught:  # a cut: the kernel answers with RST
                    with contextlib.suppress(OSError):
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                stream.socket.close()  # no checkpoint: the lab may be shutting down

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        try:
            while data := await source.receive_some(65536):
                if self.frozen:
                    await trio.sleep_forever()
                await sink.send_all(data)
                self.passed += len(data)
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def cut(self) -> None:
        self.cuts += 1
        for scope in self._scopes:
            scope.cancel()
        self._scopes.clear()

    async def cut_at(self, marks: list[int]) -> None:
        """Cut whenever the forwarded total passes each mark."""
        for mark in marks:
            while self.passed < mark:
                await trio.sleep(0.005)
            self.cut()


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
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, echo, listeners)
        task_status.started(listeners[0].socket.getsockname()[1])


@asynccontextmanager
async def bridge_behind_forwarder(
    resume_window: int = 60,
) -> AsyncIterator[tuple[BridgeServer, BridgeStrategy, Forwarder, int]]:
    config = parse_bridge_config(
        f"[bridge]\nprobe_close_delay = [0.0, 0.01]\nresume_window = {resume_window}\n"
        '[destinations]\nallow_networks = ["127.0.0.0/8"]\n',
        "<test>",
    )
    identity = generate_identity()
    server = BridgeServer(config, identity)
    async with trio.open_nursery() as nursery:
        listening = await nursery.start(server.serve, "127.0.0.1:0")
        echo_port = await nursery.start(serve_echo)
        forwarder = Forwarder(listening.addresses[0])
        await nursery.start(forwarder.serve)
        uri = BridgeURI(
            short_id=identity.short_id, public_key=identity.public_key, secret=identity.secret,
            carrier="raw", host=forwarder.address[0], port=forwarder.address[1],
        )  # fmt: skip
        strategy = BridgeStrategy("b", uri, handshake_timeout=5.0)
        try:
            yield server, strategy, forwarder, echo_port
        finally:
            await strategy.aclose()
            nursery.cancel_scope.cancel()


async def echo_through(strategy: BridgeStrategy, port: int, payload: bytes) -> bytes:
    stream = await strategy.connect(Target("127.0.0.1", port), [], b"")
    async with stream:
        received = bytearray()

        async def send() -> None:
            view = memoryview(payload)
            for start in range(0, len(view), 65536):
                await stream.send_all(view[start : start + 65536])
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while chunk := await stream.receive_some():
                received += chunk
        return bytes(received)


async def test_cut_carriers_lose_no_byte_and_keep_the_session() -> None:
    async with bridge_behind_forwarder() as (server, strategy, forwarder, port):
        payload = os.urandom(3 * 1024 * 1024)  # up and back down: 6 MiB through the cuts
        session = await strategy.session()
        [session_id] = server.sessions
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forwarder.cut_at, [1_000_000, 2_500_000, 4_000_000])
                echoed = await echo_through(strategy, port, payload)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
        assert forwarder.cuts == 3
        assert await strategy.session() is session and not session.dead
        assert list(server.sessions) == [session_id]  # the same session, resumed each time
        assert strategy.sessions_opened == 1 and server.sessions_opened == 1
        assert strategy.resumes == 3 and server.sessions_resumed == 3
        assert session.carriers == 4
        # and it still carries new streams
        assert await echo_through(strategy, port, b"after the cuts") == b"after the cuts"


async def test_cut_during_many_streams_keeps_them_all() -> None:
    async with bridge_behind_forwarder() as (server, strategy, forwarder, port):
        payloads = {i: os.urandom(50_000 + i * 1000) for i in range(20)}
        results: dict[int, bytes] = {}

        async def one(i: int) -> None:
            results[i] = await echo_through(strategy, port, payloads[i])

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forwarder.cut_at, [300_000, 900_000])
                for i in payloads:
                    nursery.start_soon(one, i)
        assert results == payloads
        assert server.sessions_opened == 1 and strategy.resumes == 2


async def test_forced_rotation_replaces_carriers_before_their_volume_without_loss() -> None:
    async with bridge_behind_forwarder() as (server, strategy, forwarder, port):
        strategy.rotate_after = 64 * 1024
        payload = os.urandom(1024 * 1024)
        with trio.fail_after(60):
            echoed = await echo_through(strategy, port, payload)
        assert echoed == payload
        session = await strategy.session()
        assert strategy.rotations >= len(payload) // (64 * 1024) - 1  # one per 64 KiB sent
        assert strategy.resumes == 0 and session.carriers == strategy.rotations + 1
        assert forwarder.connections == session.carriers
        assert server.sessions_opened == 1 and server.sessions_resumed == strategy.rotations
        assert strategy.learned_limit is None  # nothing stalled: nothing learned


async def test_resume_after_the_window_breaks_the_streams_and_a_new_session_works() -> None:
    async with bridge_behind_forwarder(resume_window=1) as (server, strategy, forwarder, port):
        strategy.resume_backoff = (2.5,)  # the client comes back after the bridge gave up
        stream = await strategy.connect(Target("127.0.0.1", port), [], b"ping")
        with trio.fail_after(10):
            assert await stream.receive_some() == b"ping"
        old = await strategy.session()
        forwarder.cut()
        with trio.fail_after(10):
            while server.sessions:  # the bridge drops it after its window
                await trio.sleep(0.05)
            with pytest.raises(trio.BrokenResourceError):
                while True:
                    await stream.receive_some()
        assert old.dead and "cannot resume" in (old.error or "")
        with trio.fail_after(10):
            assert await echo_through(strategy, port, b"fresh") == b"fresh"
        assert strategy.sessions_opened == 2 and server.sessions_opened == 2
        assert server.sessions_resumed == 0


async def test_closing_the_client_says_bye_and_the_bridge_drops_the_session_at_once() -> None:
    async with bridge_behind_forwarder(resume_window=3600) as (server, strategy, _, port):
        assert await echo_through(strategy, port, b"x") == b"x"
        assert len(server.sessions) == 1
        await strategy.aclose()
        with trio.fail_after(5):
            while server.sessions:
                await trio.sleep(0.01)


async def test_the_bridge_gives_up_a_client_that_vanished_without_a_word() -> None:
    async with bridge_behind_forwarder(resume_window=1) as (server, strategy, forwarder, port):
        server.client_silence = 0.5
        strategy.keepalive = 0.1  # a live client is heard often enough
        assert await echo_through(strategy, port, b"x") == b"x"
        await trio.sleep(1.5)  # three silence limits: the pings keep the session
        assert len(server.sessions) == 1
        forwarder.frozen = True  # the client's network is gone: no FIN, no RST, nothing
        start = trio.current_time()
        with trio.fail_after(10):
            while server.sessions:
                await trio.sleep(0.02)
        # given up after the silence limit, then dropped after the resume window
        assert 1.2 <= trio.current_time() - start < 5


async def test_a_replayed_resume_hello_gets_silence() -> None:
    async with bridge_behind_forwarder() as (server, strategy, forwarder, port):
        session = await strategy.session()
        sent: list[bytes] = []
        original = strategy._exchange

        async def recording(carrier, session, received):  # type: ignore[no-untyped-def]
            class Tap:
                async def send_all(self, data: bytes) -> None:
                    sent.append(bytes(data))
                    await carrier.send_all(data)

                async def receive_some(self, n: int) -> bytes:
                    return await carrier.receive_some(n)

            return await original(Tap(), session, received)  # type: ignore[arg-type]

        strategy._exchange = recording  # type: ignore[method-assign]
        forwarder.cut()
        with trio.fail_after(10):
            while strategy.resumes < 1:
                await trio.sleep(0.01)
        assert not session.dead
        [hello] = sent
        silenced = server.probes_silenced
        probe = await trio.open_tcp_stream(*strategy.uri_address())
        async with probe:
            await probe.send_all(hello)
            await probe.send_eof()
            with trio.fail_after(10):
                assert await probe.receive_some() == b""  # nothing, then a close
        assert server.probes_silenced == silenced + 1
        assert server.sessions_resumed == 1
        assert await echo_through(strategy, port, b"still here") == b"still here"


@pytest.mark.parametrize("value", ["-1", "3601", '"60"', "1.5"])
def test_bridge_config_refuses_a_bad_resume_window(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_bridge_config(f"[bridge]\n\nresume_window = {value}\n", "t.toml")
    assert "t.toml:3: bridge.resume_window:" in str(info.value)


def test_bridge_config_resume_window_defaults_to_a_minute() -> None:
    assert parse_bridge_config("", "t.toml").bridge.resume_window == 60
