"""WebSocket (RFC 6455) framing and the opening handshake's keys, without any I/O.

Just enough for the bridge's WebSocket carrier: a byte stream carried in binary frames. The
carrier wraps it as a trio stream; HTTP around the handshake is parsed with h11.

:class:`FrameDecoder` takes bytes in any chunking and returns whole frames; it enforces the
RFC's rules a peer must not break (reserved bits clear, known opcodes, control frames short and
unfragmented, masking from client to server only, minimal length encodings are not required by
the RFC and are accepted) and bounds a frame's payload. A violation raises
:class:`~proxy.errors.RemoteProtocolError`. :func:`encode_frame` builds one frame; the mask key
comes in as an argument (four random bytes from the caller for every client frame).
"""

from __future__ import annotations

import base64
import enum
import hashlib
import struct
from dataclasses import dataclass

from proxy.errors import LocalProtocolError, RemoteProtocolError

#: the GUID of section 1.3 that the server appends to the client's key
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: default bound on one frame's payload
MAX_PAYLOAD = 1 << 20
MAX_CONTROL_PAYLOAD = 125


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA

    @property
    def is_control(self) -> bool:
        return self >= 0x8


@dataclass(frozen=True, slots=True)
class Frame:
    opcode: Opcode
    payload: bytes
    fin: bool = True


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    digest = hashlib.sha1(key.encode("ascii") + _GUID, usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def valid_client_key(key: str) -> bool:
    """A ``Sec-WebSocket-Key`` is 16 bytes in base64 (24 characters)."""
    try:
        return len(key) == 24 and len(base64.b64decode(key, validate=True)) == 16
    except (ValueError, UnicodeError):
        return False


_HEAD_SHORT = struct.Struct("!BB")
_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")


def _apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``mask`` repeated (the same call masks and unmasks).

    The whole payload is one big integer XORed with the mask repeated to its length: a few
    passes in C instead of a Python loop per byte.
    """
    size = len(data)
    if not size:
        return b""
    repeated = mask * (size // 4 + 1)
    n = int.from_bytes(data, "little") ^ int.from_bytes(repeated[:size], "little")
    return n.to_bytes(size, "little")


def encode_frame(
    opcode: Opcode,
    payload: bytes | bytearray | memoryview,
    *,
    mask: bytes | None = None,
    fin: bool = True,
) -> bytes:
    """One frame; ``mask`` (4 bytes) is required from a client and forbidden from a server.

    The result is built with one copy of an unmasked payload (server frames carry bulk data).
    """
    size = len(payload)
    if opcode.is_control and (size > MAX_CONTROL_PAYLOAD or not fin):
        raise LocalProtocolError("control frames are unfragmented and at most 125 bytes")
    if mask is not None and len(mask) != 4:
        raise LocalProtocolError("a mask key is 4 bytes")
    first = (0x80 if fin else 0) | opcode
    flag = 0x80 if mask is not None else 0
    if size < 126:
        head = _HEAD_SHORT.pack(first, flag | size)
    elif size < 1 << 16:
        head = _HEAD_16.pack(first, flag | 126, size)
    else:
        head = _HEAD_64.pack(first, flag | 127, size)
    if mask is None:
        return head + payload
    return head + mask + _apply_mask(payload, mask)


class FrameDecoder:
    """Frames from a byte stream; ``client_side`` is the end that reads server frames."""

    def __init__(self, *, client_side: bool, max_payload: int = MAX_PAYLOAD) -> None:
        self.client_side = client_side
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._pos = 0  # where the next frame starts in ``_buffer``
        self._fragmented = False  # inside a fragmented data message

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Feed bytes; every frame now complete, in order.

        Received bytes are appended once; each payload is copied out once, and the buffer is
        only compacted after the call (what stays is less than one frame).
        """
        self._buffer += data
        frames = []
        try:
            while (frame := self._next()) is not None:
                frames.append(frame)
        finally:
            if self._pos:
                if self._pos == len(self._buffer):
                    self._buffer.clear()
                else:
                    del self._buffer[: self._pos]
                self._pos = 0
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer) - self._pos

    def _next(self) -> Frame | None:
        buf = self._buffer
        start = self._pos
        have = len(buf) - start
        if have < 2:
            return None
        first, second = buf[start], buf[start + 1]
        if first & 0x70:
            raise RemoteProtocolError("WebSocket frame with reserved bits set")
        try:
            opcode = Opcode(first & 0x0F)
        except ValueError:
            raise RemoteProtocolError(f"unknown WebSocket opcode {first & 0x0F}") from None
        fin = bool(first & 0x80)
        masked = bool(second & 0x80)
        if masked == self.client_side:
            raise RemoteProtocolError(
                "server frames must not be masked" if masked else "client frames must be masked"
            )
        size = second & 0x7F
        pos = 2
        if size == 126:
            if have < 4:
                return None
            size, pos = struct.unpack_from("!H", buf, start + 2)[0], 4
        elif size == 127:
            if have < 10:
                return None
            size, pos = struct.unpack_from("!Q", buf, start + 2)[0], 10
            if size >> 63:
                raise RemoteProtocolError("WebSocket frame length has its top bit set")
        if opcode.is_control and (size > MAX_CONTROL_PAYLOAD or not fin):
            raise RemoteProtocolError("WebSocket control frame fragmented or over 125 bytes")
        if size > self.max_payload:
            raise RemoteProtocolError(f"WebSocket frame of {size} bytes is over the limit")
        fragmented = self._fragmented
        if not opcode.is_control:
            if (opcode is Opcode.CONTINUATION) != self._fragmented:
                raise RemoteProtocolError("WebSocket continuation frame out of place")
            fragmented = not fin
        mask = b""
        if masked:
            if have < pos + 4:
                return None
            mask, pos = bytes(buf[start + pos : start + pos + 4]), pos + 4
        if have < pos + size:
            return None
        with memoryview(buf) as view:
            body = view[start + pos : start + pos + size]
            payload = _apply_mask(body, mask) if masked else bytes(body)
            body.release()
        self._pos = start + pos + size
        self._fragmented = fragmented
        return Frame(opcode, payload, fin)
