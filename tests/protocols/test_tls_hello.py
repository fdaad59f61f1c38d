"""Tests for proxy.protocols.tls_hello: whole, byte by byte, split over records, and fuzzed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import RemoteProtocolError
from proxy.protocols.tls_hello import (
    MAX_HELLO_SIZE,
    ClientHello,
    build_client_hello,
    looks_like_tls,
    parse_client_hello,
)


def curl_like(sni: str = "example.com") -> bytes:
    return build_client_hello(sni, ("h2", "http/1.1"), pad_to=512)


def chromium_like(sni: str = "www.example.org", seed: int = 1, **kw: object) -> bytes:
    return build_client_hello(
        sni,
        ("h2", "http/1.1"),
        key_share_size=1216,
        grease=True,
        ech=True,
        shuffle_seed=seed,
        **kw,  # type: ignore[arg-type]
    )


def assert_sni_offsets(data: bytes, hello: ClientHello) -> None:
    assert hello.sni is not None
    assert hello.sni_offset is not None and hello.sni_length is not None
    span = data[hello.sni_offset : hello.sni_offset + hello.sni_length]
    if hello.sni_length == len(hello.sni):
        assert span == hello.sni.encode()
    else:
        # a record boundary falls inside the name: the span holds one 5-byte record header
        assert hello.sni_length == len(hello.sni) + 5
        cut = next(i for i in range(len(span)) if span[i : i + 3] == b"\x16\x03\x01")
        assert span[:cut] + span[cut + 5 :] == hello.sni.encode()
    ext = hello.sni_extension_offset
    assert ext is not None
    # the extension type is 0x0000 (a record header may sit between its two bytes)
    assert data[ext] == 0
    assert data[ext + 1] == 0 or data[ext + 1 : ext + 4] == b"\x16\x03\x01"


def test_tls_hello_curl_like_is_517_bytes() -> None:
    data = curl_like()
    assert len(data) == 517
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.sni == "example.com"
    assert hello.alpn == ("h2", "http/1.1")
    assert hello.total_length == 517
    assert hello.record_length == 512
    assert hello.record_count == 1
    assert hello.legacy_version == 0x0303
    assert hello.supported_versions == (0x0304, 0x0303)
    assert hello.extensions[0] == 0x0000
    assert hello.extensions[-1] == 0x0015  # padding
    assert not hello.has_ech
    assert len(hello.session_id) == 32
    assert 0x1301 in hello.cipher_suites
    assert_sni_offsets(data, hello)


def test_tls_hello_chromium_like_with_mlkem_share() -> None:
    data = chromium_like()
    assert 1800 <= len(data) <= 2100
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.sni == "www.example.org"
    assert hello.has_ech
    assert hello.total_length == len(data)
    assert hello.extensions[0] == 0x0A0A and hello.extensions[-1] == 0x1A1A
    assert 0x0A0A in hello.supported_versions
    assert_sni_offsets(data, hello)


def test_tls_hello_shuffled_extensions_put_sni_in_different_places() -> None:
    positions = set()
    for seed in range(12):
        data = chromium_like(seed=seed)
        hello = parse_client_hello(data)
        assert hello is not None and hello.sni == "www.example.org"
        positions.add(hello.extensions.index(0))
        assert_sni_offsets(data, hello)
    assert len(positions) >= 4


def test_tls_hello_split_over_two_records() -> None:
    whole = chromium_like()
    split = chromium_like(record_sizes=[200])
    assert len(split) == len(whole) + 5
    hello = parse_client_hello(split)
    assert hello is not None
    assert hello.record_count == 2
    assert hello.record_length == 200
    assert hello.total_length == len(split)
    assert hello.sni == "www.example.org"
    assert_sni_offsets(split, hello)
    reference = parse_client_hello(whole)
    assert reference is not None
    assert hello.extensions == reference.extensions


def test_tls_hello_record_boundary_inside_the_sni() -> None:
    base = curl_like("blocked.example.net")
    hello = parse_client_hello(base)
    assert hello is not None and hello.sni_offset is not None
    # cut the handshake message three bytes into the server name
    cut = hello.sni_offset - 5 + 3
    data = build_client_hello(
        "blocked.example.net", ("h2", "http/1.1"), pad_to=512, record_sizes=[cut]
    )
    split = parse_client_hello(data)
    assert split is not None
    assert split.sni == "blocked.example.net"
    assert split.sni_offset == hello.sni_offset
    assert split.sni_length == len("blocked.example.net") + 5
    assert_sni_offsets(data, split)


def test_tls_hello_tiny_records_like_a_fragmenter() -> None:
    message_len = len(curl_like()) - 5
    data = build_client_hello(
        "example.com", ("h2", "http/1.1"), pad_to=512, record_sizes=[1] * message_len
    )
    hello = parse_client_hello(data)
    assert hello is not None
    assert hello.record_count == message_len
    assert hello.total_length == len(data)
    assert hello.sni == "example.com"


def test_tls_hello_without_sni_or_alpn() -> None:
    hello = parse_client_hello(build_client_hello(None, ()))
    assert hello is not None
    assert hello.sni is None and hello.sni_offset is None and hello.sni_length is None
    assert hello.sni_extension_offset is None
    assert hello.alpn == ()


def test_tls_hello_trailing_data_not_counted() -> None:
    data = chromium_like()
    early = b"\x17\x03\x03\x00\x10" + bytes(16)
    hello = parse_client_hello(data + early)
    assert hello == parse_client_hello(data)
    assert hello is not None and hello.total_length == len(data)


def test_tls_hello_byte_by_byte() -> None:
    data = curl_like()
    for end in range(len(data)):
        assert parse_client_hello(data[:end]) is None
    assert parse_client_hello(data) == parse_client_hello(data + b"\x00")


@given(
    seed=st.integers(0, 1000),
    sizes=st.lists(st.integers(1, 600), max_size=5),
    sni=st.from_regex(r"[a-z0-9]{1,20}(\.[a-z0-9]{1,20}){0,3}", fullmatch=True),
    data=st.data(),
)
def test_tls_hello_every_prefix_is_incomplete(
    seed: int, sizes: list[int], sni: str, data: st.DataObject
) -> None:
    raw = chromium_like(sni, seed=seed, record_sizes=sizes)
    full = parse_client_hello(raw)
    assert full is not None and full.sni == sni
    assert full.total_length == len(raw)
    assert_sni_offsets(raw, full)
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert parse_client_hello(raw[:cut]) is None
    assert parse_client_hello(raw + data.draw(st.binary(max_size=40))) == full


def _only_our_error(data: bytes) -> ClientHello | None:
    try:
        return parse_client_hello(data)
    except RemoteProtocolError:
        return None


@given(st.binary(max_size=3000))
def test_tls_hello_garbage_raises_only_remote_protocol_error(data: bytes) -> None:
    _only_our_error(data)


@given(st.binary(max_size=600))
def test_tls_hello_garbage_behind_a_record_header(body: bytes) -> None:
    data = b"\x16\x03\x01" + struct.pack("!H", len(body)) + body
    _only_our_error(data)


@given(data=st.data())
def test_tls_hello_mutations_raise_only_remote_protocol_error(data: st.DataObject) -> None:
    raw = bytearray(chromium_like(seed=data.draw(st.integers(0, 50))))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    hello = _only_our_error(bytes(raw))
    if hello is not None:
        # whatever was parsed stays inside the input
        assert hello.total_length <= len(raw)
        if hello.sni_offset is not None and hello.sni_length is not None:
            assert hello.sni_offset + hello.sni_length <= hello.total_length


@given(data=st.data())
def test_tls_hello_truncated_length_fields_never_crash(data: st.DataObject) -> None:
    raw = bytearray(curl_like())
    pos = data.draw(st.integers(5, len(raw) - 2))
    struct.pack_into("!H", raw, pos, data.draw(st.integers(0, 0xFFFF)))
    _only_our_error(bytes(raw[: data.draw(st.integers(0, len(raw)))]))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x17\x03\x03\x00\x05hello", "not handshake"),
        (b"\x16\x03\x07\x00\x05", "bad version"),
        (b"\x16\x02\x01\x00\x05", "bad version"),
        (b"\x16\x03\x01\x00\x00", "empty record"),
        (b"\x16\x03\x01\x40\x01", "record too big"),
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x00", "ServerHello"),
        (b"\x16\x03\x01\x00\x04\x01\x01\x00\x00", "too large hello"),
        (b"GET / HTTP/1.1\r\n\r\n", "HTTP"),
    ],
)
def test_tls_hello_rejects_non_hellos(data: bytes, why: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_client_hello(data)


def test_tls_hello_rejects_a_second_record_of_another_type() -> None:
    data = chromium_like(record_sizes=[100])
    data = data[:105] + b"\x14" + data[106:]
    with pytest.raises(RemoteProtocolError):
        parse_client_hello(data)


def test_tls_hello_size_bound() -> None:
    assert MAX_HELLO_SIZE == 65536
    # the handshake header alone announces a body over the bound: refused before it arrives
    header = b"\x01" + (MAX_HELLO_SIZE - 3).to_bytes(3, "big")
    with pytest.raises(RemoteProtocolError, match="larger"):
        parse_client_hello(b"\x16\x03\x01\x40\x00" + header)
    # a hello near the bound (60 KB of padding over four records) is accepted
    ok = build_client_hello("example.com", extra_padding=MAX_HELLO_SIZE - 5000)
    hello = parse_client_hello(ok)
    assert hello is not None and hello.record_count == 4
    assert hello.total_length == len(ok)


def test_tls_hello_rejects_duplicate_extensions() -> None:
    data = bytearray(curl_like())
    hello = parse_client_hello(bytes(data))
    assert hello is not None
    # turn extended_master_secret (0x0017, second extension) into a second SNI
    ems = bytes(data).index(b"\x00\x17\x00\x00", hello.sni_offset)
    data[ems : ems + 2] = b"\x00\x00"
    with pytest.raises(RemoteProtocolError):
        parse_client_hello(bytes(data))


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b"", False),
        (b"\x16", True),
        (b"\x16\x03", True),
        (b"\x16\x03\x01", True),
        (b"\x16\x03\x03\x02\x00", True),
        (b"\x16\x03\x05", False),
        (b"\x16\x02", False),
        (b"\x05\x01\x00", False),
        (b"CONNECT", False),
    ],
)
def test_tls_hello_looks_like_tls(prefix: bytes, expected: bool) -> None:
    assert looks_like_tls(prefix) is expected
