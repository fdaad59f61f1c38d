"""The trio side of a bridge session: one carrier stream, one BridgeConnection, many streams.

Both ends use it once the handshake is over. :class:`BridgeSession` owns the carrier: one
reader task feeds carrier bytes to the sans-IO :class:`BridgeConnection` and routes its events
to the streams, and one writer task takes whatever the connection has queued and writes it in
one go. Streams only queue frames and wake the writer (:meth:`BridgeSession.kick`), so records
leave in order and many small frames share one write; what may wait unsent is bounded by the
peer's flow-control credit.

Each multiplexed stream is a :class:`MuxStream`, an ordinary ``trio.abc.HalfCloseableStream``:
the client's strategy hands it to the dispatcher, the server relays it to the destination.
Flow control is the mux's credit: ``send_all`` waits for window, ``receive_some`` acknowledges
what it hands out (which returns credit to the peer). Incoming bytes wait in a per-stream
buffer that the peer's window bounds.

A session outlives its carrier (:mod:`proxy.protocols.bridge.resume`): the writer keeps every
sealed byte in the ledger until the peer acknowledges it, and :meth:`BridgeSession.swap` moves
the session to a new carrier, resending what the peer missed. The client swaps when its carrier
breaks, stalls or has carried enough (see :mod:`proxy.strategies.bridge`); the server when a
resume hello names the session. Only when no carrier comes back in time, or when one end says
BYE, is the session lost, and every stream breaks at once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio

from proxy.errors import LocalProtocolError, RemoteProtocolError
from proxy.net.stream import FastStream
from proxy.protocols.bridge import (
    BridgeConnection,
    ByeReceived,
    DataReceived,
    Event,
    ResetCode,
    SessionEnded,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from proxy.protocols.bridge.frames import MAX_DATA
from proxy.protocols.bridge.resume import ResumeTicket, SessionLedger

log = logging.getLogger("sidestep.bridge")

#: bytes asked of the carrier per read
CARRIER_READ = 256 * 1024
#: most bytes one ``send_all`` step hands to the mux at a time
SEND_STEP = 256 * 1024
#: what a relay should read per step to feed a stream: whole records of bulk DATA, no tail
STREAM_READ = 4 * MAX_DATA
#: a stream's reader gets a received chunk this large on its own; smaller ones are joined
JOIN_BELOW = 16 * 1024
#: reads a stream answers from its buffer before it lets other tasks run anyway (as
#: :class:`~proxy.net.stream.FastStream` does: a checkpoint per read costs a scheduler pass)
YIELD_EVERY = 16
CARRIER_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: seconds a received batch may wait for its ACK when nothing else goes the other way
ACK_DELAY = 0.2
#: seconds :meth:`BridgeSession.aclose` waits for its BYE to be written
BYE_TIMEOUT = 1.0
#: seconds between looks at a carrier that has carried its rotation share (rotation pending)
HOLD_RECHECK = 0.25


class MuxStream(trio.abc.HalfCloseableStream):
    """One stream of a :class:`BridgeSession`."""

    def __init__(self, session: BridgeSession, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.host = ""
        self.port = 0
        # received bytes not yet read, as the chunks they arrived in (no copying while they
        # wait, and a read of a whole chunk hands it out as it is); the window bounds them
        self._chunks: deque[bytes | bytearray] = deque()
        self._buffered = 0
        self._eof = False
        self._reset: ResetCode | None = None
        self._sent_eof = False
        self._closed = False
        self._waiting = trio.lowlevel.ParkingLot()
        self._quick = 0  # reads answered without waiting since the last checkpoint

    @property
    def reset_code(self) -> ResetCode | None:
        """Why the peer reset the stream, if it did."""
        return self._reset

    def _wake(self) -> None:
        self._waiting.unpark_all()

    def _deliver(self, data: bytes | bytearray) -> None:
        """(the session) Bytes arrived for this stream."""
        self._chunks.append(data)
        self._buffered += len(data)
        self._waiting.unpark_all()

    def _check_alive(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this bridge stream was closed")
        if self._reset is not None:
            raise trio.BrokenResourceError(f"the bridge reset the stream ({self._reset.name})")
        if self.session.dead:
            raise trio.BrokenResourceError("the bridge session was lost")

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        chunks = self._chunks
        while not chunks:
            if self._closed or self._reset is not None or not self._eof:
                self._check_alive()
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            self._quick = 0
            await self._waiting.park()
        limit = self._buffered if max_bytes is None else max_bytes
        first = chunks.popleft()
        if len(first) > limit:  # a short read: the rest stays first in line
            chunks.appendleft(first[limit:])
            data = first[:limit]
        elif len(first) >= JOIN_BELOW or not chunks or len(first) + len(chunks[0]) > limit:
            data = first  # the usual bulk case: one whole chunk, no copy
        else:  # small chunks: hand out as many as fit at once
            parts = [first]
            size = len(first)
            while chunks and size + len(chunks[0]) <= limit:
                size += len(chunks[0])
                parts.append(chunks.popleft())
            data = b"".join(parts)
        self._buffered -= len(data)
        conn = self.session.conn
        conn.acknowledge_data(self.stream_id, len(data))
        if conn.has_data_to_send:  # credit went back: a WINDOW frame is due
            self.session.kick()
        self._quick += 1
        if self._quick >= YIELD_EVERY:  # a bulk reader never waits: let the others run
            self._quick = 0
            await trio.lowlevel.checkpoint()
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        conn = self.session.conn
        while view:
            self._check_alive()
            if self._sent_eof:
                raise trio.ClosedResourceError("send_eof was already called")
            window = conn.send_window(self.stream_id)
            if window <= 0:
                await self._waiting.park()
                continue
            step = min(window, SEND_STEP, len(view))
            conn.send_data(self.stream_id, view[:step])  # copied into the frames
            view = view[step:]
            self.session.kick()
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        while self.session.conn.send_window(self.stream_id) <= 0:
            self._check_alive()
            await self._waiting.park()
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        self._check_alive()
        if self._sent_eof:
            await trio.lowlevel.checkpoint()
            return
        self._sent_eof = True
        self.session.conn.end_stream(self.stream_id)
        self.session.kick()
        await trio.lowlevel.checkpoint()

    async def reset(self, code: ResetCode) -> None:
        """Drop the stream both ways, telling the peer ``code`` (why it failed)."""
        if not self._closed and not self.session.dead and self._reset is None:
            self._reset = code
            self.session.conn.reset_stream(self.stream_id, code)
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        session = self.session
        session.streams.pop(self.stream_id, None)
        if session.dead:
            await trio.lowlevel.checkpoint()
            return
        try:
            if self._buffered:
                session.conn.acknowledge_data(self.stream_id, self._buffered)
                self._chunks.clear()
                self._buffered = 0
            if not (self._sent_eof and self._eof) and self._reset is None:
                session.conn.reset_stream(self.stream_id, ResetCode.CANCEL)
            session.kick()
        except LocalProtocolError:
            pass
        await trio.lowlevel.checkpoint()


def _socket_reader(
    carrier: trio.abc.Stream,
) -> Callable[[], Awaitable[bytes | memoryview]] | None:
    """For a carrier that is a plain TCP stream: a ``receive_some`` that reads into one buffer,
    reused by every call, and visits the scheduler only when it must wait (and every
    :data:`YIELD_EVERY` reads, to stay fair). ``None`` for any other carrier.

    Each result is a view of that buffer, valid until the next call: the session hands it to
    the ledger, whose record opener decrypts whole records into new buffers and copies aside
    only the unfinished one, so nothing keeps the view. This spares an allocation of
    :data:`CARRIER_READ` bytes and most scheduler passes per read.
    """
    if not isinstance(carrier, FastStream | trio.SocketStream):
        return None
    sock = carrier.socket
    buffer = bytearray(CARRIER_READ)
    view = memoryview(buffer)
    quick = 0

    async def receive() -> bytes | memoryview:
        nonlocal quick
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the carrier was closed")
            try:
                size = os.readv(fd, [buffer])
            except BlockingIOError:
                size = -1  # wait outside the handler, which would keep the exception alive
            except OSError as exc:
                raise trio.BrokenResourceError(exc) from exc
            if size < 0:
                quick = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            quick += 1
            if quick >= YIELD_EVERY:
                quick = 0
                await trio.lowlevel.checkpoint()
            return view[:size]

    return receive


@dataclass(frozen=True, slots=True)
class Reattached:
    """What a resume exchange on a new carrier agreed (see :meth:`BridgeSession.swap`)."""

    #: how many of our sealed-record bytes the peer has received
    peer_received: int
    #: record bytes that arrived right behind the peer's answer
    trailing: bytes = b""
    #: handshake bytes written to and read from the new carrier (they count towards rotation)
    sent: int = 0
    received: int = 0


#: given our received offset, run the resume exchange on the new carrier
Exchange = Callable[[int], Awaitable[Reattached]]


class BridgeSession:
    """An open bridge session (the handshake is done), carried by one carrier at a time.

    ``ledger`` numbers the sealed-record bytes both ways (a new one is made when not given: a
    session whose ends never resume needs no more). :meth:`swap` moves the session to a new
    carrier; :meth:`run` with ``linger`` keeps a session whose carrier broke for that many
    seconds, waiting for a swap, before it is lost.
    """

    def __init__(
        self,
        conn: BridgeConnection,
        carrier: trio.abc.Stream,
        *,
        now: Callable[[], float] = time.time,
        ledger: SessionLedger | None = None,
        ticket: ResumeTicket | None = None,
    ) -> None:
        self.conn = conn
        self.ledger = ledger or SessionLedger(conn)
        #: the session's name and proof for a resume (``None``: this session never resumes)
        self.ticket = ticket
        #: the current carrier; ``None`` while detached
        self.carrier: trio.abc.Stream | None = carrier
        self.streams: dict[int, MuxStream] = {}
        self.dead = False
        self.error: str | None = None
        #: one end said BYE: the session ended on purpose and is not resumed
        self.ended = False
        #: carriers used so far, and what broke the last one
        self.carriers = 1
        self.carrier_error: str | None = None
        #: bytes written to and read from the current carrier (the handshake included)
        self.carrier_sent = 0
        self.carrier_received = 0
        #: ask for a new carrier once the current one carried this many bytes either way (0: no)
        self.rotate_at = 0
        #: (server) a carrier that brought nothing for this many seconds is given up: a live
        #: client sends at least a keepalive PING every 30 s, one that vanished without a word
        #: (a cut network, a sleeping laptop) would otherwise hold its session until TCP
        #: gives up, which on an idle connection is never
        self.silence_limit = math.inf
        #: ``trio.current_time()`` when carrier bytes, and stream data, last arrived
        self.last_received = -math.inf
        self.last_data = -math.inf
        #: set (then replaced) whenever the carrier changes, is lost, or rotation falls due
        self.changed = trio.Event()
        self._now = now
        self._wanted = trio.Event()  # the writer has something to send
        self._ack_timed = False  # the idle writer will flush an owed ACK after ACK_DELAY
        self._resend = b""  # what the peer missed, written first on a new carrier
        self._carry_scope: trio.CancelScope | None = None
        self._carry_done = trio.Event()
        self._carry_done.set()
        self._swap_lock = trio.Lock()
        self._rotation_told = False
        self._bye_written: trio.Event | None = None
        self._on_open: Callable[[MuxStream], Awaitable[None]] | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def detached(self) -> bool:
        """The carrier is gone and the session waits for a new one."""
        return self.carrier is None and not self.dead

    @property
    def rotation_due(self) -> bool:
        carried = max(self.carrier_sent, self.carrier_received)
        return self.rotate_at > 0 and self.carrier is not None and carried >= self.rotate_at

    def open_stream(self, host: str, port: int) -> MuxStream:
        """(client) A new stream to ``host:port``; the OPEN leaves with the next flush."""
        if self.dead:
            raise trio.BrokenResourceError("the bridge session was lost")
        stream_id = self.conn.open_stream(host, port)
        stream = MuxStream(self, stream_id)
        stream.host, stream.port = host, port
        self.streams[stream_id] = stream
        return stream

    def kick(self) -> None:
        """Wake the writer: the connection has something queued."""
        self._wanted.set()

    async def flush(self) -> None:
        """Wake the writer and let it run (the frames go out in order with the next write)."""
        self.kick()
        await trio.lowlevel.checkpoint()

    def ping(self, opaque: bytes) -> None:
        """Queue a PING (keepalive, or a probe of a carrier that went quiet)."""
        if not self.dead:
            self.conn.ping(opaque)
            self.kick()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    # ------------------------------------------------------------------------------- running

    async def run(
        self,
        on_open: Callable[[MuxStream], Awaitable[None]] | None = None,
        initial: list[Event] | None = None,
        *,
        linger: float = 0.0,
    ) -> None:
        """Carry the session until it ends; ``on_open`` (server) runs per opened stream, in a
        nursery that is cancelled when the session ends. ``initial`` are events the handshake
        already produced. When a carrier breaks, the session waits ``linger`` seconds for
        :meth:`swap` (0: it is lost at once)."""
        self._on_open = on_open
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    self._handle(initial or [])
                    self.kick()
                    await self._carry_on(linger)
                finally:
                    self._lose(self.error or self.carrier_error or "carrier closed")
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            if self.carrier is not None:
                await trio.aclose_forcefully(self.carrier)

    async def _carry_on(self, linger: float) -> None:
        while not self.dead:
            carrier = self.carrier
            if carrier is not None:
                await self._carry(carrier)
                if self.carrier is carrier:  # it broke (a swap would have replaced it)
                    self.carrier = None
                    self._notify()
                    await trio.aclose_forcefully(carrier)
                    if not self.dead and linger > 0:
                        log.info("bridge: session detached (%s)", self.carrier_error)
                continue
            if self.ended or linger <= 0:
                return
            with trio.move_on_after(linger):
                while self.carrier is None and not self.dead:
                    await self.changed.wait()
            if self.carrier is None:
                self.error = self.error or f"not resumed within {linger:g} s ({self.carrier_error})"
                return

    async def _carry(self, carrier: trio.abc.Stream) -> None:
        """Read and write ``carrier`` until it breaks or a swap or the end stops it."""
        self._carry_done = done = trio.Event()
        self._carry_scope = scope = trio.CancelScope()
        self._rotation_told = False
        try:
            with scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._write_then_stop, carrier, nursery.cancel_scope)
                    if self.silence_limit < math.inf:
                        nursery.start_soon(self._hear_or_give_up, nursery.cancel_scope)
                    await self._read(carrier)
                    nursery.cancel_scope.cancel()
        finally:
            self._carry_scope = None
            done.set()

    async def _hear_or_give_up(self, scope: trio.CancelScope) -> None:
        """Give the carrier up (detach) once it brought nothing for :attr:`silence_limit`."""
        limit = self.silence_limit
        since = trio.current_time()
        while True:
            quiet = trio.current_time() - max(since, self.last_received)
            if quiet >= limit:
                self.carrier_error = f"nothing heard from the client for {limit:g} s"
                scope.cancel()
                return
            await trio.sleep(limit - quiet)

    async def _write_then_stop(self, carrier: trio.abc.Stream, scope: trio.CancelScope) -> None:
        await self._write(carrier)
        scope.cancel()

    async def _write(self, carrier: trio.abc.Stream) -> None:
        # ``pending`` is sealed and numbered (the ledger keeps it) but not yet on this carrier
        pending, self._resend = self._resend, b""
        if isinstance(carrier, trio.SocketStream):  # writes that need not wait skip the scheduler
            carrier = FastStream(carrier.socket)
        while True:
            if not pending:
                if not self._wanted.is_set():
                    self._ack_timed = self.ledger.owes_ack
                    idle = ACK_DELAY if self._ack_timed else math.inf
                    with trio.move_on_after(idle):
                        await self._wanted.wait()
                flush_ack = not self._wanted.is_set()
                self._wanted = trio.Event()
                pending = self.ledger.data_to_send(flush_ack=flush_ack)
                if not pending:
                    continue
            room = self.rotate_at - self.carrier_sent if self.rotate_at else len(pending)
            if room <= 0:  # this carrier has carried its share: hold until the next one
                with trio.move_on_after(HOLD_RECHECK):
                    await self.changed.wait()
                continue
            if room >= len(pending):  # the usual case: all of it, without a copy
                chunk, pending = pending, b""
            else:
                chunk, pending = pending[:room], pending[room:]
            if not await self._send(carrier, chunk):
                return
            if not pending and self._bye_written is not None:
                self._bye_written.set()

    async def _send(self, carrier: trio.abc.Stream, out: bytes | bytearray) -> bool:
        try:
            await carrier.send_all(out)
        except CARRIER_ERRORS as exc:
            self.carrier_error = f"carrier broke while sending: {exc}"
            return False
        self.carrier_sent += len(out)
        self._check_rotation()
        return True

    async def _read(self, carrier: trio.abc.Stream) -> None:
        receive = _socket_reader(carrier) or partial(carrier.receive_some, CARRIER_READ)
        while True:
            try:
                data = await receive()
            except CARRIER_ERRORS as exc:
                self.carrier_error = f"carrier broke: {exc}"
                return
            if not data:  # a FIN, ours or a middlebox's: only a BYE ends the session
                self.carrier_error = "carrier closed"
                return
            self.carrier_received += len(data)
            self.last_received = trio.current_time()
            try:
                events = self.ledger.receive_data(data)
            except RemoteProtocolError as exc:
                self._lose(f"peer broke the protocol: {exc}")
                return
            self._handle(events)
            ledger = self.ledger
            if (
                self.conn.has_data_to_send
                or ledger.ack_due
                or (ledger.owes_ack and not self._ack_timed)
            ):  # else the writer has nothing to do: no scheduler pass for it
                self.kick()
            self._check_rotation()

    def _check_rotation(self) -> None:
        if not self._rotation_told and self.rotation_due:
            self._rotation_told = True
            self._notify()

    # ------------------------------------------------------------------------- carrier swap

    async def swap(self, carrier: trio.abc.Stream, exchange: Exchange) -> None:
        """Carry on over ``carrier``: stop the current carrier (if any) and close it, run
        ``exchange(received)`` (the resume exchange, given how many of the peer's bytes we
        have), resend what the peer missed and continue. The caller keeps ``carrier`` when
        this raises; the session is then detached."""
        async with self._swap_lock:
            if self.dead:
                raise trio.BrokenResourceError(f"the bridge session was lost ({self.error})")
            old = self.carrier
            if old is not None:
                self.carrier = None
                if self._carry_scope is not None:
                    self._carry_scope.cancel()
                await self._carry_done.wait()
                self._notify()
                await trio.aclose_forcefully(old)
            agreed = await exchange(self.ledger.received)
            if self.dead:
                raise trio.BrokenResourceError(f"the bridge session was lost ({self.error})")
            try:
                self._resend = self.ledger.resume_from(agreed.peer_received)
                events = self.ledger.receive_data(agreed.trailing) if agreed.trailing else []
            except RemoteProtocolError as exc:
                self._lose(f"peer broke the protocol while resuming: {exc}")
                raise trio.BrokenResourceError(self.error) from exc
            self.carrier = carrier
            self.carriers += 1
            self.carrier_sent = agreed.sent
            self.carrier_received = agreed.received
            self.last_received = trio.current_time()
            self._handle(events)
            self.kick()
            self._notify()

    # --------------------------------------------------------------------------------- events

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                self.last_data = trio.current_time()
                stream = self.streams.get(event.stream_id)
                if stream is None or stream._closed:
                    self.conn.acknowledge_data(event.stream_id, len(event.data))
                else:
                    stream._deliver(event.data)
            elif isinstance(event, StreamOpened):
                self._opened(event)
            elif isinstance(event, StreamEnded):
                if (stream := self.streams.get(event.stream_id)) is not None:
                    stream._eof = True
                    stream._wake()
            elif isinstance(event, StreamReset):
                if (stream := self.streams.get(event.stream_id)) is not None:
                    stream._reset = event.code
                    stream._wake()
            elif isinstance(event, WindowUpdated):
                if event.stream_id == 0:
                    self._wake_all()
                elif (stream := self.streams.get(event.stream_id)) is not None:
                    stream._wake()
            elif isinstance(event, ByeReceived):
                self.ended = True
                self._lose("the peer closed the session")
            elif isinstance(event, SessionEnded):
                self._lose("carrier closed")

    def _opened(self, event: StreamOpened) -> None:
        stream = MuxStream(self, event.stream_id)
        stream.host, stream.port = event.host, event.port
        self.streams[event.stream_id] = stream
        if self._on_open is None or self._nursery is None:
            self.conn.reset_stream(event.stream_id, ResetCode.NOT_ALLOWED)
            return
        self._nursery.start_soon(self._on_open, stream)

    def _wake_all(self) -> None:
        for stream in list(self.streams.values()):
            stream._wake()

    def _lose(self, why: str) -> None:
        if self.dead:
            return
        self.dead = True
        self.error = self.error or why
        self._wake_all()
        if self._carry_scope is not None:
            self._carry_scope.cancel()
        self._notify()

    def abandon(self, why: str) -> None:
        """Give the session up (a resume failed): every stream breaks."""
        self._lose(why)

    async def aclose(self) -> None:
        """End the session for good: a BYE to the peer (so it does not keep the session for a
        resume), then the carrier is dropped and every stream breaks."""
        if not self.dead and self.carrier is not None and self._carry_scope is not None:
            self._bye_written = written = trio.Event()
            try:
                self.conn.mux.send_bye()
                self.kick()
                with trio.move_on_after(BYE_TIMEOUT):
                    await written.wait()
            except LocalProtocolError:
                pass
        self.ended = True
        self._lose("closed locally")
        if self.carrier is not None:
            await trio.aclose_forcefully(self.carrier)
