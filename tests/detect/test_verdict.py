"""Verdicts: what a failed attempt means once the controls have spoken."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.detect.outcome import Outcome, judge_first_response, looks_like_blockpage
from proxy.detect.verdict import (
    CENSORSHIP,
    Controls,
    Verdict,
    classify,
    needs_address_control,
    neutral_hello,
)
from proxy.protocols.tls_hello import parse_client_hello

REACHED = Controls(site_reached=True)
ANSWERS = Controls(address_answers=True)
NOTHING = Controls(address_answers=False)


@pytest.mark.parametrize(
    ("outcome", "controls", "verdict"),
    [
        (Outcome.RESET_AFTER_FIRST_FLIGHT, REACHED, Verdict.SNI_RESET),
        (Outcome.EOF_BEFORE_RESPONSE, ANSWERS, Verdict.SNI_RESET),
        (Outcome.RESET_AFTER_FIRST_FLIGHT, NOTHING, Verdict.SITE_DOWN),
        (Outcome.TIMEOUT_AFTER_FIRST_FLIGHT, REACHED, Verdict.SNI_TIMEOUT),
        (Outcome.TIMEOUT_AFTER_FIRST_FLIGHT, ANSWERS, Verdict.SNI_TIMEOUT),
        (Outcome.TIMEOUT_AFTER_FIRST_FLIGHT, Controls(), Verdict.SITE_DOWN),
        (Outcome.CONNECT_REFUSED, REACHED, Verdict.IP_BLOCKED),
        (Outcome.CONNECT_TIMEOUT, REACHED, Verdict.IP_BLOCKED),
        (Outcome.UNREACHABLE, Controls(), Verdict.SITE_DOWN),
        (Outcome.NOT_SERVER_HELLO, REACHED, Verdict.BLOCKPAGE),
        (Outcome.BLOCKPAGE, ANSWERS, Verdict.BLOCKPAGE),
        (Outcome.RESOLVE_ERROR, REACHED, Verdict.DNS_TAMPERING),
        (Outcome.RESOLVE_ERROR, Controls(), Verdict.SITE_DOWN),
        (Outcome.CONNECT_REFUSED, Controls(site_reached=True, dns_mismatch=True),
         Verdict.DNS_TAMPERING),
        (Outcome.CONNECT_REFUSED, Controls(dns_mismatch=True), Verdict.DNS_TAMPERING),
        (Outcome.NOT_ALLOWED, REACHED, Verdict.PATH_FAILED),
        (Outcome.ERROR, Controls(), Verdict.PATH_FAILED),
        (Outcome.OK, Controls(), Verdict.OK),
    ],
)  # fmt: skip
def test_verdict_table(outcome: Outcome, controls: Controls, verdict: Verdict) -> None:
    assert classify(outcome, controls) is verdict


def test_verdict_dns_mismatch_only_blames_a_local_lookup() -> None:
    mismatch = Controls(site_reached=True, dns_mismatch=True)
    got = classify(Outcome.CONNECT_REFUSED, mismatch, resolved_locally=False)
    assert got is Verdict.IP_BLOCKED


@given(
    st.sampled_from(list(Outcome)),
    st.booleans(),
    st.sampled_from([None, False]),
    st.booleans(),
)
def test_verdict_never_blames_censorship_without_a_control_reaching_the_site(
    outcome: Outcome, local: bool, answers: bool | None, mismatch: bool
) -> None:
    """No control reached the site and DNS agrees: never a censorship verdict, so nothing
    that would change a strategy is learned from an outage."""
    got = classify(outcome, Controls(False, answers, False), resolved_locally=local)
    assert got not in CENSORSHIP
    # and the verdict is always one of the stable names
    assert Verdict(got.value) is got


def test_verdict_values_are_the_stable_names() -> None:
    assert {v.value for v in Verdict} == {
        "ok", "dns-tampering", "ip-blocked", "sni-reset", "sni-timeout", "throttled", "frozen",
        "blockpage", "site-down", "path-failed",
    }  # fmt: skip


def test_verdict_address_control_only_for_answers_after_the_first_flight() -> None:
    assert needs_address_control(Outcome.RESET_AFTER_FIRST_FLIGHT)
    assert needs_address_control(Outcome.TIMEOUT_AFTER_FIRST_FLIGHT)
    assert not needs_address_control(Outcome.CONNECT_REFUSED)
    assert not needs_address_control(Outcome.NOT_ALLOWED)


def test_verdict_neutral_hello_names_an_innocuous_site() -> None:
    hello = parse_client_hello(neutral_hello())
    assert hello is not None and hello.sni == "www.example.com"


GET = b"GET / HTTP/1.1\r\nHost: news.example\r\nAccept: */*\r\n\r\n"


@pytest.mark.parametrize(
    ("response", "blocked"),
    [
        (b"HTTP/1.1 451 Unavailable For Legal Reasons\r\n\r\n", True),
        (b"HTTP/1.1 302 Found\r\nLocation: http://blockpage.isp/?blocked\r\n\r\n", True),
        (b"HTTP/1.1 301 Moved\r\nLocation: https://www.news.example/\r\n\r\n", False),
        (b"HTTP/1.1 302 Found\r\nlocation: /login\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", False),
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", False),
        (b"\x16\x03\x03", False),
        (b"HTTP/1.1 30", False),
    ],
)
def test_blockpage_heuristic(response: bytes, blocked: bool) -> None:
    assert looks_like_blockpage(GET, response) is blocked
    expected = Outcome.BLOCKPAGE if blocked else Outcome.OK
    assert judge_first_response(GET, response, tls=False) is expected


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_blockpage_heuristic_takes_any_bytes(request: bytes, response: bytes) -> None:
    assert isinstance(looks_like_blockpage(request, response), bool)
