"""Where to cut a first flight, and the pieces that come out (no I/O).

A fragmenting strategy never changes what the server's application reads, except where the
protocol allows it: a TLS ClientHello keeps every byte of its handshake message (the transcript
both sides hash must not change), only its record headers are rebuilt when it is cut into more
records; a plain-HTTP request may have its Host field name in another letter case and other
optional whitespace after the colon (RFC 9110 5.1 and RFC 9112 5: names are case-insensitive,
the space is OWS), nothing else.

Cut positions are written as :class:`SplitPoint`\\ s, an anchor and an optional offset:

=============== =================================================================================
``start+N``     N bytes into the first flight (a bare ``N`` means the same). For TLS this counts
                record-header bytes too: ``start+2`` cuts the 5-byte header of the first record.
``sni-ext``     the start of the server_name extension (TLS)
``sni``         the first byte of the server name
``sni-middle``  the middle of the server name
``sni-end``     just after the server name
``host-line``   the start of the ``Host:`` header line (HTTP)
``host``        the first byte of the Host value
``host-middle`` the middle of the Host value
``host-end``    just after the Host value
=============== =================================================================================

``+N``/``-N`` after a TLS name anchor counts bytes of the handshake message (record headers
are skipped). Anchors of the other protocol, and points that fall outside the message, are
ignored: one list can serve TLS and HTTP flights alike.

:func:`plan_fragments` turns a first flight and a :class:`FragmentPolicy` into the pieces to
send, one TCP segment each. With ``records`` the ClientHello is first re-framed so that a new
record starts at each point (and with ``segments`` too, each record then goes in its own
segment); points inside a record header can only cut segments.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Literal

from proxy.errors import RemoteProtocolError
from proxy.protocols.tls_hello import (
    RECORD_HEADER_SIZE,
    ClientHello,
    HelloLayout,
    hello_layout,
    looks_like_tls,
    parse_client_hello,
    split_records,
)

__all__ = ["ANCHORS", "FragmentPlan", "FragmentPolicy", "SplitPoint", "plan_fragments"]

TLS_ANCHORS = ("sni-ext", "sni", "sni-middle", "sni-end")
HTTP_ANCHORS = ("host-line", "host", "host-middle", "host-end")
ANCHORS = ("start", *TLS_ANCHORS, *HTTP_ANCHORS)

_POINT = re.compile(r"(?P<anchor>[a-z-]+?)?(?:(?P<sign>^|[+-])(?P<offset>\d{1,5}))?")
_REQUEST_LINE = re.compile(rb"[A-Z]{1,20} [^ \r\n]+ HTTP/1\.[01]\r\n")
_OWS = b" \t"


@dataclass(frozen=True, slots=True)
class SplitPoint:
    """One cut position: an anchor (see the module docstring) plus a byte offset."""

    anchor: str
    offset: int = 0

    @classmethod
    def parse(cls, text: str) -> SplitPoint:
        """``"sni-middle"``, ``"sni+3"``, ``"start+2"``, ``"2"``; raises ``ValueError``."""
        match = _POINT.fullmatch(text.strip())
        anchor = match and (match["anchor"] or "start")
        bare = match is not None and not match["anchor"]
        if not match or anchor not in ANCHORS or (bare and (match["sign"] or not match["offset"])):
            raise ValueError(
                f"{text!r} is not a split point; write an anchor ({', '.join(ANCHORS)}), "
                'optionally with +N or -N, like "sni-middle" or "start+2"'
            )
        offset = int(match["offset"] or 0)
        return cls(anchor, -offset if match["sign"] == "-" else offset)

    def __str__(self) -> str:
        if not self.offset:
            return self.anchor
        return f"{self.anchor}{self.offset:+d}"


@dataclass(frozen=True, slots=True)
class FragmentPolicy:
    """How a fragmenting strategy re-frames a first flight."""

    points: tuple[SplitPoint, ...]
    #: cut the TLS ClientHello into several records at the points
    records: bool = False
    #: send the pieces as separate TCP segments
    segments: bool = True
    #: HTTP: how to spell the Host field name (any case of "host"), None keeps it
    host_header: str | None = None
    #: HTTP: the spaces/tabs between "Host:" and the value, None keeps them
    host_space: str | None = None

    def __post_init__(self) -> None:
        if self.host_header is not None and self.host_header.lower() != "host":
            raise ValueError(f"{self.host_header!r} is not a spelling of the Host field name")
        if self.host_space is not None and self.host_space.strip(" \t"):
            raise ValueError("the Host spacing may only hold spaces and tabs")


@dataclass(frozen=True, slots=True)
class FragmentPlan:
    """The pieces to send, in order; their concatenation is what the peer's TCP receives."""

    pieces: tuple[bytes, ...]
    protocol: Literal["tls", "http", "other"]
    #: the bytes differ from the first flight, or are cut in more than one piece
    changed: bool

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)


def plan_fragments(data: bytes, policy: FragmentPolicy) -> FragmentPlan:
    """Cut ``data`` (a client's first flight) as ``policy`` says.

    A flight that is neither a complete, valid ClientHello nor an HTTP/1.x request comes back
    whole and unchanged (``protocol == "other"``); so do points that resolve nowhere.
    """
    if looks_like_tls(data[:3]) and len(data) >= RECORD_HEADER_SIZE:
        try:
            hello = parse_client_hello(data)
        except RemoteProtocolError:
            hello = None
        if hello is not None:
            layout = hello_layout(data)
            assert layout is not None  # the hello parsed, so its records are complete
            return _plan_tls(data, hello, layout, policy)
    if _REQUEST_LINE.match(data):
        return _plan_http(data, policy)
    return FragmentPlan((data,), "other", changed=False)


def _cut(data: bytes, cuts: list[int]) -> tuple[bytes, ...]:
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return tuple(data[a:b] for a, b in itertools.pairwise(bounds))


# --- TLS ---------------------------------------------------------------------------------------


def _tls_raw(point: SplitPoint, hello: ClientHello, layout: HelloLayout) -> int | None:
    """The raw offset a point names in this hello, or None."""
    if point.anchor == "start":
        return point.offset
    if point.anchor not in TLS_ANCHORS or hello.sni_offset is None or hello.sni is None:
        return None
    assert hello.sni_extension_offset is not None and hello.sni_length is not None
    name = layout.message_offset(hello.sni_offset)
    assert name is not None  # the name's first byte is a payload byte
    if point.anchor == "sni-ext":
        base = layout.message_offset(hello.sni_extension_offset)
        assert base is not None
    elif point.anchor == "sni":
        base = name
    elif point.anchor == "sni-middle":
        base = name + len(hello.sni) // 2
    else:
        base = name + len(hello.sni)
    target = base + point.offset
    if not 0 <= target <= layout.message_length:
        return None
    return layout.raw_offset(target)


def _plan_tls(
    data: bytes, hello: ClientHello, layout: HelloLayout, policy: FragmentPolicy
) -> FragmentPlan:
    raw = [r for p in policy.points if (r := _tls_raw(p, hello, layout)) is not None]
    raw = [r for r in raw if 0 < r < layout.raw_length]
    out = data
    cuts = raw
    if policy.records:
        message_cuts = [m for r in raw if (m := layout.message_offset(r)) is not None]
        out, starts = split_records(data, message_cuts)
        cuts = [_reframed_offset(r, layout, starts) for r in raw]
    pieces = _cut(out, cuts) if policy.segments else (out,)
    return FragmentPlan(pieces, "tls", changed=out != data or len(pieces) > 1)


def _reframed_offset(raw: int, layout: HelloLayout, starts: list[tuple[int, int]]) -> int:
    """Where a raw offset of the input lands in the re-framed output.

    A cut in the message lands before the header of the record that now starts there; a byte
    of an input record header lands in the header of the first record cut from that record.
    """
    message = layout.message_offset(raw)
    if message is not None:
        for start, header in reversed(starts):
            if start == message and message > 0:
                return header
            if start <= message:
                return header + RECORD_HEADER_SIZE + message - start
    message_start = 0
    for header, length in layout.records:
        if header <= raw < header + RECORD_HEADER_SIZE:
            out_header = next(h for s, h in starts if s == message_start)
            return out_header + raw - header
        message_start += length
    raise ValueError(f"offset {raw} is not in the hello")


# --- HTTP --------------------------------------------------------------------------------------


def _plan_http(data: bytes, policy: FragmentPolicy) -> FragmentPlan:
    out = data
    anchors: dict[str, int] = {}
    host = _find_host_line(data)
    if host is not None:
        start, colon, end = host
        value = data[colon + 1 : end]
        space = value[: len(value) - len(value.lstrip(_OWS))]
        value = value[len(space) :]
        name = data[start:colon] if policy.host_header is None else policy.host_header.encode()
        if policy.host_space is not None:
            space = policy.host_space.encode()
        line = name + b":" + space + value
        out = data[:start] + line + data[end:]
        bare = value.rstrip(_OWS)
        first = start + len(name) + 1 + len(space)
        anchors = {
            "host-line": start,
            "host": first,
            "host-middle": first + len(bare) // 2,
            "host-end": first + len(bare),
        }
    cuts = []
    for point in policy.points:
        if point.anchor == "start":
            cuts.append(point.offset)
        elif point.anchor in anchors:
            cuts.append(anchors[point.anchor] + point.offset)
    pieces = _cut(out, cuts) if policy.segments else (out,)
    return FragmentPlan(pieces, "http", changed=out != data or len(pieces) > 1)


def _find_host_line(data: bytes) -> tuple[int, int, int] | None:
    """(line start, colon, line end before CRLF) of the Host field in the request head."""
    pos = data.index(b"\r\n") + 2
    while True:
        end = data.find(b"\r\n", pos)
        if end <= pos:  # the blank line ending the head, or the head is cut here
            return None
        colon = data.find(b":", pos, end)
        if colon > pos and data[pos:colon].lower() == b"host":
            return pos, colon, end
        pos = end + 2
