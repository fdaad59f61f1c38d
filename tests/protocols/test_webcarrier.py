"""The HTTP carriers' codec: carrier ids, request targets, the reorder buffer."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import RemoteProtocolError
from proxy.protocols.webcarrier import (
    ID_TEXT_LEN,
    MAX_SEQ,
    CarrierId,
    CarrierKind,
    CarrierTarget,
    ReorderBuffer,
    build_target,
    check_carrier_id,
    make_carrier_id,
    parse_target,
)

secrets_ = st.binary(min_size=32, max_size=32)
kinds = st.sampled_from(list(CarrierKind))
times = st.integers(min_value=0, max_value=(1 << 32) - 1)
nonces = st.binary(min_size=8, max_size=8)
paths = st.from_regex(r"(/[A-Za-z0-9._~-]{1,12}){1,3}", fullmatch=True)
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@given(secrets_, kinds, times, nonces)
def test_carrier_id_round_trips(secret: bytes, kind: CarrierKind, now: int, nonce: bytes) -> None:
    text = make_carrier_id(secret, kind, now, nonce)
    assert len(text) == ID_TEXT_LEN
    assert check_carrier_id(secret, text) == CarrierId(kind, now, text)


@given(secrets_, kinds, times, nonces, st.data())
def test_carrier_id_with_any_character_changed_is_refused(
    secret: bytes, kind: CarrierKind, now: int, nonce: bytes, data: st.DataObject
) -> None:
    text = make_carrier_id(secret, kind, now, nonce)
    at = data.draw(st.integers(0, len(text) - 1))
    other = data.draw(st.sampled_from(ALPHABET).filter(lambda c: c != text[at]))
    assert check_carrier_id(secret, text[:at] + other + text[at + 1 :]) is None


@given(secrets_, secrets_, kinds, times, nonces)
def test_carrier_id_needs_the_bridge_secret(
    secret: bytes, other: bytes, kind: CarrierKind, now: int, nonce: bytes
) -> None:
    text = make_carrier_id(other, kind, now, nonce)
    assert (check_carrier_id(secret, text) is not None) == (secret == other)


@given(secrets_, st.text(max_size=64))
def test_check_carrier_id_takes_any_text(secret: bytes, text: str) -> None:
    assert check_carrier_id(secret, text) is None  # forging a tag by chance: 2**-64


def test_carrier_id_freshness_is_a_window_both_ways() -> None:
    found = check_carrier_id(
        b"k" * 32, make_carrier_id(b"k" * 32, CarrierKind.POLL, 1000, b"n" * 8)
    )
    assert found is not None and found.kind is CarrierKind.POLL
    assert found.fresh(1100, 120) and found.fresh(900, 120)
    assert not found.fresh(1121, 120) and not found.fresh(879, 120)
    with pytest.raises(ValueError, match="nonce"):
        make_carrier_id(b"k" * 32, CarrierKind.SPLIT, 0, b"short")


@given(paths, secrets_, kinds, times, nonces, st.none() | st.integers(0, MAX_SEQ))
def test_targets_round_trip(
    path: str, secret: bytes, kind: CarrierKind, now: int, nonce: bytes, seq: int | None
) -> None:
    carrier = make_carrier_id(secret, kind, now, nonce)
    target = build_target(path, carrier, seq).encode()
    assert parse_target(path, target) == CarrierTarget(carrier, seq)
    # one more level, a query, a sign or leading zeros make it not ours
    assert parse_target(path, target + b"/1") is None or seq is None
    assert parse_target(path, target + b"?a=1") is None
    if seq is not None:
        assert parse_target(path, target.replace(f"/{seq}".encode(), f"/0{seq}".encode())) is None
        assert parse_target(path, target.replace(f"/{seq}".encode(), f"/+{seq}".encode())) is None
    assert parse_target(path + "x", target) is None


@given(paths, st.binary(max_size=120))
def test_parse_target_takes_any_bytes(path: str, target: bytes) -> None:
    found = parse_target(path, target)
    if found is not None:  # whatever it accepts, it rebuilds to the same target
        assert build_target(path, found.carrier, found.seq).encode() == target


def test_seq_out_of_range_is_refused() -> None:
    carrier = "A" * ID_TEXT_LEN
    assert parse_target("/p", f"/p/{carrier}/{MAX_SEQ + 1}".encode()) is None
    with pytest.raises(ValueError, match="range"):
        build_target("/p", carrier, -1)


@given(st.lists(st.binary(max_size=40), max_size=20), st.randoms(use_true_random=False))
def test_reorder_buffer_restores_any_order_and_drops_repeats(
    pieces: list[bytes], rnd: random.Random
) -> None:
    arrivals = [*enumerate(pieces), *rnd.sample(list(enumerate(pieces)), len(pieces) // 2)]
    rnd.shuffle(arrivals)
    buffer = ReorderBuffer(window=max(1, len(pieces)))
    out = b""
    bound = sum(len(p) for p in pieces)
    for seq, data in arrivals:
        buffer.add(seq, data)
        assert buffer.held <= bound
        out += buffer.read(rnd.randint(0, 50))
    out += buffer.read()
    assert out == b"".join(pieces)
    assert buffer.held == 0 and buffer.next_seq == len(pieces)


def test_reorder_buffer_refuses_pieces_beyond_its_window() -> None:
    buffer = ReorderBuffer(window=4)
    assert buffer.add(3, b"d")
    with pytest.raises(RemoteProtocolError, match="too far ahead"):
        buffer.add(4, b"e")
    assert not buffer.add(3, b"d")  # a repeat changes nothing
    for seq, data in ((1, b"b"), (0, b"a"), (2, b"c")):
        buffer.add(seq, data)
    assert buffer.read() == b"abcd" and buffer.held == 0
    assert not buffer.add(0, b"a")
    with pytest.raises(ValueError):
        ReorderBuffer(window=0)
