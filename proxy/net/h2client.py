"""One multiplexed HTTP/2 client connection (RFC 9113), h2 driven over a trio stream.

:class:`H2ClientConnection` owns an already-handshaken stream (TLS with ALPN ``h2``, chosen by
the caller) and an h2 state machine. :meth:`H2ClientConnection.run` is its reader task: it feeds
every received byte to h2 and hands the events to the stream they belong to. Any number of tasks
may call :meth:`H2ClientConnection.request` at once; each gets its own stream, so answers come
back in any order.

How the connection fails, and what a caller may do about it:

* **RST_STREAM** fails that one request with :class:`H2StreamReset`; the others go on.
* **GOAWAY** marks the connection unusable (:attr:`H2ClientConnection.usable` turns false, so a
  pool opens a new one). Requests on streams above the peer's ``last_stream_id`` were never
  processed and fail with :class:`H2ConnectionLost`, which is safe to retry elsewhere. h2 accepts
  no frames after a GOAWAY, so streams at or below it that are still unanswered fail the same way.
* **EOF, a broken socket or a protocol error** fails every pending request with
  :class:`H2ConnectionLost`.

The peer's ``SETTINGS_MAX_CONCURRENT_STREAMS`` is respected (a request waits for a free slot;
until the peer's first SETTINGS arrives we assume 100),
bodies are sent within the peer's flow-control windows, and received data is acknowledged at
once. The connection stops offering itself before the stream IDs run out. Writes go through one
lock; a write that is interrupted leaves the TLS stream in an unknown state, so it kills the
connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import trio

from proxy.errors import UpstreamError

Headers = list[tuple[str, str]]

#: stop opening streams well before the 2**31 stream-ID space of a connection is used up
_LAST_STREAM_ID = 2**31 - 1 - 2 * 1000
_READ_SIZE = 65536
#: streams we allow ourselves before the peer's first SETTINGS says how many it takes
#: (RFC 9113 6.5.2 recommends servers allow at least 100)
_ASSUMED_MAX_STREAMS = 100


class H2Error(UpstreamError):
    """An HTTP/2 exchange failed. ``retryable``: the request may be sent again elsewhere."""

    retryable = False


class H2ConnectionLost(H2Error):
    """The connection went away (EOF, GOAWAY, breakage) before this request was answered."""

    retryable = True


class H2StreamReset(H2Error):
    """The peer reset this request's stream (RST_STREAM); ``error_code`` is its reason."""

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message)
        self.error_code = error_code
        # REFUSED_STREAM promises the request was not processed (RFC 9113 8.7)
        self.retryable = error_code == h2.errors.ErrorCodes.REFUSED_STREAM


@dataclass(slots=True)
class _Exchange:
    done: trio.Event = field(default_factory=trio.Event)
    status: int = 0
    headers: Headers = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    error: H2Error | None = None

    def fail(self, error: H2Error) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class H2ClientConnection:
    """An HTTP/2 client on ``stream`` for requests to ``authority`` (``host`` or ``host:port``).

    Start it with ``await nursery.start(conn.run)``; stop it with :meth:`aclose`.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        authority: str,
        *,
        scheme: str = "https",
        max_body: int = 1 << 20,
    ) -> None:
        self.stream = stream
        self.authority = authority
        self.scheme = scheme
        self.max_body = max_body
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self._h2 = h2.connection.H2Connection(config=config)
        self._exchanges: dict[int, _Exchange] = {}
        self._send_lock = trio.Lock()
        self._changed = trio.Event()  # window, settings or stream count changed
        self._closing = False  # GOAWAY seen, or we are shutting down
        self._dead: H2ConnectionLost | None = None
        self._settings_seen = False
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        #: the peer's GOAWAY: ``(error code, last stream id)``
        self.goaway: tuple[int, int] | None = None

    # --- state --------------------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """Whether new requests may be sent here (running, no GOAWAY, stream IDs left)."""
        return (
            self._scope is not None
            and self._dead is None
            and not self._closing
            and self._h2.highest_outbound_stream_id < _LAST_STREAM_ID
        )

    @property
    def open_streams(self) -> int:
        """Requests sent and not yet finished."""
        return len(self._exchanges)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _fail_all(self, error: H2ConnectionLost, *, above: int = -1) -> None:
        for stream_id in [sid for sid in self._exchanges if sid > above]:
            self._exchanges.pop(stream_id).fail(error)
        self._wake()

    def _die(self, reason: str) -> None:
        if self._dead is None:
            self._dead = H2ConnectionLost(f"{self.authority}: {reason}")
        self._fail_all(self._dead)
        if self._scope is not None:
            self._scope.cancel()

    # --- the reader task ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send the connection preface, then read and dispatch until the connection ends.

        Always closes the stream on the way out; pending requests fail with
        :class:`H2ConnectionLost`.
        """
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                with trio.CancelScope() as scope:
                    self._scope = scope
                    self._h2.initiate_connection()
                    await self._flush()
                    task_status.started()
                    await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            self._die("connection closed")
            await trio.aclose_forcefully(self.stream)

    async def _read_loop(self) -> None:
        while True:
            try:
                data = await self.stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._die(f"connection broken ({exc.__cause__ or exc})")
                return
            if not data:
                self._die("server closed the connection")
                return
            try:
                events = self._h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self._die(f"HTTP/2 protocol error ({exc})")
                await self._flush_quietly()  # h2 queued a GOAWAY of its own
                return
            for event in events:
                self._on_event(event)
            try:
                await self._flush()
            except H2Error:
                return  # the write side broke: _flush has failed every request
            if self._closing and not self._exchanges:
                return  # GOAWAY and nothing left to wait for

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None:
                headers = [(str(k), str(v)) for k, v in event.headers]
                exchange.headers = [(k, v) for k, v in headers if k != ":status"]
                status = dict(headers).get(":status", "")
                exchange.status = int(status) if status.isdigit() else 0
        elif isinstance(event, h2.events.DataReceived):
            if event.flow_controlled_length:
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            exchange = self._exchanges.get(event.stream_id)
            if exchange is not None and event.data:
                exchange.body += event.data
                if len(exchange.body) > self.max_body:
                    self._finish(event.stream_id, H2Error(f"response over {self.max_body} bytes"))
                    self._h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.CANCEL)
        elif isinstance(event, h2.events.StreamEnded):
            self._finish(event.stream_id, None)
        elif isinstance(event, h2.events.StreamReset):
            code = event.error_code
            name = getattr(code, "name", str(code))
            error = H2StreamReset(f"{self.authority}: stream reset by the server ({name})", code)
            self._finish(event.stream_id, error)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._on_goaway(event)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_seen = True
            self._wake()
        elif isinstance(event, h2.events.WindowUpdated):
            self._wake()

    def _on_goaway(self, event: h2.events.ConnectionTerminated) -> None:
        code = int(event.error_code or 0)
        last = event.last_stream_id if event.last_stream_id is not None else 2**31
        self.goaway = (code, last)
        self._closing = True
        name = getattr(event.error_code, "name", str(code))
        self._fail_all(H2ConnectionLost(f"{self.authority}: GOAWAY ({name})"), above=last)
        # h2 takes no more frames after a GOAWAY: whatever is still open will not be answered
        self._fail_all(H2ConnectionLost(f"{self.authority}: GOAWAY ({name}) before the answer"))

    def _finish(self, stream_id: int, error: H2Error | None) -> None:
        exchange = self._exchanges.pop(stream_id, None)
        if exchange is not None:
            if error is not None:
                exchange.fail(error)
            else:
                exchange.done.set()
        self._wake()

    # --- writing ------------------------------------------------------------------------------

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._h2.data_to_send()
            if not data:
                return
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._die(f"send failed ({exc.__cause__ or exc!r})")
                raise (self._dead or H2ConnectionLost("send failed")) from exc
            except BaseException:
                # a partial write leaves the TLS record stream unusable, whatever interrupted it
                self._die("send interrupted")
                raise

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except H2Error:
            pass

    async def _wait_for_change(self) -> None:
        await self._changed.wait()
        if self._dead is not None:
            raise self._dead

    async def _open_stream(self) -> int:
        """A new stream ID, once the peer's concurrency limit leaves room for it."""
        while True:
            self._check_usable()
            limit = self._h2.remote_settings.max_concurrent_streams
            if not self._settings_seen:
                limit = min(limit, _ASSUMED_MAX_STREAMS)
            if self._h2.open_outbound_streams < limit:
                return self._h2.get_next_available_stream_id()
            await self._wait_for_change()

    def _check_usable(self) -> None:
        if self._dead is not None:
            raise self._dead
        if not self.usable:
            raise H2ConnectionLost(f"{self.authority}: connection is closing")

    async def _send_body(self, stream_id: int, body: bytes, exchange: _Exchange) -> None:
        view = memoryview(body)
        while view:
            if exchange.done.is_set():
                return  # reset or failed while we waited for window
            window = self._h2.local_flow_control_window(stream_id)
            if window <= 0:
                await self._wait_for_change()
                continue
            size = min(window, self._h2.max_outbound_frame_size, len(view))
            self._h2.send_data(stream_id, bytes(view[:size]), end_stream=size == len(view))
            view = view[size:]
            await self._flush()

    async def request(
        self,
        method: str,
        path: str,
        headers: Sequence[tuple[str, str]] = (),
        body: bytes = b"",
    ) -> tuple[int, Headers, bytes]:
        """Send one request and wait for the whole response: ``(status, headers, body)``.

        Raises :class:`H2StreamReset` or :class:`H2ConnectionLost` (see the module docstring).
        Cancelling the caller resets the stream.
        """
        stream_id = await self._open_stream()
        exchange = self._exchanges[stream_id] = _Exchange()
        request_headers = [
            (":method", method),
            (":scheme", self.scheme),
            (":authority", self.authority),
            (":path", path),
            *headers,
        ]
        if body:
            request_headers.append(("content-length", str(len(body))))
        try:
            try:
                self._h2.send_headers(stream_id, request_headers, end_stream=not body)
            except h2.exceptions.ProtocolError as exc:
                self._finish(stream_id, None)
                raise H2ConnectionLost(f"{self.authority}: cannot send ({exc})") from None
            await self._flush()
            if body:
                await self._send_body(stream_id, body, exchange)
            await exchange.done.wait()
        except BaseException:
            self._abandon(stream_id, exchange)
            raise
        if exchange.error is not None:
            raise exchange.error
        return exchange.status, exchange.headers, bytes(exchange.body)

    def _abandon(self, stream_id: int, exchange: _Exchange) -> None:
        """The caller gave up (cancelled) on a stream: reset it unless it already ended."""
        if self._exchanges.pop(stream_id, None) is None or self._dead is not None:
            return
        try:
            self._h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.ProtocolError:
            return
        exchange.fail(H2ConnectionLost("request abandoned"))
        self._wake()
        if self._nursery is not None:
            self._nursery.start_soon(self._flush_quietly)  # we may be inside a cancelled scope

    async def aclose(self) -> None:
        """Say GOAWAY, fail pending requests and close the stream."""
        if self._scope is None or self._dead is not None:
            await trio.lowlevel.checkpoint()
            if self._scope is not None:
                self._scope.cancel()
            return
        self._closing = True
        try:
            self._h2.close_connection()
        except h2.exceptions.ProtocolError:
            pass
        with trio.move_on_after(1) as scope:
            scope.shield = True
            try:
                await self._flush()
            except H2Error:
                pass
        self._die("closed by us")
