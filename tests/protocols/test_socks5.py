"""Tests for proxy.protocols.socks5: byte-level behaviour, state table, round trips and fuzz."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import (
    ConnectRefused,
    ConnectTimeout,
    LocalProtocolError,
    NotAllowed,
    ProxyError,
    RemoteProtocolError,
    ResolveError,
    Unreachable,
)
from proxy.protocols import socks5
from proxy.protocols.socks5 import (
    SERVER_TRANSITIONS,
    AddressType,
    AuthResult,
    ClientState,
    Command,
    CommandRequested,
    ConnectionClosed,
    CredentialsReceived,
    Method,
    MethodSelected,
    Reply,
    ReplyCode,
    ServerState,
    Socks5ClientConnection,
    Socks5ServerConnection,
    Step,
    address_type_of,
    build_reply,
    build_udp_datagram,
    decode_domain,
    parse_udp_datagram,
    reply_code_for,
)

GREETING_NO_AUTH = b"\x05\x01\x00"
GREETING_USERPASS = b"\x05\x01\x02"
CREDENTIALS = b"\x01\x05alice\x06secret"
CONNECT_EXAMPLE = b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"


def feed(conn: Socks5ServerConnection | Socks5ClientConnection, data: bytes, *, split: str):
    """Feed ``data`` whole or one byte at a time; return every event."""
    if split == "whole":
        return conn.receive_data(data)
    events = []
    for i in range(len(data)):
        events += conn.receive_data(data[i : i + 1])
    return events


SPLITS = pytest.mark.parametrize("split", ["whole", "bytes"])


# ---------------------------------------------------------------------------- handshake paths


@SPLITS
def test_socks5_no_auth_connect_with_trailing_data(split: str) -> None:
    server = Socks5ServerConnection(require_auth=False)
    events = feed(server, GREETING_NO_AUTH + CONNECT_EXAMPLE + b"\x16\x03\x01hello", split=split)
    assert events == [CommandRequested(Command.CONNECT, "example.com", 443, AddressType.DOMAIN)]
    assert server.data_to_send() == b"\x05\x00"
    assert server.state is ServerState.WAIT_REPLY
    assert server.trailing_data == b"\x16\x03\x01hello"
    server.send(Reply(ReplyCode.SUCCEEDED, "10.0.0.1", 4242))
    assert server.data_to_send() == b"\x05\x00\x00\x01\x0a\x00\x00\x01\x10\x92"
    assert server.state is ServerState.ESTABLISHED
    server.receive_data(b" more")
    assert server.trailing_data == b"\x16\x03\x01hello more"


@SPLITS
def test_socks5_userpass_auth_then_request(split: str) -> None:
    server = Socks5ServerConnection(require_auth=True)
    events = feed(server, b"\x05\x02\x00\x02" + CREDENTIALS + CONNECT_EXAMPLE, split=split)
    assert events == [CredentialsReceived("alice", "secret")]
    assert server.data_to_send() == b"\x05\x02"
    assert server.state is ServerState.WAIT_AUTH_RESULT
    server.send(AuthResult(True))
    assert server.data_to_send() == b"\x01\x00"
    # the request was pipelined: receive_data(b"") parses it now
    assert server.receive_data(b"") == [
        CommandRequested(Command.CONNECT, "example.com", 443, AddressType.DOMAIN)
    ]


def test_socks5_credentials_are_not_in_repr() -> None:
    assert "secret" not in repr(CredentialsReceived("alice", "secret"))


def test_socks5_failed_auth_closes() -> None:
    server = Socks5ServerConnection(require_auth=True)
    server.receive_data(GREETING_USERPASS + CREDENTIALS)
    server.send(AuthResult(False))
    assert server.data_to_send() == b"\x05\x02\x01\x01"
    assert server.state is ServerState.CLOSED
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"\x05")


def test_socks5_prefers_no_auth_when_not_required() -> None:
    server = Socks5ServerConnection(require_auth=False)
    assert server.receive_data(b"\x05\x03\x02\x01\x00") == []
    assert server.data_to_send() == b"\x05\x00"
    assert server.state is ServerState.WAIT_REQUEST


@pytest.mark.parametrize(
    ("require_auth", "greeting"),
    [(True, b"\x05\x01\x00"), (False, b"\x05\x01\x02"), (True, b"\x05\x00"), (False, b"\x05\x00")],
)
def test_socks5_rejects_unknown_auth_method(require_auth: bool, greeting: bytes) -> None:
    server = Socks5ServerConnection(require_auth=require_auth)
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(greeting)
    assert info.value.reply_code is None
    assert server.data_to_send() == b"\x05\xff"
    assert server.state is ServerState.CLOSED


@pytest.mark.parametrize("first", [b"\x04", b"G", b"\x16"])
def test_socks5_rejects_other_protocols_at_first_byte(first: bytes) -> None:
    server = Socks5ServerConnection(require_auth=False)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(first)
    assert server.data_to_send() == b""


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"\x05\x09\x00\x01", ReplyCode.COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x02", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x00\x03\x00\x00\x50", ReplyCode.GENERAL_FAILURE),  # empty name
        (b"\x05\x01\x00\x03\x03a b\x00\x50", ReplyCode.GENERAL_FAILURE),  # space
        (b"\x05\x01\x00\x03\x03a\nb\x00\x50", ReplyCode.GENERAL_FAILURE),  # control char
        (b"\x05\x01\x00\x03\x04a..b\x00\x50", ReplyCode.GENERAL_FAILURE),  # empty label
        (b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", ReplyCode.GENERAL_FAILURE),  # not UTF-8
    ],
)
def test_socks5_bad_request_queues_error_reply(request_bytes: bytes, code: ReplyCode) -> None:
    server = Socks5ServerConnection(require_auth=False)
    server.receive_data(GREETING_NO_AUTH)
    server.data_to_send()
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(request_bytes)
    assert info.value.reply_code == code
    assert server.data_to_send() == build_reply(code)
    assert reply_code_for(info.value) == code
    assert server.state is ServerState.CLOSED


def test_socks5_bad_request_version_closes_without_reply() -> None:
    server = Socks5ServerConnection(require_auth=False)
    server.receive_data(GREETING_NO_AUTH)
    server.data_to_send()
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(b"\x04\x01\x00\x01")
    assert info.value.reply_code is None
    assert server.data_to_send() == b""


def test_socks5_bad_auth_version_closes() -> None:
    server = Socks5ServerConnection(require_auth=True)
    server.receive_data(GREETING_USERPASS)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"\x05\x01a\x01b")


@pytest.mark.parametrize(
    ("wire", "host", "atyp"),
    [
        (b"\x01\x7f\x00\x00\x01", "127.0.0.1", AddressType.IPV4),
        (b"\x04" + ipaddress.IPv6Address("2001:db8::1").packed, "2001:db8::1", AddressType.IPV6),
        (b"\x04" + bytes(15) + b"\x01", "::1", AddressType.IPV6),
        (b"\x03\x0bExample.COM", "Example.COM", AddressType.DOMAIN),
        (b"\x03\x0cexample.com.", "example.com.", AddressType.DOMAIN),
        (b"\x03\x08_srv.a-b", "_srv.a-b", AddressType.DOMAIN),
        (b"\x03\x05[::1]", "[::1]", AddressType.DOMAIN),
        (b"\x03\x0a" + "bücher.de".encode(), "xn--bcher-kva.de", AddressType.DOMAIN),
    ],
)
def test_socks5_address_forms(wire: bytes, host: str, atyp: AddressType) -> None:
    server = Socks5ServerConnection(require_auth=False)
    events = server.receive_data(GREETING_NO_AUTH + b"\x05\x01\x00" + wire + b"\x00\x50")
    assert events == [CommandRequested(Command.CONNECT, host, 80, atyp)]


def test_socks5_eof_handling() -> None:
    assert Socks5ServerConnection(require_auth=False).receive_eof() == [ConnectionClosed()]
    server = Socks5ServerConnection(require_auth=False)
    server.receive_data(b"\x05\x01")
    with pytest.raises(RemoteProtocolError):
        server.receive_eof()
    assert server.state is ServerState.CLOSED
    server = Socks5ServerConnection(require_auth=False)
    server.receive_data(GREETING_NO_AUTH + CONNECT_EXAMPLE)
    assert server.receive_eof() == [ConnectionClosed()]


def test_socks5_buffer_is_bounded() -> None:
    server = Socks5ServerConnection(require_auth=True)
    server.receive_data(GREETING_USERPASS + CREDENTIALS)  # now waiting on us; input piles up
    server.receive_data(bytes(socks5.MAX_BUFFER - 100))
    with pytest.raises(RemoteProtocolError):
        server.receive_data(bytes(200))
    assert server.state is ServerState.CLOSED


# ----------------------------------------------------------------------------- the state table

SERVER_PATHS: dict[ServerState, tuple[bool, bytes, list[object]]] = {
    ServerState.WAIT_METHODS: (False, b"", []),
    ServerState.WAIT_CREDENTIALS: (True, GREETING_USERPASS, []),
    ServerState.WAIT_AUTH_RESULT: (True, GREETING_USERPASS + CREDENTIALS, []),
    ServerState.WAIT_REQUEST: (False, GREETING_NO_AUTH, []),
    ServerState.WAIT_REPLY: (False, GREETING_NO_AUTH + CONNECT_EXAMPLE, []),
    ServerState.ESTABLISHED: (
        False,
        GREETING_NO_AUTH + CONNECT_EXAMPLE,
        [Reply(ReplyCode.SUCCEEDED)],
    ),
    ServerState.CLOSED: (False, GREETING_NO_AUTH + CONNECT_EXAMPLE, [Reply(ReplyCode.NOT_ALLOWED)]),
}

SENDABLE: list[tuple[object, Step | None]] = [
    (AuthResult(True), Step.AUTH_OK),
    (AuthResult(False), Step.AUTH_FAILED),
    (Reply(ReplyCode.SUCCEEDED), Step.REPLY_OK),
    (Reply(ReplyCode.HOST_UNREACHABLE), Step.REPLY_FAILED),
    (MethodSelected(Method.NO_AUTH), None),
    (CommandRequested(Command.CONNECT, "a", 1, AddressType.DOMAIN), None),
]


def server_in(state: ServerState) -> Socks5ServerConnection:
    require_auth, data, sends = SERVER_PATHS[state]
    server = Socks5ServerConnection(require_auth=require_auth)
    server.receive_data(data)
    for event in sends:
        server.send(event)  # type: ignore[arg-type]
    assert server.state is state
    return server


@pytest.mark.parametrize("state", list(ServerState))
@pytest.mark.parametrize(("event", "step"), SENDABLE)
def test_socks5_server_send_follows_the_table(
    state: ServerState, event: object, step: Step | None
) -> None:
    server = server_in(state)
    target = SERVER_TRANSITIONS.get((state, step)) if step is not None else None
    if target is None:
        with pytest.raises(LocalProtocolError):
            server.send(event)  # type: ignore[arg-type]
        assert server.state is state
    else:
        server.send(event)  # type: ignore[arg-type]
        assert server.state is target


# ---------------------------------------------------------------------------------- round trips

domains = st.lists(
    st.from_regex(r"[a-z0-9_][a-z0-9_-]{0,20}", fullmatch=True), min_size=1, max_size=4
).map(".".join)
hosts = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str), domains)
ports = st.integers(0, 65535)


@given(
    command=st.sampled_from(list(Command)),
    host=hosts,
    port=ports,
    trailing=st.binary(max_size=64),
    auth=st.booleans(),
    cuts=st.lists(st.integers(0, 600), max_size=6),
)
def test_socks5_client_server_round_trip(
    command: Command, host: str, port: int, trailing: bytes, auth: bool, cuts: list[int]
) -> None:
    client = Socks5ClientConnection(username="u" if auth else None, password="p")
    server = Socks5ServerConnection(require_auth=auth)
    request = CommandRequested(command, host, port, address_type_of(host))

    def pump_to_server(data: bytes) -> list[object]:
        events: list[object] = []
        start = 0
        for cut in sorted({min(c, len(data)) for c in cuts} | {len(data)}):
            events += server.receive_data(data[start:cut])
            start = cut
        return events

    assert pump_to_server(client.data_to_send()) == []
    assert client.receive_data(server.data_to_send()) == [
        MethodSelected(Method.USERNAME_PASSWORD if auth else Method.NO_AUTH)
    ]
    if auth:
        assert pump_to_server(client.data_to_send()) == [CredentialsReceived("u", "p")]
        server.send(AuthResult(True))
        assert client.receive_data(server.data_to_send()) == [AuthResult(True)]
    assert client.state is ClientState.READY
    client.send(request)
    assert pump_to_server(client.data_to_send() + trailing) == [request]
    assert server.trailing_data == trailing
    reply = Reply(ReplyCode.SUCCEEDED, host, port)  # any address form works as a bind address
    server.send(reply)
    assert client.receive_data(server.data_to_send() + trailing) == [reply]
    assert client.trailing_data == trailing
    assert client.state is ClientState.ESTABLISHED


@given(host=hosts, port=ports, payload=st.binary(max_size=200), frag=st.integers(0, 255))
def test_socks5_udp_datagram_round_trip(host: str, port: int, payload: bytes, frag: int) -> None:
    datagram = parse_udp_datagram(build_udp_datagram(host, port, payload, frag=frag))
    assert datagram == socks5.UdpDatagram(frag, host, port, payload)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x00\x00",
        b"\x00\x00\x00\x01\x7f\x00",
        b"\x00\x00\x00\x07abcdef",
        b"\x00\x00\x00\x03",
    ],
)
def test_socks5_udp_rejects_malformed(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_udp_datagram(data)


def test_socks5_udp_strips_scope_and_compresses_ipv6() -> None:
    wire = build_udp_datagram("fe80::1%eth0", 53, b"q")
    assert parse_udp_datagram(wire).host == "fe80::1"
    wire = b"\x00\x00\x00\x04" + ipaddress.IPv6Address("2001:db8:0:0:0:0:0:1").packed + b"\x00\x35"
    assert parse_udp_datagram(wire).host == "2001:db8::1"


# ---------------------------------------------------------------------------------- client side


def test_socks5_client_reports_refusals_as_events() -> None:
    client = Socks5ClientConnection()
    assert client.data_to_send() == b"\x05\x01\x00"
    assert client.receive_data(b"\x05\xff") == [MethodSelected(Method.NO_ACCEPTABLE)]
    assert client.state is ClientState.CLOSED

    client = Socks5ClientConnection(username="u", password="bad")
    assert client.data_to_send() == b"\x05\x02\x00\x02"
    client.receive_data(b"\x05\x02")
    assert client.data_to_send() == b"\x01\x01u\x03bad"
    assert client.receive_data(b"\x01\x01") == [AuthResult(False)]
    assert client.state is ClientState.CLOSED

    client = Socks5ClientConnection()
    client.receive_data(b"\x05\x00")
    client.send(CommandRequested(Command.CONNECT, "10.0.0.1", 80, AddressType.IPV4))
    assert client.receive_data(build_reply(ReplyCode.CONNECTION_REFUSED)) == [
        Reply(ReplyCode.CONNECTION_REFUSED)
    ]
    assert client.state is ClientState.CLOSED


def test_socks5_client_rejects_a_method_it_did_not_offer() -> None:
    client = Socks5ClientConnection()
    with pytest.raises(RemoteProtocolError):
        client.receive_data(b"\x05\x02")
    client = Socks5ClientConnection()
    with pytest.raises(LocalProtocolError):
        client.send(CommandRequested(Command.CONNECT, "a.b", 1, AddressType.DOMAIN))
    with pytest.raises(RemoteProtocolError):
        client.receive_eof()


def test_socks5_client_refuses_to_send_bad_hosts() -> None:
    client = Socks5ClientConnection()
    client.receive_data(b"\x05\x00")
    for host, atyp in [("a b", AddressType.DOMAIN), ("1.2.3.4", AddressType.IPV6)]:
        with pytest.raises(LocalProtocolError):
            client.send(CommandRequested(Command.CONNECT, host, 1, atyp))
    assert client.state is ClientState.READY


# ------------------------------------------------------------------------------------- helpers


def test_socks5_reply_code_for_errors() -> None:
    assert reply_code_for(ConnectRefused()) is ReplyCode.CONNECTION_REFUSED
    assert reply_code_for(ConnectTimeout()) is ReplyCode.HOST_UNREACHABLE
    assert reply_code_for(ResolveError()) is ReplyCode.HOST_UNREACHABLE
    assert reply_code_for(Unreachable()) is ReplyCode.NETWORK_UNREACHABLE
    assert reply_code_for(NotAllowed()) is ReplyCode.NOT_ALLOWED
    assert reply_code_for(RemoteProtocolError("x", reply_code=7)) is ReplyCode.COMMAND_NOT_SUPPORTED
    assert reply_code_for(RemoteProtocolError("x", reply_code=400)) is ReplyCode.GENERAL_FAILURE
    assert reply_code_for(RemoteProtocolError("x")) is ReplyCode.GENERAL_FAILURE
    assert reply_code_for(ProxyError()) is ReplyCode.GENERAL_FAILURE
    assert reply_code_for(OSError()) is ReplyCode.GENERAL_FAILURE


def test_socks5_decode_domain_limits() -> None:
    assert decode_domain(b"a" * 63 + b"." + b"b" * 63) == "a" * 63 + "." + "b" * 63
    for bad in [b"", b"a" * 64, b"a" * 256, b"a/b", b".", b"a..b", b"\x00"]:
        with pytest.raises(RemoteProtocolError):
            decode_domain(bad, reply_code=4)


# ----------------------------------------------------------------------------------------- fuzz


def drive_server(server: Socks5ServerConnection, chunks: list[bytes]) -> None:
    """Feed chunks, answering every event as a lenient I/O layer would."""
    for chunk in chunks:
        events = server.receive_data(chunk)
        while events:
            for event in events:
                if isinstance(event, CredentialsReceived):
                    server.send(AuthResult(True))
                elif isinstance(event, CommandRequested):
                    server.send(Reply(ReplyCode.SUCCEEDED))
            events = server.receive_data(b"")
        assert len(server.trailing_data) <= socks5.MAX_BUFFER


valid_prefixes = st.sampled_from(
    [b"", GREETING_NO_AUTH, GREETING_USERPASS, GREETING_USERPASS + CREDENTIALS]
)


@given(
    require_auth=st.booleans(),
    prefix=valid_prefixes,
    chunks=st.lists(st.binary(max_size=300), max_size=8),
)
def test_socks5_server_garbage_raises_only_remote_protocol_error(
    require_auth: bool, prefix: bytes, chunks: list[bytes]
) -> None:
    server = Socks5ServerConnection(require_auth=require_auth)
    try:
        drive_server(server, [prefix, *chunks])
        server.receive_eof()
    except RemoteProtocolError:
        assert server.state is ServerState.CLOSED
    server.data_to_send()


@given(chunks=st.lists(st.binary(max_size=300), max_size=8), auth=st.booleans())
def test_socks5_client_garbage_raises_only_remote_protocol_error(
    chunks: list[bytes], auth: bool
) -> None:
    client = Socks5ClientConnection(username="u" if auth else None, password="p")
    try:
        for chunk in chunks:
            if client.state is ClientState.CLOSED:
                return  # a refusal arrived as an event; feeding a closed client is our bug
            client.receive_data(chunk)
            if client.state is ClientState.READY:
                client.send(CommandRequested(Command.CONNECT, "a.b", 1, AddressType.DOMAIN))
            assert len(client.trailing_data) <= socks5.MAX_BUFFER
        if client.state is not ClientState.CLOSED:
            client.receive_eof()
    except RemoteProtocolError:
        assert client.state is ClientState.CLOSED


FULL_HANDSHAKE = b"\x05\x01\x02" + CREDENTIALS + CONNECT_EXAMPLE


@given(cut=st.integers(0, len(FULL_HANDSHAKE) - 1))
def test_socks5_truncated_handshake_waits_then_fails_on_eof(cut: int) -> None:
    server = Socks5ServerConnection(require_auth=True)
    drive_server(server, [FULL_HANDSHAKE[:cut]])
    assert server.state not in (ServerState.WAIT_REPLY, ServerState.ESTABLISHED)
    if cut == 0:
        assert server.receive_eof() == [ConnectionClosed()]
    else:
        with pytest.raises(RemoteProtocolError):
            server.receive_eof()


@given(data=st.binary(max_size=300))
def test_socks5_udp_parser_raises_only_remote_protocol_error(data: bytes) -> None:
    try:
        datagram = parse_udp_datagram(data)
    except RemoteProtocolError:
        return
    assert len(datagram.payload) < len(data)
