"""When the session ledger acknowledges: ACKs ride along with other frames, and cost a write
of their own only every ``ack_every`` bytes or when the line goes idle."""

from __future__ import annotations

import os
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.bridge.identity import generate_identity
from proxy.protocols.bridge import BridgeConnection, DataReceived, ReplayCache
from proxy.protocols.bridge.resume import SessionLedger

IDENTITY = generate_identity()
LINE = IDENTITY.line()
PRIVATE = IDENTITY.static_private()
NOW = 1_800_000_000.0


def ledgers(ack_every: int) -> tuple[SessionLedger, SessionLedger, int]:
    """Client and server ledgers of one open session, and a stream the server knows."""
    rnd = random.Random(3)
    client = BridgeConnection.client(LINE, rng=rnd.randbytes, now=NOW)
    server = BridgeConnection.server(LINE, PRIVATE, ReplayCache(), rng=rnd.randbytes)
    server.receive_data(client.data_to_send(), NOW)
    client.receive_data(server.data_to_send())
    sid = client.open_stream("example.org", 443)
    server.receive_data(client.data_to_send(), NOW)
    return SessionLedger(client, ack_every=ack_every), SessionLedger(server), sid


def consume(ledger: SessionLedger, wire: bytes | bytearray) -> int:
    """Feed ``wire`` and acknowledge every DATA byte to the mux; returns the DATA bytes."""
    got = 0
    for event in ledger.receive_data(wire):
        if isinstance(event, DataReceived):
            got += len(event.data)
            ledger.conn.acknowledge_data(event.stream_id, len(event.data))
    return got


def test_an_owed_ack_waits_for_other_frames_or_the_idle_flush() -> None:
    client, server, sid = ledgers(ack_every=1 << 20)
    server.conn.send_data(sid, os.urandom(10_000))
    consume(client, server.data_to_send())
    assert client.owes_ack and not client.ack_due
    assert client.data_to_send() == b""  # no write just for the ACK
    client.conn.ping(bytes(8))
    wire = client.data_to_send()  # the PING leaves, and the ACK with it
    consume(server, wire)
    assert server.acked == server.sent and not client.owes_ack
    assert client.eliciting_end == client.sent  # the PING wants an acknowledgement


def test_an_ack_only_write_is_not_waited_for() -> None:
    client, server, sid = ledgers(ack_every=1 << 20)
    server.conn.send_data(sid, b"x" * 5000)
    consume(client, server.data_to_send())
    assert client.data_to_send(flush_ack=True)  # the line went idle: the ACK alone
    assert not client.expecting_ack  # an ACK is never acknowledged


@given(st.lists(st.integers(1, 300_000), min_size=1, max_size=12))
@settings(max_examples=25, deadline=None)
def test_acks_leave_at_least_every_ack_every_bytes_however_data_arrives(
    pieces: list[int],
) -> None:
    ack_every = 100_000
    client, server, sid = ledgers(ack_every)
    for size in pieces:
        server.conn.send_data(sid, bytes(min(size, server.conn.send_window(sid))))
        consume(client, server.data_to_send())
        consume(server, client.data_to_send())  # windows and ACKs, whatever is due
        assert client.received - client.acked_to_peer < ack_every
        assert server.acked == client.acked_to_peer  # every ACK made arrived
    consume(server, client.data_to_send(flush_ack=True))
    assert server.acked == server.sent  # in the end everything is acknowledged
    assert server.unacked == 0
