"""Tests for proxy.protocols.socks4: SOCKS4 and 4a requests, replies, state table and fuzz."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocols import socks4
from proxy.protocols.socks4 import (
    MAX_DOMAIN,
    MAX_USERID,
    TRANSITIONS,
    Command,
    CommandRequested,
    ConnectionClosed,
    Reply,
    ReplyCode,
    ServerState,
    Socks4ServerConnection,
    Step,
    build_reply,
    build_request,
    parse_reply,
)

CONNECT_IP = b"\x04\x01\x00\x50\x0a\x00\x00\x01bob\x00"
CONNECT_4A = b"\x04\x01\x01\xbb\x00\x00\x00\x07\x00example.com\x00"


def feed(conn: Socks4ServerConnection, data: bytes, *, split: str) -> list[object]:
    if split == "whole":
        return list(conn.receive_data(data))
    events: list[object] = []
    for i in range(len(data)):
        events += conn.receive_data(data[i : i + 1])
    return events


SPLITS = pytest.mark.parametrize("split", ["whole", "bytes"])


@SPLITS
def test_socks4_connect_with_trailing_data(split: str) -> None:
    server = Socks4ServerConnection()
    events = feed(server, CONNECT_IP + b"GET / HTTP/1.0\r\n", split=split)
    assert events == [CommandRequested(Command.CONNECT, "10.0.0.1", 80, "bob")]
    assert server.trailing_data == b"GET / HTTP/1.0\r\n"
    assert server.state is ServerState.WAIT_REPLY
    server.send(Reply(ReplyCode.GRANTED, "127.0.0.1", 1080))
    assert server.data_to_send() == b"\x00\x5a\x04\x38\x7f\x00\x00\x01"
    assert server.state is ServerState.ESTABLISHED


@SPLITS
def test_socks4a_domain_with_trailing_data(split: str) -> None:
    server = Socks4ServerConnection()
    events = feed(server, CONNECT_4A + b"\x16\x03\x01", split=split)
    assert events == [CommandRequested(Command.CONNECT, "example.com", 443, "")]
    assert server.trailing_data == b"\x16\x03\x01"


def test_socks4_zero_ip_is_not_4a() -> None:
    server = Socks4ServerConnection()
    events = server.receive_data(b"\x04\x01\x00\x50\x00\x00\x00\x00\x00example.com\x00")
    assert events == [CommandRequested(Command.CONNECT, "0.0.0.0", 80, "")]
    assert server.trailing_data == b"example.com\x00"


def test_socks4_rejected_reply_closes() -> None:
    server = Socks4ServerConnection()
    server.receive_data(CONNECT_IP)
    server.send(Reply(ReplyCode.REJECTED))
    assert server.data_to_send() == b"\x00\x5b\x00\x00\x00\x00\x00\x00"
    assert server.state is ServerState.CLOSED
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")


@pytest.mark.parametrize(
    "data",
    [
        b"\x04\x03\x00\x50\x0a\x00\x00\x01\x00",  # unknown command
        b"\x04\x01\x00\x50\x0a\x00\x00\x01" + b"u" * (MAX_USERID + 1),  # user id too long
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"d" * (MAX_DOMAIN + 1),  # name too long
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00",  # empty name
        b"\x04\x01\x00\x50\x00\x00\x00\x01\x00a b\x00",  # bad name
    ],
)
def test_socks4_bad_request_queues_rejection(data: bytes) -> None:
    server = Socks4ServerConnection()
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(data)
    assert info.value.reply_code == ReplyCode.REJECTED
    assert server.data_to_send() == build_reply(ReplyCode.REJECTED)
    assert server.state is ServerState.CLOSED


def test_socks4_wrong_version_closes_without_reply() -> None:
    server = Socks4ServerConnection()
    with pytest.raises(RemoteProtocolError) as info:
        server.receive_data(b"\x05\x01\x00")
    assert info.value.reply_code is None
    assert server.data_to_send() == b""


def test_socks4_eof_handling() -> None:
    assert Socks4ServerConnection().receive_eof() == [ConnectionClosed()]
    server = Socks4ServerConnection()
    server.receive_data(CONNECT_IP[:5])
    with pytest.raises(RemoteProtocolError):
        server.receive_eof()
    server = Socks4ServerConnection()
    server.receive_data(CONNECT_IP)
    assert server.receive_eof() == [ConnectionClosed()]


def test_socks4_buffer_is_bounded() -> None:
    server = Socks4ServerConnection()
    server.receive_data(CONNECT_IP)
    server.receive_data(bytes(socks4.MAX_BUFFER - 100))
    with pytest.raises(RemoteProtocolError):
        server.receive_data(bytes(200))


def test_socks4_reply_helpers() -> None:
    assert build_reply(ReplyCode.GRANTED, "::1", 80) == b"\x00\x5a" + bytes(6)
    assert parse_reply(b"\x00\x5a\x00\x50\x01\x02\x03\x04") == Reply(
        ReplyCode.GRANTED, "1.2.3.4", 80
    )
    assert parse_reply(b"\x00\x5a") is None
    for bad in [b"\x04\x5a" + bytes(6), b"\x00\x10" + bytes(6)]:
        with pytest.raises(RemoteProtocolError):
            parse_reply(bad)
    with pytest.raises(LocalProtocolError):
        build_request(Command.CONNECT, "a b", 1)
    with pytest.raises(LocalProtocolError):
        build_request(Command.CONNECT, "1.2.3.4", 1, userid="a\0b")


# ----------------------------------------------------------------------------- the state table

PATHS: dict[ServerState, list[Reply]] = {
    ServerState.WAIT_REPLY: [],
    ServerState.ESTABLISHED: [Reply(ReplyCode.GRANTED)],
    ServerState.CLOSED: [Reply(ReplyCode.REJECTED)],
}


@pytest.mark.parametrize("state", list(ServerState))
@pytest.mark.parametrize(
    ("event", "step"),
    [
        (Reply(ReplyCode.GRANTED), Step.REPLY_OK),
        (Reply(ReplyCode.REJECTED), Step.REPLY_FAILED),
        (Reply(ReplyCode.IDENTD_MISMATCH), Step.REPLY_FAILED),
        (CommandRequested(Command.CONNECT, "1.2.3.4", 1, ""), None),
    ],
)
def test_socks4_send_follows_the_table(
    state: ServerState, event: object, step: Step | None
) -> None:
    server = Socks4ServerConnection()
    if state is not ServerState.WAIT_REQUEST:
        server.receive_data(CONNECT_IP)
        for reply in PATHS[state]:
            server.send(reply)
    assert server.state is state
    target = TRANSITIONS.get((state, step)) if step is not None else None
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
userids = st.text(st.characters(blacklist_characters="\0", codec="utf-8"), max_size=40)


def _is_4a_marker(host: str) -> bool:
    try:
        packed = ipaddress.IPv4Address(host).packed
    except ValueError:
        return False
    return packed[:3] == b"\0\0\0" and packed[3] != 0


@given(
    command=st.sampled_from(list(Command)),
    host=st.one_of(st.ip_addresses(v=4).map(str), domains),
    port=st.integers(0, 65535),
    userid=userids,
    trailing=st.binary(max_size=64),
    cuts=st.lists(st.integers(0, 400), max_size=5),
)
def test_socks4_request_round_trip(
    command: Command, host: str, port: int, userid: str, trailing: bytes, cuts: list[int]
) -> None:
    if _is_4a_marker(host):
        # SOCKS4a reserves these addresses for "a name follows": they cannot be sent
        with pytest.raises(LocalProtocolError):
            build_request(command, host, port, userid)
        return
    wire = build_request(command, host, port, userid) + trailing
    server = Socks4ServerConnection()
    events: list[object] = []
    start = 0
    for cut in sorted({min(c, len(wire)) for c in cuts} | {len(wire)}):
        events += server.receive_data(wire[start:cut])
        start = cut
    assert events == [CommandRequested(command, host, port, userid)]
    assert server.trailing_data == trailing


@given(
    code=st.sampled_from(list(ReplyCode)),
    host=st.ip_addresses(v=4).map(str),
    port=st.integers(0, 65535),
)
def test_socks4_reply_round_trip(code: ReplyCode, host: str, port: int) -> None:
    server = Socks4ServerConnection()
    server.receive_data(CONNECT_IP)
    server.send(Reply(code, host, port))
    assert parse_reply(server.data_to_send()) == Reply(code, host, port)


# ----------------------------------------------------------------------------------------- fuzz


@given(
    prefix=st.sampled_from([b"", b"\x04", b"\x04\x01", b"\x04\x01\x00\x50\x00\x00\x00\x01"]),
    chunks=st.lists(st.binary(max_size=300), max_size=8),
)
def test_socks4_garbage_raises_only_remote_protocol_error(
    prefix: bytes, chunks: list[bytes]
) -> None:
    server = Socks4ServerConnection()
    try:
        for chunk in [prefix, *chunks]:
            for event in server.receive_data(chunk):
                assert isinstance(event, CommandRequested)
                server.send(Reply(ReplyCode.GRANTED))
            assert len(server.trailing_data) <= socks4.MAX_BUFFER
        server.receive_eof()
    except RemoteProtocolError:
        assert server.state is ServerState.CLOSED


@given(cut=st.integers(1, len(CONNECT_4A) - 1))
def test_socks4_truncated_request_waits_then_fails_on_eof(cut: int) -> None:
    server = Socks4ServerConnection()
    assert server.receive_data(CONNECT_4A[:cut]) == []
    with pytest.raises(RemoteProtocolError):
        server.receive_eof()
