"""Stream multiplexing over one bridge session, with per-stream credit-based flow control.

Only the client opens streams (an OPEN frame names the target host and port); ids count up
from 1 and are never reused. Each direction of each stream starts with ``INITIAL_WINDOW`` bytes
of credit, and the session as a whole ``SESSION_WINDOW`` (WINDOW frames on stream 0 return it),
so one session never makes its peer hold more than that however many streams it opens. A sender
never sends more DATA than its credit (:meth:`Mux.send_data` raises
``LocalProtocolError`` rather than overrun); a receiver that gets more than it granted treats it
as a protocol error that ends the session. Credit comes back in WINDOW frames once the
application says it consumed the bytes (:meth:`Mux.acknowledge_data`), batched so a WINDOW goes
out per quarter window, not per read (so up to a quarter window less one byte may stay held back
until more is consumed; a sender is never left without room). CLOSE is a half-close (the sender
is done, it still reads); RESET drops the stream both ways at once. Frames for a stream that was
already closed or reset are ignored (they crossed our RESET in flight); frames for a stream id
that was never opened are a protocol error.

The mux speaks plaintext records (lists of frames) and knows nothing about keys, so it can be
tested without cryptography and a session layer can later sit under it unchanged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocols.bridge.frames import (
    DATA_HEADER_LEN,
    MAX_DATA,
    MAX_WINDOW,
    Ack,
    Bye,
    Close,
    Data,
    Frame,
    Open,
    Pad,
    Ping,
    Pong,
    Reset,
    ResetCode,
    Window,
    data_frame_span,
    decode_frames,
    encode_data_header,
    encode_frame,
)
from proxy.protocols.bridge.handshake import RandomSource
from proxy.protocols.bridge.padding import PaddingShape
from proxy.protocols.bridge.records import MAX_PLAINTEXT

#: a stream's credit: one window per round trip is a stream's top speed (2 MiB at 200 ms is
#: 10 MB/s), and the most a receiver buffers for it
INITIAL_WINDOW = 2 * 1024 * 1024
#: the whole session's credit: the most one peer makes the other buffer, however many streams
SESSION_WINDOW = 16 * 1024 * 1024
DEFAULT_MAX_STREAMS = 1024


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


# ---------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class StreamOpened:
    """(server) The client wants a connection to ``host:port`` on ``stream_id``."""

    stream_id: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Bytes for a stream; call :meth:`Mux.acknowledge_data` once they are consumed. A
    ``bytearray`` (bulk data, handed over without a copy) is the receiver's to keep."""

    stream_id: int
    data: bytes | bytearray


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The peer half-closed the stream: no more data will arrive on it."""

    stream_id: int


@dataclass(frozen=True, slots=True)
class StreamReset:
    """The peer dropped the stream (or refused to open it) with ``code``."""

    stream_id: int
    code: ResetCode


@dataclass(frozen=True, slots=True)
class WindowUpdated:
    """We may now send up to ``window`` bytes on the stream; stream 0 is the whole session's
    credit (a writer blocked by it waits for this event whatever its stream)."""

    stream_id: int
    window: int


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer pinged; the PONG is already queued."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    """Answer to one of our pings (keepalive proof that the session is alive)."""

    opaque: bytes


@dataclass(frozen=True, slots=True)
class AckReceived:
    """The peer has received ``offset`` bytes of our sealed records (for the session layer)."""

    offset: int


@dataclass(frozen=True, slots=True)
class ByeReceived:
    """The peer ended the session on purpose: it will not be resumed."""


MuxEvent = (
    StreamOpened
    | DataReceived
    | StreamEnded
    | StreamReset
    | WindowUpdated
    | PingReceived
    | PongReceived
    | AckReceived
    | ByeReceived
)


class _Kind(enum.Enum):
    """How a queued frame is packed into records."""

    CONTROL = "control"  # shares a record with anything
    DATA = "data"  # shares a record, lightly padded
    HEAVY = "heavy"  # one of a stream's first DATA frames: ends its record, heavily padded
    PAD = "pad"  # a padding-only record on its own


@dataclass(slots=True)
class _Stream:
    send_window: int = INITIAL_WINDOW
    receive_window: int = INITIAL_WINDOW  # what the peer may still send
    delivered: int = 0  # handed to the application, not yet acknowledged
    credit: int = 0  # acknowledged, not yet returned in a WINDOW frame
    local_closed: bool = False
    remote_closed: bool = False
    data_records: int = 0  # DATA frames sent, for heavy padding of the first ones


class Mux:
    """Streams over a sequence of plaintext records, for one end of a session."""

    def __init__(
        self,
        role: Role,
        shape: PaddingShape,
        rng: RandomSource,
        *,
        max_streams: int = DEFAULT_MAX_STREAMS,
        initial_window: int = INITIAL_WINDOW,
        session_window: int = SESSION_WINDOW,
    ) -> None:
        if not 1 <= initial_window <= MAX_WINDOW or not 1 <= session_window <= MAX_WINDOW:
            raise ValueError(f"windows must be 1-{MAX_WINDOW}")
        self.role = role
        self._shape = shape
        self._rng = rng
        self.max_streams = max_streams
        self.initial_window = initial_window
        self.session_window = session_window
        self._session_send = session_window  # what we may still send, all streams together
        self._session_receive = session_window  # what the peer may still send
        self._session_credit = 0  # consumed, not yet returned in a WINDOW on stream 0
        # streams finished both ways whose delivered bytes are not all acknowledged yet
        self._lingering: dict[int, int] = {}
        self._streams: dict[int, _Stream] = {}
        self._highest = 0  # the highest stream id ever opened
        self._queue: list[tuple[bytes, _Kind]] = []

    # ------------------------------------------------------------------------------ inspection

    @property
    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def send_window(self, stream_id: int) -> int:
        """Bytes we may send on ``stream_id`` now (0 for a stream that is gone)."""
        stream = self._streams.get(stream_id)
        if stream is None or stream.local_closed:
            return 0
        return min(stream.send_window, self._session_send)

    def receive_window(self, stream_id: int) -> int:
        stream = self._streams.get(stream_id)
        return stream.receive_window if stream is not None else 0

    # --------------------------------------------------------------------------------- sending

    def open_stream(self, host: str, port: int) -> int:
        """(client) Queue an OPEN for ``host:port``; returns the new stream id."""
        if self.role is not Role.CLIENT:
            raise LocalProtocolError("only the client opens bridge streams")
        if len(self._streams) >= self.max_streams:
            raise LocalProtocolError(f"the session already carries {self.max_streams} streams")
        if self._highest >= 0xFFFFFFFF:
            raise LocalProtocolError("stream ids are exhausted; open a new session")
        stream_id = self._highest + 1
        try:
            frame = encode_frame(Open(stream_id, host, port))
        except (ValueError, UnicodeError) as exc:
            raise LocalProtocolError(f"cannot open a stream to {host!r}:{port}: {exc}") from None
        self._highest = stream_id
        self._streams[stream_id] = self._new_stream()
        self._queue.append((frame, _Kind.CONTROL))
        return stream_id

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` on a stream; never more than :meth:`send_window` bytes.

        The bytes are copied once, into the frames (``data`` may be reused at once).
        """
        stream = self._sendable(stream_id)
        window = min(stream.send_window, self._session_send)
        view = memoryview(data).cast("B")
        size = len(view)
        if size > window:
            raise LocalProtocolError(
                f"{size} bytes exceed the {window}-byte window of stream {stream_id}"
            )
        stream.send_window -= size
        self._session_send -= size
        heavy_left = self._shape.heavy_records
        for start in range(0, size, MAX_DATA):
            chunk = view[start : start + MAX_DATA]
            kind = _Kind.HEAVY if stream.data_records < heavy_left else _Kind.DATA
            stream.data_records += 1
            self._queue.append((encode_data_header(stream_id, len(chunk)) + chunk, kind))

    def end_stream(self, stream_id: int) -> None:
        """Half-close: we send nothing more on the stream (the peer may still send)."""
        stream = self._sendable(stream_id)
        stream.local_closed = True
        self._queue.append((encode_frame(Close(stream_id)), _Kind.CONTROL))
        self._forget_if_done(stream_id, stream)

    def reset_stream(self, stream_id: int, code: ResetCode = ResetCode.CANCEL) -> None:
        """Drop the stream both ways. A stream that is already gone is left alone."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            self._queue.append((encode_frame(Reset(stream_id, code)), _Kind.CONTROL))
            self._return_session_credit(stream.delivered)

    def acknowledge_data(self, stream_id: int, amount: int) -> None:
        """The application consumed ``amount`` received bytes: return the credit to the peer.

        Acknowledge every :class:`DataReceived`, even after the stream ended: the session's
        credit depends on it. Bytes of a reset stream were credited back at the reset, so
        acknowledging them later does nothing.
        """
        stream = self._streams.get(stream_id)
        if stream is None:  # finished both ways (still owed), or reset (already credited)
            owed = self._lingering.pop(stream_id, 0)
            if amount < owed:
                self._lingering[stream_id] = owed - amount
            if owed:
                self._return_session_credit(min(amount, owed))
            return
        if not 0 <= amount <= stream.delivered:
            raise LocalProtocolError(
                f"acknowledged {amount} bytes but only {stream.delivered} were delivered"
            )
        stream.delivered -= amount
        stream.credit += amount
        if stream.credit and stream.credit >= self.initial_window // 4 and not stream.remote_closed:
            stream.receive_window += stream.credit
            self._queue.append((encode_frame(Window(stream_id, stream.credit)), _Kind.CONTROL))
            stream.credit = 0
        self._return_session_credit(amount)

    def _return_session_credit(self, amount: int) -> None:
        """Bytes the application consumed (or that will never reach it) free session credit."""
        self._session_credit += amount
        if self._session_credit and self._session_credit >= self.session_window // 4:
            self._session_receive += self._session_credit
            self._queue.append((encode_frame(Window(0, self._session_credit)), _Kind.CONTROL))
            self._session_credit = 0

    def ping(self, opaque: bytes) -> None:
        """Queue a keepalive PING carrying 8 opaque bytes (a counter or a timestamp)."""
        if len(opaque) != 8:
            raise LocalProtocolError("a ping carries exactly 8 opaque bytes")
        self._queue.append((encode_frame(Ping(opaque)), _Kind.CONTROL))

    def send_ack(self, offset: int) -> None:
        """Queue an ACK: we have received ``offset`` bytes of the peer's sealed records."""
        self._queue.append((encode_frame(Ack(offset)), _Kind.CONTROL))

    def send_bye(self) -> None:
        """Queue a BYE: this end closes the session for good (no resumption)."""
        self._queue.append((encode_frame(Bye()), _Kind.CONTROL))

    def send_padding(self, size: int) -> None:
        """Queue a record of nothing but ``size`` bytes of padding (cover traffic)."""
        if not 1 <= size <= MAX_PLAINTEXT:
            raise LocalProtocolError(f"a padding record holds 1-{MAX_PLAINTEXT} bytes")
        self._queue.append((encode_frame(Pad(size - 1)), _Kind.PAD))

    def records_to_send(self) -> list[bytes | bytearray]:
        """Plaintexts of the records to seal and send, padded by the bridge's shape.

        Control frames and later DATA frames share records; each heavy DATA frame (one of the
        first writes of a stream) ends its record, padded heavily; padding records stand alone.
        """
        records: list[bytes | bytearray] = []
        current = bytearray()
        has_data = False
        for frame, kind in self._queue:
            if current and (
                (kind is _Kind.HEAVY and has_data)
                or kind is _Kind.PAD
                or len(current) + len(frame) > MAX_PLAINTEXT
            ):
                records.append(self._padded(current, heavy=False))
                current = bytearray()
                has_data = False
            if kind is _Kind.PAD:
                records.append(frame)
                continue
            if not current and len(frame) == MAX_PLAINTEXT:  # a full record: no copy, no room
                records.append(frame)
                continue
            current += frame
            has_data = has_data or kind is not _Kind.CONTROL
            if kind is _Kind.HEAVY:
                records.append(self._padded(current, heavy=True))
                current = bytearray()
                has_data = False
        if current:
            records.append(self._padded(current, heavy=False))
        self._queue.clear()
        return records

    @property
    def has_queued(self) -> bool:
        """Frames wait for :meth:`records_to_send`."""
        return bool(self._queue)

    def discard_outgoing(self) -> None:
        """Forget every queued frame (the session broke: nothing more may leave)."""
        self._queue.clear()

    def _padded(self, record: bytearray, *, heavy: bool) -> bytearray:
        rand = int.from_bytes(self._rng(4), "big")
        pad = min(self._shape.padding_for(len(record), heavy=heavy, rand=rand), MAX_PLAINTEXT)
        pad = min(pad, MAX_PLAINTEXT - len(record))
        if pad:
            record += bytes(pad)  # a PAD frame: type 0x00, then zeros
        return record  # the caller's from now on (sealed as it is, not copied again)

    # ------------------------------------------------------------------------------- receiving

    def receive_record(self, plaintext: bytes | bytearray) -> list[MuxEvent]:
        """Act on one record's frames; raises ``RemoteProtocolError`` on any rule broken.

        A ``bytearray`` that holds one DATA frame (and maybe padding), the shape of every bulk
        record, is taken over: its header is cut off in place and the rest is delivered as the
        :class:`DataReceived` bytes, without a copy.
        """
        events: list[MuxEvent] = []
        if type(plaintext) is bytearray and (bulk := data_frame_span(plaintext)) is not None:
            stream_id, end = bulk
            del plaintext[end:]  # the padding
            del plaintext[:DATA_HEADER_LEN]  # O(1): the buffer's start just moves
            self._receive_data(stream_id, plaintext, events)
            return events
        for frame in decode_frames(plaintext):
            self._receive_frame(frame, events)
        return events

    def _receive_frame(self, frame: Frame, events: list[MuxEvent]) -> None:
        match frame:
            case Data(stream_id, data):
                self._receive_data(stream_id, data, events)
            case Open(stream_id, host, port):
                if self.role is not Role.SERVER:
                    raise RemoteProtocolError("bridge server tried to open a stream")
                if stream_id <= self._highest:
                    raise RemoteProtocolError(f"bridge stream id {stream_id} was already used")
                self._highest = stream_id
                if len(self._streams) >= self.max_streams:
                    self._queue.append(
                        (encode_frame(Reset(stream_id, ResetCode.TOO_MANY_STREAMS)), None)
                    )
                    return
                self._streams[stream_id] = self._new_stream()
                events.append(StreamOpened(stream_id, host, port))
            case Close(stream_id):
                stream = self._known(stream_id, "CLOSE")
                if stream is None:
                    return
                if stream.remote_closed:
                    raise RemoteProtocolError(f"bridge peer closed stream {stream_id} twice")
                stream.remote_closed = True
                events.append(StreamEnded(stream_id))
                self._forget_if_done(stream_id, stream)
            case Reset(stream_id, code):
                stream = self._known(stream_id, "RESET")
                if stream is not None:
                    del self._streams[stream_id]
                    self._return_session_credit(stream.delivered)
                    events.append(StreamReset(stream_id, code))
            case Window(0, increment):
                if self._session_send + increment > MAX_WINDOW:
                    raise RemoteProtocolError("bridge peer overflowed the session window")
                self._session_send += increment
                events.append(WindowUpdated(0, self._session_send))
            case Window(stream_id, increment):
                stream = self._known(stream_id, "WINDOW")
                if stream is None:
                    return
                if stream.send_window + increment > MAX_WINDOW:
                    raise RemoteProtocolError(f"bridge peer overflowed the window of {stream_id}")
                stream.send_window += increment
                if not stream.local_closed:
                    events.append(WindowUpdated(stream_id, stream.send_window))
            case Ping(opaque):
                self._queue.append((encode_frame(Pong(opaque)), _Kind.CONTROL))
                events.append(PingReceived(opaque))
            case Pong(opaque):
                events.append(PongReceived(opaque))
            case Ack(offset):
                events.append(AckReceived(offset))
            case Bye():
                events.append(ByeReceived())
            case Pad():
                pass

    def _receive_data(
        self, stream_id: int, data: bytes | bytearray, events: list[MuxEvent]
    ) -> None:
        if len(data) > self._session_receive:
            raise RemoteProtocolError("bridge peer overran the session's flow-control window")
        self._session_receive -= len(data)
        stream = self._known(stream_id, "DATA")
        if stream is None:  # crossed our RESET: nobody will consume it
            self._return_session_credit(len(data))
            return
        if stream.remote_closed:
            raise RemoteProtocolError(f"bridge peer sent DATA after CLOSE on {stream_id}")
        if len(data) > stream.receive_window:
            raise RemoteProtocolError(
                f"bridge peer overran the flow-control window of stream {stream_id}"
            )
        stream.receive_window -= len(data)
        if data:
            stream.delivered += len(data)
            events.append(DataReceived(stream_id, data))

    # --------------------------------------------------------------------------------- helpers

    def _new_stream(self) -> _Stream:
        return _Stream(send_window=self.initial_window, receive_window=self.initial_window)

    def _known(self, stream_id: int, what: str) -> _Stream | None:
        """The live stream, ``None`` for one already finished, an error for one never opened."""
        stream = self._streams.get(stream_id)
        if stream is None and not 0 < stream_id <= self._highest:
            raise RemoteProtocolError(f"bridge peer sent {what} on unopened stream {stream_id}")
        return stream

    def _sendable(self, stream_id: int) -> _Stream:
        stream = self._streams.get(stream_id)
        if stream is None:
            raise LocalProtocolError(f"stream {stream_id} is not open")
        if stream.local_closed:
            raise LocalProtocolError(f"stream {stream_id} was already ended")
        return stream

    def _forget_if_done(self, stream_id: int, stream: _Stream) -> None:
        if stream.local_closed and stream.remote_closed:
            del self._streams[stream_id]
            if stream.delivered:  # the application still owes acknowledgements
                self._lingering[stream_id] = stream.delivered
