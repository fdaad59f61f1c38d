"""Tests for proxy.protocols.bridge.handshake: key agreement, silence to probes, replay."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocols.bridge import handshake
from proxy.protocols.bridge.connection import (
    BridgeConnection,
    ConnectionState,
    HandshakeCompleted,
    HandshakeRejected,
)
from proxy.protocols.bridge.handshake import (
    MAX_HELLO_LEN,
    Accepted,
    BridgeLine,
    ClientHandshake,
    Pending,
    Rejected,
    ReplayCache,
    ServerHandshake,
    SessionKeys,
)
from proxy.protocols.bridge.mux import DataReceived, StreamOpened

NOW = 1_800_000_000.0


def rng_from(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


def make_bridge(seed: int = 1) -> tuple[BridgeLine, X25519PrivateKey]:
    r = random.Random(seed)
    private = X25519PrivateKey.from_private_bytes(r.randbytes(32))
    line = BridgeLine(private.public_key().public_bytes_raw(), r.randbytes(32), r.randbytes(8))
    return line, private


LINE, PRIVATE = make_bridge()


def server_for(replay: ReplayCache | None = None, seed: int = 7) -> ServerHandshake:
    return ServerHandshake(LINE, PRIVATE, replay or ReplayCache(), rng_from(seed))


def run_handshake(
    client_line: BridgeLine = LINE, *, now: float = NOW, server_now: float = NOW, seed: int = 3
) -> tuple[ClientHandshake, ServerHandshake, bytes, handshake.Decision]:
    client = ClientHandshake(client_line, rng_from(seed))
    hello = client.hello(now)
    server = server_for()
    return client, server, hello, server.receive_data(hello, server_now)


@pytest.fixture
def dh_calls(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Record every X25519 the handshake module performs."""
    calls: list[bytes] = []
    real = handshake.diffie_hellman

    def counting(private: X25519PrivateKey, public: bytes) -> bytes:
        calls.append(public)
        return real(private, public)

    monkeypatch.setattr(handshake, "diffie_hellman", counting)
    return calls


def assert_mirrored(client: SessionKeys, server: SessionKeys) -> None:
    assert client.send_key == server.receive_key
    assert client.send_length_key == server.receive_length_key
    assert client.receive_key == server.send_key
    assert client.receive_length_key == server.send_length_key
    assert client.transcript_hash == server.transcript_hash
    assert len({client.send_key, client.receive_key, client.send_length_key}) == 3


def test_bridge_handshake_agrees_on_mirrored_keys() -> None:
    client, _, _, decision = run_handshake()
    assert isinstance(decision, Accepted)
    keys = client.receive_data(decision.reply)
    assert keys is not None
    assert_mirrored(keys, decision.keys)


def test_bridge_handshake_is_forward_secret_per_session() -> None:
    """Two sessions of the same bridge share no key (fresh ephemerals on both sides)."""
    _, _, _, first = run_handshake(seed=3)
    _, _, _, second = run_handshake(seed=4)
    assert isinstance(first, Accepted) and isinstance(second, Accepted)
    assert first.keys.send_key != second.keys.send_key


def chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of ``sizes`` (cycled), the rest in one piece."""
    out, pos = [], 0
    for size in sizes:
        if pos >= len(data):
            break
        out.append(data[pos : pos + size])
        pos += size
    if pos < len(data):
        out.append(data[pos:])
    return out


SIZES = st.lists(st.integers(1, 400), max_size=16)


@given(SIZES, SIZES)
def test_bridge_handshake_any_chunking_gives_the_same_keys(
    hello_sizes: list[int], reply_sizes: list[int]
) -> None:
    client = ClientHandshake(LINE, rng_from(11))
    server = server_for(seed=12)
    decisions = [server.receive_data(c, NOW) for c in chunks(client.hello(NOW), hello_sizes)]
    assert all(isinstance(d, Pending) for d in decisions[:-1])
    decision = decisions[-1]
    assert isinstance(decision, Accepted)
    pieces = chunks(decision.reply + b"records", reply_sizes)
    keys = None
    while keys is None:
        keys = client.receive_data(pieces.pop(0))
    assert_mirrored(keys, decision.keys)
    assert client.trailing_data + b"".join(pieces) == b"records"


def test_bridge_handshake_byte_by_byte() -> None:
    client = ClientHandshake(LINE, rng_from(11))
    server = server_for(seed=12)
    hello = client.hello(NOW)
    decisions = [server.receive_data(hello[i : i + 1], NOW) for i in range(len(hello))]
    assert isinstance(decisions[-1], Accepted)
    reply = decisions[-1].reply
    results = [client.receive_data(reply[i : i + 1]) for i in range(len(reply))]
    assert results[-1] is not None and results[:-1] == [None] * (len(reply) - 1)


def test_bridge_handshake_keeps_bytes_after_the_answer() -> None:
    client, _, _, decision = run_handshake()
    assert isinstance(decision, Accepted)
    client.receive_data(decision.reply + b"records")
    assert client.trailing_data == b"records"


def test_bridge_server_keeps_bytes_after_the_hello() -> None:
    client = ClientHandshake(LINE, rng_from(3))
    server = server_for()
    decision = server.receive_data(client.hello(NOW) + b"pipelined", NOW)
    assert isinstance(decision, Accepted)
    assert server.trailing_data == b"pipelined"


@given(st.lists(st.tuples(st.sampled_from(["c2s", "s2c"]), st.integers(1, 600)), max_size=40))
def test_bridge_connections_any_interleaving_complete_the_same_session(
    plan: list[tuple[str, int]],
) -> None:
    """Bytes move between a client and a server in random directions and chunk sizes."""
    client = BridgeConnection.client(LINE, rng=rng_from(21), now=NOW)
    server = BridgeConnection.server(LINE, PRIVATE, ReplayCache(), rng=rng_from(22))
    sid = client.open_stream("example.com", 443)
    pipes = {"c2s": bytearray(), "s2c": bytearray()}
    events: dict[str, list[object]] = {"client": [], "server": []}
    sent_data = False

    def move(name: str, size: int) -> None:
        nonlocal sent_data
        pipes["c2s"] += client.data_to_send()
        pipes["s2c"] += server.data_to_send()
        if client.state is ConnectionState.OPEN and not sent_data:
            client.send_data(sid, b"GET / HTTP/1.1\r\n\r\n")
            sent_data = True
        chunk = bytes(pipes[name][:size])
        del pipes[name][:size]
        if chunk and name == "c2s":
            events["server"].extend(server.receive_data(chunk, NOW))
        elif chunk:
            events["client"].extend(client.receive_data(chunk))

    for name, size in plan:
        move(name, size)
    for _ in range(4):  # then deliver everything, both ways, until quiet
        move("c2s", 1 << 20)
        move("s2c", 1 << 20)
    completed = [
        e for e in events["client"] + events["server"] if isinstance(e, HandshakeCompleted)
    ]
    assert len(completed) == 2
    assert completed[0].transcript_hash == completed[1].transcript_hash
    assert StreamOpened(sid, "example.com", 443) in events["server"]
    assert DataReceived(sid, b"GET / HTTP/1.1\r\n\r\n") in events["server"]


# --------------------------------------------------------------------- silence to the uninvited


def test_bridge_server_rejects_a_wrong_secret_before_any_dh(dh_calls: list[bytes]) -> None:
    wrong = BridgeLine(LINE.server_public, bytes(32), LINE.short_id)
    *_, decision = run_handshake(wrong)
    assert decision == Rejected("bad hello tag")
    assert dh_calls == []


def test_bridge_server_rejects_a_wrong_server_key_before_any_dh(dh_calls: list[bytes]) -> None:
    other, _ = make_bridge(99)
    wrong = BridgeLine(other.server_public, LINE.secret, LINE.short_id)
    *_, decision = run_handshake(wrong)
    assert decision == Rejected("bad hello tag")
    assert dh_calls == []


def test_bridge_server_rejects_a_wrong_short_id(dh_calls: list[bytes]) -> None:
    wrong = BridgeLine(LINE.server_public, LINE.secret, bytes(8))
    *_, decision = run_handshake(wrong)
    assert decision == Rejected("bad hello tag")
    assert dh_calls == []


@pytest.mark.parametrize("skew", [-121.0, 121.0, -3600.0, 10**9])
def test_bridge_server_rejects_a_stale_timestamp(skew: float, dh_calls: list[bytes]) -> None:
    *_, decision = run_handshake(now=NOW, server_now=NOW + skew)
    assert isinstance(decision, Rejected)
    assert "timestamp" in decision.reason
    assert dh_calls == []


@pytest.mark.parametrize("skew", [-120.0, 0.0, 119.5])
def test_bridge_server_accepts_a_timestamp_inside_the_window(skew: float) -> None:
    *_, decision = run_handshake(now=NOW, server_now=NOW + skew)
    assert isinstance(decision, Accepted)


def test_bridge_server_rejects_a_replayed_hello(dh_calls: list[bytes]) -> None:
    replay = ReplayCache()
    hello = ClientHandshake(LINE, rng_from(5)).hello(NOW)
    first = ServerHandshake(LINE, PRIVATE, replay, rng_from(1)).receive_data(hello, NOW)
    assert isinstance(first, Accepted)
    assert len(dh_calls) == 2  # es and ee, for the genuine hello only
    again = ServerHandshake(LINE, PRIVATE, replay, rng_from(2)).receive_data(hello, NOW + 100)
    assert again == Rejected("replayed hello")
    assert len(dh_calls) == 2


def test_bridge_server_rejects_every_single_flipped_bit(dh_calls: list[bytes]) -> None:
    hello = ClientHandshake(LINE, rng_from(8)).hello(NOW)
    replay = ReplayCache()
    for bit in range(len(hello) * 8):
        mutated = bytearray(hello)
        mutated[bit // 8] ^= 1 << (bit % 8)
        server = ServerHandshake(LINE, PRIVATE, replay, rng_from(bit))
        decision = server.receive_data(bytes(mutated), NOW)
        if isinstance(decision, Pending):  # a flipped length bit: the server waits for more
            decision = server.receive_data(bytes(MAX_HELLO_LEN), NOW)
        assert isinstance(decision, Rejected), bit
    assert dh_calls == []
    assert len(replay) == 0


def test_bridge_server_rejects_a_low_order_client_key_after_the_mac() -> None:
    """Only a holder of the secret can get this far; the server still refuses quietly."""
    keys = handshake._line_keys(LINE)
    nonce = bytes(range(16))
    header = bytes(32) + int(NOW).to_bytes(8, "big") + (0).to_bytes(2, "big")
    body = nonce + handshake._keystream_xor(keys.mask1, nonce, header)
    decision = server_for().receive_data(body + handshake._hello_tag(keys.mac1, body), NOW)
    assert decision == Rejected("low-order client key")


@given(st.binary(min_size=0, max_size=2 * MAX_HELLO_LEN))
def test_bridge_server_answers_random_bytes_with_silence(garbage: bytes) -> None:
    conn = BridgeConnection.server(LINE, PRIVATE, ReplayCache(), rng=rng_from(1))
    events = conn.receive_data(garbage, NOW) + conn.receive_eof()
    assert all(isinstance(e, HandshakeRejected) for e in events)
    assert len(events) == 1
    assert conn.state is ConnectionState.REJECTED
    assert conn.data_to_send() == b""
    assert conn.receive_data(b"more", NOW) == []


def test_bridge_server_rejects_a_truncated_hello_on_eof() -> None:
    hello = ClientHandshake(LINE, rng_from(5)).hello(NOW)
    conn = BridgeConnection.server(LINE, PRIVATE, ReplayCache(), rng=rng_from(1))
    assert conn.receive_data(hello[:-1], NOW) == []
    assert conn.receive_eof() == [HandshakeRejected("hello truncated")]
    assert conn.data_to_send() == b""


def test_bridge_server_connection_needs_a_clock() -> None:
    conn = BridgeConnection.server(LINE, PRIVATE, ReplayCache(), rng=rng_from(1))
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")


# ----------------------------------------------------------------------------- the client side


def test_bridge_client_refuses_an_answer_with_any_flipped_bit() -> None:
    _, _, hello, decision = run_handshake(seed=9)
    assert isinstance(decision, Accepted)
    for bit in range(len(decision.reply) * 8):
        client = ClientHandshake(LINE, rng_from(9))
        assert client.hello(NOW) == hello
        mutated = bytearray(decision.reply)
        mutated[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(RemoteProtocolError):
            if client.receive_data(bytes(mutated)) is None:
                client.receive_data(bytes(MAX_HELLO_LEN))
        assert client.state is handshake.ClientState.FAILED


def test_bridge_client_refuses_an_impostor_server() -> None:
    """Someone with the secret but not the static key cannot complete the handshake."""
    impostor_key = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    client = ClientHandshake(LINE, rng_from(3))
    hello = client.hello(NOW)
    # The impostor passes its own key off as the bridge's: the hello tag still verifies because
    # the impostor knows the secret, but it cannot compute es with the real public key.
    fake_line = BridgeLine(impostor_key.public_key().public_bytes_raw(), LINE.secret, LINE.short_id)
    fake = ServerHandshake(fake_line, impostor_key, ReplayCache(), rng_from(4))
    assert isinstance(fake.receive_data(hello, NOW), Rejected)  # tags are bound to the key
    keys = handshake._line_keys(LINE)
    tag = hello[-16:]
    ephemeral = X25519PrivateKey.from_private_bytes(bytes(32 * [7]))
    clear = ephemeral.public_key().public_bytes_raw() + bytes(2)
    forged = handshake._keystream_xor(keys.mask2, tag, clear) + bytes(16)
    with pytest.raises(RemoteProtocolError, match="prove its key"):
        client.receive_data(forged)


def test_bridge_client_connection_eof_during_handshake_is_an_error() -> None:
    client = BridgeConnection.client(LINE, rng=rng_from(1), now=NOW)
    client.data_to_send()
    with pytest.raises(RemoteProtocolError, match="during the handshake"):
        client.receive_eof()
    assert client.state is ConnectionState.CLOSED


def test_bridge_client_builds_one_hello_only() -> None:
    client = ClientHandshake(LINE, rng_from(1))
    client.hello(NOW)
    with pytest.raises(LocalProtocolError):
        client.hello(NOW)


def test_bridge_hellos_have_no_fixed_bytes_or_size() -> None:
    hellos = [ClientHandshake(LINE, rng_from(i)).hello(NOW) for i in range(64)]
    assert len({len(h) for h in hellos}) > 32
    for pos in range(74):  # nonce, encrypted header, and (min padding) tag positions
        assert len({h[pos] for h in hellos}) > 20, pos
    ones = sum(bin(b).count("1") for h in hellos for b in h) / sum(len(h) for h in hellos)
    assert 3.8 < ones < 4.2  # like random data: none of the FET exemptions by popcount


def test_bridge_server_refuses_a_mismatched_private_key() -> None:
    other = X25519PrivateKey.from_private_bytes(bytes(range(32)))
    with pytest.raises(LocalProtocolError):
        ServerHandshake(LINE, other, ReplayCache(), rng_from(1))


# ------------------------------------------------------------------------------ replay cache


def test_bridge_replay_cache_forgets_after_twice_the_window() -> None:
    cache = ReplayCache(window=10)
    assert cache.check_and_add(b"a", 100.0) is None
    assert cache.check_and_add(b"a", 119.0) == "replayed hello"
    assert cache.check_and_add(b"b", 115.0) is None
    assert cache.check_and_add(b"a", 120.5) is None  # expired and re-added
    assert len(cache) == 2


def test_bridge_replay_cache_refuses_when_full_instead_of_forgetting() -> None:
    cache = ReplayCache(window=10, max_entries=2)
    assert cache.check_and_add(b"a", 0.0) is None
    assert cache.check_and_add(b"b", 1.0) is None
    assert cache.check_and_add(b"c", 2.0) == "replay cache full"
    assert cache.check_and_add(b"a", 3.0) == "replayed hello"
    assert cache.check_and_add(b"c", 20.5) is None  # "a" expired at 20


def test_bridge_line_checks_lengths() -> None:
    with pytest.raises(ValueError):
        BridgeLine(bytes(31), bytes(32), bytes(8))
    with pytest.raises(ValueError):
        BridgeLine(bytes(32), bytes(31), bytes(8))
    with pytest.raises(ValueError):
        BridgeLine(bytes(32), bytes(32), bytes(7))
    assert "sss" not in repr(BridgeLine(bytes(32), b"s" * 32, bytes(8)))
