"""Tests for proxy.protocols.bridge.resume: the resume hello and the byte-offset ledger."""

from __future__ import annotations

import os
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.bridge.identity import generate_identity
from proxy.errors import RemoteProtocolError
from proxy.protocols.bridge import BridgeConnection, DataReceived, ReplayCache, Role
from proxy.protocols.bridge.handshake import MAX_HELLO_LEN, NONCE_LEN, TAG_LEN, Pending, Rejected
from proxy.protocols.bridge.resume import (
    ClientResume,
    FreshHello,
    ResumeRequest,
    ResumeTicket,
    SessionLedger,
    check_resume,
    read_first_message,
    resume_answer,
)

IDENTITY = generate_identity()
LINE = IDENTITY.line()
PRIVATE = IDENTITY.static_private()
NOW = 1_800_000_000.0


def seeded(seed: int):
    rnd = random.Random(seed)
    return lambda n: rnd.randbytes(n)


def open_pair(seed: int = 1) -> tuple[BridgeConnection, BridgeConnection]:
    """A client and a server connection whose handshake is done (server's reply consumed)."""
    client = BridgeConnection.client(LINE, rng=seeded(seed), now=NOW)
    server = BridgeConnection.server(LINE, PRIVATE, ReplayCache(), rng=seeded(seed + 1))
    server.receive_data(client.data_to_send(), NOW)
    client.receive_data(server.data_to_send())
    return client, server


def tickets(
    client: BridgeConnection, server: BridgeConnection
) -> tuple[ResumeTicket, ResumeTicket]:
    assert client.keys is not None and server.keys is not None
    return ResumeTicket.from_keys(client.keys, Role.CLIENT), ResumeTicket.from_keys(
        server.keys, Role.SERVER
    )


def test_resume_ticket_is_the_same_at_both_ends_and_unique_per_session() -> None:
    c1, s1 = open_pair(1)
    c2, s2 = open_pair(7)
    t1c, t1s = tickets(c1, s1)
    t2c, _ = tickets(c2, s2)
    assert t1c == t1s
    assert t1c.session_id != t2c.session_id and t1c.key != t2c.key
    assert t1c.key.hex() not in repr(t1c)


# --- the resume hello -------------------------------------------------------------------------


def resume_hello(ticket: ResumeTicket, received: int, seed: int = 3, now: float = NOW) -> bytes:
    return ClientResume(LINE, ticket, seeded(seed)).hello(received, now)


@given(st.integers(0, (1 << 64) - 1), st.integers(0, 2**32))
@settings(max_examples=40)
def test_resume_hello_round_trips_and_is_accepted(received: int, seed: int) -> None:
    client, server = open_pair()
    ticket, _ = tickets(client, server)
    hello = resume_hello(ticket, received, seed)
    assert NONCE_LEN + 42 + TAG_LEN <= len(hello) <= MAX_HELLO_LEN  # a fresh hello's range
    request = read_first_message(LINE, hello + b"records")
    assert isinstance(request, ResumeRequest)
    assert (request.session_id, request.offset, request.stamp) == (
        ticket.session_id, received, int(NOW),
    )  # fmt: skip
    assert request.trailing == b"records"
    assert check_resume(request, ticket, ReplayCache(), NOW) is None


def test_first_message_tells_hello_from_resume_and_waits_for_the_whole_message() -> None:
    client, server = open_pair()
    ticket, _ = tickets(client, server)
    fresh = BridgeConnection.client(LINE, rng=os.urandom, now=NOW).data_to_send()
    assert isinstance(read_first_message(LINE, fresh), FreshHello)
    hello = resume_hello(ticket, 5)
    for cut in range(len(hello)):
        assert isinstance(read_first_message(LINE, hello[:cut]), Pending)
    assert isinstance(read_first_message(LINE, hello), ResumeRequest)
    other = generate_identity().line()  # another bridge's line: nothing verifies
    assert isinstance(read_first_message(other, hello), Rejected | Pending)


@given(st.binary(min_size=0, max_size=2000))
def test_first_message_of_random_bytes_is_never_accepted(data: bytes) -> None:
    assert isinstance(read_first_message(LINE, data), Pending | Rejected)


def test_resume_refused_when_replayed_stale_unknown_or_unproven() -> None:
    client, server = open_pair()
    ticket, _ = tickets(client, server)
    replay = ReplayCache()
    request = read_first_message(LINE, resume_hello(ticket, 0))
    assert isinstance(request, ResumeRequest)
    assert check_resume(request, ticket, replay, NOW) is None
    assert check_resume(request, ticket, replay, NOW + 1) == "replayed resume hello"
    stale = read_first_message(LINE, resume_hello(ticket, 0, seed=4, now=NOW - 3600))
    assert isinstance(stale, ResumeRequest)
    assert "timestamp" in (check_resume(stale, ticket, replay, NOW) or "")
    unknown = read_first_message(LINE, resume_hello(ticket, 0, seed=5))
    assert isinstance(unknown, ResumeRequest)
    assert "unknown" in (check_resume(unknown, None, replay, NOW) or "")
    other_ticket, _ = tickets(*open_pair(9))
    forged = read_first_message(LINE, resume_hello(ticket, 0, seed=6))
    assert isinstance(forged, ResumeRequest)
    assert "proof" in (check_resume(forged, other_ticket, replay, NOW) or "")


def answer_for(ticket: ResumeTicket, received: int, offset: int) -> tuple[ClientResume, bytes]:
    resume = ClientResume(LINE, ticket, seeded(11))
    request = read_first_message(LINE, resume.hello(received, NOW))
    assert isinstance(request, ResumeRequest)
    return resume, resume_answer(LINE, ticket, request, offset, seeded(12))


@given(st.integers(0, (1 << 64) - 1), st.integers(1, 200), st.binary(max_size=50))
@settings(max_examples=40)
def test_resume_answer_parses_in_any_chunking_with_trailing_data(
    offset: int, step: int, trailing: bytes
) -> None:
    ticket, _ = tickets(*open_pair())
    resume, answer = answer_for(ticket, 0, offset)
    assert 34 + TAG_LEN <= len(answer) <= 34 + 1280 + TAG_LEN  # a fresh answer's range
    wire = answer + trailing
    got = None
    for i in range(0, len(wire), step):
        if got is None:
            got = resume.receive_data(wire[i : i + step])
            if got is not None:
                rest = wire[i + step :]
    assert got == offset
    assert resume.trailing_data + rest == trailing


@given(st.binary(min_size=1, max_size=1500), st.integers(0, 1400))
def test_resume_answer_garbage_or_tampering_raises_only_remote_protocol_error(
    garbage: bytes, flip: int
) -> None:
    ticket, _ = tickets(*open_pair())
    resume, answer = answer_for(ticket, 0, 77)
    try:
        resume.receive_data(garbage + bytes(1400))
    except RemoteProtocolError:
        pass
    resume, answer = answer_for(ticket, 0, 77)
    tampered = bytearray(answer)
    tampered[flip % len(answer)] ^= 0x01
    try:
        result = resume.receive_data(bytes(tampered) + bytes(1400))
    except RemoteProtocolError:
        return
    assert result is None or result == 77  # a flipped padding-length bit may just need more


# --- the ledger -------------------------------------------------------------------------------


class Wire:
    """Two ledgers and what is in flight between them; a cut loses whatever was in flight."""

    def __init__(self, ack_every: int = 4096, limit: int = 1 << 22) -> None:
        self.client_conn, self.server_conn = open_pair()
        self.client = SessionLedger(self.client_conn, ack_every=ack_every, limit=limit)
        self.server = SessionLedger(self.server_conn, ack_every=ack_every, limit=limit)
        self.to_server = b""
        self.to_client = b""
        self.got: dict[str, bytearray] = {"client": bytearray(), "server": bytearray()}

    def pump(self, step: int, *, budget: int | None = None) -> None:
        """Move bytes both ways in ``step``-sized pieces (at most ``budget`` each way)."""
        for _ in range(10_000):
            self.to_server += self.client.data_to_send(flush_ack=True)
            self.to_client += self.server.data_to_send(flush_ack=True)
            if not self.to_server and not self.to_client:
                return
            for name, ledger, attr in (("server", self.server, "to_server"),
                                       ("client", self.client, "to_client")):  # fmt: skip
                pending = getattr(self, attr)
                take = (
                    min(step, len(pending)) if budget is None else min(step, budget, len(pending))
                )
                chunk, rest = pending[:take], pending[take:]
                setattr(self, attr, rest)
                if chunk:
                    self.deliver(name, ledger, chunk)
            if budget is not None:
                return

    def deliver(self, name: str, ledger: SessionLedger, chunk: bytes) -> None:
        for event in ledger.receive_data(chunk):
            if isinstance(event, DataReceived):
                self.got[name] += event.data
                ledger.conn.acknowledge_data(event.stream_id, len(event.data))

    def cut_and_resume(self) -> None:
        self.to_server = self.to_client = b""
        client_has, server_has = self.client.received, self.server.received
        self.to_server = self.client.resume_from(server_has)
        self.to_client = self.server.resume_from(client_has)


@given(
    st.binary(min_size=1, max_size=40_000),
    st.binary(max_size=40_000),
    st.integers(1, 5000),
    st.lists(st.integers(1, 30_000), max_size=6),
)
@settings(max_examples=30, deadline=None)
def test_ledgers_deliver_every_byte_once_across_any_cuts(
    upload: bytes, download: bytes, step: int, cuts: list[int]
) -> None:
    wire = Wire()
    sid = wire.client_conn.open_stream("example.org", 443)
    wire.pump(step)  # the OPEN reaches the server
    wire.client_conn.send_data(sid, upload)
    if download:
        wire.server_conn.send_data(sid, download)
    for budget in cuts:  # each cut drops what was in flight after ``budget`` bytes moved
        wire.pump(step, budget=budget)
        wire.cut_and_resume()
    wire.pump(step)
    assert bytes(wire.got["server"]) == upload
    assert bytes(wire.got["client"]) == download
    # both sides acknowledged everything worth acknowledging: the buffers hold only ACKs
    assert wire.client.unacked < 200 and wire.server.unacked < 200


def test_ledger_stops_making_records_when_its_buffer_is_full_until_acknowledged() -> None:
    wire = Wire(ack_every=1 << 30, limit=20_000)
    sid = wire.client_conn.open_stream("example.org", 443)
    wire.client_conn.send_data(sid, os.urandom(60_000))
    first = wire.client.data_to_send()
    assert len(first) >= 20_000 and wire.client.full
    wire.client_conn.send_data(sid, b"more")
    assert wire.client.data_to_send() == b""  # backpressure: nothing new while full
    wire.deliver("server", wire.server, first)
    wire.to_client += wire.server.data_to_send(flush_ack=True)  # an idle ACK
    wire.deliver("client", wire.client, wire.to_client)
    assert not wire.client.full and wire.client.acked == len(first)
    assert wire.client.data_to_send()


def test_ledger_acks_are_not_acknowledged_so_idle_ends_fall_silent() -> None:
    wire = Wire()
    sid = wire.client_conn.open_stream("example.org", 443)
    wire.client_conn.send_data(sid, b"hello")
    wire.pump(100)
    assert wire.got["server"] == b"hello"
    assert not wire.client.owes_ack and not wire.server.owes_ack
    assert not wire.client.expecting_ack  # the server acknowledged the data
    assert wire.client.data_to_send(flush_ack=True) == b""
    assert wire.server.data_to_send(flush_ack=True) == b""


def test_ledger_refuses_an_ack_of_bytes_never_sent() -> None:
    wire = Wire()
    wire.server_conn.mux.send_ack(10**9)
    with pytest.raises(RemoteProtocolError, match="acknowledged"):
        wire.client.receive_data(wire.server_conn.data_to_send())
    with pytest.raises(RemoteProtocolError, match="acknowledged"):
        Wire().client.resume_from(10**9)
