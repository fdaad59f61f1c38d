"""Tests for proxy.protocols.bridge.prefix: first-byte shaping of the raw carrier."""

from __future__ import annotations

import os
import random

from hypothesis import given
from hypothesis import strategies as st

from proxy.lab.triggers import _looks_like
from proxy.protocols.bridge.prefix import (
    ASCII_LEN,
    build_prefix,
    check_prefix,
    prefix_length,
)


@given(st.integers(0, 2**32 - 1), st.integers(1, 1354))
def test_ascii_prefix_is_printable_and_checks(seed: int, hello_length: int) -> None:
    rng = random.Random(seed)
    prefix = build_prefix("ascii", rng.randbytes, hello_length)
    assert len(prefix) == ASCII_LEN == prefix_length("ascii")
    assert all(0x20 <= b <= 0x7E for b in prefix)  # China's FET exemptions 2 and 4
    assert check_prefix("ascii", prefix + os.urandom(10)) is True
    assert check_prefix("ascii", prefix[:-1]) is None


@given(st.integers(1, 0xFFFF))
def test_tls_prefix_looks_like_a_tls_record_to_an_allow_list(hello_length: int) -> None:
    prefix = build_prefix("tls", os.urandom, hello_length)
    assert prefix[:3] == b"\x16\x03\x01"
    assert int.from_bytes(prefix[3:5], "big") == hello_length
    assert _looks_like("tls", prefix + os.urandom(64))
    assert check_prefix("tls", prefix) is True


@given(st.binary(max_size=40))
def test_check_prefix_rejects_or_waits_but_never_accepts_wrong_bytes(data: bytes) -> None:
    verdict = check_prefix("tls", data)
    if len(data) < 5:
        assert verdict is None
    else:
        assert verdict is (data[:3] == b"\x16\x03\x01")
    ascii_verdict = check_prefix("ascii", data)
    if len(data) < ASCII_LEN:
        assert ascii_verdict is None
    else:
        assert ascii_verdict is all(0x20 <= b <= 0x7E for b in data[:ASCII_LEN])
    assert check_prefix("none", data) is True
    assert build_prefix("none", os.urandom, 10) == b""


def test_ascii_prefix_uses_every_printable_byte_evenly() -> None:
    rng = random.Random(7)
    counts = [0] * 256
    for _ in range(4000):
        for b in build_prefix("ascii", rng.randbytes, 100):
            counts[b] += 1
    used = counts[0x20:0x7F]
    assert min(used) > 0.7 * (sum(used) / len(used))
