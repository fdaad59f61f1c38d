"""Just enough DNS wire format (RFC 1035 section 4) for a cache's hot path, without I/O.

Full parsing with dnspython costs tens of microseconds per message, more than everything else a
cache hit does. The functions here read only what a cache needs, straight from the bytes:

- :func:`question_key` reads the header and the single question of a query and returns a
  :class:`QuestionKey`: the question with its name lower-cased, plus the flags that change the
  answer, as one ``bytes`` value to use as a dictionary key.
- :func:`patch_id` puts another message ID into a message.
- :func:`walk_records` lists every resource record after the question with the offset of its TTL
  field, so a cached response can have its TTLs rewritten in place by slicing.
- :func:`build_query` makes a minimal query for a key (used to refresh popular names).

What changes the answer, and so is part of the key (all documented on :class:`QuestionKey`):
QNAME (case-folded, ASCII only, as RFC 4343 asks), QTYPE, QCLASS, the CD header bit (a validating
upstream returns bogus data only with CD), whether the query has an OPT record (an answer to a
query without EDNS must not carry one, RFC 6891 section 7) and its DO bit (RRSIGs are returned
only with DO, RFC 3225). The advertised UDP payload size is not part of the key: fitting an
answer to the client's size is the server's job, not the cache's.

Everything is bounds-checked. Malformed input gives ``None``, never an exception: a name that
runs past the end, a label over 63 octets, a name over 255 octets, an extended label type, a
compression pointer inside the question (nothing precedes it but the header, so a pointer there
can only be a forgery), more than one OPT record, or bytes after the last record.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

__all__ = [
    "FLAG_CD",
    "FLAG_DO",
    "FLAG_EDNS",
    "HEADER_SIZE",
    "QuestionKey",
    "Record",
    "build_query",
    "patch_id",
    "question_key",
    "walk_records",
]

HEADER_SIZE = 12
#: RFC 1035 section 2.3.4
MAX_NAME_LENGTH = 255
MAX_LABEL_LENGTH = 63
TYPE_OPT = 41

#: bits of the flags byte that ends :attr:`QuestionKey.key`
FLAG_EDNS = 0x01
FLAG_DO = 0x02
FLAG_CD = 0x04

_HEADER = struct.Struct(">HHHHHH")
_RR_FIXED = struct.Struct(">HHIH")  # TYPE, CLASS, TTL, RDLENGTH
_U16 = struct.Struct(">H")
# owner (must be the root, 0), TYPE, CLASS, extended RCODE, version, flags, RDLENGTH
_OPT_HEAD = struct.Struct(">BHHBBHH")
_FLAG_BYTES = [bytes((i,)) for i in range(8)]

# ASCII case folding only (RFC 4343). Label length octets are at most 63 and so never fall in
# 'A'..'Z' (65..90): the whole encoded name can be translated at once.
_FOLD = bytes.maketrans(bytes(range(65, 91)), bytes(range(97, 123)))

# header byte 2: QR(1) OPCODE(4) AA TC RD; byte 3: RA Z AD CD RCODE(4)
_OPCODE_BITS = 0x7800
_CD_BIT = 0x10
_DO_BIT = 0x8000  # in the 16 flag bits of the OPT record's TTL field


class QuestionKey(NamedTuple):
    """The question of a message, normalised for use as a cache key.

    ``key`` is the question section as on the wire with the QNAME lower-cased (no compression
    is possible there), followed by one flags byte made of :data:`FLAG_EDNS`, :data:`FLAG_DO`
    and :data:`FLAG_CD`. Two queries get the same ``key`` exactly when a cache may give them
    the same answer. ``end`` is the offset just past the question in the message it came from;
    since the question always starts at offset 12, it is ``12 + len(key) - 1``.
    """

    key: bytes
    end: int

    @property
    def question(self) -> bytes:
        """The normalised question section (QNAME, QTYPE, QCLASS) without the flags byte."""
        return self.key[:-1]

    @property
    def qname(self) -> bytes:
        """The lower-cased QNAME in wire form, root label included."""
        return self.key[:-5]

    @property
    def qtype(self) -> int:
        return int(_U16.unpack_from(self.key, len(self.key) - 5)[0])

    @property
    def qclass(self) -> int:
        return int(_U16.unpack_from(self.key, len(self.key) - 3)[0])

    @property
    def flags(self) -> int:
        return self.key[-1]

    @property
    def edns(self) -> bool:
        return bool(self.key[-1] & FLAG_EDNS)

    @property
    def dnssec_ok(self) -> bool:
        return bool(self.key[-1] & FLAG_DO)

    @property
    def checking_disabled(self) -> bool:
        return bool(self.key[-1] & FLAG_CD)

    def name_text(self) -> str:
        """The QNAME as dotted text (labels decoded as Latin-1, no escaping), for logs."""
        labels = []
        pos = 0
        qname = self.qname
        while qname[pos]:
            n = qname[pos]
            labels.append(qname[pos + 1 : pos + 1 + n].decode("latin-1"))
            pos += 1 + n
        return ".".join(labels) + "."


class Record(NamedTuple):
    """Where one resource record sits in a message, and its fixed fields."""

    #: 0 answer, 1 authority, 2 additional
    section: int
    #: offset of the owner name
    start: int
    rtype: int
    rclass: int
    ttl: int
    #: offset of the 4-byte TTL field
    ttl_offset: int
    rdata_start: int
    rdata_end: int


def _question_end(wire: bytes) -> int:
    """Offset just past the first question, or -1; no compression pointers allowed."""
    size = len(wire)
    pos = HEADER_SIZE
    while True:
        if pos >= size:
            return -1
        n = wire[pos]
        if n == 0:
            pos += 1
            break
        if n > MAX_LABEL_LENGTH:  # a pointer (0xC0) or an extended/reserved label type
            return -1
        pos += 1 + n
    if pos - HEADER_SIZE > MAX_NAME_LENGTH:
        return -1
    pos += 4
    return pos if pos <= size else -1


def _skip_name(wire: bytes, pos: int) -> int:
    """Offset just past the (possibly compressed) name at ``pos``, or -1. Pointers aren't followed."""
    size = len(wire)
    start = pos
    while True:
        if pos >= size:
            return -1
        n = wire[pos]
        if n == 0:
            return pos + 1
        if n & 0xC0 == 0xC0:
            return pos + 2 if pos + 2 <= size else -1
        if n > MAX_LABEL_LENGTH:
            return -1
        pos += 1 + n
        if pos - start > MAX_NAME_LENGTH:
            return -1


def walk_records(wire: bytes, start: int | None = None) -> list[Record] | None:
    """Every record of the answer, authority and additional sections, in wire order.

    ``start`` is the offset just past the question (computed when ``None``). Returns ``None``
    when the message is malformed or has bytes after its last record. Owner names are skipped,
    not decoded; RDATA is not looked into.
    """
    if len(wire) < HEADER_SIZE:
        return None
    _, _, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    if start is None:
        if qdcount != 1:
            return None
        start = _question_end(wire)
        if start < 0:
            return None
    size = len(wire)
    pos = start
    records: list[Record] = []
    for section, count in enumerate((ancount, nscount, arcount)):
        for _ in range(count):
            rr_start = pos
            pos = _skip_name(wire, pos)
            if pos < 0 or pos + 10 > size:
                return None
            rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(wire, pos)
            rdata_start = pos + 10
            pos = rdata_start + rdlength
            if pos > size:
                return None
            records.append(
                Record(section, rr_start, rtype, rclass, ttl, rdata_start - 6, rdata_start, pos)
            )
    return records if pos == size else None


def question_key(wire: bytes) -> QuestionKey | None:
    """The cache key of a standard query (or of the question a response echoes).

    ``None`` when ``wire`` is malformed (see the module docstring), has a QDCOUNT other than 1,
    or has an opcode other than QUERY: only standard queries are cacheable.

    This runs for every query a cache sees, so the question walk is inlined and the common
    shapes (no records, or one OPT record right after the question) are read with one
    ``struct`` call; anything else goes through :func:`walk_records`.
    """
    size = len(wire)
    if size < HEADER_SIZE:
        return None
    _, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(wire)
    if qdcount != 1 or flags & _OPCODE_BITS:
        return None
    pos = HEADER_SIZE
    while True:
        if pos >= size:
            return None
        n = wire[pos]
        if not n:
            break
        if n > MAX_LABEL_LENGTH:  # a pointer (0xC0) or an extended/reserved label type
            return None
        pos += n + 1
    if pos >= HEADER_SIZE + MAX_NAME_LENGTH:
        return None
    name_end = pos + 1
    end = name_end + 4
    keyflags = FLAG_CD if flags & _CD_BIT else 0
    if ancount or nscount or arcount != 1:
        if ancount or nscount or arcount:
            return _slow_question_key(wire, end, keyflags)
        if end != size:
            return None
    else:
        if end + 11 > size:
            return None
        owner, rtype, _, _, _, optflags, rdlength = _OPT_HEAD.unpack_from(wire, end)
        if owner or rtype != TYPE_OPT:
            return _slow_question_key(wire, end, keyflags)
        if end + 11 + rdlength != size:
            return None
        keyflags |= FLAG_EDNS | FLAG_DO if optflags & _DO_BIT else FLAG_EDNS
    return QuestionKey(
        wire[HEADER_SIZE:name_end].translate(_FOLD) + wire[name_end:end] + _FLAG_BYTES[keyflags],
        end,
    )


def _slow_question_key(wire: bytes, end: int, keyflags: int) -> QuestionKey | None:
    """:func:`question_key` for queries with records other than a lone OPT."""
    if end > len(wire):
        return None
    records = walk_records(wire, end)
    if records is None:
        return None
    opts = [r for r in records if r.rtype == TYPE_OPT]
    if len(opts) > 1:
        return None
    if opts:
        opt = opts[0]
        # RFC 6891 section 6.1.1: only in the additional section, owner is the root
        if opt.section != 2 or wire[opt.start] != 0 or opt.ttl_offset != opt.start + 5:
            return None
        keyflags |= FLAG_EDNS
        if _U16.unpack_from(wire, opt.ttl_offset + 2)[0] & _DO_BIT:
            keyflags |= FLAG_DO
    qname = wire[HEADER_SIZE : end - 4].translate(_FOLD)
    return QuestionKey(qname + wire[end - 4 : end] + _FLAG_BYTES[keyflags], end)


def patch_id(wire: bytes, msg_id: int) -> bytes:
    """``wire`` with its 16-bit message ID replaced by ``msg_id``."""
    if len(wire) < 2:
        raise ValueError("a DNS message is at least 12 bytes long")
    if not 0 <= msg_id <= 0xFFFF:
        raise ValueError(f"message ID {msg_id} is not a 16-bit value")
    return _U16.pack(msg_id) + wire[2:]


def build_query(key: QuestionKey, msg_id: int, *, payload_size: int = 1232) -> bytes:
    """A recursive query for ``key``: RD set, CD and an OPT record (with DO) as the key says.

    ``payload_size`` is the advertised UDP size (1232, DNS Flag Day 2020).
    """
    if not 0 <= msg_id <= 0xFFFF:
        raise ValueError(f"message ID {msg_id} is not a 16-bit value")
    flags = 0x0100 | (_CD_BIT if key.checking_disabled else 0)
    arcount = 1 if key.edns else 0
    parts = [_HEADER.pack(msg_id, flags, 1, 0, 0, arcount), key.question]
    if key.edns:
        ttl = _DO_BIT if key.dnssec_ok else 0
        parts.append(b"\x00" + _RR_FIXED.pack(TYPE_OPT, payload_size, ttl, 0))
    return b"".join(parts)
