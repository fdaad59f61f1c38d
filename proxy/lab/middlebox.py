"""The censor on the wire: a TCP middlebox on trio that runs a :class:`CensorEngine`.

A :class:`Middlebox` listens on an origin's *public* lab address and forwards each accepted
connection to the origin's real address, asking the engine (:mod:`proxy.lab.rules`) what to do at
every step. It is the stream-level ("tier A") execution of the censor: it cannot see IP packets,
so actions map onto socket operations.

* **Segments.** Each read from the client is one segment for the engine. A dedicated task reads
  the client eagerly and hands the bytes over a channel to the task that writes upstream, so two
  client sends are seen as two segments unless the client sends faster than the middlebox reads.
  Tests that depend on a split wait on :meth:`FlowStats.wait_segments` between sends. Each
  segment is forwarded with its own ``send``, and TCP_NODELAY is set on both sides, so the origin
  sees the same boundaries as far as loopback TCP allows.
* **RESET/REFUSE**: SO_LINGER 0, then close both sockets (the client and the origin read
  ECONNRESET).
* **BLACKHOLE/DROP_SYN**: nothing is forwarded either way; both sockets stay open until the client
  goes away or the lab stops.
* **THROTTLE**: S->C chunks wait ``engine.throttle_delay`` (``trio.sleep``, so a MockClock makes it
  instant) and are read no larger than the bucket.
* **FREEZE_AFTER**: S->C is cut at exactly the limit and then discarded, FIN included.
* **BLOCKPAGE/REDIRECT**: the engine's reply goes to the client, then a normal close.
* **DROP_CLIENT**: C->S bytes are discarded, S->C still flows.
* **Urgent data.** By default the middlebox reads like any socket: a TCP urgent byte (``MSG_OOB``)
  is left out of the stream it inspects, as a censor that honours the urgent pointer would. With
  ``urgent_inline=True`` it behaves like the naive DPIs the ``oob`` trick targets: the engine sees
  the urgent byte inside the stream, while the origin still gets the stream without it (the
  origin's kernel would drop it).

Connect-time actions are approximate for single flows (see :mod:`proxy.lab.rules`): the kernel has
already completed the handshake, so a refused flow is accepted and reset at once, and a dropped
SYN becomes an accepted connection that never answers. When
:meth:`~proxy.lab.rules.CensorEngine.listener_action` says that *every* flow to the address is
refused or dropped, the middlebox does it for real: it binds without listening (the kernel answers
the SYN with RST: ECONNREFUSED), or listens with a backlog of zero that one idle connection of its
own fills (the kernel drops SYNs: the client's connect times out).

A client that half-closes during a blackhole or freeze has its flow torn down (the middlebox
cannot tell a half-close from a full close); in plain forwarding, half-closes are passed on.
Everything the middlebox opens is closed when :meth:`Middlebox.serve` is cancelled.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
from dataclasses import dataclass, field

import trio

from proxy.lab.dnsserver import loopback_address
from proxy.lab.rules import Action, ActionKind, CensorEngine, Flow

__all__ = ["FlowStats", "Middlebox"]

log = logging.getLogger(__name__)

_LINGER_RESET = struct.pack("ii", 1, 0)
#: ioctl: is the read position at the urgent mark? (Linux, include/uapi/linux/sockios.h)
_SIOCATMARK = 0x8905
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)
#: flows stay held (blackhole/drop) with no upstream connection for these connect-time actions
_HOLD = frozenset({ActionKind.BLACKHOLE, ActionKind.DROP_SYN})
_RESET = frozenset({ActionKind.RESET, ActionKind.REFUSE})
#: after these, a client EOF ends the flow instead of being passed on
_SUPPRESS = frozenset({ActionKind.BLACKHOLE, ActionKind.DROP_SYN, ActionKind.DROP_CLIENT})


@dataclass(eq=False)
class FlowStats:
    """What the middlebox did with one client connection; tests wait on it."""

    flow: Flow
    #: client reads handed to the engine so far
    segments: int = 0
    c2s_forwarded: int = 0
    c2s_dropped: int = 0
    s2c_forwarded: int = 0
    s2c_dropped: int = 0
    #: the engine's latest decision for this flow
    action: ActionKind = ActionKind.FORWARD
    #: the flow ended with RST towards both sides
    reset: bool = False
    #: S->C has been stopped (freeze, blackhole)
    s2c_stopped: bool = False
    closed: bool = False
    _changed: trio.Event = field(default_factory=trio.Event, repr=False)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_segments(self, n: int) -> None:
        """Return once the middlebox has read ``n`` segments from the client (or the flow ended)."""
        while self.segments < n and not self.closed:
            await self._changed.wait()

    async def wait_closed(self) -> None:
        while not self.closed:
            await self._changed.wait()


class Middlebox:
    """Listens on ``listen``, forwards to ``upstream``, censoring with ``engine``."""

    def __init__(
        self,
        engine: CensorEngine,
        *,
        listen: tuple[str, int],
        upstream: tuple[str, int],
        buffer_size: int = 65536,
        connect_timeout: float = 10.0,
        real_refusal: bool = True,
        urgent_inline: bool = False,
    ) -> None:
        self.engine = engine
        #: the engine sees TCP urgent bytes inside the stream (see the module docstring)
        self.urgent_inline = urgent_inline
        self.listen = loopback_address(listen)
        self.upstream = loopback_address(upstream)
        self.buffer_size = buffer_size
        self.connect_timeout = connect_timeout
        #: refuse or drop SYNs in the kernel when a rule covers every flow (see module docstring)
        self.real_refusal = real_refusal
        #: the bound address, once :meth:`serve` has started
        self.address: tuple[str, int] | None = None
        #: every accepted flow, in order
        self.flows: list[FlowStats] = []
        self._new_flow = trio.Event()

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until cancelled; reports the bound ``(ip, port)``."""
        ip, port = self.listen
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        static: Action | None = None
        if self.real_refusal:
            # the port is only known after bind when it is 0; rules with ports need it fixed
            static = self.engine.listener_action(ip, port) if port else None
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        filler: trio.socket.SocketType | None = None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            await sock.bind((ip, port))
            self.address = (ip, sock.getsockname()[1])
            if self.real_refusal and static is None and not port:
                static = self.engine.listener_action(ip, self.address[1])
            if static is not None and static.kind is ActionKind.REFUSE:
                task_status.started(self.address)
                await trio.sleep_forever()  # bound, never listening: SYNs get RST
            if static is not None and static.kind is ActionKind.DROP_SYN:
                sock.listen(0)
                filler = trio.socket.socket(family, socket.SOCK_STREAM)
                await filler.connect(self.address)  # fills the accept queue: later SYNs drop
                task_status.started(self.address)
                await trio.sleep_forever()
            sock.listen(128)
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                task_status.started(self.address)
                await trio.serve_listeners(self._handle, [listener], handler_nursery=nursery)
        finally:
            sock.close()
            if filler is not None:
                filler.close()

    async def wait_flow(self, index: int = 0) -> FlowStats:
        """The ``index``-th accepted flow (0-based), waiting until it exists."""
        while len(self.flows) <= index:
            await self._new_flow.wait()
        return self.flows[index]

    async def flow_from(self, client_port: int) -> FlowStats:
        """The flow whose client uses local port ``client_port``, waiting until it is accepted."""
        while True:
            for stats in self.flows:
                if stats.flow.client_port == client_port:
                    return stats
            await self._new_flow.wait()

    async def _handle(self, client: trio.SocketStream) -> None:
        try:
            peer = client.socket.getpeername()
        except OSError:  # the client left before we got to it
            client.socket.close()
            return
        assert self.address is not None
        flow = Flow(peer[0], peer[1], self.address[0], self.address[1], "tcp")
        stats = FlowStats(flow)
        self.flows.append(stats)
        self._new_flow.set()
        self._new_flow = trio.Event()
        try:
            await _FlowRunner(self, client, stats).run()
        except Exception as exc:  # one broken flow must not stop the lab
            log.warning("middlebox %s:%s flow %s failed: %r", *self.address, flow, exc)


class _FlowRunner:
    """The tasks of one flow and the way it ends."""

    def __init__(self, box: Middlebox, client: trio.SocketStream, stats: FlowStats) -> None:
        self.box = box
        self.engine = box.engine
        self.client = client
        self.upstream: trio.SocketStream | None = None
        self.stats = stats
        self.flow = stats.flow
        self.action = Action.forward()
        self.reset = False
        self.client_lock = trio.Lock()  # S->C data and block pages share the client socket
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        try:
            with self.scope:
                await self._run()
        finally:
            for stream in (self.client, self.upstream):
                if stream is None:
                    continue
                if self.reset:
                    try:
                        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                    except OSError:
                        pass
                stream.socket.close()
            self.engine.on_close(self.flow)
            self.stats.reset = self.reset
            self.stats.closed = True
            self.stats._notify()

    def _end(self, *, reset: bool = False) -> None:
        self.reset = self.reset or reset
        self.scope.cancel()

    def _s2c_blocked(self) -> bool:
        """Whether the origin's FIN or RST must not reach the client either."""
        return self.stats.s2c_stopped or self.action.kind in _HOLD

    def _note(self, action: Action) -> None:
        self.action = action
        self.stats.action = action.kind

    async def _run(self) -> None:
        verdict = self.engine.on_connect(self.flow)
        self._note(verdict.action)
        if verdict.kind in _RESET:
            self._end(reset=True)
            return
        if verdict.kind not in _HOLD:
            try:
                with trio.fail_after(self.box.connect_timeout):
                    self.upstream = await trio.open_tcp_stream(*self.box.upstream)
            except (OSError, trio.TooSlowError):
                self._end(reset=True)  # the origin is down: the client sees a reset
                return
            for s in (self.client, self.upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        send, receive = trio.open_memory_channel[bytes](64)
        async with trio.open_nursery() as nursery:
            if self.upstream is not None:
                nursery.start_soon(self._client_to_server, self.upstream, receive)
                nursery.start_soon(self._server_to_client, self.upstream)
            else:
                receive.close()
            await self._read_client(send)

    async def _receive_client(self) -> tuple[bytes, bool]:
        """One client read, and whether its first byte is TCP urgent data (``urgent_inline``)."""
        if not self.box.urgent_inline:
            return await self.client.receive_some(self.box.buffer_size), False
        sock = self.client.socket
        await trio.lowlevel.wait_readable(sock)
        try:
            mark = fcntl.ioctl(sock.fileno(), _SIOCATMARK, b"\0\0\0\0")
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc
        # reads stop right before the urgent byte, so a read that starts at the mark starts with it
        urgent = struct.unpack("i", mark)[0] != 0
        return await self.client.receive_some(self.box.buffer_size), urgent

    async def _read_client(self, send: trio.MemorySendChannel[bytes]) -> None:
        if self.box.urgent_inline:
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, True)
        async with send:
            while True:
                try:
                    data, urgent = await self._receive_client()
                except _STREAM_ERRORS:
                    self._end(reset=True)  # the client reset: pass the RST on
                    return
                if not data:
                    if self.action.kind in _SUPPRESS or self._s2c_blocked():
                        self._end()
                    return  # closing ``send`` half-closes the upstream once it drained
                verdict = self.engine.on_client_segment(self.flow, data)
                self._note(verdict.action)
                self.stats.segments += 1
                self.stats._notify()
                if verdict.kind in _RESET:
                    self._end(reset=True)
                    return
                if verdict.reply:
                    async with self.client_lock:
                        try:
                            await self.client.send_all(verdict.reply)
                        except _STREAM_ERRORS:
                            pass
                    self._end()
                    return
                if urgent:  # the origin's kernel would not put it in the stream either
                    data = data[1:]
                    self.stats.c2s_dropped += 1
                if not data:
                    continue
                if verdict.forward and self.upstream is not None:
                    try:
                        await send.send(data)
                    except _STREAM_ERRORS:
                        return
                else:
                    self.stats.c2s_dropped += len(data)

    async def _client_to_server(
        self, upstream: trio.SocketStream, receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        async with receive:
            async for data in receive:
                try:
                    await upstream.send_all(data)
                except _STREAM_ERRORS:
                    self._end(reset=True)
                    return
                self.stats.c2s_forwarded += len(data)
        try:
            await upstream.send_eof()
        except _STREAM_ERRORS:
            pass

    async def _server_to_client(self, upstream: trio.SocketStream) -> None:
        stats = self.stats
        while True:
            size = self.box.buffer_size
            if self.action.kind is ActionKind.THROTTLE:
                size = min(size, max(1024, self.action.burst))
            try:
                data = await upstream.receive_some(size)
            except _STREAM_ERRORS:
                if not self._s2c_blocked():
                    self._end(reset=True)  # the origin reset: so does the client
                return
            if not data:
                if not self._s2c_blocked():
                    async with self.client_lock:
                        try:
                            await self.client.send_eof()
                        except _STREAM_ERRORS:
                            pass
                return
            verdict = self.engine.on_server_bytes(self.flow, len(data))
            if verdict.delay > 0:
                await trio.sleep(verdict.delay)
            if verdict.allow:
                async with self.client_lock:
                    try:
                        await self.client.send_all(data[: verdict.allow])
                    except _STREAM_ERRORS:
                        self._end(reset=True)
                        return
                stats.s2c_forwarded += verdict.allow
            stats.s2c_dropped += len(data) - verdict.allow
            if verdict.stop and not stats.s2c_stopped:
                stats.s2c_stopped = True
                stats._notify()
