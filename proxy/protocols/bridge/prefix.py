"""First-byte shaping for the raw carrier: a short prefix in front of the client hello.

China's 2021-2023 blocking of fully encrypted traffic exempted a first packet whose first six
bytes were printable ASCII or that started like TLS or HTTP; protocol allow-lists (Iran) pass
only what starts like TLS, HTTP or DNS. A bridge hello is uniformly random, so the raw carrier
can put one of these in front of it (both ends know which from the bridge URI):

``ascii``  :data:`ASCII_LEN` random printable bytes (0x20-0x7e), hitting "first 6 printable"
           and "more than 20 contiguous printable"
``tls``    a TLS handshake record header, ``16 03 01`` and the hello's length

The prefix is a disguise, not a secret: the hello behind it still proves the bridge line. The
server checks it byte for byte and treats a wrong one like any other bad hello (silence).
"""

from __future__ import annotations

from typing import Literal

from proxy.protocols.bridge.handshake import RandomSource

PrefixKind = Literal["none", "ascii", "tls"]
PREFIXES: tuple[PrefixKind, ...] = ("none", "ascii", "tls")
ASCII_LEN = 24
TLS_HEADER = b"\x16\x03\x01"
_PRINTABLE = bytes(range(0x20, 0x7F))


def prefix_length(kind: PrefixKind) -> int:
    return {"none": 0, "ascii": ASCII_LEN, "tls": len(TLS_HEADER) + 2}[kind]


def build_prefix(kind: PrefixKind, rng: RandomSource, hello_length: int) -> bytes:
    """The bytes to send before a hello of ``hello_length`` bytes."""
    if kind == "ascii":
        # rejection sampling keeps every printable byte equally likely
        out = bytearray()
        while len(out) < ASCII_LEN:
            out += bytes(b for b in rng(ASCII_LEN) if b < 2 * len(_PRINTABLE))
        return bytes(_PRINTABLE[b % len(_PRINTABLE)] for b in out[:ASCII_LEN])
    if kind == "tls":
        if not 0 < hello_length <= 0xFFFF:
            raise ValueError("a TLS-like prefix covers 1-65535 bytes")
        return TLS_HEADER + hello_length.to_bytes(2, "big")
    return b""


def check_prefix(kind: PrefixKind, data: bytes) -> bool | None:
    """Whether ``data`` starts with a valid prefix of ``kind``; ``None`` while too short.

    The length in a ``tls`` header is not checked here: the hello behind it has a random
    length that only the handshake knows, and a wrong one fails the hello anyway.
    """
    need = prefix_length(kind)
    if len(data) < need:
        return None
    if kind == "ascii":
        return all(0x20 <= b <= 0x7E for b in data[:need])
    if kind == "tls":
        return data[:3] == TLS_HEADER
    return True
