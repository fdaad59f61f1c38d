"""Re-framing a ClientHello (tls_hello.split_records / hello_layout, splits.plan_fragments for
TLS): the handshake message never changes, whatever the hello and the split points."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocols.splits import ANCHORS, FragmentPolicy, SplitPoint, plan_fragments
from proxy.protocols.tls_hello import (
    ClientHello,
    build_client_hello,
    hello_layout,
    parse_client_hello,
    split_records,
)


def chromium_like(sni: str = "blocked.test", *, late: bool = False, **kw: object) -> bytes:
    """A ~1.8 KB hello with a post-quantum key share, the name early (byte ~127) or late."""
    return build_client_hello(
        sni,
        key_share_size=1216,
        grease=True,
        ech=True,
        shuffle_seed=3,
        sni_index=-1 if late else 0,
        **kw,  # type: ignore[arg-type]
    )


def message_of(data: bytes) -> bytes:
    """The handshake message: every record payload of the hello, concatenated."""
    layout = hello_layout(data)
    assert layout is not None
    return b"".join(data[h + 5 : h + 5 + n] for h, n in layout.records)


def same_hello(a: ClientHello, b: ClientHello) -> None:
    for name in ("sni", "alpn", "legacy_version", "supported_versions", "extensions",
                 "has_ech", "session_id", "cipher_suites"):  # fmt: skip
        assert getattr(a, name) == getattr(b, name), name


def points(*texts: str) -> tuple[SplitPoint, ...]:
    return tuple(SplitPoint.parse(t) for t in texts)


def test_tls_reframe_hello_positions_early_and_late() -> None:
    early, late = chromium_like(), chromium_like(late=True)
    e, la = parse_client_hello(early), parse_client_hello(late)
    assert e is not None and la is not None
    assert len(early) > 1800 and len(late) == len(early)
    assert e.sni_offset is not None and e.sni_offset < 150
    assert la.sni_offset is not None and la.sni_offset > 1750


def test_tls_reframe_layout_of_a_client_split_hello() -> None:
    data = chromium_like(record_sizes=(100, 700))
    layout = hello_layout(data)
    assert layout is not None
    assert [n for _, n in layout.records][:2] == [100, 700]
    assert [h for h, _ in layout.records] == [0, 105, 810]
    assert layout.raw_offset(0) == 5 and layout.raw_offset(100) == 110
    assert layout.message_offset(3) is None  # inside the first header
    assert layout.message_offset(107) is None and layout.message_offset(110) == 100
    assert layout.raw_offset(layout.message_length) == layout.raw_length == len(data)
    with pytest.raises(ValueError, match="outside"):
        layout.raw_offset(layout.message_length + 1)
    assert hello_layout(data[:-1]) is None


def test_tls_reframe_split_records_keeps_the_message() -> None:
    data = chromium_like() + b"early data"
    out, starts = split_records(data, [10, 400, 400, 0, 10**6])
    assert out.endswith(b"early data")
    hello = parse_client_hello(out)
    assert hello is not None and hello.record_count == 3
    assert message_of(out) == message_of(data)
    assert [s for s, _ in starts] == [0, 10, 400]
    assert [out[h : h + 3] for _, h in starts] == [b"\x16\x03\x01"] * 3
    with pytest.raises(ValueError, match="not complete"):
        split_records(data[:100], [10])


def test_tls_reframe_keeps_the_clients_record_boundaries_and_versions() -> None:
    data = bytearray(chromium_like(record_sizes=(300,)))
    data[2] = 0x03  # a client that writes TLS 1.2 in its record headers
    out, starts = split_records(bytes(data), [150, 600])
    assert [s for s, _ in starts] == [0, 150, 300, 600]
    assert {out[h + 2] for _, h in starts[:2]} == {0x03}
    assert {out[h + 2] for _, h in starts[2:]} == {0x01}
    assert message_of(out) == message_of(bytes(data))


@pytest.mark.parametrize("late", [False, True])
def test_tls_reframe_records_push_the_name_out_of_the_first_record(late: bool) -> None:
    data = chromium_like(late=late)
    plan = plan_fragments(data, FragmentPolicy(points("sni-middle"), records=True,
                                               segments=False))  # fmt: skip
    assert plan.protocol == "tls" and plan.changed and len(plan.pieces) == 1
    first_length = int.from_bytes(plan.data[3:5], "big")
    assert b"blocked.test" not in plan.data[: 5 + first_length]
    assert b"block" in plan.data[: 5 + first_length] or not late
    hello = parse_client_hello(plan.data)
    assert hello is not None and hello.record_count == 2 and hello.sni == "blocked.test"


def test_tls_reframe_segments_cut_the_record_header_and_the_name() -> None:
    data = chromium_like()
    hello = parse_client_hello(data)
    assert hello is not None and hello.sni_offset is not None
    plan = plan_fragments(data, FragmentPolicy(points("start+2", "sni-middle")))
    assert plan.data == data
    assert [len(p) for p in plan.pieces][:2] == [2, hello.sni_offset + 6 - 2]
    assert plan.pieces[2].startswith(b"d.test")


def test_tls_reframe_records_and_segments_put_each_record_in_a_segment() -> None:
    data = chromium_like(late=True)
    policy = FragmentPolicy(points("start+2", "sni-ext", "sni-middle"), records=True)
    plan = plan_fragments(data, policy)
    assert len(plan.pieces) == 4
    assert plan.pieces[0] == b"\x16\x03"
    # pieces 2 and 3 each start with a record header of their own
    assert all(p[:3] == b"\x16\x03\x01" for p in plan.pieces[2:])
    assert plan.pieces[2][5:9] == b"\x00\x00\x00\x11"  # server_name, 17 bytes long
    assert message_of(plan.data) == message_of(data)


def test_tls_reframe_a_cut_right_after_the_first_header_stays_there() -> None:
    data = chromium_like()
    plan = plan_fragments(data, FragmentPolicy(points("start+5"), records=True))
    assert len(plan.pieces[0]) == 5 and plan.data == data


def test_tls_reframe_offsets_relative_to_the_name() -> None:
    data = chromium_like()
    hello = parse_client_hello(data)
    assert hello is not None and hello.sni_offset is not None
    for text, expected in (("sni", 0), ("sni+3", 3), ("sni-2", -2), ("sni-end", 12),
                           ("sni-end-1", 11)):  # fmt: skip
        plan = plan_fragments(data, FragmentPolicy(points(text)))
        assert len(plan.pieces[0]) == hello.sni_offset + expected, text


def test_tls_reframe_name_points_are_skipped_without_sni() -> None:
    data = build_client_hello(None)
    plan = plan_fragments(data, FragmentPolicy(points("sni-middle", "host"), records=True))
    assert plan.pieces == (data,) and not plan.changed
    assert plan_fragments(data, FragmentPolicy(points("start+1"))).changed


def test_tls_reframe_leaves_broken_or_partial_hellos_alone() -> None:
    data = chromium_like()
    policy = FragmentPolicy(points("start+2", "sni-middle"), records=True)
    for flight in (data[:1000], b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", b"", b"\x16"):
        plan = plan_fragments(flight, policy)
        assert plan.pieces == (flight,) and plan.protocol == "other" and not plan.changed


# --- hypothesis: any hello, any points --------------------------------------------------------

point_texts = st.one_of(
    st.sampled_from(ANCHORS),
    st.tuples(st.sampled_from(ANCHORS), st.integers(-40, 2000)).map(
        lambda t: f"{t[0]}{t[1]:+d}" if t[1] else t[0]
    ),
)


@st.composite
def hellos(draw: st.DrawFn) -> bytes:
    sni = draw(
        st.one_of(st.none(), st.from_regex(r"[a-z0-9]{1,20}(\.[a-z]{2,8}){1,3}", fullmatch=True))
    )
    sizes = draw(st.lists(st.integers(1, 600), max_size=4))
    return build_client_hello(
        sni,
        key_share_size=draw(st.sampled_from([0, 1216])),
        grease=draw(st.booleans()),
        ech=draw(st.booleans()),
        shuffle_seed=draw(st.one_of(st.none(), st.integers(0, 1000))),
        record_sizes=sizes,
        seed=draw(st.integers(0, 100)),
    )


@given(hellos(), st.lists(point_texts, max_size=6), st.booleans(), st.booleans(),
       st.binary(max_size=20))  # fmt: skip
def test_tls_reframe_never_changes_the_handshake(
    data: bytes, texts: list[str], records: bool, segments: bool, trailing: bytes
) -> None:
    policy = FragmentPolicy(points(*texts), records=records, segments=segments or not records)
    plan = plan_fragments(data + trailing, policy)
    out = plan.data
    assert all(plan.pieces)
    assert out.endswith(trailing)
    if not records:
        assert out == data + trailing
    assert message_of(out) == message_of(data)
    before, after = parse_client_hello(data), parse_client_hello(out)
    assert before is not None and after is not None
    same_hello(before, after)
    assert after.total_length == len(out) - len(trailing)
    # every record stays within the TLS limit and no record is empty
    layout = hello_layout(out)
    assert layout is not None and all(0 < n <= 1 << 14 for _, n in layout.records)
