"""The DNS tampering checks, one by one: pure parts with hypothesis, probes over loopback
against lab DNS servers (honest, lying, injecting) and lab TLS origins."""

from __future__ import annotations

import ipaddress
import ssl

import dns.message
import dns.name
import dns.rdatatype
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from proxy.detect import dnscheck
from proxy.detect.dnscheck import AnswerPolicy, Verdict
from proxy.lab import world
from proxy.lab.ca import LabCA
from proxy.lab.dnsinject import DnsInjector, InjectionPolicy
from proxy.lab.dnsserver import DnsMode, DnsPolicy, DnsServer, QueryContext, Zone
from proxy.lab.world import Lab, open_lab
from proxy.resolve.chain import EndpointKey

ip = ipaddress.ip_address
LAB_POLICY = AnswerPolicy(dnscheck.networks(["127.0.0.0/8"]), frozenset({ip("127.5.3.17")}))
ZONE = Zone("lab").add("site.lab", "127.60.0.1").add("cdn.lab", "127.60.0.9")


# --- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "bogus"),
    [
        ("10.10.34.35", True),  # Iran's block page, known and private
        ("195.175.254.2", True),  # Turkey's block page, a public address
        ("0.0.0.0", True),
        ("127.0.0.1", True),
        ("192.168.1.1", True),
        ("100.64.0.1", True),  # carrier-grade NAT
        ("169.254.1.1", True),
        ("224.0.0.1", True),
        ("::1", True),
        ("fe80::1", True),
        ("93.184.216.34", False),
        ("2606:2800:220:1::1", False),
    ],
)
def test_answer_policy_flags_bogons_and_block_pages(address: str, bogus: bool) -> None:
    assert (AnswerPolicy().why_bogus(ip(address)) is not None) is bogus


def test_answer_policy_local_networks_are_not_bogus_but_block_pages_still_are() -> None:
    policy = AnswerPolicy(dnscheck.networks(["192.168.0.0/16"]), frozenset({ip("192.168.9.9")}))
    assert policy.why_bogus(ip("192.168.1.1")) is None
    assert policy.why_bogus(ip("192.168.9.9")) == "a known block-page address"


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=60))
def test_randomize_case_changes_only_case(name: str) -> None:
    mixed = dnscheck.randomize_case(name)
    assert mixed.lower() == name.lower() and len(mixed) == len(name)


@given(st.sampled_from(["com", "lab", "example.org", "org."]))
def test_random_names_are_valid_and_fresh(suffix: str) -> None:
    a, b = dnscheck.random_name(suffix), dnscheck.random_name(suffix)
    assert a != b and a.endswith("." + suffix.strip("."))
    dns.name.from_text(a)  # a valid DNS name


@given(
    st.dictionaries(
        st.from_regex(r"[a-z]{1,8}\.(com|org|net)", fullmatch=True),
        st.lists(st.sampled_from(["203.0.113.1", "203.0.113.2", "198.51.100.7"]), min_size=1,
                 max_size=3).map(lambda xs: [ip(x) for x in xs]),
        max_size=12,
    )
)  # fmt: skip
def test_shared_address_is_only_ever_suspect(answers: dict[str, list[object]]) -> None:
    verdicts = dnscheck.check_shared_address("udp x", answers)  # type: ignore[arg-type]
    for v in verdicts:
        assert v.status == "suspect" and v.check == "shared-address"
    lone: dict[object, set[str]] = {}
    for name, addrs in answers.items():
        if len(set(addrs)) == 1:
            lone.setdefault(addrs[0], set()).add(name)
    assert len(verdicts) == sum(1 for names in lone.values() if len(names) >= 3)


def test_shared_address_counts_sites_not_names() -> None:
    same = [ip("203.0.113.1")]
    answers = {"a.example.com": same, "b.example.com": same, "c.example.com": same}
    assert dnscheck.check_shared_address("x", answers) == []
    answers |= {"other.org": same, "third.net": same}
    [v] = dnscheck.check_shared_address("x", answers)
    assert "3 unrelated sites" in v.evidence[0]


@given(
    st.sampled_from(["ok", "tampered", "blocked", "suspect", "inconclusive"]),
    st.lists(st.text(max_size=20), max_size=3),
)
def test_verdict_json_and_badness(status: str, evidence: list[str]) -> None:
    v = Verdict("compare", "udp 192.0.2.1:53", status, tuple(evidence), "x.lab")  # type: ignore[arg-type]
    doc = v.to_json()
    assert doc["status"] == status and doc["evidence"] == evidence
    assert v.bad == (status in ("tampered", "blocked"))
    assert status in v.line()


# --- plaintext probes over loopback -----------------------------------------------------------


async def serve(nursery: trio.Nursery, server: DnsServer | DnsInjector) -> tuple[str, int]:
    return await nursery.start(server.serve)  # type: ignore[no-any-return]


async def test_nxdomain_hijack_is_detected(nursery: trio.Nursery) -> None:
    honest = await serve(nursery, DnsServer(ZONE, ("127.53.41.1", 0)))
    hijack = DnsPolicy({".": DnsMode.NXDOMAIN_HIJACK}, hijack_ips=("127.66.6.6",))
    lying = await serve(nursery, DnsServer(ZONE, ("127.53.41.2", 0), policy=hijack))
    good = await dnscheck.check_nxdomain_hijack(honest, "lab", timeout=2.0)
    bad = await dnscheck.check_nxdomain_hijack(lying, "lab", timeout=2.0)
    assert good.status == "ok"
    assert bad.status == "tampered" and "127.66.6.6" in bad.evidence[0]


async def test_nxdomain_check_without_answers_is_inconclusive(nursery: trio.Nursery) -> None:
    silent = await serve(nursery, DnsServer(ZONE, ("127.53.41.3", 0), policy=DnsPolicy(
        {".": DnsMode.TIMEOUT})))  # fmt: skip
    verdict = await dnscheck.check_nxdomain_hijack(silent, "lab", timeout=0.3)
    assert verdict.status == "inconclusive"


def lowercasing(query: dns.message.Message, ctx: QueryContext) -> dns.message.Message | None:
    """A middlebox-style answerer that writes the question back in lower case."""
    lowered = dns.message.make_query(query.question[0].name.to_text().lower(), "A")
    lowered.id = query.id
    response = ZONE.answer(lowered, ctx)
    assert response is not None
    response.id = query.id
    return response


async def test_0x20_mismatch_is_suspect(nursery: trio.Nursery) -> None:
    honest = await serve(nursery, DnsServer(ZONE, ("127.53.41.4", 0)))
    rewriting = await serve(nursery, DnsServer(lowercasing, ("127.53.41.5", 0)))
    assert (await dnscheck.check_case(honest, "site.lab", timeout=2.0)).status == "ok"
    verdict = await dnscheck.check_case(rewriting, "a-much-longer-name.site.lab", timeout=2.0)
    # 20+ letters: the odds that every one came out lower case are below one in a million
    assert verdict.status == "suspect" and "the answer says" in verdict.evidence[0]


async def test_two_answers_to_one_query_are_injection(nursery: trio.Nursery) -> None:
    real = await serve(nursery, DnsServer(ZONE, ("127.53.41.6", 0)))
    tap = DnsInjector(InjectionPolicy({"site.lab": ("127.98.0.1",)}, count=1),
                      ("127.53.41.7", 0), upstream=real)  # fmt: skip
    tapped = await serve(nursery, tap)
    verdict, seen = await dnscheck.check_two_answers(tapped, "site.lab", timeout=2.0)
    assert verdict.status == "tampered"
    assert seen == [[ip("127.98.0.1")], [ip("127.60.0.1")]]
    clean, _ = await dnscheck.check_two_answers(real, "site.lab", timeout=2.0)
    assert clean.status == "ok"


async def test_silent_address_answers_are_injection(nursery: trio.Nursery) -> None:
    policy = InjectionPolicy({"poisoned.lab": ("127.98.0.1",)}, count=1)
    silent = await serve(nursery, DnsInjector(policy, ("127.53.41.8", 0)))
    verdict = await dnscheck.check_silent_address(
        silent, ["poisoned.lab", "open.lab"], "lab", timeout=0.5
    )
    assert verdict.status == "tampered" and verdict.evidence == (
        "poisoned.lab was answered (127.98.0.1)",
    )


async def test_silent_address_intercepting_everything_is_suspect(nursery: trio.Nursery) -> None:
    everything = await serve(nursery, DnsServer(Zone(), ("127.53.41.9", 0), policy=DnsPolicy(
        {".": DnsMode.NXDOMAIN_HIJACK}, hijack_ips=("127.66.6.6",))))  # fmt: skip
    verdict = await dnscheck.check_silent_address(everything, ["x.lab"], "lab", timeout=0.5)
    assert verdict.status == "suspect" and "intercepted" in verdict.evidence[-1]


async def test_nothing_listening_is_ok() -> None:
    verdict = await dnscheck.check_silent_address(("127.53.41.10", 53), ["x.lab"], "lab",
                                                  timeout=0.3)  # fmt: skip
    assert verdict.status == "ok"


# --- comparisons settled by TLS, and endpoints, in the lab ------------------------------------


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


def verifier(lab: Lab) -> dnscheck.Verifier:
    context = ssl.create_default_context(cafile=str(lab.ca_file))
    return dnscheck.tls_verifier(context, lab.ports.https, timeout=2.0)


async def test_compare_settles_disagreement_with_tls(ca: LabCA) -> None:
    async with open_lab("none", ca=ca) as lab:
        verify = verifier(lab)
        true = [ip(lab.address(world.OPEN)[0])]
        other_true = [ip(lab.address(world.BLOCKED)[0])]  # a real server, wrong certificate
        forged = [ip(world.FORGED_IPS[0])]  # nothing listens
        same = await dnscheck.compare_answers("p", world.OPEN, true, true, verify, LAB_POLICY)
        assert same.status == "ok"
        lie = await dnscheck.compare_answers("p", world.OPEN, forged, true, verify, LAB_POLICY)
        assert lie.status == "tampered" and "passed" in lie.evidence[0]
        wrong = await dnscheck.compare_answers("p", world.OPEN, other_true, true, verify,
                                               LAB_POLICY)  # fmt: skip
        assert wrong.status == "tampered"
        # a CDN: the plain address differs but proves itself, so no lie
        cdn = await dnscheck.compare_answers("p", world.OPEN, true, forged, verify, LAB_POLICY)
        assert cdn.status == "ok" and "CDN" in cdn.evidence[0]
        # neither side proves itself: no verdict
        unknown = await dnscheck.compare_answers("p", world.OPEN, forged, [ip("127.98.0.2")],
                                                 verify, LAB_POLICY)  # fmt: skip
        assert unknown.status == "inconclusive"
        # plain said NXDOMAIN, the secure answer proves itself
        hidden = await dnscheck.compare_answers("p", world.OPEN, "NXDOMAIN", true, verify,
                                                LAB_POLICY)  # fmt: skip
        assert hidden.status == "tampered"
        page = await dnscheck.compare_answers("p", world.OPEN, [ip(world.BLOCKPAGE_IP)], true,
                                              verify, LAB_POLICY)  # fmt: skip
        assert page.status == "tampered" and "block-page" in page.evidence[0]


async def test_secure_answer_is_checked_too() -> None:
    polluted = dnscheck.check_secure_answer("doh", "x.org", [ip("10.10.34.35")], AnswerPolicy())
    assert polluted.status == "tampered" and polluted.check == "secure-answer"


async def test_endpoint_probe_tells_ip_from_sni_blocking(ca: LabCA) -> None:
    expected = [
        (world.FAMOUS_DOH_IPS[0], world.FAMOUS_DOH, "ip-blocked"),  # the GFW drops its SYNs
        (world.FAMOUS_DOH_IPS[1], world.FAMOUS_DOH, "sni-blocked"),  # and resets the name
        (world.SMALL_DOH_IPS[0], world.SMALL_DOH, "working"),
    ]
    async with open_lab("cn", ca=ca) as lab:
        context = ssl.create_default_context(cafile=str(lab.ca_file))
        for address, name, state in expected:
            key = EndpointKey(address, lab.ports.https, "doh", name)
            verdict = await dnscheck.probe_endpoint(key, name, context, timeout=1.0)
            assert dnscheck.endpoint_state(verdict) == state, verdict
            assert verdict.bad == (state != "working")


async def test_endpoint_with_a_wrong_certificate_is_a_tls_error(ca: LabCA) -> None:
    async with open_lab("none", ca=ca) as lab:
        # open.lab's server, asked for the DoH name: a certificate for another name
        key = EndpointKey(lab.address(world.OPEN)[0], lab.ports.https, "doh", world.SMALL_DOH)
        context = ssl.create_default_context(cafile=str(lab.ca_file))
        verdict = await dnscheck.probe_endpoint(key, "x", context, timeout=1.0)
        assert dnscheck.endpoint_state(verdict) == "tls-error"


async def test_plain_addresses_reports_rcodes_and_all_answers(nursery: trio.Nursery) -> None:
    server = await serve(nursery, DnsServer(ZONE, ("127.53.41.11", 0)))
    got, seen = await dnscheck.plain_addresses(server, "site.lab", timeout=1.0)
    assert got == [ip("127.60.0.1")] and seen == [got]
    missing, _ = await dnscheck.plain_addresses(server, "nope.lab", timeout=1.0)
    assert missing == "NXDOMAIN"
    nothing, _ = await dnscheck.plain_addresses(("127.53.41.12", 53), "site.lab", timeout=0.2)
    assert isinstance(nothing, str) and "refused" in nothing  # nothing listens there


def test_addresses_of_reads_a_and_aaaa() -> None:
    zone = Zone().add("both.lab", "127.0.0.9", "::9")
    ctx = QueryContext(("127.0.0.1", 1), "udp")
    for rdtype, want in (("A", "127.0.0.9"), ("AAAA", "::9")):
        response = zone.answer(dns.message.make_query("both.lab", rdtype), ctx)
        assert response is not None
        assert dnscheck.addresses_of(response) == [ip(want)]
    assert dns.rdatatype.A  # the module constant used above exists


@pytest.mark.parametrize(
    "junk",
    [
        b"",
        b"\x00",
        b"garbage that is not DNS",
        b"\xff" * 12,  # a header claiming many records, with none
    ],
)
async def test_udp_exchange_ignores_garbage_and_strangers(junk: bytes) -> None:
    """Junk and answers to another question come first; only the real answer is kept."""
    query = dnscheck.make_query("site.lab")
    with trio.socket.socket(type=trio.socket.SOCK_DGRAM) as server:
        await server.bind(("127.53.41.20", 0))

        async def answer() -> None:
            wire, client = await server.recvfrom(4096)
            asked = dns.message.from_wire(wire)
            other = dns.message.make_response(dnscheck.make_query("other.lab"))
            other.id = asked.id  # right ID, wrong question: a blind forgery
            wrong_id = dns.message.make_response(asked)
            wrong_id.id = (asked.id + 1) % 65536
            real = ZONE.answer(asked, QueryContext(client, "udp"))
            assert real is not None
            for datagram in (junk, other.to_wire(), wrong_id.to_wire(), real.to_wire()):
                await server.sendto(datagram, client)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer)
            got = await dnscheck.udp_exchange(query, server.getsockname(), timeout=2.0, linger=0.1)
    assert len(got) == 1 and dnscheck.addresses_of(got[0]) == [ip("127.60.0.1")]
