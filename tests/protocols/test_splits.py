"""Split points and HTTP plans (proxy.protocols.splits): the grammar, the Host tricks, and that
servers still read the same request (h11 as the server)."""

from __future__ import annotations

import h11
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.protocols.splits import ANCHORS, FragmentPolicy, SplitPoint, plan_fragments


def points(*texts: str) -> tuple[SplitPoint, ...]:
    return tuple(SplitPoint.parse(t) for t in texts)


REQUEST = (
    b"GET /path?q=1 HTTP/1.1\r\nUser-Agent: t\r\nHost:  blocked.test:8080 \r\nAccept: */*\r\n\r\n"
)


def served(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """What an h11 server makes of a request head: method, target, headers."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, h11.Request)
    return event.method, event.target, list(event.headers)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sni-middle", SplitPoint("sni-middle")),
        ("sni+3", SplitPoint("sni", 3)),
        ("sni-end-2", SplitPoint("sni-end", -2)),
        ("2", SplitPoint("start", 2)),
        (" start+2 ", SplitPoint("start", 2)),
        ("host-middle", SplitPoint("host-middle")),
    ],
)
def test_splits_parse_points(text: str, expected: SplitPoint) -> None:
    assert SplitPoint.parse(text) == expected
    assert SplitPoint.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", "sni middle", "middle", "-3", "+2", "start2", "sni+x",
                                  "sni+999999", "SNI"])  # fmt: skip
def test_splits_reject_bad_points(text: str) -> None:
    with pytest.raises(ValueError, match=r"not a split point.*sni-middle"):
        SplitPoint.parse(text)


def test_splits_policy_checks_the_host_tricks() -> None:
    with pytest.raises(ValueError, match="Host field"):
        FragmentPolicy((), host_header="hots")
    with pytest.raises(ValueError, match="spaces and tabs"):
        FragmentPolicy((), host_space=" x")


def test_splits_http_host_case_and_spacing_keep_the_request() -> None:
    policy = FragmentPolicy((), host_header="hOsT", host_space="\t")
    plan = plan_fragments(REQUEST, policy)
    assert plan.protocol == "http" and plan.changed and len(plan.pieces) == 1
    assert b"\r\nhOsT:\tblocked.test:8080 \r\n" in plan.data
    assert served(plan.data) == served(REQUEST)
    no_space = plan_fragments(REQUEST, FragmentPolicy((), host_space=""))
    assert b"\r\nHost:blocked.test:8080 \r\n" in no_space.data
    assert served(no_space.data) == served(REQUEST)


def test_splits_http_segments_at_the_request_line_and_host() -> None:
    plan = plan_fragments(REQUEST, FragmentPolicy(points("start+2", "host", "host-middle",
                                                         "host-end", "host-line")))  # fmt: skip
    assert plan.data == REQUEST and not plan.pieces[0].endswith(b"\n")
    assert plan.pieces[0] == b"GE"
    assert plan.pieces[2].endswith(b"Host:  ") and plan.pieces[3] == b"blocked."
    assert plan.pieces[4] == b"test:8080"
    assert plan.pieces[5].startswith(b" \r\nAccept")


def test_splits_http_without_host_or_complete_head() -> None:
    head = b"GET / HTTP/1.0\r\nAccept: */*\r\n\r\n"
    plan = plan_fragments(head, FragmentPolicy(points("host-middle"), host_header="HOST"))
    assert plan.pieces == (head,) and not plan.changed
    cut = b"GET / HTTP/1.1\r\nAccept: */*\r\nHost: blocked.te"  # Host line not complete yet
    plan = plan_fragments(cut, FragmentPolicy(points("host-middle"), host_header="HOST"))
    assert plan.pieces == (cut,) and not plan.changed
    body = b"POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 9\r\n\r\nHost: b.c"
    plan = plan_fragments(body, FragmentPolicy((), host_header="HOST"))
    assert plan.data == body.replace(b"Host: a", b"HOST: a")  # the body is never touched


def test_splits_other_protocols_pass_unchanged() -> None:
    for flight in (b"SSH-2.0-OpenSSH_9.6\r\n", b"get / http/1.1\r\n", b"\x00" * 10):
        plan = plan_fragments(flight, FragmentPolicy(points("start+2"), records=True))
        assert plan.pieces == (flight,) and plan.protocol == "other"


host_names = st.from_regex(r"[a-z0-9-]{1,15}(\.[a-z]{2,6}){1,2}(:[0-9]{2,5})?", fullmatch=True)


@given(
    host_names,
    st.sampled_from(["host", "Host", "HOST", "hOsT"]),
    st.one_of(st.none(), st.text(" \t", max_size=8)),
    st.lists(st.tuples(st.sampled_from(ANCHORS), st.integers(-5, 80)), max_size=5),
)
def test_splits_http_plans_are_served_the_same(
    host: str, spelling: str, space: str | None, cuts: list[tuple[str, int]]
) -> None:
    request = f"GET / HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode()
    policy = FragmentPolicy(
        tuple(SplitPoint(a, o) for a, o in cuts), host_header=spelling, host_space=space
    )
    plan = plan_fragments(request, policy)
    assert all(plan.pieces)
    assert served(plan.data) == served(request)
    assert len(plan.data) == len(request) + (0 if space is None else len(space) - 1)
