"""Tests for proxy.protocols.websocket: RFC 6455 framing and handshake keys."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.errors import RemoteProtocolError
from proxy.protocols.websocket import (
    MAX_CONTROL_PAYLOAD,
    Frame,
    FrameDecoder,
    Opcode,
    accept_key,
    encode_frame,
    valid_client_key,
)

DATA_OPCODES = st.sampled_from([Opcode.BINARY, Opcode.TEXT])
CONTROL = st.sampled_from([Opcode.PING, Opcode.PONG, Opcode.CLOSE])


def test_accept_key_matches_rfc_6455_example() -> None:
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert valid_client_key("dGhlIHNhbXBsZSBub25jZQ==")
    assert not valid_client_key("dGhlIHNhbXBsZSBub25jZQ")
    assert not valid_client_key("!" * 24)


def test_rfc_6455_examples_decode() -> None:
    # section 5.7: unmasked "Hello" and masked "Hello"
    assert FrameDecoder(client_side=True).receive_data(bytes.fromhex("810548656c6c6f")) == [
        Frame(Opcode.TEXT, b"Hello")
    ]
    masked = bytes.fromhex("818537fa213d7f9f4d5158")
    assert FrameDecoder(client_side=False).receive_data(masked) == [Frame(Opcode.TEXT, b"Hello")]


@st.composite
def messages(draw: st.DrawFn) -> list[Frame]:
    """Valid frame sequences: data messages (maybe fragmented) with control frames between."""
    frames: list[Frame] = []
    for _ in range(draw(st.integers(1, 5))):
        parts = draw(st.lists(st.binary(max_size=70000), min_size=1, max_size=3))
        for i, part in enumerate(parts):
            opcode = draw(DATA_OPCODES) if i == 0 else Opcode.CONTINUATION
            frames.append(Frame(opcode, part, fin=i == len(parts) - 1))
            if draw(st.booleans()):
                frames.append(Frame(draw(CONTROL), draw(st.binary(max_size=125))))
    return frames


@given(messages(), st.booleans(), st.binary(min_size=4, max_size=4), st.data())
def test_frames_round_trip_in_any_chunking(
    frames: list[Frame], from_client: bool, mask: bytes, data: st.DataObject
) -> None:
    wire = b"".join(
        encode_frame(f.opcode, f.payload, mask=mask if from_client else None, fin=f.fin)
        for f in frames
    )
    decoder = FrameDecoder(client_side=not from_client, max_payload=1 << 17)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    got: list[Frame] = []
    last = 0
    for cut in [*cuts, len(wire)]:
        got += decoder.receive_data(wire[last:cut])
        last = cut
    assert got == frames
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("wire", "client_side", "message"),
    [
        (bytes([0xC2, 0x00]), True, "reserved bits"),
        (bytes([0x83, 0x00]), True, "unknown WebSocket opcode"),
        (bytes([0x82, 0x00]), False, "must be masked"),
        (bytes([0x82, 0x80, 1, 2, 3, 4]), True, "must not be masked"),
        (bytes([0x09, 0x00]), True, "control frame"),
        (bytes([0x89, 126, 0, 126]), True, "control frame"),
        (bytes([0x80, 0x00]), True, "continuation"),
        (bytes([0x02, 0x00, 0x82, 0x00]), True, "continuation"),
        (bytes([0x82, 127]) + (1 << 63).to_bytes(8, "big"), True, "top bit"),
        (bytes([0x82, 127]) + (1 << 40).to_bytes(8, "big"), True, "over the limit"),
    ],
)
def test_decoder_rejects_protocol_violations(wire: bytes, client_side: bool, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        FrameDecoder(client_side=client_side).receive_data(wire)


@given(st.binary(max_size=300), st.booleans())
def test_decoder_on_garbage_raises_only_our_error_and_stays_bounded(
    garbage: bytes, client_side: bool
) -> None:
    decoder = FrameDecoder(client_side=client_side, max_payload=1024)
    try:
        for frame in decoder.receive_data(garbage):
            assert len(frame.payload) <= 1024
            if frame.opcode.is_control:
                assert len(frame.payload) <= MAX_CONTROL_PAYLOAD
    except RemoteProtocolError:
        return
    assert decoder.buffered <= len(garbage)


def test_encoder_refuses_big_or_fragmented_control_frames_and_bad_masks() -> None:
    from proxy.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        encode_frame(Opcode.PING, b"x" * 126)
    with pytest.raises(LocalProtocolError):
        encode_frame(Opcode.CLOSE, b"", fin=False)
    with pytest.raises(LocalProtocolError):
        encode_frame(Opcode.BINARY, b"", mask=b"abc")


@given(st.binary(max_size=70000), st.booleans(), st.binary(min_size=4, max_size=4))
def test_encoder_takes_any_bytes_like_payload(payload: bytes, masked: bool, mask: bytes) -> None:
    key = mask if masked else None
    expected = encode_frame(Opcode.BINARY, payload, mask=key)
    assert encode_frame(Opcode.BINARY, bytearray(payload), mask=key) == expected
    assert encode_frame(Opcode.BINARY, memoryview(payload), mask=key) == expected
    decoded = FrameDecoder(client_side=not masked).receive_data(expected)
    assert decoded == [Frame(Opcode.BINARY, payload)]
