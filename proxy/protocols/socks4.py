"""SOCKS4 and SOCKS4a, server side, without any I/O.

A SOCKS4 request is ``VN=4 CD DSTPORT DSTIP USERID NUL``; SOCKS4a signals a name with a DSTIP of
``0.0.0.x`` (x != 0) and appends ``DOMAIN NUL`` after the user id. The reply is eight bytes:
``0 CD DSTPORT DSTIP`` with CD 0x5A (granted) or 0x5B (rejected or failed).

Same contract as :mod:`proxy.protocols.socks5`: ``receive_data`` returns events, ``send`` queues
the reply, ``data_to_send`` drains it, ``trailing_data`` keeps whatever the client sent after its
request. Bad input raises :class:`~proxy.errors.RemoteProtocolError`; when a reply is still
meaningful (an unknown command, an over-long user id or name) a 0x5B reply is already queued, so
the I/O layer flushes ``data_to_send()`` once and closes.

SOCKS4 has no authentication. The user id is reported but proves nothing, so an inbound that
requires a password must answer every SOCKS4 request with ``Reply(ReplyCode.REJECTED)``: that is
the I/O layer's job (:func:`proxy.inbound.socks.handle_socks4`).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

from proxy.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocols.socks5 import decode_domain

VERSION = 0x04
#: longest user id and SOCKS4a domain we accept, without the terminating NUL
MAX_USERID = 255
MAX_DOMAIN = 255
#: the most bytes kept buffered (one request is at most 8 + 256 + 256 bytes; the rest is
#: pipelined payload from one read)
MAX_BUFFER = 128 * 1024


class ServerState(enum.Enum):
    WAIT_REQUEST = "wait-request"
    WAIT_REPLY = "wait-reply"  # CommandRequested emitted, waiting for Reply
    ESTABLISHED = "established"  # granted; the rest is payload
    CLOSED = "closed"


class Step(enum.Enum):
    REQUEST = "request"
    REPLY_OK = "reply-ok"
    REPLY_FAILED = "reply-failed"


# Every allowed move; anything else raises (RemoteProtocolError for the peer's input,
# LocalProtocolError for ours) and leaves the connection CLOSED.
TRANSITIONS: dict[tuple[ServerState, Step], ServerState] = {
    (ServerState.WAIT_REQUEST, Step.REQUEST): ServerState.WAIT_REPLY,
    (ServerState.WAIT_REPLY, Step.REPLY_OK): ServerState.ESTABLISHED,
    (ServerState.WAIT_REPLY, Step.REPLY_FAILED): ServerState.CLOSED,
}


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02


class ReplyCode(enum.IntEnum):
    GRANTED = 0x5A
    REJECTED = 0x5B
    IDENTD_UNREACHABLE = 0x5C
    IDENTD_MISMATCH = 0x5D


@dataclass(frozen=True, slots=True)
class CommandRequested:
    """A CONNECT or BIND request. ``host`` is an IPv4 literal, or a domain for SOCKS4a."""

    command: Command
    host: str
    port: int
    userid: str


@dataclass(frozen=True, slots=True)
class Reply:
    """Our answer; only an IPv4 ``bind_host`` can be expressed (others are sent as zeros)."""

    code: ReplyCode
    bind_host: str = "0.0.0.0"
    bind_port: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The client closed its sending side."""


Event = CommandRequested | Reply | ConnectionClosed

_COMMANDS = frozenset(int(c) for c in Command)


def build_reply(code: ReplyCode, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    """The eight-byte SOCKS4 reply."""
    try:
        ip = ipaddress.IPv4Address(bind_host)
    except ValueError:
        ip, bind_port = ipaddress.IPv4Address(0), 0
    if not 0 <= bind_port <= 0xFFFF:
        raise LocalProtocolError(f"port {bind_port} out of range")
    return bytes([0, code]) + bind_port.to_bytes(2, "big") + ip.packed


def parse_reply(data: bytes) -> Reply | None:
    """Parse a reply (client side); None until eight bytes are there. Extra bytes are ignored."""
    if len(data) < 8:
        return None
    if data[0] != 0:
        raise RemoteProtocolError(f"bad SOCKS4 reply version 0x{data[0]:02x}")
    try:
        code = ReplyCode(data[1])
    except ValueError:
        raise RemoteProtocolError(f"unknown SOCKS4 reply code 0x{data[1]:02x}") from None
    port = int.from_bytes(data[2:4], "big")
    return Reply(code, str(ipaddress.IPv4Address(bytes(data[4:8]))), port)


def build_request(command: Command, host: str, port: int, userid: str = "") -> bytes:
    """A SOCKS4 request, or SOCKS4a when ``host`` is not an IPv4 literal (client side)."""
    user = userid.encode()
    if b"\0" in user or len(user) > MAX_USERID:
        raise LocalProtocolError("SOCKS4 user id must be at most 255 bytes without NUL")
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port {port} out of range")
    head = bytes([VERSION, command]) + port.to_bytes(2, "big")
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        if ip.packed[:3] == b"\0\0\0" and ip.packed[3] != 0:
            raise LocalProtocolError(f"{host} means 'a name follows' in SOCKS4a")
        return head + ip.packed + user + b"\0"
    name = host.encode("idna") if not host.isascii() else host.encode()
    try:
        decode_domain(name)
    except RemoteProtocolError as exc:
        raise LocalProtocolError(f"cannot send host {host!r}: {exc}") from None
    return head + bytes([0, 0, 0, 1]) + user + b"\0" + name + b"\0"


class Socks4ServerConnection:
    """Server side of SOCKS4/4a. No I/O.

    Emits one :class:`CommandRequested`; answer it with ``send(Reply(...))``.
    """

    def __init__(self) -> None:
        self._state = ServerState.WAIT_REQUEST
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._received_any = False

    @property
    def state(self) -> ServerState:
        return self._state

    @property
    def trailing_data(self) -> bytes:
        """Bytes received but not consumed: after the request, the first payload bytes."""
        return bytes(self._buffer)

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; returns the request once it is complete."""
        if self._state is ServerState.CLOSED:
            raise LocalProtocolError("receive_data() on a closed SOCKS4 connection")
        if len(self._buffer) + len(data) > MAX_BUFFER:
            self._state = ServerState.CLOSED
            raise RemoteProtocolError(f"client sent more than {MAX_BUFFER} bytes unasked")
        self._buffer += data
        self._received_any = self._received_any or bool(data)
        if self._state is not ServerState.WAIT_REQUEST:
            return []
        request = self._parse_request()
        if request is None:
            return []
        self._state = TRANSITIONS[(self._state, Step.REQUEST)]
        return [request]

    def receive_eof(self) -> list[Event]:
        """The client closed its sending side."""
        if self._state is ServerState.WAIT_REQUEST and self._received_any:
            self._state = ServerState.CLOSED
            raise RemoteProtocolError("client closed the connection during the SOCKS4 request")
        return [ConnectionClosed()]

    def send(self, event: Event) -> None:
        """Queue the reply to the request."""
        if not isinstance(event, Reply):
            raise LocalProtocolError(f"a SOCKS4 server cannot send {type(event).__name__}")
        step = Step.REPLY_OK if event.code == ReplyCode.GRANTED else Step.REPLY_FAILED
        if (self._state, step) not in TRANSITIONS:
            raise LocalProtocolError(f"cannot send {event!r} in state {self._state.name}")
        self._outgoing += build_reply(event.code, event.bind_host, event.bind_port)
        self._state = TRANSITIONS[(self._state, step)]

    def _reject(self, message: str, *, reply: bool = True) -> RemoteProtocolError:
        if reply:
            self._outgoing += build_reply(ReplyCode.REJECTED)
        self._state = ServerState.CLOSED
        return RemoteProtocolError(message, reply_code=ReplyCode.REJECTED if reply else None)

    def _parse_request(self) -> CommandRequested | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != VERSION:
            raise self._reject(f"not SOCKS4 (version byte 0x{buf[0]:02x})", reply=False)
        if len(buf) < 2:
            return None
        if buf[1] not in _COMMANDS:
            raise self._reject(f"unknown SOCKS4 command 0x{buf[1]:02x}")
        userid_end = self._find_nul(8, MAX_USERID, "user id")
        if userid_end is None:
            return None
        ip = ipaddress.IPv4Address(bytes(buf[4:8]))
        host = str(ip)
        end = userid_end + 1
        if ip.packed[:3] == b"\0\0\0" and ip.packed[3] != 0:  # SOCKS4a: a name follows
            domain_end = self._find_nul(end, MAX_DOMAIN, "domain name")
            if domain_end is None:
                return None
            try:
                host = decode_domain(bytes(buf[end:domain_end]), reply_code=ReplyCode.REJECTED)
            except RemoteProtocolError as exc:
                raise self._reject(str(exc)) from None
            end = domain_end + 1
        port = int.from_bytes(buf[2:4], "big")
        userid = bytes(buf[8:userid_end]).decode("utf-8", errors="replace")
        command = Command(buf[1])
        del buf[:end]
        return CommandRequested(command, host, port, userid)

    def _find_nul(self, start: int, limit: int, what: str) -> int | None:
        """Index of the NUL ending a field that starts at ``start``; None if not there yet."""
        index = self._buffer.find(0, start, start + limit + 1)
        if index >= 0:
            return index
        if len(self._buffer) > start + limit:
            raise self._reject(f"SOCKS4 {what} longer than {limit} bytes")
        return None
