"""The censor core at the engine level: triggers, actions, memoisation, the penalty box, and the
reassembly knob over realistic ClientHellos (hypothesis over split positions and record layouts).
"""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.lab.clock import ManualClock
from proxy.lab.rules import (
    Action,
    ActionKind,
    AllOf,
    AnyOf,
    CensorEngine,
    Destination,
    Flow,
    FragmentedHello,
    HttpHost,
    Keyword,
    NameMatch,
    Penalty,
    PenaltyKey,
    ProtocolAllowList,
    Reassembly,
    Rule,
    Sni,
    Verdict,
)
from proxy.protocols.tls_hello import build_client_hello, parse_client_hello

SERVER = "127.0.10.1"
_ports = iter(range(20000, 60000))


def new_flow(client: str = "127.0.0.1", server: str = SERVER, port: int = 443) -> Flow:
    return Flow(client, next(_ports), server, port)


def engine_with(*rules: Rule, clock: ManualClock | None = None, **kw: object) -> CensorEngine:
    return CensorEngine(list(rules), clock=clock or ManualClock(), **kw)  # type: ignore[arg-type]


def feed(engine: CensorEngine, segments: list[bytes], flow: Flow | None = None) -> Verdict:
    """Connect, send the segments one by one; the last verdict."""
    flow = flow or new_flow()
    verdict = engine.on_connect(flow)
    for seg in segments:
        verdict = engine.on_client_segment(flow, seg)
    return verdict


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def curl_hello(sni: str = "blocked.test", **kw: object) -> bytes:
    return build_client_hello(sni, pad_to=512, **kw)  # type: ignore[arg-type]


def chrome_hello(sni: str = "blocked.test", seed: int = 1, **kw: object) -> bytes:
    return build_client_hello(
        sni,
        key_share_size=1216,
        grease=True,
        shuffle_seed=seed,
        **kw,  # type: ignore[arg-type]
    )


def sni_rule(mode: Reassembly, action: Action | None = None, name: str = "sni") -> Rule:
    return Rule(name, Sni("blocked.test"), action or Action.reset(), reassembly=mode)


# --- triggers ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "mode", "name", "expected"),
    [
        ("blocked.test", NameMatch.EXACT, "blocked.test", True),
        ("blocked.test", NameMatch.EXACT, "www.blocked.test", False),
        ("Blocked.Test", NameMatch.EXACT, "BLOCKED.test", True),
        ("*.twimg.com", NameMatch.SUFFIX, "pbs.twimg.com", True),
        ("twimg.com", NameMatch.SUFFIX, "twimg.com", True),
        ("twimg.com", NameMatch.SUFFIX, "nottwimg.com", False),
        ("*t.co*", NameMatch.GLOB, "t.co", True),
        ("*t.co*", NameMatch.GLOB, "microsoft.com", True),  # the 2021 throttler's bug
        ("*t.co*", NameMatch.GLOB, "reddit.com", True),
        ("*t.co*", NameMatch.GLOB, "example.com", False),
        (r"^(www\.)?blocked\.test$", NameMatch.REGEX, "www.blocked.test", True),
        (r"^(www\.)?blocked\.test$", NameMatch.REGEX, "xblocked.test", False),
    ],
)
def test_sni_name_matching(pattern: str, mode: NameMatch, name: str, expected: bool) -> None:
    engine = engine_with(Rule("r", Sni(pattern, mode), Action.reset()))
    verdict = feed(engine, [curl_hello(name)])
    assert (verdict.kind is ActionKind.RESET) is expected
    assert len(engine.hits(name="r")) == int(expected)


def test_tco_bug_throttles_microsoft_and_logs_the_trigger() -> None:
    engine = engine_with(Rule("twitter", Sni("*t.co*", NameMatch.GLOB), Action.throttle(16000)))
    verdict = feed(engine, [chrome_hello("www.microsoft.com")])
    assert verdict.kind is ActionKind.THROTTLE and verdict.forward
    [hit] = engine.hits(action=ActionKind.THROTTLE)
    assert hit.rule == "twitter" and "microsoft.com" in hit.trigger and "*t.co*" in hit.trigger


def http_request(host: str, path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: t\r\n\r\n".encode()


def test_http_host_trigger_is_case_insensitive_and_ignores_port() -> None:
    engine = engine_with(Rule("host", HttpHost("blocked.test"), Action.blockpage(451)))
    verdict = feed(engine, [http_request("Blocked.Test:8080")], new_flow(port=80))
    assert verdict.kind is ActionKind.BLOCKPAGE and not verdict.forward
    assert verdict.reply.startswith(b"HTTP/1.1 451 ") and b"<iframe" in verdict.reply
    assert feed(engine, [http_request("fine.test")], new_flow(port=80)).forward


def test_http_host_split_segments_none_versus_full() -> None:
    request = http_request("blocked.test")
    parts = split(request, [len(request) - 10])
    none = engine_with(Rule("h", HttpHost("blocked.test"), Action.reset()))
    full = engine_with(
        Rule("h", HttpHost("blocked.test"), Action.reset(), reassembly=Reassembly.FULL)
    )
    assert feed(none, parts).forward
    assert feed(full, parts).kind is ActionKind.RESET


def test_keyword_anywhere_and_in_request_line_only() -> None:
    anywhere = engine_with(Rule("k", Keyword(b"falun"), Action.reset()))
    assert feed(anywhere, [http_request("x.test", "/?q=falun")]).kind is ActionKind.RESET
    line = engine_with(Rule("k", Keyword(b"falun", request_line=True), Action.reset()))
    assert feed(line, [http_request("x.test", "/?q=falun")]).kind is ActionKind.RESET
    body = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nfalun"
    assert feed(line, [body]).forward


def test_destination_cidr_and_port_decide_at_connect() -> None:
    engine = engine_with(
        Rule("ip", Destination(("127.0.20.0/24",), (443,)), Action.refuse()),
        Rule("port", Destination(ports=(853,)), Action.drop_syn()),
    )
    assert engine.on_connect(new_flow(server="127.0.20.7")).kind is ActionKind.REFUSE
    assert engine.on_connect(new_flow(server="127.0.20.7", port=80)).forward
    assert engine.on_connect(new_flow(server="127.0.21.7")).forward
    assert engine.on_connect(new_flow(port=853)).kind is ActionKind.DROP_SYN
    assert [h.rule for h in engine.hits()] == ["ip", "port"]


def test_listener_action_only_when_every_client_is_covered() -> None:
    engine = engine_with(
        Rule("sni", Sni("x.test"), Action.reset()),
        Rule("ip", Destination(("127.0.20.0/24",)), Action.refuse()),
        Rule("mixed", AllOf((Destination(("127.0.21.0/24",)), Sni("y.test"))), Action.refuse()),
        Rule("drop", Destination(("127.0.22.0/24",)), Action.drop_syn()),
    )
    assert engine.listener_action("127.0.20.1", 443) == Action.refuse()
    assert engine.listener_action("127.0.21.1", 443) is None
    assert engine.listener_action("127.0.22.1", 443) == Action.drop_syn()
    assert engine.listener_action("127.0.23.1", 443) is None
    assert [h.flow for h in engine.hits()] == [None, None]
    blackhole_first = engine_with(
        Rule("bh", Destination(("127.0.20.0/24",)), Action.blackhole()),
        Rule("ip", Destination(("127.0.20.0/24",)), Action.refuse()),
    )
    assert blackhole_first.listener_action("127.0.20.1", 443) is None


@pytest.mark.parametrize(
    ("first", "violation"),
    [
        (curl_hello()[:5], False),
        (http_request("x.test"), False),
        (b"\x00\x1d\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03www", False),  # DNS/TCP
        (b"\x16\x03", True),  # too short to show a whole TLS record header
        (bytes(range(40)), True),
        (b"SSH-2.0-OpenSSH_9.6\r\n", True),
    ],
)
def test_protocol_allow_list(first: bytes, violation: bool) -> None:
    engine = engine_with(Rule("iran", ProtocolAllowList(), Action.drop_client()))
    verdict = feed(engine, [first, b"\x00" * 10])
    assert (verdict.kind is ActionKind.DROP_CLIENT) is violation
    assert verdict.forward is not violation


def test_fragmented_hello_trigger() -> None:
    engine = engine_with(Rule("frag", FragmentedHello(), Action.blackhole()))
    hello = curl_hello("fine.test")
    assert feed(engine, [hello]).forward
    assert feed(engine, split(hello, [100])).kind is ActionKind.BLACKHOLE
    assert feed(engine, [curl_hello("fine.test", record_sizes=[50])]).kind is ActionKind.BLACKHOLE
    assert feed(engine, [http_request("x.test")]).forward


def test_any_of_and_all_of() -> None:
    engine = engine_with(
        Rule("both", AllOf((Destination(ports=(443,)), Sni("blocked.test"))), Action.reset()),
        Rule("either", AnyOf((Sni("a.test"), Sni("b.test"))), Action.blackhole()),
    )
    assert feed(engine, [curl_hello()]).kind is ActionKind.RESET
    assert feed(engine, [curl_hello()], new_flow(port=8443)).forward
    assert feed(engine, [curl_hello("b.test")], new_flow(port=8443)).kind is ActionKind.BLACKHOLE


# --- actions, memoisation, ordering ------------------------------------------------------------


def test_first_match_wins_and_policy_is_memoised() -> None:
    engine = engine_with(
        Rule("first", Sni("blocked.test"), Action.blackhole()),
        Rule("second", Sni("blocked.test"), Action.reset()),
    )
    flow = new_flow()
    engine.on_connect(flow)
    assert engine.on_client_segment(flow, curl_hello()).kind is ActionKind.BLACKHOLE
    # later segments are not inspected again, whatever they hold
    assert engine.on_client_segment(flow, b"anything").kind is ActionKind.BLACKHOLE
    assert engine.on_server_bytes(flow, 100).allow == 0
    assert [h.rule for h in engine.hits()] == ["first"]


def test_unmatched_flow_forwards_everything() -> None:
    engine = engine_with(sni_rule(Reassembly.FULL))
    flow = new_flow()
    assert feed(engine, [curl_hello("fine.test"), b"x" * 100], flow).forward
    sv = engine.on_server_bytes(flow, 5000)
    assert (sv.allow, sv.delay, sv.stop) == (5000, 0.0, False)
    assert engine.throttle_delay(flow, 5000) == 0.0
    assert engine.hits() == []


def test_inspection_window_in_segments() -> None:
    engine = engine_with(sni_rule(Reassembly.FULL), inspect_segments=2)
    hello = curl_hello()
    assert feed(engine, split(hello, [10, 20])).forward  # the third segment is not looked at
    assert feed(engine, split(hello, [10])).kind is ActionKind.RESET


@pytest.mark.parametrize(
    ("action", "forward"),
    [
        (Action.reset(), False),
        (Action.blackhole(), False),
        (Action.refuse(), False),
        (Action.drop_syn(), False),
        (Action.drop_client(), False),
        (Action.throttle(1000), True),
        (Action.freeze_after(10), True),
    ],
)
def test_action_forwarding_of_client_bytes(action: Action, forward: bool) -> None:
    verdict = feed(engine_with(sni_rule(Reassembly.NONE, action)), [curl_hello()])
    assert verdict.kind is action.kind and verdict.forward is forward and verdict.reply == b""


def test_blockpage_and_redirect_replies_are_given_once() -> None:
    page = engine_with(Rule("p", HttpHost("blocked.test"), Action.blockpage(403, b"no")))
    flow = new_flow(port=80)
    first = feed(page, [http_request("blocked.test")], flow)
    assert first.reply == (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Length: 2\r\nConnection: close\r\n\r\nno"
    )
    assert page.on_client_segment(flow, b"more").reply == b""
    redirect = engine_with(Rule("r", HttpHost("blocked.test"), Action.redirect("http://x/b")))
    reply = feed(redirect, [http_request("blocked.test")], new_flow(port=80)).reply
    assert reply.startswith(b"HTTP/1.1 302 Found\r\nLocation: http://x/b\r\n")
    ok200 = Action.blockpage(200, iframe="http://10.10.34.36/")
    assert b'<iframe src="http://10.10.34.36/"' in ok200.response()


def test_blockpage_decided_at_connect_replies_to_the_first_segment() -> None:
    engine = engine_with(Rule("ip", Destination((SERVER + "/32",)), Action.blockpage()))
    flow = new_flow(port=80)
    assert engine.on_connect(flow).reply == b""
    assert engine.on_client_segment(flow, http_request("a")).reply.startswith(b"HTTP/1.1 451")


def test_freeze_after_counts_exactly() -> None:
    engine = engine_with(sni_rule(Reassembly.NONE, Action.freeze_after(16384)))
    flow = new_flow()
    feed(engine, [curl_hello()], flow)
    assert engine.on_server_bytes(flow, 10000).allow == 10000
    sv = engine.on_server_bytes(flow, 10000)
    assert (sv.allow, sv.stop) == (6384, True)
    assert engine.on_server_bytes(flow, 1).allow == 0


def test_throttle_token_bucket_is_deterministic() -> None:
    clock = ManualClock(100.0)
    engine = engine_with(sni_rule(Reassembly.NONE, Action.throttle(1000, burst=500)), clock=clock)
    flow = new_flow()
    feed(engine, [curl_hello()], flow)
    assert engine.on_server_bytes(flow, 500).delay == 0.0  # the burst
    assert engine.on_server_bytes(flow, 1000).delay == pytest.approx(1.0)
    assert engine.on_server_bytes(flow, 1000).delay == pytest.approx(2.0)  # queued behind
    clock.advance(2.0)
    assert engine.throttle_delay(flow, 1000) == pytest.approx(1.0)
    clock.advance(10.0)  # the bucket refills to its burst, not beyond
    assert engine.throttle_delay(flow, 500) == 0.0
    assert engine.throttle_delay(flow, 1) == pytest.approx(0.001)


def test_invalid_configuration_is_rejected() -> None:
    with pytest.raises(ValueError):
        Action.throttle(0)
    with pytest.raises(ValueError):
        Rule("p", Sni("x"), Action.reset(), probability=1.5)
    with pytest.raises(ValueError, match="rng"):
        engine_with(Rule("p", Sni("x"), Action.reset(), probability=0.5))
    with pytest.raises(ValueError, match="unique"):
        engine_with(Rule("a", Sni("x"), Action.reset()), Rule("a", Sni("y"), Action.reset()))
    with pytest.raises(ValueError):
        Destination(("not-a-network",))


def test_probability_uses_the_seeded_rng_once_per_flow() -> None:
    def run(seed: int) -> list[bool]:
        rule = Rule("fet", Sni("blocked.test"), Action.blackhole(), probability=0.25)
        engine = engine_with(rule, rng=random.Random(seed))
        out = []
        for _ in range(200):
            flow = new_flow()
            engine.on_connect(flow)
            engine.on_client_segment(flow, curl_hello())
            # a spared flow stays spared: the draw is not repeated for its later segments
            out.append(engine.on_client_segment(flow, curl_hello()).kind is ActionKind.BLACKHOLE)
        return out

    first = run(7)
    assert first == run(7)
    assert 20 <= sum(first) <= 80


# --- residual blocking -------------------------------------------------------------------------


def test_penalty_box_expires_exactly_after_n_seconds() -> None:
    clock = ManualClock(1000.0)
    rule = Rule("gfw", Sni("blocked.test"), Action.reset(), penalty=Penalty(90))
    engine = engine_with(rule, clock=clock)
    assert feed(engine, [curl_hello()]).kind is ActionKind.RESET
    clock.advance(89.999)
    boxed = new_flow()
    assert engine.on_connect(boxed).kind is ActionKind.BLACKHOLE
    assert engine.on_client_segment(boxed, curl_hello("innocent.test")).kind is ActionKind.BLACKHOLE
    # other clients, other ports and other servers are not boxed under the 3-tuple key
    assert engine.on_connect(new_flow(client="127.0.0.2")).forward
    assert engine.on_connect(new_flow(port=8443)).forward
    assert engine.on_connect(new_flow(server="127.0.10.2")).forward
    clock.set(1090.0)
    assert engine.on_connect(new_flow()).forward
    residual = engine.hits(name="gfw")
    assert [h.residual for h in residual] == [False, True]
    assert residual[1].trigger == "penalty box until 1090.000"


@pytest.mark.parametrize(
    ("key", "other_client_boxed", "other_port_boxed"),
    [
        (PenaltyKey.CLIENT, False, True),
        (PenaltyKey.CLIENT_SERVER, False, True),
        (PenaltyKey.THREE_TUPLE, False, False),
    ],
)
def test_penalty_keys(key: PenaltyKey, other_client_boxed: bool, other_port_boxed: bool) -> None:
    penalty = Penalty(60, key=key, action=Action.refuse())
    engine = engine_with(Rule("r", Sni("blocked.test"), Action.reset(), penalty=penalty))
    feed(engine, [curl_hello()])
    assert engine.on_connect(new_flow()).kind is ActionKind.REFUSE
    assert engine.penalised(new_flow(client="127.0.0.9")) is other_client_boxed
    assert engine.penalised(new_flow(port=8443)) is other_port_boxed


# --- reassembly --------------------------------------------------------------------------------


def sni_span(hello: bytes) -> tuple[int, int]:
    parsed = parse_client_hello(hello)
    assert parsed is not None and parsed.sni_offset is not None and parsed.sni_length
    return parsed.sni_offset, parsed.sni_offset + parsed.sni_length


def blocked(mode: Reassembly, segments: list[bytes], name: str = "blocked.test") -> bool:
    engine = engine_with(Rule("sni", Sni(name), Action.reset(), reassembly=mode))
    return feed(engine, segments).kind is ActionKind.RESET


@pytest.mark.parametrize("make", [curl_hello, chrome_hello])
def test_split_inside_the_sni(make: object) -> None:
    hello = make()  # type: ignore[operator]
    start, _ = sni_span(hello)
    parts = split(hello, [start + 3])
    assert not blocked(Reassembly.NONE, parts)
    assert blocked(Reassembly.FIRST_RECORD, parts)
    assert blocked(Reassembly.FULL, parts)
    for at in (1, 2, 3, 4):
        parts = split(hello, [at])
        assert not blocked(Reassembly.FIRST_RECORD, parts)
        assert blocked(Reassembly.FULL, parts)


def test_curl_hello_is_517_bytes() -> None:
    assert len(curl_hello()) == 517


hellos = st.one_of(
    st.builds(lambda: ("curl", curl_hello())),
    st.builds(
        lambda seed: ("chrome", chrome_hello(seed=seed)), st.integers(min_value=0, max_value=1000)
    ),
)


@st.composite
def split_hellos(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    _, hello = draw(hellos)
    cuts = draw(st.lists(st.integers(1, len(hello) - 1), min_size=1, max_size=6, unique=True))
    return hello, cuts


@given(split_hellos())
def test_none_is_evaded_by_any_split(case: tuple[bytes, list[int]]) -> None:
    hello, cuts = case
    assert not blocked(Reassembly.NONE, split(hello, cuts))


@given(split_hellos())
def test_first_record_is_evaded_only_by_a_split_in_the_header(
    case: tuple[bytes, list[int]],
) -> None:
    hello, cuts = case
    assert blocked(Reassembly.FIRST_RECORD, split(hello, cuts)) is (min(cuts) >= 5)


@given(split_hellos())
def test_full_is_never_evaded_by_tcp_splits(case: tuple[bytes, list[int]]) -> None:
    hello, cuts = case
    assert blocked(Reassembly.FULL, split(hello, cuts))


@st.composite
def reframed_hellos(draw: st.DrawFn) -> tuple[bytes, list[int], list[int]]:
    """A hello cut into several TLS records, then into TCP segments at or after byte 5."""
    chrome, seed = draw(st.booleans()), draw(st.integers(0, 1000))
    plain = chrome_hello(seed=seed) if chrome else curl_hello()
    sizes = draw(st.lists(st.integers(1, len(plain) - 6), min_size=1, max_size=4))
    hello = (
        chrome_hello(seed=seed, record_sizes=sizes) if chrome else curl_hello(record_sizes=sizes)
    )
    cuts = draw(st.lists(st.integers(5, len(hello) - 1), max_size=4, unique=True))
    return hello, sizes, cuts


@given(reframed_hellos())
def test_record_split_evades_first_record_iff_sni_leaves_the_first_record(
    case: tuple[bytes, list[int], list[int]],
) -> None:
    hello, sizes, cuts = case
    _, sni_end = sni_span(hello)
    in_first_record = sni_end <= 5 + sizes[0]
    assert blocked(Reassembly.FIRST_RECORD, split(hello, cuts)) is in_first_record
    assert blocked(Reassembly.FULL, split(hello, cuts))


@given(hellos, st.lists(st.integers(1, 3000), max_size=4), st.sampled_from(list(Reassembly)))
def test_unsplit_listed_sni_always_matches_and_unlisted_never(
    kind_hello: tuple[str, bytes], cuts: list[int], mode: Reassembly
) -> None:
    _, hello = kind_hello
    assert blocked(mode, [hello])
    assert not blocked(mode, [hello], name="other.test")
    # no-censorship twin: an unlisted name never matches, however the hello is cut
    cuts = [c for c in cuts if c < len(hello)]
    assert not blocked(mode, split(hello, cuts), name="other.test")
