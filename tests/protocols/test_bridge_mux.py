"""Tests for the bridge multiplexer and for whole sessions (handshake + records + mux)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocols.bridge.connection import (
    TRANSITIONS,
    BridgeConnection,
    ConnectionState,
    HandshakeCompleted,
    SessionEnded,
)
from proxy.protocols.bridge.frames import (
    MAX_DATA,
    Close,
    Data,
    Open,
    Reset,
    ResetCode,
    Window,
    decode_frames,
    encode_frame,
)
from proxy.protocols.bridge.handshake import BridgeLine, ReplayCache
from proxy.protocols.bridge.mux import (
    INITIAL_WINDOW,
    DataReceived,
    Mux,
    MuxEvent,
    PingReceived,
    PongReceived,
    Role,
    StreamEnded,
    StreamOpened,
    StreamReset,
    WindowUpdated,
)
from proxy.protocols.bridge.padding import PaddingShape
from proxy.protocols.bridge.records import MAX_CIPHERTEXT, MAX_PLAINTEXT

NOW = 1_800_000_000.0
SHAPE = PaddingShape.from_seed(b"shape" * 8)


def rng_from(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def mux_pair(**options: int) -> tuple[Mux, Mux]:
    return (
        Mux(Role.CLIENT, SHAPE, rng_from(1), **options),
        Mux(Role.SERVER, SHAPE, rng_from(2), **options),
    )


def deliver(src: Mux, dst: Mux) -> list[MuxEvent]:
    events: list[MuxEvent] = []
    for record in src.records_to_send():
        assert 1 <= len(record) <= MAX_PLAINTEXT
        events += dst.receive_record(record)
    return events


class Peer:
    """One end of a mux pair plus what it received, for the model-based test."""

    def __init__(self, mux: Mux) -> None:
        self.mux = mux
        self.received: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: set[int] = set()

    def absorb(self, events: list[MuxEvent]) -> None:
        for event in events:
            match event:
                case StreamOpened(sid):
                    self.received[sid] = bytearray()
                case DataReceived(sid, data):
                    self.received.setdefault(sid, bytearray()).extend(data)
                    self.mux.acknowledge_data(sid, len(data))
                case StreamEnded(sid):
                    self.ended.add(sid)
                case StreamReset(sid):
                    self.reset.add(sid)


ops = st.lists(
    st.one_of(
        st.tuples(st.just("open")),
        st.tuples(st.just("send"), st.booleans(), st.integers(0, 50), st.integers(0, 70_000)),
        st.tuples(st.just("end"), st.booleans(), st.integers(0, 50)),
        st.tuples(st.just("reset"), st.booleans(), st.integers(0, 50)),
        st.tuples(st.just("pump"), st.booleans()),
    ),
    max_size=60,
)


@given(ops)
def test_bridge_mux_random_operations_deliver_exact_bytes_in_order(
    operations: list[tuple],
) -> None:
    client, server = (Peer(m) for m in mux_pair())
    sent: dict[tuple[bool, int], bytearray] = {}  # (from client?, stream) -> bytes sent
    ended: set[tuple[bool, int]] = set()
    resets: set[int] = set()
    counter = 0
    opened: list[int] = []

    def side(from_client: bool) -> Peer:
        return client if from_client else server

    def streams_of(from_client: bool) -> list[int]:
        if from_client:
            return [s for s in opened if s not in resets]
        return [s for s in server.received if s not in resets]

    for op in operations:
        if op[0] == "open":
            opened.append(client.mux.open_stream("example.com", 443))
        elif op[0] == "pump":
            src, dst = (client, server) if op[1] else (server, client)
            dst.absorb(deliver(src.mux, dst.mux))
        else:
            from_client, index = op[1], op[2]
            candidates = streams_of(from_client)
            if not candidates:
                continue
            sid = candidates[index % len(candidates)]
            me = side(from_client)
            if (from_client, sid) in ended:
                with pytest.raises(LocalProtocolError):
                    me.mux.send_data(sid, b"x")
                continue
            if op[0] == "send":
                window = me.mux.send_window(sid)
                size = min(op[3], window)
                if op[3] > window:
                    with pytest.raises(LocalProtocolError):
                        me.mux.send_data(sid, bytes(op[3]))
                counter += 1
                payload = bytes([counter % 256]) * size
                me.mux.send_data(sid, payload)
                sent.setdefault((from_client, sid), bytearray()).extend(payload)
            elif op[0] == "end":
                me.mux.end_stream(sid)
                ended.add((from_client, sid))
            else:
                me.mux.reset_stream(sid, ResetCode.CANCEL)
                resets.add(sid)
    for _ in range(200):  # pump both ways until nothing moves
        moved = client.mux.records_to_send()
        for record in moved:
            server.absorb(server.mux.receive_record(record))
        back = server.mux.records_to_send()
        for record in back:
            client.absorb(client.mux.receive_record(record))
        if not moved and not back:
            break
    for (from_client, sid), data in sent.items():
        if sid in resets:
            continue
        receiver = server if from_client else client
        assert bytes(receiver.received.get(sid, b"")) == bytes(data)
    for from_client, sid in ended:
        if sid not in resets:
            assert sid in (server if from_client else client).ended
    for sid in resets:
        assert sid not in client.mux.stream_ids and sid not in server.mux.stream_ids


def test_bridge_mux_window_is_respected_and_refilled() -> None:
    client, server = mux_pair()
    sid = client.open_stream("example.com", 443)
    client.send_data(sid, bytes(INITIAL_WINDOW))
    assert client.send_window(sid) == 0
    with pytest.raises(LocalProtocolError, match="window"):
        client.send_data(sid, b"x")
    events = deliver(client, server)
    total = sum(len(e.data) for e in events if isinstance(e, DataReceived))
    assert total == INITIAL_WINDOW
    assert server.receive_window(sid) == 0
    server.acknowledge_data(sid, INITIAL_WINDOW // 8)  # below the batching threshold
    assert deliver(server, client) == []
    server.acknowledge_data(sid, INITIAL_WINDOW // 8)
    assert deliver(server, client) == [WindowUpdated(sid, INITIAL_WINDOW // 4)]
    client.send_data(sid, bytes(INITIAL_WINDOW // 4))
    with pytest.raises(LocalProtocolError):
        server.acknowledge_data(sid, INITIAL_WINDOW)  # more than was delivered


def test_bridge_mux_peer_overrunning_the_window_is_a_protocol_error() -> None:
    _, server = mux_pair(initial_window=1000)
    server.receive_record(encode_frame(Open(1, "example.com", 443)))
    server.receive_record(encode_frame(Data(1, bytes(600))))
    with pytest.raises(RemoteProtocolError, match="overran"):
        server.receive_record(encode_frame(Data(1, bytes(401))))


def test_bridge_mux_window_overflow_is_a_protocol_error() -> None:
    client, _ = mux_pair()
    sid = client.open_stream("example.com", 443)
    with pytest.raises(RemoteProtocolError, match="overflow"):
        client.receive_record(encode_frame(Window(sid, 0x7FFFFFFF)))


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (Data(5, b"x"), "unopened"),
        (Close(5), "unopened"),
        (Reset(5, ResetCode.CANCEL), "unopened"),
        (Window(5, 1), "unopened"),
    ],
)
def test_bridge_mux_frames_for_unopened_streams_are_errors(frame: object, message: str) -> None:
    client, _ = mux_pair()
    with pytest.raises(RemoteProtocolError, match=message):
        client.receive_record(encode_frame(frame))  # type: ignore[arg-type]


def test_bridge_mux_late_frames_after_reset_are_ignored() -> None:
    client, server = mux_pair()
    sid = client.open_stream("example.com", 443)
    deliver(client, server)
    client.reset_stream(sid)
    # crossing in flight: the server's data and close arrive after our reset
    assert client.receive_record(encode_frame(Data(sid, b"late"))) == []
    assert client.receive_record(encode_frame(Close(sid))) == []
    assert deliver(client, server) == [StreamReset(sid, ResetCode.CANCEL)]
    client.reset_stream(sid)  # resetting a gone stream is a no-op
    assert client.records_to_send() == []


def test_bridge_mux_only_the_client_opens_and_ids_never_repeat() -> None:
    client, server = mux_pair()
    with pytest.raises(LocalProtocolError):
        server.open_stream("example.com", 443)
    with pytest.raises(RemoteProtocolError, match="server tried"):
        client.receive_record(encode_frame(Open(1, "example.com", 443)))
    server.receive_record(encode_frame(Open(7, "example.com", 443)))
    with pytest.raises(RemoteProtocolError, match="already used"):
        server.receive_record(encode_frame(Open(7, "example.com", 443)))


def test_bridge_mux_refuses_streams_beyond_the_limit() -> None:
    client = Mux(Role.CLIENT, SHAPE, rng_from(1), max_streams=3)
    server = Mux(Role.SERVER, SHAPE, rng_from(2), max_streams=2)
    ids = [client.open_stream(f"{name}.example", 443) for name in "abc"]
    with pytest.raises(LocalProtocolError, match="already carries"):
        client.open_stream("d.example", 443)
    assert [type(e) for e in deliver(client, server)] == [StreamOpened, StreamOpened]
    assert server.stream_ids == ids[:2]
    assert deliver(server, client) == [StreamReset(ids[2], ResetCode.TOO_MANY_STREAMS)]
    assert client.stream_ids == ids[:2]


def test_bridge_mux_close_is_a_half_close() -> None:
    client, server = mux_pair()
    sid = client.open_stream("example.com", 443)
    client.send_data(sid, b"request")
    client.end_stream(sid)
    assert deliver(client, server) == [
        StreamOpened(sid, "example.com", 443),
        DataReceived(sid, b"request"),
        StreamEnded(sid),
    ]
    server.send_data(sid, b"response")
    server.end_stream(sid)
    assert deliver(server, client) == [DataReceived(sid, b"response"), StreamEnded(sid)]
    assert client.stream_ids == server.stream_ids == []
    with pytest.raises(RemoteProtocolError, match="unopened"):
        client.receive_record(encode_frame(Data(sid + 1, b"x")))


def test_bridge_mux_data_after_close_is_a_protocol_error() -> None:
    _, server = mux_pair()
    server.receive_record(encode_frame(Open(1, "example.com", 443)) + encode_frame(Close(1)))
    with pytest.raises(RemoteProtocolError, match="after CLOSE"):
        server.receive_record(encode_frame(Data(1, b"x")))


def test_bridge_mux_ping_is_answered() -> None:
    client, server = mux_pair()
    client.ping(b"12345678")
    assert deliver(client, server) == [PingReceived(b"12345678")]
    assert deliver(server, client) == [PongReceived(b"12345678")]
    with pytest.raises(LocalProtocolError):
        client.ping(b"short")


def test_bridge_mux_pads_the_first_records_of_each_stream_heavily() -> None:
    client, _ = mux_pair()
    sid = client.open_stream("example.com", 443)
    sizes = []
    for _ in range(SHAPE.heavy_records + 30):
        client.send_data(sid, b"x" * 40)
        sizes += [len(r) for r in client.records_to_send()]
    heavy, light = sizes[: SHAPE.heavy_records], sizes[SHAPE.heavy_records :]
    assert all(size >= min(SHAPE.targets) for size in heavy)
    assert sum(light) / len(light) < min(SHAPE.targets)
    assert 47 in light  # most later records carry no padding at all


def test_bridge_mux_padding_only_records_are_legal() -> None:
    client, server = mux_pair()
    client.send_padding(500)
    records = client.records_to_send()
    assert [len(r) for r in records] == [500]
    assert server.receive_record(records[0]) == []
    with pytest.raises(LocalProtocolError):
        client.send_padding(0)


def test_bridge_mux_large_writes_are_split_into_records() -> None:
    client, server = mux_pair()
    sid = client.open_stream("example.com", 443)
    payload = random.Random(3).randbytes(100_000)
    client.send_data(sid, payload)
    records = client.records_to_send()
    assert all(len(r) <= MAX_PLAINTEXT for r in records)
    frames = [f for r in records for f in decode_frames(r)]
    assert max(len(f.data) for f in frames if isinstance(f, Data)) == MAX_DATA
    got = b"".join(
        e.data for r in records for e in server.receive_record(r) if isinstance(e, DataReceived)
    )
    assert got == payload


# ------------------------------------------------------------------- whole sessions (crypto)


def make_line(seed: int = 1) -> tuple[BridgeLine, X25519PrivateKey]:
    r = random.Random(seed)
    private = X25519PrivateKey.from_private_bytes(r.randbytes(32))
    return BridgeLine(
        private.public_key().public_bytes_raw(), r.randbytes(32), r.randbytes(8)
    ), private


LINE, PRIVATE = make_line()


def session(**options: int) -> tuple[BridgeConnection, BridgeConnection]:
    client = BridgeConnection.client(LINE, rng=rng_from(5), now=NOW, **options)
    server = BridgeConnection.server(LINE, PRIVATE, ReplayCache(), rng=rng_from(6), **options)
    assert isinstance(server.receive_data(client.data_to_send(), NOW)[0], HandshakeCompleted)
    assert isinstance(client.receive_data(server.data_to_send())[0], HandshakeCompleted)
    return client, server


def test_bridge_session_carries_500_concurrent_streams() -> None:
    client, server = session()
    payloads = {}
    for i in range(500):
        sid = client.open_stream(f"host{i}.example", 443)
        payloads[sid] = random.Random(i).randbytes(200 + i * 7)
        client.send_data(sid, payloads[sid])
    opened: list[int] = []
    received: dict[int, bytearray] = {}
    for event in server.receive_data(client.data_to_send(), NOW):
        if isinstance(event, StreamOpened):
            opened.append(event.stream_id)
        elif isinstance(event, DataReceived):
            received.setdefault(event.stream_id, bytearray()).extend(event.data)
            server.acknowledge_data(event.stream_id, len(event.data))
    assert len(opened) == 500 and len(server.mux.stream_ids) == 500
    for sid, data in received.items():  # echo everything back reversed, then close
        server.send_data(sid, bytes(data[::-1]))
        server.end_stream(sid)
    echoed: dict[int, bytearray] = {}
    ended = set()
    for event in client.receive_data(server.data_to_send()):
        if isinstance(event, DataReceived):
            echoed.setdefault(event.stream_id, bytearray()).extend(event.data)
        elif isinstance(event, StreamEnded):
            ended.add(event.stream_id)
    assert ended == set(payloads)
    assert {sid: bytes(data) for sid, data in echoed.items()} == {
        sid: p[::-1] for sid, p in payloads.items()
    }


def test_bridge_session_tampered_record_closes_with_a_clear_error() -> None:
    client, server = session()
    sid = client.open_stream("example.com", 443)
    client.send_data(sid, b"secret request")
    wire = bytearray(client.data_to_send())
    wire[10] ^= 0x01
    with pytest.raises(RemoteProtocolError, match="tampered"):
        server.receive_data(bytes(wire), NOW)
    assert server.state is ConnectionState.CLOSED
    assert server.data_to_send() == b""
    with pytest.raises(RemoteProtocolError, match="closed"):
        server.receive_data(b"more", NOW)
    with pytest.raises(LocalProtocolError):
        server.ping(b"12345678")


def test_bridge_session_replayed_and_reordered_records_close_it() -> None:
    client, server = session()
    sid = client.open_stream("example.com", 443)
    client.send_data(sid, b"one")
    first = client.data_to_send()
    client.send_data(sid, b"two")
    second = client.data_to_send()
    server.receive_data(first, NOW)
    # a replayed record's length unmasks to a random size: the tag check fails once that many
    # bytes are in (or at once, when the size is out of range)
    with pytest.raises(RemoteProtocolError):
        server.receive_data(first + bytes(MAX_CIPHERTEXT + 2), NOW)
    client2, server2 = session()
    sid = client2.open_stream("example.com", 443)
    client2.send_data(sid, b"one")
    first = client2.data_to_send()
    client2.send_data(sid, b"two")
    second = client2.data_to_send()
    with pytest.raises(RemoteProtocolError):
        server2.receive_data(second + first + bytes(MAX_CIPHERTEXT + 2), NOW)


def test_bridge_session_truncated_and_clean_ends() -> None:
    client, server = session()
    client.ping(b"abcdefgh")
    wire = client.data_to_send()
    server.receive_data(wire[:-3], NOW)
    with pytest.raises(RemoteProtocolError, match="truncated"):
        server.receive_eof()
    client, server = session()
    assert server.receive_eof() == [SessionEnded()]
    assert server.receive_eof() == [SessionEnded()]


@given(st.binary(min_size=1, max_size=3000), st.integers(0, 10**6))
def test_bridge_session_garbage_after_handshake_never_leaks(garbage: bytes, seed: int) -> None:
    client, server = session()
    sid = client.open_stream("example.com", 443)
    client.send_data(sid, b"hello")
    try:
        events = server.receive_data(random.Random(seed).randbytes(2) + garbage, NOW)
    except RemoteProtocolError:
        assert server.data_to_send() == b""
        return
    assert not any(isinstance(e, DataReceived) for e in events)


def test_bridge_session_streams_queued_before_the_handshake_leave_after_it() -> None:
    client = BridgeConnection.client(LINE, rng=rng_from(5), now=NOW)
    server = BridgeConnection.server(LINE, PRIVATE, ReplayCache(), rng=rng_from(6))
    sid = client.open_stream("example.com", 443)
    hello = client.data_to_send()
    assert client.records_to_send() == []
    server.receive_data(hello, NOW)
    client.receive_data(server.data_to_send())
    assert server.receive_data(client.data_to_send(), NOW) == [
        StreamOpened(sid, "example.com", 443)
    ]


def test_bridge_session_rekeys_in_step() -> None:
    client, server = session(rekey_interval=4)
    sid = client.open_stream("example.com", 443)
    for i in range(20):
        client.send_data(sid, bytes([i]) * 100)
        events = server.receive_data(client.data_to_send(), NOW)
        assert events[-1] == DataReceived(sid, bytes([i]) * 100)


session_ops = st.lists(
    st.sampled_from(
        ["c2s", "s2c", "open", "send", "ping", "garbage-c", "garbage-s", "eof-c", "eof-s", "flip"]
    ),
    max_size=25,
)


@given(session_ops)
def test_bridge_session_states_only_move_along_the_table(operations: list[str]) -> None:
    """Any sequence of deliveries, stream calls, garbage and EOFs: every state change is in
    TRANSITIONS, and the only exceptions are the protocol's own."""
    client = BridgeConnection.client(LINE, rng=rng_from(5), now=NOW)
    server = BridgeConnection.server(LINE, PRIVATE, ReplayCache(), rng=rng_from(6))
    allowed = {(old, new) for (old, _), new in TRANSITIONS.items()}
    wires = {"c2s": bytearray(), "s2c": bytearray()}
    flip = False
    for op in operations:
        before = (client.state, server.state)
        try:
            if op in ("c2s", "s2c"):
                src, dst = (client, server) if op == "c2s" else (server, client)
                wires[op] += src.data_to_send()
                chunk = bytes(wires[op])
                wires[op].clear()
                if flip and chunk:
                    chunk = bytes([chunk[0] ^ 1]) + chunk[1:]
                    flip = False
                dst.receive_data(chunk, NOW)
            elif op == "open":
                client.open_stream("example.com", 443)
            elif op == "send" and client.mux.stream_ids:
                client.send_data(client.mux.stream_ids[0], b"data")
            elif op == "ping":
                client.ping(b"01234567")
            elif op == "garbage-c":
                client.receive_data(b"\x00garbage")
            elif op == "garbage-s":
                server.receive_data(b"\x00garbage", NOW)
            elif op == "eof-c":
                client.receive_eof()
            elif op == "eof-s":
                server.receive_eof()
            elif op == "flip":
                flip = True
        except (RemoteProtocolError, LocalProtocolError):
            pass
        for old, new in zip(before, (client.state, server.state), strict=True):
            assert old == new or (old, new) in allowed
        for conn in (client, server):
            if conn.state in (ConnectionState.REJECTED, ConnectionState.CLOSED):
                assert conn.data_to_send() == b""


def test_bridge_mux_session_window_bounds_all_streams_together() -> None:
    client = Mux(Role.CLIENT, SHAPE, rng_from(1), initial_window=800, session_window=1000)
    server = Mux(Role.SERVER, SHAPE, rng_from(2), initial_window=800, session_window=1000)
    one, two = client.open_stream("a.example", 1), client.open_stream("b.example", 1)
    client.send_data(one, bytes(700))
    assert client.send_window(two) == 300
    with pytest.raises(LocalProtocolError, match="window"):
        client.send_data(two, bytes(301))
    client.send_data(two, bytes(300))
    events = deliver(client, server)
    assert [len(e.data) for e in events if isinstance(e, DataReceived)] == [700, 300]
    server.acknowledge_data(one, 700)  # returns 700 to stream one and to the session
    assert WindowUpdated(0, 700) in deliver(server, client)
    assert client.send_window(two) == 500  # stream two: 800 - 300; session: 1000 - 1000 + 700


def test_bridge_mux_session_overrun_is_a_protocol_error() -> None:
    server = Mux(Role.SERVER, SHAPE, rng_from(2), initial_window=800, session_window=1000)
    server.receive_record(
        encode_frame(Open(1, "a.example", 1)) + encode_frame(Open(2, "b.example", 1))
    )
    server.receive_record(encode_frame(Data(1, bytes(800))))
    with pytest.raises(RemoteProtocolError, match="session's flow-control window"):
        server.receive_record(encode_frame(Data(2, bytes(201))))


def test_bridge_mux_session_credit_survives_resets_and_ended_streams() -> None:
    """Credit of bytes nobody will consume comes back: no slow leak of the session window."""
    client = Mux(Role.CLIENT, SHAPE, rng_from(1), initial_window=1000, session_window=1000)
    server = Mux(Role.SERVER, SHAPE, rng_from(2), initial_window=1000, session_window=1000)
    for _ in range(20):  # each round would leak the whole window if credit were lost
        sid = client.open_stream("a.example", 1)
        client.send_data(sid, bytes(1000))
        client.end_stream(sid)
        events = deliver(client, server)
        assert [type(e) for e in events] == [StreamOpened, DataReceived, StreamEnded]
        if sid % 2:
            server.reset_stream(sid)  # the application gives up without reading
        else:
            server.end_stream(sid)  # finished both ways, then the bytes are consumed
            server.acknowledge_data(sid, 1000)
            server.acknowledge_data(sid, 1000)  # a second acknowledgement changes nothing
        back = deliver(server, client)
        assert WindowUpdated(0, 1000) in back
        assert client.send_window(client.open_stream("probe.example", 1)) == 1000
        client.reset_stream(client.stream_ids[-1])
        deliver(client, server)


@given(st.integers(1, 8), st.integers(1, 8), st.lists(st.integers(0, 8), max_size=20))
def test_bridge_mux_tiny_windows_never_stall_or_send_empty_credit(
    initial: int, session: int, acks: list[int]
) -> None:
    client = Mux(Role.CLIENT, SHAPE, rng_from(1), initial_window=initial, session_window=session)
    server = Mux(Role.SERVER, SHAPE, rng_from(2), initial_window=initial, session_window=session)
    sid = client.open_stream("a.example", 1)
    sent = received = unacked = 0
    for ack in acks:
        size = client.send_window(sid)
        client.send_data(sid, bytes(size))
        sent += size
        for event in deliver(client, server):
            if isinstance(event, DataReceived):
                received += len(event.data)
                unacked += len(event.data)
        server.acknowledge_data(sid, min(ack, unacked))
        unacked -= min(ack, unacked)
        deliver(server, client)
    assert sent == received
    server.acknowledge_data(sid, unacked)  # everything consumed: the sender may go on
    deliver(server, client)
    # credit goes back in batches of a quarter window, so less than a quarter may stay held
    # back (it leaves with the next batch); the sender is never left without room
    held_stream, held_session = max(initial // 4 - 1, 0), max(session // 4 - 1, 0)
    window = client.send_window(sid)
    assert window > 0 and window >= min(initial - held_stream, session - held_session)


@given(st.binary(min_size=0, max_size=3000), st.integers(0, 40), st.booleans())
def test_bridge_mux_bulk_records_are_taken_over_without_changing_what_arrives(
    payload: bytes, pad: int, as_bytearray: bool
) -> None:
    # A record holding one DATA frame (and maybe padding) may come as a bytearray, which the mux
    # takes over in place; the events are the same as for the same bytes in any other form.
    client, server = mux_pair()
    sid = client.open_stream("bulk.example", 443)
    deliver(client, server)
    record = encode_frame(Data(sid, payload)) + (bytes(pad + 1) if pad else b"")
    got = server.receive_record(bytearray(record) if as_bytearray else record)
    assert got == ([DataReceived(sid, payload)] if payload else [])
    assert server.receive_window(sid) == INITIAL_WINDOW - len(payload)


def test_bridge_mux_bulk_records_keep_every_flow_control_rule() -> None:
    client, server = mux_pair(initial_window=100)
    sid = client.open_stream("bulk.example", 443)
    deliver(client, server)
    with pytest.raises(RemoteProtocolError, match="overran"):
        server.receive_record(bytearray(encode_frame(Data(sid, bytes(101)))))
    client, server = mux_pair()
    with pytest.raises(RemoteProtocolError, match="unopened"):
        server.receive_record(bytearray(encode_frame(Data(7, b"x"))))


def test_bridge_mux_fills_whole_records_with_bulk_data() -> None:
    client, server = mux_pair()
    sid = client.open_stream("bulk.example", 443)
    deliver(client, server)
    client.send_data(sid, memoryview(bytes(4 * MAX_DATA)))
    records = client.records_to_send()
    # the first DATA records are heavy (each ends its record); all are full size, none padded
    assert sorted(len(r) for r in records)[-4:] == [MAX_PLAINTEXT] * 4
    events = [e for r in records for e in server.receive_record(bytearray(r))]
    assert sum(len(e.data) for e in events if isinstance(e, DataReceived)) == 4 * MAX_DATA
