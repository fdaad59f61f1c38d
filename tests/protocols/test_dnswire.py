"""Tests for proxy.protocols.dnswire against messages made by dnspython, and fuzzed."""

from __future__ import annotations

import struct

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocols.dnswire import (
    FLAG_CD,
    FLAG_DO,
    FLAG_EDNS,
    QuestionKey,
    build_query,
    patch_id,
    question_key,
    walk_records,
)

LABEL_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"

labels = st.text(LABEL_CHARS, min_size=1, max_size=63)
names = (
    st.lists(labels, min_size=0, max_size=6)
    .map(lambda ls: ".".join(ls) + ".")
    .filter(lambda n: len(n) <= 253 or n == ".")
)
rdtypes = st.sampled_from([1, 2, 5, 6, 12, 15, 16, 28, 33, 64, 65, 255])
rdclasses = st.sampled_from([1, 3, 255])


def make_query(
    name: str,
    rdtype: int = 1,
    rdclass: int = 1,
    *,
    edns: bool = True,
    dnssec: bool = False,
    cd: bool = False,
    msg_id: int = 0x1234,
) -> bytes:
    q = dns.message.make_query(
        name, rdtype, rdclass, use_edns=0 if edns else False, want_dnssec=dnssec
    )
    q.id = msg_id
    if cd:
        q.flags |= dns.flags.CD
    return q.to_wire()


def expected_key(name: str, rdtype: int, rdclass: int, flags: int) -> bytes:
    wire_name = dns.name.from_text(name).canonicalize().to_wire()
    assert wire_name is not None
    return wire_name + struct.pack(">HH", rdtype, rdclass) + bytes((flags,))


@given(names, rdtypes, rdclasses, st.booleans(), st.booleans(), st.booleans())
def test_dnswire_key_matches_dnspython_question(
    name: str, rdtype: int, rdclass: int, edns: bool, dnssec: bool, cd: bool
) -> None:
    wire = make_query(name, rdtype, rdclass, edns=edns or dnssec, dnssec=dnssec, cd=cd)
    qk = question_key(wire)
    assert qk is not None
    flags = (FLAG_EDNS if edns or dnssec else 0) | (FLAG_DO if dnssec else 0)
    flags |= FLAG_CD if cd else 0
    assert qk.key == expected_key(name, rdtype, rdclass, flags)
    assert qk.end == 12 + len(qk.key) - 1
    parsed = dns.message.from_wire(wire)
    assert qk.qname == parsed.question[0].name.canonicalize().to_wire()
    assert (qk.qtype, qk.qclass) == (rdtype, rdclass)
    assert (qk.edns, qk.dnssec_ok, qk.checking_disabled) == (edns or dnssec, dnssec, cd)
    assert dns.name.from_text(qk.name_text()) == parsed.question[0].name


@given(names, rdtypes)
def test_dnswire_key_is_case_insensitive(name: str, rdtype: int) -> None:
    upper = question_key(make_query(name.upper(), rdtype))
    lower = question_key(make_query(name.lower(), rdtype))
    assert upper is not None and upper == lower


def test_dnswire_key_differs_by_edns_do_and_cd() -> None:
    keys = {
        question_key(make_query("example.com.", edns=False)),
        question_key(make_query("example.com.")),
        question_key(make_query("example.com.", dnssec=True)),
        question_key(make_query("example.com.", cd=True)),
        question_key(make_query("example.com.", 28)),
    }
    assert None not in keys and len(keys) == 5


@given(names, rdtypes, st.booleans(), st.booleans())
def test_dnswire_truncated_query_gives_none(name: str, rdtype: int, edns: bool, do: bool) -> None:
    wire = make_query(name, rdtype, edns=edns or do, dnssec=do)
    for cut in range(len(wire)):
        assert question_key(wire[:cut]) is None
    assert question_key(wire + b"\x00") is None  # trailing bytes


@given(st.binary(max_size=300))
def test_dnswire_garbage_never_raises(data: bytes) -> None:
    qk = question_key(data)
    if qk is not None:
        assert qk.end <= len(data)
        assert qk.qname == data[12 : qk.end - 4].lower()
        assert qk.question[-4:] == data[qk.end - 4 : qk.end]
    records = walk_records(data)
    for r in records or ():
        assert r.start < r.ttl_offset < r.rdata_start <= r.rdata_end <= len(data)


@given(names, st.integers(0, 80), st.integers(0, 255))
def test_dnswire_byte_flip_agrees_with_dnspython(name: str, where: int, value: int) -> None:
    wire = bytearray(make_query(name, 28, dnssec=True))
    wire[where % len(wire)] = value
    qk = question_key(bytes(wire))
    try:
        parsed = dns.message.from_wire(bytes(wire))
    except (dns.exception.DNSException, ValueError):
        return
    if qk is not None:
        # when both read it, both read the same question
        q = parsed.question[0]
        assert qk.qname == q.name.canonicalize().to_wire()
        assert (qk.qtype, qk.qclass) == (q.rdtype, q.rdclass)
        assert qk.dnssec_ok == bool(parsed.ednsflags & dns.flags.DO)
        assert qk.edns == (parsed.edns >= 0)


def test_dnswire_rejects_compression_pointer_in_question() -> None:
    header = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0)
    assert question_key(header + b"\xc0\x0c" + struct.pack(">HH", 1, 1)) is None
    assert question_key(header + b"\x03www\xc0\x0c" + struct.pack(">HH", 1, 1)) is None


def test_dnswire_rejects_long_names_and_label_types() -> None:
    header = struct.pack(">HHHHHH", 1, 0x0100, 1, 0, 0, 0)
    tail = b"\x00" + struct.pack(">HH", 1, 1)
    too_long = (b"\x3f" + b"a" * 63) * 4 + tail  # 256 octets with the root
    assert question_key(header + too_long) is None
    fits = (b"\x3f" + b"a" * 63) * 3 + b"\x3d" + b"a" * 61 + tail  # 255 octets
    assert question_key(header + fits) is not None
    assert question_key(header + b"\x41" + b"a" * 65 + tail) is None  # extended label type


def test_dnswire_rejects_other_opcodes_and_question_counts() -> None:
    wire = make_query("example.com.", edns=False)
    notify = wire[:2] + bytes((wire[2] | 0x20,)) + wire[3:]
    assert question_key(notify) is None
    two = wire[:4] + b"\x00\x02" + wire[6:]
    assert question_key(two) is None


def test_dnswire_opt_rules_on_the_slow_path() -> None:
    base = make_query("example.com.", edns=False)
    opt = b"\x00" + struct.pack(">HHIH", 41, 1232, 0x8000, 0)
    a_rr = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + b"\x01\x02\x03\x04"

    def with_counts(an: int, ns: int, ar: int, tail: bytes) -> bytes:
        return base[:6] + struct.pack(">HHH", an, ns, ar) + base[12:] + tail

    qk = question_key(with_counts(0, 0, 2, a_rr + opt))
    assert qk is not None and qk.dnssec_ok
    assert question_key(with_counts(0, 0, 2, opt + opt)) is None  # two OPT records
    assert question_key(with_counts(1, 0, 0, opt)) is None  # OPT in the answer section
    named_opt = b"\xc0\x0c" + opt[1:]
    assert question_key(with_counts(0, 0, 1, named_opt)) is None  # OPT owner is not the root
    assert question_key(with_counts(0, 0, 1, opt[:-1])) is None


@given(st.binary(min_size=12, max_size=40), st.integers(0, 0xFFFF))
def test_dnswire_patch_id_round_trip(wire: bytes, msg_id: int) -> None:
    patched = patch_id(wire, msg_id)
    assert struct.unpack(">H", patched[:2])[0] == msg_id
    assert patched[2:] == wire[2:]
    assert patch_id(patched, struct.unpack(">H", wire[:2])[0]) == wire


def test_dnswire_patch_id_rejects_bad_ids() -> None:
    with pytest.raises(ValueError):
        patch_id(b"\x00" * 12, 0x10000)
    with pytest.raises(ValueError):
        patch_id(b"", 1)


@given(names, rdtypes, st.booleans(), st.booleans(), st.booleans(), st.integers(0, 0xFFFF))
def test_dnswire_build_query_round_trip(
    name: str, rdtype: int, edns: bool, do: bool, cd: bool, msg_id: int
) -> None:
    qk = question_key(make_query(name.upper(), rdtype, edns=edns or do, dnssec=do, cd=cd))
    assert qk is not None
    wire = build_query(qk, msg_id)
    assert question_key(wire) == qk
    parsed = dns.message.from_wire(wire)
    assert parsed.id == msg_id and parsed.flags & dns.flags.RD
    assert parsed.question[0].rdtype == rdtype


def test_dnswire_walk_records_finds_ttl_offsets() -> None:
    q = dns.message.make_query("www.example.com.", "A", use_edns=0)
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("www.example.com.", 300, "IN", "CNAME", "web.example.net."))
    r.answer.append(
        dns.rrset.from_text("web.example.net.", 60, "IN", "A", "192.0.2.1", "192.0.2.2")
    )
    wire = r.to_wire()
    records = walk_records(wire)
    assert records is not None
    assert [(x.section, x.rtype, x.ttl) for x in records] == [
        (0, 5, 300),
        (0, 1, 60),
        (0, 1, 60),
        (2, 41, 0),
    ]
    for x in records:
        assert struct.unpack(">I", wire[x.ttl_offset : x.ttl_offset + 4])[0] == x.ttl
    assert walk_records(wire[:-1]) is None
    assert walk_records(wire[:11]) is None


def test_dnswire_question_key_is_a_named_tuple() -> None:
    qk = question_key(make_query("Example.COM.", 65))
    assert isinstance(qk, QuestionKey)
    assert qk.name_text() == "example.com."
    assert dns.rdatatype.to_text(qk.qtype) == "HTTPS"
    assert qk.qclass == dns.rdataclass.IN
