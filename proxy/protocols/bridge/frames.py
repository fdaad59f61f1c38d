"""Frames carried inside bridge records, and their codec.

A record's plaintext is one or more frames back to back. Every frame starts with a type byte::

    PAD    0x00 | anything                      the rest of the record is padding
    DATA   0x01 | stream u32 | length u16 | bytes
    OPEN   0x02 | stream u32 | port u16 | host length u8 | host (ASCII)
    CLOSE  0x03 | stream u32                    the sender will send no more DATA (half-close)
    RESET  0x04 | stream u32 | code u8          the stream is gone in both directions
    WINDOW 0x05 | stream u32 | increment u32    the sender may send ``increment`` more bytes
    PING   0x06 | opaque 8
    PONG   0x07 | opaque 8                      echo of a PING's opaque bytes
    ACK    0x08 | offset u64                    the sender has received this many record bytes
    BYE    0x09                                 the sender ends the session: do not resume it

PAD must be the last frame of its record; a record may be nothing but PAD (cover traffic).
:func:`decode_frames` raises only :class:`~proxy.errors.RemoteProtocolError`, whatever the input.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from proxy.errors import RemoteProtocolError
from proxy.protocols.bridge.records import MAX_PLAINTEXT
from proxy.protocols.socks5 import decode_domain


class FrameType(enum.IntEnum):
    PAD = 0x00
    DATA = 0x01
    OPEN = 0x02
    CLOSE = 0x03
    RESET = 0x04
    WINDOW = 0x05
    PING = 0x06
    PONG = 0x07
    ACK = 0x08
    BYE = 0x09


class ResetCode(enum.IntEnum):
    """Why a stream was reset; the server maps dial failures onto these."""

    CANCEL = 0  # the application gave up on the stream
    REFUSED = 1  # the destination refused the connection
    UNREACHABLE = 2  # no route, or the host is down
    TIMEOUT = 3  # the destination did not answer in time
    NOT_ALLOWED = 4  # the bridge's destination policy forbids the target
    RESOLVE_FAILED = 5  # the destination name does not resolve
    TOO_MANY_STREAMS = 6  # the session already carries its maximum of streams
    PROTOCOL = 7  # the stream broke the rules (sent on the stream, not the session)


MAX_STREAM_ID = 0xFFFFFFFF
MAX_WINDOW = 0x7FFFFFFF
#: the largest DATA payload of one frame (fits in one record with its 7-byte header)
MAX_DATA = MAX_PLAINTEXT - 7


@dataclass(frozen=True, slots=True)
class Pad:
    length: int  # padding bytes after the type byte


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Open:
    stream_id: int
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Close:
    stream_id: int


@dataclass(frozen=True, slots=True)
class Reset:
    stream_id: int
    code: ResetCode


@dataclass(frozen=True, slots=True)
class Window:
    stream_id: int
    increment: int


@dataclass(frozen=True, slots=True)
class Ping:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    opaque: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    offset: int  # sealed-record bytes received so far (see resume.py)


@dataclass(frozen=True, slots=True)
class Bye:
    pass


Frame = Pad | Data | Open | Close | Reset | Window | Ping | Pong | Ack | Bye

_SID = struct.Struct(">BI")
_DATA = struct.Struct(">BIH")
_OPEN = struct.Struct(">BIHB")
_RESET = struct.Struct(">BIB")
_WINDOW = struct.Struct(">BII")
_ACK = struct.Struct(">BQ")


DATA_HEADER_LEN = _DATA.size


def data_frame_span(plaintext: bytes | bytearray) -> tuple[int, int] | None:
    """``(stream id, end of the payload)`` when ``plaintext`` is one whole DATA frame, maybe
    followed by padding (the shape of every bulk record); ``None`` for anything else."""
    if len(plaintext) < DATA_HEADER_LEN or plaintext[0] != FrameType.DATA:
        return None
    _, stream_id, length = _DATA.unpack_from(plaintext)
    end = DATA_HEADER_LEN + length
    if end == len(plaintext) or (end < len(plaintext) and plaintext[end] == FrameType.PAD):
        return stream_id, end
    return None


def encode_data_header(stream_id: int, length: int) -> bytes:
    """The 7 bytes in front of a DATA payload (the mux joins them without copying twice)."""
    return _DATA.pack(FrameType.DATA, stream_id, length)


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of ``frame``; invalid field values raise ``ValueError``."""
    match frame:
        case Data(stream_id, data):
            if len(data) > MAX_DATA:
                raise ValueError(f"DATA payload larger than {MAX_DATA} bytes")
            return _DATA.pack(FrameType.DATA, stream_id, len(data)) + data
        case Pad(length):
            return b"\x00" * (length + 1)
        case Open(stream_id, host, port):
            raw = host.encode("ascii")
            if not 1 <= len(raw) <= 255 or not 1 <= port <= 0xFFFF:
                raise ValueError("OPEN needs a 1-255 byte host and a port 1-65535")
            return _OPEN.pack(FrameType.OPEN, stream_id, port, len(raw)) + raw
        case Close(stream_id):
            return _SID.pack(FrameType.CLOSE, stream_id)
        case Reset(stream_id, code):
            return _RESET.pack(FrameType.RESET, stream_id, code)
        case Window(stream_id, increment):
            if not 1 <= increment <= MAX_WINDOW:
                raise ValueError(f"WINDOW increment must be 1-{MAX_WINDOW}")
            return _WINDOW.pack(FrameType.WINDOW, stream_id, increment)
        case Ping(opaque) | Pong(opaque):
            if len(opaque) != 8:
                raise ValueError("PING/PONG carry exactly 8 opaque bytes")
            kind = FrameType.PING if isinstance(frame, Ping) else FrameType.PONG
            return bytes([kind]) + opaque
        case Ack(offset):
            if not 0 <= offset < 1 << 64:
                raise ValueError("ACK offset must fit in 64 bits")
            return _ACK.pack(FrameType.ACK, offset)
        case Bye():
            return bytes([FrameType.BYE])
    raise ValueError(f"not a frame: {frame!r}")


def _need(view: bytes, pos: int, n: int, what: str) -> None:
    if len(view) - pos < n:
        raise RemoteProtocolError(f"bridge {what} frame is truncated")


def decode_frames(plaintext: bytes) -> list[Frame]:
    """Every frame in one record's plaintext, in order."""
    frames: list[Frame] = []
    pos = 0
    end = len(plaintext)
    while pos < end:
        kind = plaintext[pos]
        if kind == FrameType.DATA:
            _need(plaintext, pos, _DATA.size, "DATA")
            _, sid, length = _DATA.unpack_from(plaintext, pos)
            pos += _DATA.size
            _need(plaintext, pos, length, "DATA")
            frames.append(Data(sid, plaintext[pos : pos + length]))
            pos += length
        elif kind == FrameType.PAD:
            frames.append(Pad(end - pos - 1))
            break
        elif kind == FrameType.OPEN:
            _need(plaintext, pos, _OPEN.size, "OPEN")
            _, sid, port, hlen = _OPEN.unpack_from(plaintext, pos)
            pos += _OPEN.size
            _need(plaintext, pos, hlen, "OPEN")
            if port == 0:
                raise RemoteProtocolError("bridge OPEN frame names port 0")
            host = decode_domain(plaintext[pos : pos + hlen])
            frames.append(Open(sid, host, port))
            pos += hlen
        elif kind == FrameType.CLOSE:
            _need(plaintext, pos, _SID.size, "CLOSE")
            frames.append(Close(_SID.unpack_from(plaintext, pos)[1]))
            pos += _SID.size
        elif kind == FrameType.RESET:
            _need(plaintext, pos, _RESET.size, "RESET")
            _, sid, code = _RESET.unpack_from(plaintext, pos)
            try:
                frames.append(Reset(sid, ResetCode(code)))
            except ValueError:
                raise RemoteProtocolError(f"bridge RESET frame has unknown code {code}") from None
            pos += _RESET.size
        elif kind == FrameType.WINDOW:
            _need(plaintext, pos, _WINDOW.size, "WINDOW")
            _, sid, increment = _WINDOW.unpack_from(plaintext, pos)
            if not 1 <= increment <= MAX_WINDOW:
                raise RemoteProtocolError(f"bridge WINDOW increment {increment} is out of range")
            frames.append(Window(sid, increment))
            pos += _WINDOW.size
        elif kind in (FrameType.PING, FrameType.PONG):
            _need(plaintext, pos, 9, "PING")
            opaque = plaintext[pos + 1 : pos + 9]
            frames.append(Ping(opaque) if kind == FrameType.PING else Pong(opaque))
            pos += 9
        elif kind == FrameType.ACK:
            _need(plaintext, pos, _ACK.size, "ACK")
            frames.append(Ack(_ACK.unpack_from(plaintext, pos)[1]))
            pos += _ACK.size
        elif kind == FrameType.BYE:
            frames.append(Bye())
            pos += 1
        else:
            raise RemoteProtocolError(f"bridge frame type {kind:#04x} is unknown")
    return frames
