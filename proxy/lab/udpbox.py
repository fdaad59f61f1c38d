"""The censor on UDP: a datagram middlebox on trio, and the echo service it guards.

A :class:`UdpMiddlebox` binds an origin's *public* lab address (the HTTPS port number, on UDP)
and relays datagrams to the origin's real UDP service, asking the
:class:`~proxy.lab.rules.CensorEngine` about every client datagram (``on_datagram``). This is
where the lab's QUIC censorship happens (:class:`~proxy.lab.triggers.QuicInitial`).

* **Flows.** Each client address (ip, port) is one :class:`~proxy.lab.rules.Flow` with
  ``proto="udp"`` and gets its own upstream socket, so the origin answers each flow apart. A flow
  that is silent both ways for ``idle_timeout`` seconds (trio's clock) is forgotten, in the box
  and in the engine (``on_close``); the next datagram from that address starts a fresh flow.
* **Verdicts.** A datagram the engine lets pass goes upstream; any other verdict drops it
  silently (UDP has no reset, and there is no one to show a block page to). Replies go through
  ``on_server_bytes``: a silenced flow gets nothing back, a frozen one nothing past its limit
  (a datagram is never cut), a throttled one its replies late.
* Every decision is in the engine's log, like the TCP :class:`~proxy.lab.middlebox.Middlebox`.

:class:`UdpEchoServer` is the stand-in for HTTP/3 at every TLS origin: it answers any datagram
with ``b"h3:" + payload``. Both bind loopback only, and close every socket when cancelled.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field

import trio

from proxy.lab.dnsserver import loopback_address
from proxy.lab.rules import ActionKind, CensorEngine, Flow

__all__ = ["ECHO_PREFIX", "UdpEchoServer", "UdpFlowStats", "UdpMiddlebox"]

log = logging.getLogger(__name__)

Address = tuple[str, int]

#: what the echo service puts before each payload it sends back
ECHO_PREFIX = b"h3:"
_MAX_DATAGRAM = 65535
#: an ICMP error for an earlier send, which Linux reports on the next receive
_ICMP_ERRORS = (ConnectionRefusedError, ConnectionResetError)


def _udp_socket(ip: str) -> trio.socket.SocketType:
    return trio.socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM)


@dataclass(eq=False)
class UdpFlowStats:
    """What the box did with one client address's datagrams; kept after the flow ends."""

    flow: Flow
    #: client datagrams handed to the engine
    datagrams: int = 0
    c2s_forwarded: int = 0
    c2s_dropped: int = 0
    s2c_forwarded: int = 0
    s2c_dropped: int = 0
    #: the engine's latest decision for this flow
    action: ActionKind = ActionKind.FORWARD
    closed: bool = False


@dataclass(eq=False)
class _Live:
    stats: UdpFlowStats
    upstream: trio.socket.SocketType
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class UdpMiddlebox:
    """Binds ``listen`` (UDP), relays to ``upstream``, censoring with ``engine``."""

    def __init__(
        self,
        engine: CensorEngine,
        *,
        listen: Address,
        upstream: Address,
        idle_timeout: float = 30.0,
    ) -> None:
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be > 0")
        self.engine = engine
        self.listen = loopback_address(listen)
        self.upstream = loopback_address(upstream)
        self.idle_timeout = idle_timeout
        #: the bound address, once :meth:`serve` has started
        self.address: Address | None = None
        #: every flow seen, in order (ended ones too)
        self.flows: list[UdpFlowStats] = []
        self._live: dict[Address, _Live] = {}
        self._sock: trio.socket.SocketType | None = None

    async def serve(
        self, *, task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled; reports the bound ``(ip, port)``."""
        ip, port = self.listen
        sock = self._sock = _udp_socket(ip)
        try:
            # no SO_REUSEADDR: on UDP it would let a second lab share the port silently
            await sock.bind((ip, port))
            self.address = (ip, sock.getsockname()[1])
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                while True:
                    try:
                        data, peer = await sock.recvfrom(_MAX_DATAGRAM)
                    except _ICMP_ERRORS:
                        continue  # a client went away after an earlier reply
                    await self._from_client(nursery, data, (peer[0], peer[1]))
        finally:
            for live in self._live.values():
                live.upstream.close()
            sock.close()

    async def _from_client(self, nursery: trio.Nursery, data: bytes, client: Address) -> None:
        live = self._live.get(client)
        if live is None:
            try:
                live = await nursery.start(self._run_flow, client)
            except OSError as exc:  # no socket to spare: the datagram is lost, as UDP allows
                log.warning(
                    "udp middlebox %s: cannot open a flow for %s: %r", self.address, client, exc
                )
                return
        stats = live.stats
        verdict = self.engine.on_datagram(stats.flow, data)
        stats.datagrams += 1
        stats.action = verdict.kind
        live.scope.deadline = trio.current_time() + self.idle_timeout
        if not verdict.forward:
            stats.c2s_dropped += len(data)
            return
        try:
            await live.upstream.send(data)
        except OSError as exc:
            log.debug("udp middlebox %s: send upstream failed: %r", self.address, exc)
            stats.c2s_dropped += len(data)
            return
        stats.c2s_forwarded += len(data)

    async def _run_flow(self, client: Address, *, task_status: trio.TaskStatus[_Live]) -> None:
        assert self.address is not None and self._sock is not None
        flow = Flow(client[0], client[1], self.address[0], self.address[1], "udp")
        upstream = _udp_socket(self.upstream[0])
        try:
            await upstream.connect(self.upstream)
        except OSError:
            upstream.close()
            raise
        live = _Live(UdpFlowStats(flow), upstream)
        live.scope.deadline = trio.current_time() + self.idle_timeout
        self._live[client] = live
        self.flows.append(live.stats)
        task_status.started(live)
        try:
            with live.scope:
                await self._from_server(live, client)
        finally:
            del self._live[client]
            upstream.close()
            self.engine.on_close(flow)
            live.stats.closed = True

    async def _from_server(self, live: _Live, client: Address) -> None:
        assert self._sock is not None
        stats = live.stats
        while True:
            try:
                data = await live.upstream.recv(_MAX_DATAGRAM)
            except _ICMP_ERRORS:
                continue  # the origin was not listening for an earlier datagram
            verdict = self.engine.on_server_bytes(stats.flow, len(data))
            if verdict.allow < len(data):  # silenced or frozen: a datagram is never cut
                stats.s2c_dropped += len(data)
                continue
            live.scope.deadline = trio.current_time() + self.idle_timeout
            if verdict.delay > 0:
                await trio.sleep(verdict.delay)
            try:
                await self._sock.sendto(data, client)
            except OSError as exc:
                log.debug("udp middlebox %s: send to %s failed: %r", self.address, client, exc)
                continue
            stats.s2c_forwarded += len(data)


class UdpEchoServer:
    """A UDP service answering each datagram with ``prefix + payload`` (HTTP/3's stand-in)."""

    def __init__(self, name: str, *, prefix: bytes = ECHO_PREFIX) -> None:
        self.name = name
        self.prefix = prefix
        #: datagrams answered so far
        self.answered = 0
        self.address: Address | None = None

    async def serve(
        self,
        ip: str,
        port: int,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answer datagrams on ``(ip, port)`` until cancelled; reports the bound address."""
        ip, port = loopback_address((ip, port))
        with _udp_socket(ip) as sock:
            await sock.bind((ip, port))
            self.address = (ip, sock.getsockname()[1])
            task_status.started(self.address)
            while True:
                try:
                    data, peer = await sock.recvfrom(_MAX_DATAGRAM)
                    await sock.sendto(self.prefix + data, peer)
                except OSError:
                    continue  # an ICMP error for an earlier answer, or a datagram too large
                self.answered += 1
