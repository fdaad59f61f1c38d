"""The censor profiles, on the engine alone (a ManualClock, no sockets): what each does to each
lab name, and the reassembly, residual and allow-list behaviour research C.8 asks of them."""

from __future__ import annotations

import itertools

import pytest

from proxy.lab import world
from proxy.lab.cli import PROFILE_NAMES
from proxy.lab.clock import ManualClock
from proxy.lab.dnsserver import DnsMode, DnsPolicy
from proxy.lab.profiles import (
    FREEZE_LIMIT,
    PROFILES,
    RESIDUAL_SECONDS,
    Profile,
    get_profile,
    predict_dns,
    predict_tcp,
)
from proxy.lab.rules import ActionKind, CensorEngine, Flow
from proxy.protocols.tls_hello import build_client_hello

IPS = {spec.name: spec.ip for spec in world.ORIGINS}
IPS.update({world.CDN_FRONT: world.CDN_IP, world.CDN_BACKEND: world.CDN_IP})
PORTS = {"https": 443, "http": 80}


def flow(name: str, scheme: str = "https", client_port: int = 40000) -> Flow:
    return Flow("127.0.0.1", client_port, IPS[name], PORTS[scheme])


def hello(name: str) -> bytes:
    return build_client_hello(name, ("http/1.1",))


def send(engine: CensorEngine, f: Flow, *segments: bytes) -> ActionKind:
    """The engine's decision after the connect and each client segment in turn."""
    kind = engine.on_connect(f).kind
    for segment in segments:
        kind = engine.on_client_segment(f, segment).kind
    return kind


def engine(profile: str) -> tuple[CensorEngine, ManualClock]:
    clock = ManualClock()
    return get_profile(profile).engine(clock), clock


def test_profile_names_match_the_cli_help() -> None:
    assert tuple(PROFILES) == PROFILE_NAMES


@pytest.mark.parametrize("profile", list(PROFILES.values()), ids=list(PROFILES))
def test_every_profile_explains_itself_in_one_line(profile: Profile) -> None:
    assert "\n" not in profile.summary and 20 < len(profile.summary) < 140


def test_unknown_profile_names_the_choices() -> None:
    with pytest.raises(ValueError, match="ru-tspu"):
        get_profile("ru-2019")


# --- what each profile does to each name -------------------------------------------------------

PREDICTIONS = [
    # profile, name, scheme, prediction starts with
    ("none", world.BLOCKED, "https", "pass"),
    ("ru-2021", world.TWITTER, "https", "throttle to 16 kbit/s"),
    ("ru-2021", world.MICROSOFT, "https", "throttle"),  # the *t.co* glob's collateral
    ("ru-2021", world.BLOCKED, "https", "pass"),
    ("ru-2021", world.TWITTER, "http", "pass"),  # an SNI rule: plain HTTP is not seen
    ("ru-tspu", world.BLOCKED, "https", "reset [tspu-reset]"),
    ("ru-tspu", world.TWITTER, "https", "blackhole"),
    ("ru-tspu", world.MICROSOFT, "https", "pass"),  # the 2021 bug is gone
    ("ru-tspu", world.IP_BLOCKED, "https", "refuse"),
    ("ru-tspu", world.HTTP_BLOCKED, "http", "redirect to http://blockpage.lab/"),
    ("ru-tspu", world.FROZEN, "https", "pass"),
    ("ru-2025", world.FROZEN, "https", "freeze after 16 KiB"),
    ("ru-2025", world.OPEN, "https", "pass"),
    ("cn", world.BLOCKED, "https", "reset [gfw-sni, then 120 s residual]"),
    ("cn", world.CDN_BACKEND, "https", "reset"),
    ("cn", world.CDN_FRONT, "https", "pass"),
    ("cn", world.IP_BLOCKED, "http", "drop syn"),
    ("cn", world.HTTP_BLOCKED, "http", "reset [gfw-http"),
    ("ir", world.BLOCKED, "https", "blackhole [ir-sni]"),
    ("ir", world.HTTP_BLOCKED, "http", "block page 403"),
    ("ir", world.IP_BLOCKED, "https", "blackhole [ir-ip]"),
    ("allowlist", world.OPEN, "https", "pass [allow]"),
    ("allowlist", world.CDN_FRONT, "https", "pass [allow]"),
    ("allowlist", world.CDN_BACKEND, "https", "blackhole [deny]"),
    ("allowlist", world.MICROSOFT, "http", "blackhole [deny]"),
]


@pytest.mark.parametrize(("profile", "name", "scheme", "expected"), PREDICTIONS)
def test_predictions(profile: str, name: str, scheme: str, expected: str) -> None:
    address = (IPS[name], PORTS[scheme])
    assert predict_tcp(get_profile(profile), name, address, scheme).startswith(expected)


def test_famous_doh_is_blocked_by_ip_on_one_address_and_by_sni_on_the_other() -> None:
    cn, none = get_profile("cn"), get_profile("none")
    first, second = world.FAMOUS_DOH_IPS
    assert predict_tcp(cn, world.FAMOUS_DOH, (first, 443), "https").startswith("drop syn")
    assert predict_tcp(cn, world.FAMOUS_DOH, (second, 443), "https").startswith("reset")
    small = (world.SMALL_DOH_IPS[0], 443)
    assert predict_tcp(cn, world.SMALL_DOH, small, "https") == "pass"
    assert predict_tcp(none, world.FAMOUS_DOH, (first, 443), "https") == "pass"


@pytest.mark.parametrize(
    ("profile", "name", "expected"),
    [
        ("none", world.POISONED, ""),
        ("ru-tspu", world.POISONED, "isp dns blockpage_ip -> 127.5.3.17"),
        ("ir", world.POISONED, "isp dns bogon -> 10.10.34.35"),
        ("ir", world.OPEN, ""),  # the NXDOMAIN hijack leaves existing names alone
        ("cn", world.POISONED, "dns injected -> 127.98.0.1 (+2 more)"),
        ("cn", world.OPEN, ""),
        ("allowlist", world.BLOCKED, "isp dns timeout"),
        ("allowlist", world.CDN_FRONT, ""),
    ],
)
def test_dns_predictions(profile: str, name: str, expected: str) -> None:
    assert predict_dns(get_profile(profile), name) == expected


def test_with_isp_replaces_only_the_resolver() -> None:
    policy = DnsPolicy({world.OPEN: DnsMode.SERVFAIL})
    changed = get_profile("cn").with_isp(policy)
    assert changed.isp is policy and changed.rules == get_profile("cn").rules
    assert changed.injection is get_profile("cn").injection


# --- reassembly: which splits evade which profile ----------------------------------------------


def split_at(data: bytes, *cuts: int) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def sni_cut(name: str) -> int:
    """An offset inside the server name of ``hello(name)``."""
    return hello(name).index(name.encode()) + 3


@pytest.mark.parametrize(
    ("profile", "name", "decided"),
    [("ru-2021", world.TWITTER, ActionKind.THROTTLE), ("ir", world.BLOCKED, ActionKind.BLACKHOLE)],
)
def test_one_segment_boxes_miss_any_split_hello(
    profile: str, name: str, decided: ActionKind
) -> None:
    e, _ = engine(profile)
    assert send(e, flow(name), hello(name)) is decided
    e, _ = engine(profile)
    assert send(e, flow(name), *split_at(hello(name), sni_cut(name))) is ActionKind.FORWARD


def test_tspu_first_record_is_evaded_only_by_a_split_in_the_record_header() -> None:
    data = hello(world.BLOCKED)
    for cut, decided in ((2, ActionKind.FORWARD), (100, ActionKind.RESET)):
        e, _ = engine("ru-tspu")
        assert send(e, flow(world.BLOCKED), *split_at(data, cut)) is decided, cut
    records = build_client_hello(world.BLOCKED, ("http/1.1",), record_sizes=(40,))
    e, _ = engine("ru-tspu")  # the name pushed out of the first record: not seen
    assert send(e, flow(world.BLOCKED), records) is ActionKind.FORWARD


def test_gfw_full_reassembly_sees_through_every_split() -> None:
    name = world.BLOCKED
    records = build_client_hello(name, ("http/1.1",), record_sizes=(40, 60))
    for segments in (split_at(hello(name), 2), split_at(hello(name), sni_cut(name)),
                     split_at(records, 1, 50, 120)):  # fmt: skip
        e, _ = engine("cn")
        assert send(e, flow(name), *segments) is ActionKind.RESET


def test_allowlist_fails_closed_on_a_split_hello() -> None:
    e, _ = engine("allowlist")
    assert send(e, flow(world.CDN_FRONT), hello(world.CDN_FRONT)) is ActionKind.FORWARD
    e, _ = engine("allowlist")
    halves = split_at(hello(world.CDN_FRONT), 2)
    assert send(e, flow(world.CDN_FRONT), *halves) is ActionKind.BLACKHOLE


# --- time and volume ---------------------------------------------------------------------------


def test_cn_residual_block_holds_the_pair_then_expires() -> None:
    e, clock = engine("cn")
    assert send(e, flow(world.BLOCKED), hello(world.BLOCKED)) is ActionKind.RESET
    innocent = flow(world.BLOCKED, client_port=40001)  # same client, server and port
    assert e.on_connect(innocent).kind is ActionKind.BLACKHOLE
    assert e.on_connect(flow(world.OPEN, client_port=40002)).kind is ActionKind.FORWARD
    clock.advance(RESIDUAL_SECONDS)
    assert send(e, flow(world.BLOCKED, client_port=40003), hello(world.OPEN)) is ActionKind.FORWARD
    assert [h.residual for h in e.log] == [False, True]


def test_ir_allow_list_boxes_a_client_that_speaks_something_else() -> None:
    e, clock = engine("ir")
    assert send(e, flow(world.OPEN), b"\x00\x01 not tls, not http") is ActionKind.BLACKHOLE
    assert e.on_connect(flow(world.OPEN, client_port=40001)).kind is ActionKind.BLACKHOLE
    clock.advance(60)
    assert send(e, flow(world.OPEN, client_port=40002), hello(world.OPEN)) is ActionKind.FORWARD


def test_ru_2025_freezes_foreign_hosting_at_16k_only() -> None:
    e, _ = engine("ru-2025")
    frozen = flow(world.FROZEN)
    assert send(e, frozen, hello(world.FROZEN)) is ActionKind.FREEZE_AFTER
    passed = 0
    for _ in range(10):
        verdict = e.on_server_bytes(frozen, 4000)
        passed += verdict.allow
    assert passed == FREEZE_LIMIT and verdict.stop
    home = flow(world.OPEN)
    assert send(e, home, hello(world.OPEN)) is ActionKind.FORWARD
    assert e.on_server_bytes(home, 100_000).allow == 100_000
