"""Tests for the bridge frame codec, AEAD records and padding shape."""

from __future__ import annotations

import random
import string

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import LocalProtocolError, RemoteProtocolError
from proxy.protocols.bridge.frames import (
    MAX_DATA,
    MAX_WINDOW,
    Ack,
    Bye,
    Close,
    Data,
    Frame,
    Open,
    Pad,
    Ping,
    Pong,
    Reset,
    ResetCode,
    Window,
    decode_frames,
    encode_frame,
)
from proxy.protocols.bridge.padding import MAX_TARGET, MIN_TARGET, PaddingShape
from proxy.protocols.bridge.records import (
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    RecordOpener,
    RecordSealer,
    _next_key,
)

KEY = bytes(range(32))
LENGTH_KEY = bytes(range(32, 64))

stream_ids = st.integers(0, 0xFFFFFFFF)
hosts = st.one_of(
    st.lists(
        st.text(string.ascii_lowercase + string.digits, min_size=1, max_size=12),
        min_size=1,
        max_size=4,
    ).map(".".join),
    st.ip_addresses().map(str),
)
plain_frames = st.one_of(
    st.builds(Data, stream_ids, st.binary(max_size=300)),
    st.builds(Open, stream_ids, hosts, st.integers(1, 65535)),
    st.builds(Close, stream_ids),
    st.builds(Reset, stream_ids, st.sampled_from(ResetCode)),
    st.builds(Window, stream_ids, st.integers(1, MAX_WINDOW)),
    st.builds(Ping, st.binary(min_size=8, max_size=8)),
    st.builds(Pong, st.binary(min_size=8, max_size=8)),
    st.builds(Ack, st.integers(0, (1 << 64) - 1)),
    st.builds(Bye),
)


def encode_all(frames: list[Frame]) -> bytes:
    return b"".join(encode_frame(f) for f in frames)


@given(st.lists(plain_frames, max_size=12), st.none() | st.integers(0, 200))
def test_bridge_frames_round_trip(frames: list[Frame], pad: int | None) -> None:
    if pad is not None:
        frames = [*frames, Pad(pad)]
    assert decode_frames(encode_all(frames)) == frames


@given(st.binary(max_size=600))
def test_bridge_frames_garbage_raises_only_protocol_errors(garbage: bytes) -> None:
    try:
        frames = decode_frames(garbage)
    except RemoteProtocolError:
        return
    assert encode_all(frames) == garbage or any(isinstance(f, Pad) for f in frames)


@given(st.lists(plain_frames, min_size=1, max_size=6), st.data())
def test_bridge_frames_truncation_is_an_error_or_a_prefix(
    frames: list[Frame], data: st.DataObject
) -> None:
    wire = encode_all(frames)
    cut = data.draw(st.integers(0, len(wire) - 1))
    try:
        decoded = decode_frames(wire[:cut])
    except RemoteProtocolError:
        return
    assert decoded == frames[: len(decoded)]


def test_bridge_frames_pad_swallows_the_rest_of_the_record() -> None:
    assert decode_frames(b"\x00" + encode_frame(Close(1))) == [Pad(5)]
    assert decode_frames(encode_frame(Close(1)) + b"\x00") == [Close(1), Pad(0)]


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x0a", "unknown"),
        (b"\x08\x00\x00", "truncated"),
        (b"\x01\x00\x00\x00\x01\x00\x05ab", "truncated"),
        (b"\x02\x00\x00\x00\x01\x00\x00\x01a", "port 0"),
        (b"\x02\x00\x00\x00\x01\x01\xbb\x00", "domain"),
        (b"\x02\x00\x00\x00\x01\x01\xbb\x03a b", "not valid"),
        (b"\x04\x00\x00\x00\x01\x63", "unknown code"),
        (b"\x05\x00\x00\x00\x01\x00\x00\x00\x00", "out of range"),
        (b"\x05\x00\x00\x00\x01\x80\x00\x00\x00", "out of range"),
        (b"\x06\x00", "truncated"),
    ],
)
def test_bridge_frames_reject_malformed(wire: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_frames(wire)


def test_bridge_frames_encoder_refuses_bad_fields() -> None:
    for frame in (
        Data(1, bytes(MAX_DATA + 1)),
        Open(1, "", 80),
        Open(1, "a", 0),
        Window(1, 0),
        Ping(b"short"),
    ):
        with pytest.raises(ValueError):
            encode_frame(frame)


# ---------------------------------------------------------------------------------- records


def pair(rekey_interval: int = 1 << 32) -> tuple[RecordSealer, RecordOpener]:
    return (
        RecordSealer(KEY, LENGTH_KEY, rekey_interval=rekey_interval),
        RecordOpener(KEY, LENGTH_KEY, rekey_interval=rekey_interval),
    )


@given(
    st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=10),
    st.lists(st.integers(1, 3000), max_size=20),
)
def test_bridge_records_round_trip_in_any_chunking(
    plaintexts: list[bytes], sizes: list[int]
) -> None:
    sealer, opener = pair()
    wire = b"".join(sealer.seal(p) for p in plaintexts)
    got: list[bytes] = []
    pos = 0
    for size in [*sizes, len(wire)]:
        got += opener.receive_data(wire[pos : pos + size])
        pos += size
    assert got == plaintexts
    assert opener.buffered == 0
    opener.receive_eof()


def test_bridge_records_hide_lengths_and_contents() -> None:
    sealer, _ = pair()
    first, second = sealer.seal(b"a" * 100), sealer.seal(b"a" * 100)
    assert len(first) == len(second) == 2 + 100 + 16
    assert first[:2] != second[:2]  # the same length, masked differently
    assert b"aaaa" not in first + second


def test_bridge_records_every_flipped_bit_closes_without_plaintext() -> None:
    sealer, _ = pair()
    record = sealer.seal(b"secret payload")
    for bit in range(len(record) * 8):
        _, opener = pair()
        mutated = bytearray(record)
        mutated[bit // 8] ^= 1 << (bit % 8)
        try:
            got = opener.receive_data(bytes(mutated))
        except RemoteProtocolError:
            got = None
        if got == []:  # a flipped length bit made it wait for more: the end never comes
            with pytest.raises(RemoteProtocolError, match=r"truncated|authentication"):
                got = opener.receive_data(bytes(MAX_CIPHERTEXT))
                opener.receive_eof()
        else:
            assert got is None, bit
        with pytest.raises(RemoteProtocolError):  # and it stays broken
            opener.receive_data(record)


def test_bridge_records_reordered_or_replayed_are_rejected() -> None:
    sealer, opener = pair()
    one, two = sealer.seal(b"one"), sealer.seal(b"two")
    # the length of a record out of place unmasks to a random size: the tag check fails once
    # that many bytes are in (or at once, when the size is out of range)
    rest = bytes(MAX_CIPHERTEXT + 2)
    with pytest.raises(RemoteProtocolError, match="tampered"):
        opener.receive_data(two + one + rest)
    _, opener = pair()
    assert opener.receive_data(one) == [b"one"]
    with pytest.raises(RemoteProtocolError, match="tampered"):
        opener.receive_data(one + rest)


def test_bridge_records_truncated_stream_is_an_error() -> None:
    sealer, opener = pair()
    record = sealer.seal(b"payload")
    assert opener.receive_data(record[:-1]) == []
    with pytest.raises(RemoteProtocolError, match="truncated"):
        opener.receive_eof()


def test_bridge_records_rekey_on_both_ends() -> None:
    sealer, opener = pair(rekey_interval=3)
    plaintexts = [bytes([i]) * 10 for i in range(10)]
    wire = b"".join(sealer.seal(p) for p in plaintexts)
    assert opener.receive_data(wire) == plaintexts
    assert sealer.records_sealed == 10
    # An opener that does not rekey reads the first three records and then fails.
    plain = RecordOpener(KEY, LENGTH_KEY)
    with pytest.raises(RemoteProtocolError):
        plain.receive_data(wire)


def test_bridge_records_refuse_bad_plaintext_sizes() -> None:
    sealer, _ = pair()
    with pytest.raises(LocalProtocolError):
        sealer.seal(b"")
    with pytest.raises(LocalProtocolError):
        sealer.seal(bytes(MAX_PLAINTEXT + 1))
    assert len(sealer.seal(bytes(MAX_PLAINTEXT))) == 2 + MAX_CIPHERTEXT


@given(st.binary(max_size=3 * MAX_CIPHERTEXT))
def test_bridge_records_garbage_raises_only_protocol_errors(garbage: bytes) -> None:
    _, opener = pair()
    try:
        assert opener.receive_data(garbage) == []
    except RemoteProtocolError:
        return
    assert opener.buffered <= 2 + MAX_CIPHERTEXT


# ---------------------------------------------------------------------------------- padding


def test_bridge_padding_shape_is_per_bridge_and_deterministic() -> None:
    shapes = [PaddingShape.from_seed(bytes([i]) * 32) for i in range(20)]
    assert shapes[0] == PaddingShape.from_seed(bytes(32))
    assert len({s.targets for s in shapes}) == 20
    for shape in shapes:
        assert 8 <= len(shape.targets) <= 24
        assert all(MIN_TARGET <= t <= MAX_TARGET for t in shape.targets)
        assert 8 <= shape.heavy_records <= 16


@given(st.binary(min_size=32, max_size=32), st.integers(0, 2000), st.integers(0, 2**32 - 1))
def test_bridge_padding_heavy_fills_to_a_target(seed: bytes, size: int, rand: int) -> None:
    shape = PaddingShape.from_seed(seed)
    pad = shape.padding_for(size, heavy=True, rand=rand)
    if size < MIN_TARGET:
        assert size + pad in shape.targets
    assert pad >= 0
    if size + pad not in shape.targets:
        assert pad < 64
    light = shape.padding_for(size, heavy=False, rand=rand)
    assert 0 <= light <= shape.light_max


def test_bridge_padding_light_regime_pads_a_minority_of_records() -> None:
    shape = PaddingShape.from_seed(b"x" * 32)
    r = random.Random(1)
    padded = sum(
        shape.padding_for(1000, heavy=False, rand=r.getrandbits(32)) > 0 for _ in range(4000)
    )
    assert 4000 / 20 < padded < 4000 / 3


@given(
    st.lists(st.integers(1, MAX_PLAINTEXT), min_size=1, max_size=6),
    st.integers(1, 4),
    st.lists(st.integers(1, 3 * MAX_CIPHERTEXT), max_size=10),
)
def test_bridge_records_sealed_in_batches_open_in_any_chunking(
    sizes: list[int], rekey_interval: int, reads: list[int]
) -> None:
    # batches of full-size records, across rekeys, read back in pieces of any size
    sealer, opener = pair(rekey_interval=rekey_interval)
    plaintexts = [random.Random(i).randbytes(size) for i, size in enumerate(sizes)]
    one_by_one, _ = pair(rekey_interval=rekey_interval)
    wire = bytes(sealer.seal_all(plaintexts))
    assert wire == b"".join(one_by_one.seal(p) for p in plaintexts)
    got: list[bytes] = []
    pos = 0
    for size in [*reads, len(wire)]:
        got += opener.receive_data(memoryview(wire)[pos : pos + size])
        pos += size
    assert got == plaintexts
    assert opener.buffered == 0


def test_bridge_records_never_reuse_a_nonce_across_a_rekey() -> None:
    # The first record after a rekey is sealed under the new key with counter 0: the old key
    # never sees counter 0 twice.
    sealer, _ = pair(rekey_interval=1)
    first, second = sealer.seal(b"first"), sealer.seal(b"second")
    nonce0 = bytes(12)
    assert ChaCha20Poly1305(KEY).decrypt(nonce0, first[2:], first[:2]) == b"first"
    new_key = _next_key(KEY, b"data")
    assert ChaCha20Poly1305(new_key).decrypt(nonce0, second[2:], second[:2]) == b"second"
    with pytest.raises(InvalidTag):
        ChaCha20Poly1305(KEY).decrypt(nonce0, second[2:], second[:2])


def test_bridge_records_seal_all_checks_every_size_before_sealing() -> None:
    sealer, opener = pair()
    with pytest.raises(LocalProtocolError):
        sealer.seal_all([b"fine", b""])
    assert sealer.records_sealed == 0  # nothing was sealed, no counter moved
    assert opener.receive_data(sealer.seal(b"after")) == [b"after"]
