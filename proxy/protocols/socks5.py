"""SOCKS5 (RFC 1928) with username/password authentication (RFC 1929), without any I/O.

Both ends are here: :class:`Socks5ServerConnection` for our inbound and
:class:`Socks5ClientConnection` for talking to an upstream SOCKS5 proxy (and for wiring the two
back to back in tests), plus the header codec of UDP ASSOCIATE datagrams.

The contract is the usual sans-IO one: feed bytes with ``receive_data`` (any split is fine, one
read is never assumed to be one message), act on the returned events, answer with ``send``, and
write out whatever ``data_to_send`` returns. Bytes that follow the handshake are kept in
``trailing_data``: they are usually the client's TLS ClientHello and must reach the upstream.

Errors: input that breaks the protocol raises :class:`~proxy.errors.RemoteProtocolError` and
moves the connection to ``CLOSED``. When the protocol still allows an answer (a method rejection,
a SOCKS reply to a bad request) that answer is already queued, so the I/O layer's rule is simply:
on ``RemoteProtocolError`` flush ``data_to_send()`` once, then close. ``error.reply_code`` repeats
the SOCKS reply code that was queued (``None`` when no reply was possible). Calling ``send`` with
an event the current state does not allow raises :class:`~proxy.errors.LocalProtocolError`.
"""

from __future__ import annotations

import abc
import enum
import functools
import ipaddress
import re
from dataclasses import dataclass, field

from proxy.errors import (
    ConnectRefused,
    ConnectTimeout,
    LocalProtocolError,
    NotAllowed,
    RemoteProtocolError,
    ResolveError,
    Unreachable,
)

VERSION = 0x05
AUTH_VERSION = 0x01
#: the most bytes either connection keeps buffered; a handshake message is at most 513 bytes,
#: the rest allows for pipelined data after the request (one 64 KiB read plus change)
MAX_BUFFER = 128 * 1024


class ServerState(enum.Enum):
    WAIT_METHODS = "wait-methods"  # waiting for the client's greeting
    WAIT_CREDENTIALS = "wait-credentials"  # username/password chosen, waiting for them
    WAIT_AUTH_RESULT = "wait-auth-result"  # CredentialsReceived emitted, waiting for AuthResult
    WAIT_REQUEST = "wait-request"  # waiting for CONNECT / BIND / UDP ASSOCIATE
    WAIT_REPLY = "wait-reply"  # CommandRequested emitted, waiting for Reply
    ESTABLISHED = "established"  # success reply sent; the rest is payload
    CLOSED = "closed"  # rejected, failed or broken: only data_to_send() is still useful

    # members are singletons compared by identity: hash them the same way, in C (the
    # transition tables are looked up with them on every message)
    __hash__ = object.__hash__


class ClientState(enum.Enum):
    WAIT_METHOD = "wait-method"  # greeting queued, waiting for the server's choice
    WAIT_AUTH_STATUS = "wait-auth-status"  # credentials queued, waiting for the verdict
    READY = "ready"  # may send a CommandRequested
    WAIT_REPLY = "wait-reply"  # request queued, waiting for the reply
    ESTABLISHED = "established"
    CLOSED = "closed"

    # members are singletons compared by identity: hash them the same way, in C (the
    # transition tables are looked up with them on every message)
    __hash__ = object.__hash__


class Step(enum.Enum):
    """What moves a connection from one state to the next (received or sent)."""

    METHOD_NO_AUTH = "method-no-auth"
    METHOD_USERPASS = "method-userpass"
    METHOD_REJECTED = "method-rejected"
    CREDENTIALS = "credentials"
    AUTH_OK = "auth-ok"
    AUTH_FAILED = "auth-failed"
    REQUEST = "request"
    REPLY_OK = "reply-ok"
    REPLY_FAILED = "reply-failed"

    # members are singletons compared by identity: hash them the same way, in C (the
    # transition tables are looked up with them on every message)
    __hash__ = object.__hash__


# Every allowed move. Anything else is an error: input the peer sends in a state not listed here
# raises RemoteProtocolError, an event we send in such a state raises LocalProtocolError, and
# either way the connection ends in CLOSED.
SERVER_TRANSITIONS: dict[tuple[ServerState, Step], ServerState] = {
    (ServerState.WAIT_METHODS, Step.METHOD_NO_AUTH): ServerState.WAIT_REQUEST,
    (ServerState.WAIT_METHODS, Step.METHOD_USERPASS): ServerState.WAIT_CREDENTIALS,
    (ServerState.WAIT_METHODS, Step.METHOD_REJECTED): ServerState.CLOSED,
    (ServerState.WAIT_CREDENTIALS, Step.CREDENTIALS): ServerState.WAIT_AUTH_RESULT,
    (ServerState.WAIT_AUTH_RESULT, Step.AUTH_OK): ServerState.WAIT_REQUEST,
    (ServerState.WAIT_AUTH_RESULT, Step.AUTH_FAILED): ServerState.CLOSED,
    (ServerState.WAIT_REQUEST, Step.REQUEST): ServerState.WAIT_REPLY,
    (ServerState.WAIT_REPLY, Step.REPLY_OK): ServerState.ESTABLISHED,
    (ServerState.WAIT_REPLY, Step.REPLY_FAILED): ServerState.CLOSED,
}

CLIENT_TRANSITIONS: dict[tuple[ClientState, Step], ClientState] = {
    (ClientState.WAIT_METHOD, Step.METHOD_NO_AUTH): ClientState.READY,
    (ClientState.WAIT_METHOD, Step.METHOD_USERPASS): ClientState.WAIT_AUTH_STATUS,
    (ClientState.WAIT_METHOD, Step.METHOD_REJECTED): ClientState.CLOSED,
    (ClientState.WAIT_AUTH_STATUS, Step.AUTH_OK): ClientState.READY,
    (ClientState.WAIT_AUTH_STATUS, Step.AUTH_FAILED): ClientState.CLOSED,
    (ClientState.READY, Step.REQUEST): ClientState.WAIT_REPLY,
    (ClientState.WAIT_REPLY, Step.REPLY_OK): ClientState.ESTABLISHED,
    (ClientState.WAIT_REPLY, Step.REPLY_FAILED): ClientState.CLOSED,
}


class Method(enum.IntEnum):
    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(enum.IntEnum):
    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class ReplyCode(enum.IntEnum):
    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


# ---------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class MethodSelected:
    """(client side) The server chose ``method``; NO_ACCEPTABLE means it refused us."""

    method: Method


@dataclass(frozen=True, slots=True)
class CredentialsReceived:
    """(server side) The client's RFC 1929 username and password; answer with AuthResult.

    Bytes that are not UTF-8 are decoded with U+FFFD replacements.
    """

    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class AuthResult:
    """Verdict on the credentials: sent by the server, received by the client."""

    ok: bool


@dataclass(frozen=True, slots=True)
class CommandRequested:
    """A CONNECT / BIND / UDP ASSOCIATE request: received by the server, sent by the client.

    ``host`` is an IP literal (IPv6 compressed) or an ASCII domain name (IDNs as punycode).
    """

    command: Command
    host: str
    port: int
    address_type: AddressType


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer to a request: sent by the server, received by the client."""

    code: ReplyCode
    bind_host: str = "0.0.0.0"
    bind_port: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its sending side."""


Event = (
    MethodSelected | CredentialsReceived | AuthResult | CommandRequested | Reply | ConnectionClosed
)


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One UDP ASSOCIATE datagram: header fields and the payload."""

    frag: int
    host: str
    port: int
    payload: bytes


# ------------------------------------------------------------------------------- address codec

_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
_COMMANDS = {int(c): c for c in Command}
#: ATYP byte -> address type (a dict lookup is cheaper than calling the enum)
_ADDRESS_TYPES = {int(t): t for t in AddressType}


def decode_domain(raw: bytes, *, reply_code: int | None = None) -> str:
    """Validate a domain name from the wire and return it as ASCII.

    Accepts letters, digits, ``-`` and ``_`` in dot-separated labels (a trailing dot is fine),
    IP literals written as names, and UTF-8 IDNs (converted to punycode). Anything else raises
    ``RemoteProtocolError`` carrying ``reply_code``.
    """
    if not 1 <= len(raw) <= 255:
        raise RemoteProtocolError("domain name must be 1-255 bytes", reply_code=reply_code)
    if raw.isascii():
        text = raw.decode("ascii")
    else:
        try:
            text = raw.decode("utf-8").encode("idna").decode("ascii")
        except UnicodeError:
            raise RemoteProtocolError("domain name is not valid", reply_code=reply_code) from None
        if len(text) > 255:
            raise RemoteProtocolError("domain name is too long", reply_code=reply_code)
    literal = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        ipaddress.ip_address(literal)
        return text
    except ValueError:
        pass
    labels = text[:-1].split(".") if text.endswith(".") and len(text) > 1 else text.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise RemoteProtocolError(f"domain name {text[:64]!r} is not valid", reply_code=reply_code)
    return text


@functools.lru_cache(maxsize=1024)
def _packed_ip(host: str) -> bytes | None:
    """``host`` as 4 or 16 packed bytes when it is an IP literal (cached: replies repeat the
    same few bound addresses), else ``None``."""
    try:
        return ipaddress.ip_address(host).packed
    except ValueError:
        return None


def address_type_of(host: str) -> AddressType:
    """The SOCKS5 address type that ``host`` is sent as."""
    packed = _packed_ip(host)
    if packed is None:
        return AddressType.DOMAIN
    return AddressType.IPV4 if len(packed) == 4 else AddressType.IPV6


def encode_address(host: str, port: int, address_type: AddressType | None = None) -> bytes:
    """ATYP, address and port as they appear in requests, replies and UDP headers."""
    if not 0 <= port <= 0xFFFF:
        raise LocalProtocolError(f"port {port} out of range")
    kind = address_type_of(host) if address_type is None else address_type
    if kind is AddressType.DOMAIN:
        try:
            name = host.encode("ascii")
        except UnicodeEncodeError:
            try:
                name = host.encode("idna")
            except UnicodeError:
                raise LocalProtocolError(f"cannot encode host {host!r}") from None
        try:
            decode_domain(name)
        except RemoteProtocolError as exc:
            raise LocalProtocolError(f"cannot send host {host!r}: {exc}") from None
        return bytes([kind, len(name)]) + name + port.to_bytes(2, "big")
    packed = _packed_ip(host)
    if packed is None:
        raise LocalProtocolError(f"{host!r} is not an IP address")
    if (len(packed) == 4) != (kind is AddressType.IPV4):
        raise LocalProtocolError(f"{host!r} does not match address type {kind.name}")
    return bytes([kind]) + packed + port.to_bytes(2, "big")


def _parse_address(buf: bytes | bytearray, pos: int) -> tuple[AddressType, str, int, int] | None:
    """Parse ATYP/address/port at ``pos``: (type, host, port, end), or None if incomplete."""
    if len(buf) <= pos:
        return None
    atyp = buf[pos]
    if atyp == AddressType.IPV4:
        end = pos + 1 + 4
        if len(buf) < end + 2:
            return None
        host = "%d.%d.%d.%d" % tuple(buf[pos + 1 : end])  # noqa: UP031 (one C call)
    elif atyp == AddressType.IPV6:
        end = pos + 1 + 16
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[pos + 1 : end])))
    elif atyp == AddressType.DOMAIN:
        if len(buf) <= pos + 1:
            return None
        end = pos + 2 + buf[pos + 1]
        if len(buf) < end + 2:
            return None
        host = decode_domain(bytes(buf[pos + 2 : end]), reply_code=ReplyCode.GENERAL_FAILURE)
    else:
        raise RemoteProtocolError(
            f"unknown address type 0x{atyp:02x}", reply_code=ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
        )
    port = int.from_bytes(buf[end : end + 2], "big")
    return _ADDRESS_TYPES[atyp], host, port, end + 2


@functools.lru_cache(maxsize=256)
def build_reply(code: ReplyCode, bind_host: str = "0.0.0.0", bind_port: int = 0) -> bytes:
    """A complete SOCKS5 reply message. A scoped IPv6 bind address loses its ``%scope``.
    (Cached: a server sends the same few replies over and over.)"""
    return bytes([VERSION, code, 0]) + encode_address(bind_host.split("%", 1)[0], bind_port)


def parse_udp_datagram(data: bytes) -> UdpDatagram:
    """Split a UDP ASSOCIATE datagram into header fields and payload."""
    if len(data) < 4:
        raise RemoteProtocolError("UDP datagram shorter than its header")
    try:
        parsed = _parse_address(data, 3)
    except RemoteProtocolError as exc:
        raise RemoteProtocolError(f"UDP datagram: {exc}") from None
    if parsed is None:
        raise RemoteProtocolError("UDP datagram truncated inside its header")
    _, host, port, end = parsed
    return UdpDatagram(frag=data[2], host=host, port=port, payload=bytes(data[end:]))


def build_udp_datagram(host: str, port: int, payload: bytes, *, frag: int = 0) -> bytes:
    """Wrap ``payload`` in a UDP ASSOCIATE header naming ``host:port``."""
    if not 0 <= frag <= 0xFF:
        raise LocalProtocolError(f"fragment number {frag} out of range")
    return bytes([0, 0, frag]) + encode_address(host.split("%", 1)[0], port) + payload


def reply_code_for(error: BaseException) -> ReplyCode:
    """The SOCKS5 reply code that tells a client why ``error`` happened."""
    if isinstance(error, RemoteProtocolError) and error.reply_code is not None:
        try:
            return ReplyCode(error.reply_code)
        except ValueError:
            return ReplyCode.GENERAL_FAILURE
    if isinstance(error, ConnectRefused):
        return ReplyCode.CONNECTION_REFUSED
    if isinstance(error, ConnectTimeout | ResolveError):
        return ReplyCode.HOST_UNREACHABLE
    if isinstance(error, Unreachable):
        return ReplyCode.NETWORK_UNREACHABLE
    if isinstance(error, NotAllowed):
        return ReplyCode.NOT_ALLOWED
    return ReplyCode.GENERAL_FAILURE


# ---------------------------------------------------------------------------------- connections


class _Connection(abc.ABC):
    """Buffering, bounds and data_to_send shared by both roles."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._outgoing = bytearray()

    def data_to_send(self) -> bytes:
        """Bytes to write to the peer (and forget)."""
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    @property
    def trailing_data(self) -> bytes:
        """Bytes received but not consumed by the handshake.

        Once the request (server) or the reply (client) has been parsed, these are the first
        payload bytes of the tunnel; they are kept until the I/O layer picks them up.
        """
        return bytes(self._buffer)

    def _take(self, n: int) -> bytes:
        chunk = bytes(self._buffer[:n])
        del self._buffer[:n]
        return chunk

    def _append(self, data: bytes) -> None:
        if len(self._buffer) + len(data) > MAX_BUFFER:
            self._close()
            raise RemoteProtocolError(f"peer sent more than {MAX_BUFFER} bytes unasked")
        self._buffer += data

    @abc.abstractmethod
    def _close(self) -> None:
        """Move to this role's CLOSED state."""


class Socks5ServerConnection(_Connection):
    """Server side of SOCKS5 with RFC 1929 username/password authentication. No I/O.

    With ``require_auth`` the server only accepts method 0x02 and emits
    :class:`CredentialsReceived`, which the I/O layer answers with ``send(AuthResult(ok))``;
    without it only 0x00 is accepted. After :class:`CommandRequested` the I/O layer answers with
    ``send(Reply(...))``. After any ``send``, call ``receive_data(b"")`` to parse bytes that the
    client pipelined while we were deciding.
    """

    def __init__(self, *, require_auth: bool) -> None:
        super().__init__()
        self.require_auth = require_auth
        self._state = ServerState.WAIT_METHODS
        self._received_any = False

    @property
    def state(self) -> ServerState:
        return self._state

    def _close(self) -> None:
        self._state = ServerState.CLOSED

    def _move(self, step: Step) -> None:
        self._state = SERVER_TRANSITIONS[(self._state, step)]

    def _reject(self, message: str, reply_code: ReplyCode | None) -> RemoteProtocolError:
        """Queue the SOCKS reply (if any), close, and return the error to raise."""
        if reply_code is not None and self._state is ServerState.WAIT_REQUEST:
            self._outgoing += build_reply(reply_code)
        else:
            reply_code = None
        self._close()
        return RemoteProtocolError(message, reply_code=reply_code)

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the client; returns the events that became complete."""
        if self._state is ServerState.CLOSED:
            raise LocalProtocolError("receive_data() on a closed SOCKS5 connection")
        self._append(data)
        self._received_any = self._received_any or bool(data)
        events: list[Event] = []
        while True:
            if self._state is ServerState.WAIT_METHODS:
                progressed = self._parse_greeting()
            elif self._state is ServerState.WAIT_CREDENTIALS:
                progressed = self._parse_credentials(events)
            elif self._state is ServerState.WAIT_REQUEST:
                progressed = self._parse_request(events)
            else:
                break
            if not progressed:
                break
        return events

    def receive_eof(self) -> list[Event]:
        """The client closed its sending side."""
        parsing = (ServerState.WAIT_METHODS, ServerState.WAIT_CREDENTIALS, ServerState.WAIT_REQUEST)
        if self._state in parsing and (self._received_any or self._state is not parsing[0]):
            self._close()
            raise RemoteProtocolError("client closed the connection during the SOCKS5 handshake")
        return [ConnectionClosed()]

    def send(self, event: Event) -> None:
        """Queue our answer: ``AuthResult`` after credentials, ``Reply`` after a request."""
        if isinstance(event, AuthResult):
            step = Step.AUTH_OK if event.ok else Step.AUTH_FAILED
            wire = bytes([AUTH_VERSION, 0x00 if event.ok else 0x01])
        elif isinstance(event, Reply):
            step = Step.REPLY_OK if event.code == ReplyCode.SUCCEEDED else Step.REPLY_FAILED
            wire = b""
        else:
            raise LocalProtocolError(f"a SOCKS5 server cannot send {type(event).__name__}")
        if (self._state, step) not in SERVER_TRANSITIONS:
            raise LocalProtocolError(f"cannot send {event!r} in state {self._state.name}")
        if isinstance(event, Reply):
            wire = build_reply(event.code, event.bind_host, event.bind_port)
        self._outgoing += wire
        self._move(step)

    def _parse_greeting(self) -> bool:
        buf = self._buffer
        if not buf:
            return False
        if buf[0] != VERSION:
            raise self._reject(f"not SOCKS5 (version byte 0x{buf[0]:02x})", None)
        if len(buf) < 2 or len(buf) < 2 + buf[1]:
            return False
        offered = set(self._take(2 + buf[1])[2:])
        wanted = Method.USERNAME_PASSWORD if self.require_auth else Method.NO_AUTH
        if wanted not in offered:
            self._outgoing += bytes([VERSION, Method.NO_ACCEPTABLE])
            self._move(Step.METHOD_REJECTED)
            raise RemoteProtocolError(
                f"client offered no acceptable method (needed 0x{wanted:02x})", reply_code=None
            )
        self._outgoing += bytes([VERSION, wanted])
        self._move(Step.METHOD_USERPASS if self.require_auth else Step.METHOD_NO_AUTH)
        return True

    def _parse_credentials(self, events: list[Event]) -> bool:
        buf = self._buffer
        if not buf:
            return False
        if buf[0] != AUTH_VERSION:
            raise self._reject(f"bad username/password version 0x{buf[0]:02x}", None)
        if len(buf) < 2:
            return False
        ulen = buf[1]
        if len(buf) < 3 + ulen:
            return False
        plen = buf[2 + ulen]
        if len(buf) < 3 + ulen + plen:
            return False
        message = self._take(3 + ulen + plen)
        username = message[2 : 2 + ulen].decode("utf-8", errors="replace")
        password = message[3 + ulen :].decode("utf-8", errors="replace")
        events.append(CredentialsReceived(username, password))
        self._move(Step.CREDENTIALS)
        return True

    def _parse_request(self, events: list[Event]) -> bool:
        buf = self._buffer
        if not buf:
            return False
        if buf[0] != VERSION:
            raise self._reject(f"bad request version 0x{buf[0]:02x}", None)
        if len(buf) < 2:
            return False
        if buf[1] not in _COMMANDS:
            raise self._reject(f"unknown command 0x{buf[1]:02x}", ReplyCode.COMMAND_NOT_SUPPORTED)
        # buf[2] is reserved; some clients put junk there, so it is not checked
        try:
            parsed = _parse_address(buf, 3)
        except RemoteProtocolError as exc:
            raise self._reject(str(exc), ReplyCode(exc.reply_code or 1)) from None
        if parsed is None:
            return False
        atyp, host, port, end = parsed
        command = _COMMANDS[buf[1]]
        self._take(end)
        events.append(CommandRequested(command, host, port, atyp))
        self._move(Step.REQUEST)
        return True


class Socks5ClientConnection(_Connection):
    """Client side of SOCKS5. No I/O.

    The greeting is queued at construction. Offers NO_AUTH, plus USERNAME_PASSWORD when a
    ``username`` is given. Emits :class:`MethodSelected`, then :class:`AuthResult` if the server
    asked for credentials; once ``state`` is READY, ``send(CommandRequested(...))``; the
    :class:`Reply` follows. A refusal (method 0xFF, failed auth, failed reply) is an event, not
    an exception, and leaves the connection CLOSED.
    """

    def __init__(self, *, username: str | None = None, password: str | None = None) -> None:
        super().__init__()
        self._credentials: bytes | None = None
        methods = [Method.NO_AUTH]
        if username is not None:
            user, secret = username.encode(), (password or "").encode()
            if len(user) > 255 or len(secret) > 255:
                raise LocalProtocolError("SOCKS5 username and password are limited to 255 bytes")
            self._credentials = (
                bytes([AUTH_VERSION, len(user)]) + user + bytes([len(secret)]) + secret
            )
            methods.append(Method.USERNAME_PASSWORD)
        self._outgoing += bytes([VERSION, len(methods), *methods])
        self._state = ClientState.WAIT_METHOD

    @property
    def state(self) -> ClientState:
        return self._state

    def _close(self) -> None:
        self._state = ClientState.CLOSED

    def _move(self, step: Step) -> None:
        self._state = CLIENT_TRANSITIONS[(self._state, step)]

    def _fail(self, message: str) -> RemoteProtocolError:
        self._close()
        return RemoteProtocolError(message)

    def send(self, event: Event) -> None:
        """Queue a request (allowed in READY)."""
        if not isinstance(event, CommandRequested):
            raise LocalProtocolError(f"a SOCKS5 client cannot send {type(event).__name__}")
        if (self._state, Step.REQUEST) not in CLIENT_TRANSITIONS:
            raise LocalProtocolError(f"cannot send a request in state {self._state.name}")
        address = encode_address(event.host, event.port, event.address_type)
        self._outgoing += bytes([VERSION, event.command, 0]) + address
        self._move(Step.REQUEST)

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the server; returns the events that became complete."""
        if self._state is ClientState.CLOSED:
            raise LocalProtocolError("receive_data() on a closed SOCKS5 connection")
        self._append(data)
        events: list[Event] = []
        while True:
            if self._state is ClientState.WAIT_METHOD:
                event = self._parse_method()
            elif self._state is ClientState.WAIT_AUTH_STATUS:
                event = self._parse_auth_status()
            elif self._state is ClientState.WAIT_REPLY:
                event = self._parse_reply()
            else:
                break
            if event is None:
                break
            events.append(event)
        return events

    def receive_eof(self) -> list[Event]:
        """The server closed its sending side."""
        waiting = (ClientState.WAIT_METHOD, ClientState.WAIT_AUTH_STATUS, ClientState.WAIT_REPLY)
        if self._state in waiting:
            raise self._fail("server closed the connection during the SOCKS5 handshake")
        return [ConnectionClosed()]

    def _parse_method(self) -> Event | None:
        if len(self._buffer) < 2:
            return None
        version, method = self._take(2)
        if version != VERSION:
            raise self._fail(f"server is not SOCKS5 (version byte 0x{version:02x})")
        if method == Method.NO_ACCEPTABLE:
            self._move(Step.METHOD_REJECTED)
        elif method == Method.NO_AUTH:
            self._move(Step.METHOD_NO_AUTH)
        elif method == Method.USERNAME_PASSWORD and self._credentials is not None:
            self._outgoing += self._credentials
            self._move(Step.METHOD_USERPASS)
        else:
            raise self._fail(f"server chose method 0x{method:02x}, which we did not offer")
        return MethodSelected(Method(method))

    def _parse_auth_status(self) -> Event | None:
        if len(self._buffer) < 2:
            return None
        version, status = self._take(2)
        # RFC 1929 says version 1; a few servers echo 5, which is harmless
        if version not in (AUTH_VERSION, VERSION):
            raise self._fail(f"bad username/password reply version 0x{version:02x}")
        self._move(Step.AUTH_OK if status == 0 else Step.AUTH_FAILED)
        return AuthResult(status == 0)

    def _parse_reply(self) -> Event | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != VERSION:
            raise self._fail(f"bad reply version 0x{buf[0]:02x}")
        try:
            parsed = _parse_address(buf, 3)
        except RemoteProtocolError as exc:
            raise self._fail(f"bad reply: {exc}") from None
        if parsed is None:
            return None
        try:
            code = ReplyCode(buf[1])
        except ValueError:
            code = ReplyCode.GENERAL_FAILURE
        _, host, port, end = parsed
        self._take(end)
        self._move(Step.REPLY_OK if code == ReplyCode.SUCCEEDED else Step.REPLY_FAILED)
        return Reply(code, host, port)
