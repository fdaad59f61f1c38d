"""One end of a bridge session: handshake, then AEAD records carrying the stream multiplexer.

The usual sans-IO contract: feed carrier bytes to :meth:`BridgeConnection.receive_data` (any
chunking), act on the events, call the stream methods, and write :meth:`data_to_send` to the
carrier. Time and random bytes come in as arguments.

States move only along :data:`TRANSITIONS`: the handshake completes (OPEN), the server decides
the hello is not genuine or was cut short (REJECTED), the carrier ends cleanly between records
or the peer breaks the protocol (CLOSED).

``REJECTED`` is the server's "say nothing" decision: the connection swallows further input,
never produces bytes, and the I/O layer makes the carrier look innocent (nginx's own page, or a
drain followed by a close after a random delay). ``CLOSED`` after an error also drops every
queued byte, so a broken session never leaks plaintext or an error message onto the wire.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from proxy.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocols.bridge.frames import ResetCode
from proxy.protocols.bridge.handshake import (
    Accepted,
    BridgeLine,
    ClientHandshake,
    RandomSource,
    Rejected,
    ReplayCache,
    ServerHandshake,
    SessionKeys,
    padding_seed,
)
from proxy.protocols.bridge.mux import DEFAULT_MAX_STREAMS, Mux, MuxEvent, Role
from proxy.protocols.bridge.padding import PaddingShape
from proxy.protocols.bridge.records import REKEY_INTERVAL, RecordOpener, RecordSealer


class ConnectionState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    REJECTED = "rejected"
    CLOSED = "closed"


class Step(enum.Enum):
    KEYS_AGREED = "keys-agreed"  # the server accepted the hello / the client verified the answer
    HELLO_REJECTED = "hello-rejected"  # (server) not genuine, stale, replayed or truncated
    CLEAN_EOF = "clean-eof"  # the carrier ended between records
    BROKEN = "broken"  # the peer broke the protocol (RemoteProtocolError)


# Every allowed move; REJECTED and CLOSED are final. A step not listed here is our own bug.
TRANSITIONS: dict[tuple[ConnectionState, Step], ConnectionState] = {
    (ConnectionState.HANDSHAKE, Step.KEYS_AGREED): ConnectionState.OPEN,
    (ConnectionState.HANDSHAKE, Step.HELLO_REJECTED): ConnectionState.REJECTED,
    (ConnectionState.HANDSHAKE, Step.BROKEN): ConnectionState.CLOSED,
    (ConnectionState.OPEN, Step.CLEAN_EOF): ConnectionState.CLOSED,
    (ConnectionState.OPEN, Step.BROKEN): ConnectionState.CLOSED,
}


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    """Keys agreed; ``transcript_hash`` identifies the session (for logs and a session layer)."""

    transcript_hash: bytes


@dataclass(frozen=True, slots=True)
class HandshakeRejected:
    """(server) The hello was not genuine, stale or replayed: answer nothing. Local logs only."""

    reason: str


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """The carrier ended cleanly between records."""


Event = MuxEvent | HandshakeCompleted | HandshakeRejected | SessionEnded


class BridgeConnection:
    """A client or server end of a bridge session. Build it with :meth:`client`/:meth:`server`."""

    def __init__(
        self,
        role: Role,
        line: BridgeLine,
        rng: RandomSource,
        *,
        client: ClientHandshake | None = None,
        server: ServerHandshake | None = None,
        max_streams: int = DEFAULT_MAX_STREAMS,
        rekey_interval: int = REKEY_INTERVAL,
    ) -> None:
        self.role = role
        self.state = ConnectionState.HANDSHAKE
        self.mux = Mux(
            role, PaddingShape.from_seed(padding_seed(line)), rng, max_streams=max_streams
        )
        self._client = client
        self._server = server
        self._rekey_interval = rekey_interval
        self._sealer: RecordSealer | None = None
        self._opener: RecordOpener | None = None
        #: the agreed keys, once the handshake is over (a session layer derives its resumption
        #: secret from them), and how many record bytes arrived with the handshake's last message
        self.keys: SessionKeys | None = None
        self.handshake_trailing = 0
        self._outgoing = bytearray()

    @classmethod
    def client(
        cls, line: BridgeLine, *, rng: RandomSource, now: float, **options: int
    ) -> BridgeConnection:
        """A client end whose hello (stamped ``now``) is already queued in :meth:`data_to_send`.

        Streams may be opened at once; their frames leave when the handshake completes.
        """
        handshake = ClientHandshake(line, rng)
        conn = cls(Role.CLIENT, line, rng, client=handshake, **options)
        conn._outgoing += handshake.hello(now)
        return conn

    @classmethod
    def server(
        cls,
        line: BridgeLine,
        static_private: X25519PrivateKey,
        replay: ReplayCache,
        *,
        rng: RandomSource,
        **options: int,
    ) -> BridgeConnection:
        """A server end; ``replay`` is the one cache shared by every connection of the bridge."""
        handshake = ServerHandshake(line, static_private, replay, rng)
        return cls(Role.SERVER, line, rng, server=handshake, **options)

    # --------------------------------------------------------------------------------- input

    def receive_data(
        self, data: bytes | bytearray | memoryview, now: float | None = None
    ) -> list[Event]:
        """Feed carrier bytes. The server needs ``now`` (seconds since the epoch) for the hello.

        Raises ``RemoteProtocolError`` (and moves to CLOSED) when the peer breaks the protocol:
        a tampered, truncated, reordered or replayed record, a bad frame, a flow-control
        overrun. A rejected hello is not an error: it yields :class:`HandshakeRejected`.
        """
        if self.state is ConnectionState.REJECTED:
            return []
        if self.state is ConnectionState.CLOSED:
            raise RemoteProtocolError("bridge session is closed")
        try:
            if self.state is ConnectionState.HANDSHAKE:
                return self._receive_handshake(data, now)
            return self._receive_records(data)
        except RemoteProtocolError:
            self._move(Step.BROKEN)
            raise

    def receive_eof(self) -> list[Event]:
        """The carrier's peer closed its side."""
        if self.state is ConnectionState.REJECTED:
            return []
        if self.state is ConnectionState.CLOSED:
            return [SessionEnded()]
        if self.state is ConnectionState.HANDSHAKE:
            if self.role is Role.SERVER:
                self._move(Step.HELLO_REJECTED)
                return [HandshakeRejected("hello truncated")]
            self._move(Step.BROKEN)
            raise RemoteProtocolError(
                "bridge closed the connection during the handshake "
                "(wrong bridge line, or the bridge is blocked)"
            )
        try:
            self._keys_in_use()[1].receive_eof()
        except RemoteProtocolError:
            self._move(Step.BROKEN)
            raise
        self._move(Step.CLEAN_EOF)
        return [SessionEnded()]

    def _receive_handshake(self, data: bytes, now: float | None) -> list[Event]:
        if self._client is not None:
            keys = self._client.receive_data(data)
            if keys is None:
                return []
            return self._established(keys, self._client.trailing_data)
        if self._server is None:
            raise LocalProtocolError("a bridge connection needs a client or a server handshake")
        if now is None:
            raise LocalProtocolError("the server needs `now` to check the client hello")
        decision = self._server.receive_data(data, now)
        if isinstance(decision, Rejected):
            self._move(Step.HELLO_REJECTED)
            return [HandshakeRejected(decision.reason)]
        if isinstance(decision, Accepted):
            self._outgoing += decision.reply
            return self._established(decision.keys, self._server.trailing_data)
        return []

    def _established(self, keys: SessionKeys, trailing: bytes) -> list[Event]:
        interval = self._rekey_interval
        self._sealer = RecordSealer(keys.send_key, keys.send_length_key, rekey_interval=interval)
        self._opener = RecordOpener(
            keys.receive_key, keys.receive_length_key, rekey_interval=interval
        )
        self._move(Step.KEYS_AGREED)
        self.keys = keys
        self.handshake_trailing = len(trailing)
        events: list[Event] = [HandshakeCompleted(keys.transcript_hash)]
        if trailing:
            events += self._receive_records(trailing)
        return events

    def _receive_records(self, data: bytes | bytearray | memoryview) -> list[Event]:
        events: list[Event] = []
        for plaintext in self._keys_in_use()[1].receive_data(data):
            events += self.mux.receive_record(plaintext)
        return events

    # -------------------------------------------------------------------------------- output

    def records_to_send(self) -> list[bytes]:
        """Sealed records now due, one per item (the seam for a session layer, which numbers
        and acknowledges whole records). Empty until the handshake is complete."""
        if self.state is not ConnectionState.OPEN or self._sealer is None:
            return []
        seal = self._sealer.seal
        return [seal(plaintext) for plaintext in self.mux.records_to_send()]

    @property
    def has_data_to_send(self) -> bool:
        """:meth:`data_to_send` would return bytes (a writer need not wake up otherwise)."""
        if self.state in (ConnectionState.REJECTED, ConnectionState.CLOSED):
            return False
        return bool(self._outgoing) or (self.state is ConnectionState.OPEN and self.mux.has_queued)

    def data_to_send(self) -> bytes | bytearray:
        """Bytes to write to the carrier now: the handshake message, then sealed records (a
        new buffer each call, the caller's to keep)."""
        if self.state in (ConnectionState.REJECTED, ConnectionState.CLOSED):
            return b""
        out = self._outgoing
        self._outgoing = bytearray()
        if self.state is ConnectionState.OPEN and self._sealer is not None:
            records = self.mux.records_to_send()
            if records:
                sealed = self._sealer.seal_all(records)  # one buffer for every record
                if not out:
                    return sealed  # handed over as it is: bulk data is not copied again
                out += sealed
        return bytes(out)

    # ------------------------------------------------------------------ streams (see Mux)

    def open_stream(self, host: str, port: int) -> int:
        self._check_usable()
        return self.mux.open_stream(host, port)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> None:
        self._check_usable()
        self.mux.send_data(stream_id, data)

    def end_stream(self, stream_id: int) -> None:
        self._check_usable()
        self.mux.end_stream(stream_id)

    def reset_stream(self, stream_id: int, code: ResetCode = ResetCode.CANCEL) -> None:
        self._check_usable()
        self.mux.reset_stream(stream_id, code)

    def acknowledge_data(self, stream_id: int, amount: int) -> None:
        self._check_usable()
        self.mux.acknowledge_data(stream_id, amount)

    def send_window(self, stream_id: int) -> int:
        return self.mux.send_window(stream_id)

    def ping(self, opaque: bytes) -> None:
        self._check_usable()
        self.mux.ping(opaque)

    def send_padding(self, size: int) -> None:
        self._check_usable()
        self.mux.send_padding(size)

    def _check_usable(self) -> None:
        if self.state in (ConnectionState.REJECTED, ConnectionState.CLOSED):
            raise LocalProtocolError(f"bridge session is {self.state.value}")

    def _keys_in_use(self) -> tuple[RecordSealer, RecordOpener]:
        if self._sealer is None or self._opener is None:
            raise LocalProtocolError("the bridge session has no keys yet")
        return self._sealer, self._opener

    def _move(self, step: Step) -> None:
        new = TRANSITIONS.get((self.state, step))
        if new is None:
            raise LocalProtocolError(f"bridge connection cannot take {step.value} in {self.state}")
        self.state = new
        if new in (ConnectionState.REJECTED, ConnectionState.CLOSED):
            self._outgoing.clear()  # nothing may leave a rejected or broken session
            self.mux.discard_outgoing()
