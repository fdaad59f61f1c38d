"""TLS ClientHello parsing (RFC 8446 section 4.1.2), without I/O.

:func:`parse_client_hello` is a pure function over the bytes a client has sent so far. Call it
again with more bytes whenever it returns ``None``. It gathers a handshake message that a client
(or a fragmenting middlebox) split over several TLS records, and reports where the server name
sits in the *raw* bytes, record headers included, so a fragmenter can cut inside it without
touching the hello itself.

Modern browser hellos are about 2 KB (a 1216-byte X25519MLKEM768 key share alone) and Chromium
shuffles extension order, so nothing here assumes a position or a size below the bound.

:func:`build_client_hello` makes realistic hellos for tests (curl-like, Chromium-like). It takes
a seed instead of randomness so the module stays deterministic.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.errors import RemoteProtocolError

__all__ = [
    "MAX_HELLO_SIZE",
    "ClientHello",
    "HelloLayout",
    "build_client_hello",
    "hello_layout",
    "looks_like_tls",
    "parse_client_hello",
    "split_records",
]

#: largest handshake message (ClientHello) we accept, in bytes
MAX_HELLO_SIZE = 64 * 1024
#: largest amount of raw input (records with their headers) a hello may span; leaves room for
#: hellos cut into many tiny records by a fragmenter
MAX_RAW_SIZE = 2 * MAX_HELLO_SIZE
#: RFC 8446 5.1: plaintext records carry at most 2^14 bytes
MAX_RECORD_PAYLOAD = 1 << 14

CONTENT_TYPE_HANDSHAKE = 0x16
HANDSHAKE_CLIENT_HELLO = 0x01
RECORD_HEADER_SIZE = 5
HANDSHAKE_HEADER_SIZE = 4

EXT_SERVER_NAME = 0x0000
EXT_ALPN = 0x0010
EXT_SUPPORTED_VERSIONS = 0x002B
EXT_ENCRYPTED_CLIENT_HELLO = 0xFE0D


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What sidestep needs to know about a ClientHello.

    Offsets count bytes of the raw input given to :func:`parse_client_hello`, record headers
    included.
    """

    #: first host_name in the server_name extension, as sent (ASCII), or None
    sni: str | None
    #: ALPN protocol names in the client's order
    alpn: tuple[str, ...]
    #: raw offset of the first byte of the server name, or None without SNI
    sni_offset: int | None
    #: raw bytes from the first to the last byte of the server name; equals ``len(sni)`` unless a
    #: record boundary falls inside the name (then the record header is counted too)
    sni_length: int | None
    #: raw offset of the server_name extension (its 2-byte type field)
    sni_extension_offset: int | None
    #: payload length declared in the first record's header
    record_length: int
    #: raw bytes that make up the whole hello: every record it spans, headers included. Bytes
    #: after that (early data, a second flight) are not counted.
    total_length: int
    #: number of records the hello spans
    record_count: int
    #: ClientHello.legacy_version (0x0303 for TLS 1.2 and 1.3 clients)
    legacy_version: int
    #: versions from the supported_versions extension, GREASE values included
    supported_versions: tuple[int, ...]
    #: extension types in the order the client sent them
    extensions: tuple[int, ...]
    #: encrypted_client_hello (0xfe0d) is present (real or GREASE ECH)
    has_ech: bool
    session_id: bytes
    cipher_suites: tuple[int, ...]


def looks_like_tls(prefix: bytes) -> bool:
    """Whether ``prefix`` could start a TLS handshake record (``16 03 0x``).

    Checks as many of the first three bytes as are present; an empty prefix is not TLS.
    """
    if not prefix or prefix[0] != CONTENT_TYPE_HANDSHAKE:
        return False
    if len(prefix) >= 2 and prefix[1] != 0x03:
        return False
    return not (len(prefix) >= 3 and prefix[2] > 0x04)


def _malformed(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"bad TLS ClientHello: {message}")


class _Cursor:
    """Bounds-checked reader over the reassembled handshake bytes."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise _malformed(f"{what} runs past its enclosing length")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint8(self, what: str) -> int:
        return self.take(1, what)[0]

    def uint16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def sub(self, length_size: int, what: str) -> _Cursor:
        """A cursor over a length-prefixed vector; skips it in this cursor."""
        length = int.from_bytes(self.take(length_size, what + " length"), "big")
        if length > self.end - self.pos:
            raise _malformed(f"{what} runs past its enclosing length")
        inner = _Cursor(self.data, self.pos, self.pos + length)
        self.pos += length
        return inner


def _reassemble(data: bytes) -> tuple[bytes, list[tuple[int, int]], int, int, int] | None:
    """Gather handshake bytes from consecutive records.

    Returns (handshake bytes, segment map, first record length, raw length, record count) once
    the whole handshake message is present, else None. The segment map holds
    (handshake offset, raw offset) at the start of each record's payload.
    """
    pos = 0
    handshake = bytearray()
    segments: list[tuple[int, int]] = []
    first_record_length = -1
    needed: int | None = None
    records = 0
    while True:
        if needed is not None and len(handshake) >= needed:
            return bytes(handshake), segments, first_record_length, pos, records
        if pos >= MAX_RAW_SIZE:
            raise _malformed("hello spans too many bytes of records")
        header = data[pos : pos + RECORD_HEADER_SIZE]
        # validate the bytes of a record header we have, even when it is incomplete
        if not looks_like_tls(header) and header:
            if header[0] != CONTENT_TYPE_HANDSHAKE:
                raise _malformed(f"record type {header[0]:#04x} is not handshake")
            raise _malformed("record version is not TLS")
        if len(header) < RECORD_HEADER_SIZE:
            return None
        length = int.from_bytes(header[3:5], "big")
        if length == 0:
            raise _malformed("empty handshake record")
        if length > MAX_RECORD_PAYLOAD:
            raise _malformed(f"record of {length} bytes exceeds 2^14")
        if first_record_length < 0:
            first_record_length = length
        records += 1
        payload_start = pos + RECORD_HEADER_SIZE
        payload = data[payload_start : payload_start + length]
        segments.append((len(handshake), payload_start))
        handshake += payload
        if needed is None and handshake:
            if handshake[0] != HANDSHAKE_CLIENT_HELLO:
                raise _malformed(f"handshake type {handshake[0]} is not ClientHello")
            if len(handshake) >= HANDSHAKE_HEADER_SIZE:
                body_length = int.from_bytes(handshake[1:4], "big")
                if body_length + HANDSHAKE_HEADER_SIZE > MAX_HELLO_SIZE:
                    raise _malformed(f"hello of {body_length} bytes is larger than we accept")
                needed = HANDSHAKE_HEADER_SIZE + body_length
        if len(payload) < length:
            return None
        pos = payload_start + length


def _raw_offset(segments: list[tuple[int, int]], handshake_offset: int) -> int:
    index = bisect.bisect_right(segments, (handshake_offset, float("inf"))) - 1
    start, raw = segments[index]
    return raw + (handshake_offset - start)


def parse_client_hello(data: bytes) -> ClientHello | None:
    """Parse the ClientHello at the start of ``data``.

    Returns ``None`` while the hello is incomplete. Raises :class:`RemoteProtocolError` when the
    bytes are not TLS handshake records carrying a ClientHello, are malformed, or the hello is
    larger than :data:`MAX_HELLO_SIZE`. Bytes after the hello's last record are ignored.
    """
    gathered = _reassemble(data)
    if gathered is None:
        return None
    handshake, segments, record_length, total_length, record_count = gathered
    body_end = HANDSHAKE_HEADER_SIZE + int.from_bytes(handshake[1:4], "big")
    if len(handshake) > body_end:
        # another handshake message shares the last record: a client never sends one after
        # its ClientHello, so treat it as malformed rather than guess
        raise _malformed("unexpected bytes after the ClientHello in its record")
    cur = _Cursor(handshake, HANDSHAKE_HEADER_SIZE, body_end)

    legacy_version = cur.uint16("legacy_version")
    cur.take(32, "random")
    session = cur.sub(1, "session id")
    if session.remaining() > 32:
        raise _malformed("session id longer than 32 bytes")
    session_id = session.take(session.remaining(), "session id")
    suites = cur.sub(2, "cipher suites")
    if suites.remaining() == 0 or suites.remaining() % 2:
        raise _malformed("cipher suite list has a bad length")
    cipher_suites = tuple(suites.uint16("cipher suite") for _ in range(suites.remaining() // 2))
    compression = cur.sub(1, "compression methods")
    if compression.remaining() == 0:
        raise _malformed("no compression methods")

    sni: str | None = None
    sni_offset: int | None = None
    sni_length: int | None = None
    sni_ext_offset: int | None = None
    alpn: tuple[str, ...] = ()
    supported_versions: tuple[int, ...] = ()
    types: list[int] = []
    # extensions may be absent altogether in very old hellos
    if cur.remaining():
        exts = cur.sub(2, "extensions")
        if cur.remaining():
            raise _malformed("bytes after the extensions")
        while exts.remaining():
            ext_start = exts.pos
            ext_type = exts.uint16("extension type")
            if ext_type in types:
                raise _malformed(f"extension {ext_type:#06x} appears twice")
            types.append(ext_type)
            body = exts.sub(2, f"extension {ext_type:#06x}")
            if ext_type == EXT_SERVER_NAME:
                sni_ext_offset = _raw_offset(segments, ext_start)
                found = _parse_server_name(body)
                if found is not None:
                    start, name = found
                    sni = name
                    sni_offset = _raw_offset(segments, start)
                    sni_length = _raw_offset(segments, start + len(name) - 1) + 1 - sni_offset
            elif ext_type == EXT_ALPN:
                alpn = _parse_alpn(body)
            elif ext_type == EXT_SUPPORTED_VERSIONS:
                supported_versions = _parse_supported_versions(body)

    return ClientHello(
        sni=sni,
        alpn=alpn,
        sni_offset=sni_offset,
        sni_length=sni_length,
        sni_extension_offset=sni_ext_offset,
        record_length=record_length,
        total_length=total_length,
        record_count=record_count,
        legacy_version=legacy_version,
        supported_versions=supported_versions,
        extensions=tuple(types),
        has_ech=EXT_ENCRYPTED_CLIENT_HELLO in types,
        session_id=session_id,
        cipher_suites=cipher_suites,
    )


def _parse_server_name(body: _Cursor) -> tuple[int, str] | None:
    """(handshake offset, name) of the first host_name entry (RFC 6066 section 3)."""
    names = body.sub(2, "server name list")
    if body.remaining():
        raise _malformed("bytes after the server name list")
    found: tuple[int, str] | None = None
    while names.remaining():
        name_type = names.uint8("server name type")
        entry = names.sub(2, "server name")
        raw = entry.take(entry.remaining(), "server name")
        if name_type != 0 or found is not None:
            continue
        if not raw:
            raise _malformed("empty server name")
        try:
            found = (entry.pos - len(raw), raw.decode("ascii"))
        except UnicodeDecodeError:
            raise _malformed("server name is not ASCII") from None
    return found


def _parse_alpn(body: _Cursor) -> tuple[str, ...]:
    names = body.sub(2, "ALPN list")
    if body.remaining():
        raise _malformed("bytes after the ALPN list")
    out: list[str] = []
    while names.remaining():
        entry = names.sub(1, "ALPN protocol")
        if entry.remaining() == 0:
            raise _malformed("empty ALPN protocol name")
        # protocol ids are opaque bytes; latin-1 keeps every byte and never fails
        out.append(entry.take(entry.remaining(), "ALPN protocol").decode("latin-1"))
    return tuple(out)


def _parse_supported_versions(body: _Cursor) -> tuple[int, ...]:
    versions = body.sub(1, "supported versions")
    if body.remaining() or versions.remaining() % 2:
        raise _malformed("supported_versions has a bad length")
    return tuple(versions.uint16("version") for _ in range(versions.remaining() // 2))


# --- re-framing: the same handshake message in other records ------------------------------------


@dataclass(frozen=True, slots=True)
class HelloLayout:
    """Where the records of a complete ClientHello sit in the raw bytes.

    *Raw* offsets count the input bytes, record headers included; *message* offsets count the
    handshake message alone (the concatenated record payloads).
    """

    #: (raw offset of the 5-byte record header, payload length) for each record of the hello
    records: tuple[tuple[int, int], ...]

    @property
    def message_length(self) -> int:
        return sum(length for _, length in self.records)

    @property
    def raw_length(self) -> int:
        header, length = self.records[-1]
        return header + RECORD_HEADER_SIZE + length

    def raw_offset(self, message_offset: int) -> int:
        """The raw offset of a message byte (``message_length`` maps to the end of the hello)."""
        if not 0 <= message_offset <= self.message_length:
            raise ValueError(f"message offset {message_offset} is outside the hello")
        start = 0
        for header, length in self.records:
            if message_offset < start + length:
                return header + RECORD_HEADER_SIZE + message_offset - start
            start += length
        return self.raw_length

    def message_offset(self, raw_offset: int) -> int | None:
        """The message offset of a raw byte, or None when it lies in a record header or
        outside the hello."""
        start = 0
        for header, length in self.records:
            payload = header + RECORD_HEADER_SIZE
            if header <= raw_offset < payload:
                return None
            if payload <= raw_offset < payload + length:
                return start + raw_offset - payload
            start += length
        return None


def hello_layout(data: bytes) -> HelloLayout | None:
    """The record layout of the ClientHello at the start of ``data`` (None while incomplete).

    Raises :class:`RemoteProtocolError` like :func:`parse_client_hello`, which callers are
    expected to have run first.
    """
    gathered = _reassemble(data)
    if gathered is None:
        return None
    _, segments, _, total_length, _ = gathered
    records = []
    for i, (start, raw) in enumerate(segments):
        end = segments[i + 1][0] if i + 1 < len(segments) else None
        if end is None:
            end = start + (total_length - raw)
        records.append((raw - RECORD_HEADER_SIZE, end - start))
    return HelloLayout(tuple(records))


def split_records(data: bytes, cuts: Sequence[int]) -> tuple[bytes, list[tuple[int, int]]]:
    """Re-frame the ClientHello at the start of ``data`` so a new record starts at each of the
    message offsets in ``cuts``.

    The handshake message is not changed by a single byte: only record headers are added (each
    with the content type and version of the record it was cut from, and its own length). The
    client's own record boundaries are kept, bytes after the hello are appended unchanged, and
    cuts at 0, at the end or outside the message are ignored.

    Returns the new bytes and, for each record of the result, (message offset where its payload
    starts, raw offset of its header in the result).
    """
    layout = hello_layout(data)
    if layout is None:
        raise ValueError("the ClientHello is not complete")
    wanted = sorted({c for c in cuts if 0 < c < layout.message_length})
    out = bytearray()
    starts: list[tuple[int, int]] = []
    message_start = 0
    for header, length in layout.records:
        prefix = data[header : header + 3]
        payload = data[header + RECORD_HEADER_SIZE : header + RECORD_HEADER_SIZE + length]
        inner = [c - message_start for c in wanted if message_start < c < message_start + length]
        bounds = [0, *inner, length]
        for a, b in itertools.pairwise(bounds):
            starts.append((message_start + a, len(out)))
            out += prefix + (b - a).to_bytes(2, "big") + payload[a:b]
        message_start += length
    out += data[layout.raw_length :]
    return bytes(out), starts


# --- building hellos for tests -----------------------------------------------------------------

_GREASE = 0x0A0A
_CHROME_SUITES = (
    0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8,
    0xC013, 0xC014, 0x009C, 0x009D, 0x002F, 0x0035,
)  # fmt: skip
_SIG_ALGS = (0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601)
_GROUP_X25519 = 0x001D
_GROUP_X25519MLKEM768 = 0x11EC


class _Stream:
    """Deterministic byte stream from a seed (SHA-256 in counter mode)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed.to_bytes(8, "big", signed=True)
        self.counter = 0

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
            self.counter += 1
        return bytes(out[:n])

    def below(self, n: int) -> int:
        return int.from_bytes(self.read(4), "big") % n


def _vec(length_size: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(length_size, "big") + payload


def _ext(ext_type: int, payload: bytes) -> bytes:
    return struct.pack("!HH", ext_type, len(payload)) + payload


def _u16s(values: Sequence[int]) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)


def build_client_hello(
    sni: str | None = "example.com",
    alpn: Sequence[str] = ("h2", "http/1.1"),
    *,
    extra_padding: int = 0,
    key_share_size: int = 0,
    shuffle_seed: int | None = None,
    pad_to: int | None = None,
    grease: bool = False,
    ech: bool = False,
    record_sizes: Sequence[int] = (),
    seed: int = 0,
    sni_index: int | None = None,
) -> bytes:
    """Build a plausible TLS 1.3 ClientHello, wrapped in handshake records (tests only).

    - ``key_share_size``: size of an extra X25519MLKEM768 share (1216 in Chromium); 0 = X25519
      only.
    - ``shuffle_seed``: shuffle the extension order as Chromium does (GREASE stays first and
      last); None keeps a fixed order with SNI first.
    - ``pad_to``: add a padding extension so the handshake message is this long (OpenSSL pads
      to 512 bytes, giving curl's 517-byte record); ``extra_padding`` adds a padding extension
      with that many zero bytes instead.
    - ``grease``/``ech``: add GREASE values and a GREASE encrypted_client_hello extension.
    - ``record_sizes``: split the handshake message into records of these payload sizes (the
      rest goes into one last record).
    - ``seed``: derives the random, session id and key shares.
    - ``sni_index``: after any shuffle, move the server_name extension to this place in the
      list (0 first, -1 last; GREASE stays outside), to put the name early or late on purpose.
    """
    rng = _Stream(seed)
    exts: list[bytes] = []
    if sni is not None:
        name = sni.encode("ascii")
        exts.append(_ext(EXT_SERVER_NAME, _vec(2, b"\x00" + _vec(2, name))))
    exts.append(_ext(0x0017, b""))  # extended_master_secret
    exts.append(_ext(0xFF01, b"\x00"))  # renegotiation_info
    groups = [_GROUP_X25519, 0x0017, 0x0018]
    if key_share_size:
        groups.insert(0, _GROUP_X25519MLKEM768)
    if grease:
        groups.insert(0, _GREASE)
    exts.append(_ext(0x000A, _vec(2, _u16s(groups))))  # supported_groups
    exts.append(_ext(0x000B, b"\x01\x00"))  # ec_point_formats
    exts.append(_ext(0x0023, b""))  # session_ticket
    if alpn:
        protos = b"".join(_vec(1, p.encode("latin-1")) for p in alpn)
        exts.append(_ext(EXT_ALPN, _vec(2, protos)))
    exts.append(_ext(0x0005, b"\x01\x00\x00\x00\x00"))  # status_request
    exts.append(_ext(0x000D, _vec(2, _u16s(_SIG_ALGS))))  # signature_algorithms
    exts.append(_ext(0x0012, b""))  # signed_certificate_timestamp
    shares = b""
    if grease:
        shares += struct.pack("!HH", _GREASE, 1) + b"\x00"
    if key_share_size:
        shares += struct.pack("!HH", _GROUP_X25519MLKEM768, key_share_size)
        shares += rng.read(key_share_size)
    shares += struct.pack("!HH", _GROUP_X25519, 32) + rng.read(32)
    exts.append(_ext(0x0033, _vec(2, shares)))  # key_share
    exts.append(_ext(0x002D, b"\x01\x01"))  # psk_key_exchange_modes
    versions = ([_GREASE] if grease else []) + [0x0304, 0x0303]
    exts.append(_ext(EXT_SUPPORTED_VERSIONS, _vec(1, _u16s(versions))))
    exts.append(_ext(0x001B, b"\x02\x00\x02"))  # compress_certificate (brotli)
    if grease:
        exts.append(_ext(0x44CD, _vec(2, _vec(1, b"h2"))))  # application_settings (ALPS)
    if ech:
        # GREASE ECH: config id, cipher suite, a fake encapsulated key and payload
        payload = b"\x00" + struct.pack("!HHB", 1, 1, rng.below(256))
        payload += _vec(2, rng.read(32)) + _vec(2, rng.read(240))
        exts.append(_ext(EXT_ENCRYPTED_CLIENT_HELLO, payload))
    if shuffle_seed is not None:
        order = _Stream(shuffle_seed)
        for i in range(len(exts) - 1, 0, -1):
            j = order.below(i + 1)
            exts[i], exts[j] = exts[j], exts[i]
    if sni is not None and sni_index is not None:
        server_name = next(e for e in exts if e[:2] == b"\x00\x00")
        exts.remove(server_name)
        exts.insert(sni_index if sni_index >= 0 else len(exts) + 1 + sni_index, server_name)
    if grease:
        exts.insert(0, _ext(_GREASE, b""))
        exts.append(_ext(0x1A1A, b"\x00"))
    if extra_padding:
        exts.append(_ext(0x0015, bytes(extra_padding)))

    suites = ((_GREASE,) if grease else ()) + _CHROME_SUITES
    head = b"\x03\x03" + rng.read(32) + _vec(1, rng.read(32)) + _vec(2, _u16s(suites))
    head += b"\x01\x00"
    body_without_padding = head + _vec(2, b"".join(exts))
    if pad_to is not None:
        # the padding extension costs 4 bytes of header on top of its content
        missing = pad_to - HANDSHAKE_HEADER_SIZE - len(body_without_padding) - 4
        if missing >= 0:
            exts.append(_ext(0x0015, bytes(missing)))
    body = head + _vec(2, b"".join(exts))
    message = bytes([HANDSHAKE_CLIENT_HELLO]) + _vec(3, body)

    out = bytearray()
    pos = 0
    sizes = list(record_sizes)
    sizes += [MAX_RECORD_PAYLOAD] * (len(message) // MAX_RECORD_PAYLOAD + 1)
    for size in sizes:
        chunk = message[pos : pos + size]
        if not chunk:
            break
        out += b"\x16\x03\x01" + _vec(2, chunk)
        pos += len(chunk)
    return bytes(out)
