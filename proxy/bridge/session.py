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
buffer that the peer's window bounds. When the carrier is lost every stream breaks at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from proxy.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocols.bridge import (
    BridgeConnection,
    DataReceived,
    Event,
    ResetCode,
    SessionEnded,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)

log = logging.getLogger("sidestep.bridge")

#: bytes asked of the carrier per read
CARRIER_READ = 256 * 1024
#: most bytes one ``send_all`` step hands to the mux at a time
SEND_STEP = 256 * 1024
CARRIER_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class MuxStream(trio.abc.HalfCloseableStream):
    """One stream of a :class:`BridgeSession`."""

    def __init__(self, session: BridgeSession, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.host = ""
        self.port = 0
        self._buffer = bytearray()
        self._eof = False
        self._reset: ResetCode | None = None
        self._sent_eof = False
        self._closed = False
        self._changed = trio.Event()

    @property
    def reset_code(self) -> ResetCode | None:
        """Why the peer reset the stream, if it did."""
        return self._reset

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _check_alive(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this bridge stream was closed")
        if self._reset is not None:
            raise trio.BrokenResourceError(f"the bridge reset the stream ({self._reset.name})")
        if self.session.dead:
            raise trio.BrokenResourceError("the bridge session was lost")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while not self._buffer:
            if self._closed or self._reset is not None or not self._eof:
                self._check_alive()
            if self._eof:
                await trio.lowlevel.checkpoint()
                return b""
            await self._changed.wait()
        size = len(self._buffer) if max_bytes is None else min(max_bytes, len(self._buffer))
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        self.session.conn.acknowledge_data(self.stream_id, size)
        self.session.kick()
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
                await self._changed.wait()
                continue
            step = min(window, SEND_STEP, len(view))
            conn.send_data(self.stream_id, bytes(view[:step]))
            view = view[step:]
            self.session.kick()
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        while self.session.conn.send_window(self.stream_id) <= 0:
            self._check_alive()
            await self._changed.wait()
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
            if self._buffer:
                session.conn.acknowledge_data(self.stream_id, len(self._buffer))
                self._buffer.clear()
            if not (self._sent_eof and self._eof) and self._reset is None:
                session.conn.reset_stream(self.stream_id, ResetCode.CANCEL)
            session.kick()
        except LocalProtocolError:
            pass
        await trio.lowlevel.checkpoint()


class BridgeSession:
    """An open bridge session over ``carrier`` (the handshake is done)."""

    def __init__(
        self,
        conn: BridgeConnection,
        carrier: trio.abc.Stream,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.conn = conn
        self.carrier = carrier
        self.streams: dict[int, MuxStream] = {}
        self.dead = False
        self.error: str | None = None
        self._now = now
        self._wanted = trio.Event()  # the writer has something to send
        self._on_open: Callable[[MuxStream], Awaitable[None]] | None = None
        self._nursery: trio.Nursery | None = None

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

    async def _write(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            out = self.conn.data_to_send()
            if not out:
                continue
            try:
                await self.carrier.send_all(out)
            except CARRIER_ERRORS as exc:
                self.error = self.error or f"carrier broke while sending: {exc}"
                return

    async def run(
        self,
        on_open: Callable[[MuxStream], Awaitable[None]] | None = None,
        initial: list[Event] | None = None,
    ) -> None:
        """Read the carrier until it ends; ``on_open`` (server) runs per opened stream, in a
        nursery that is cancelled when the session ends. ``initial`` are events the handshake
        already produced."""
        self._on_open = on_open
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._write_then_stop, nursery.cancel_scope)
                try:
                    self._handle(initial or [])
                    self.kick()
                    await self._read()
                finally:
                    self._lose(self.error or "carrier closed")
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None

    async def _write_then_stop(self, scope: trio.CancelScope) -> None:
        await self._write()
        self._lose(self.error or "carrier closed")
        scope.cancel()

    async def _read(self) -> None:
        while True:
            try:
                data = await self.carrier.receive_some(CARRIER_READ)
            except CARRIER_ERRORS as exc:
                self.error = f"carrier broke: {exc}"
                return
            try:
                events = (
                    self.conn.receive_data(data, self._now()) if data else (self.conn.receive_eof())
                )
            except RemoteProtocolError as exc:
                self.error = f"peer broke the protocol: {exc}"
                return
            self._handle(events)
            if not data:
                self.error = "carrier closed"
                return
            self.kick()

    def _handle(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataReceived):
                stream = self.streams.get(event.stream_id)
                if stream is None or stream._closed:
                    self.conn.acknowledge_data(event.stream_id, len(event.data))
                else:
                    stream._buffer += event.data
                    stream._wake()
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

    async def aclose(self) -> None:
        """Drop the carrier (every stream breaks)."""
        self._lose("closed locally")
        await trio.aclose_forcefully(self.carrier)
