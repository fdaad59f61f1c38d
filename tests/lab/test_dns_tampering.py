"""Lying and blocked resolvers in the censor lab: detection, the automatic switch, the probe.

For each censoring profile the ``auto`` resolver starts on the lab's ISP resolver, its checks
find what the profile does (a block page in Russia, injection and a blocked famous DoH in
China, bogons and NXDOMAIN hijack in Iran), it switches to secure DNS, and from then on the
poisoned name resolves to its true address and not one more query reaches the ISP resolver
(counted by the lab's own DNS servers). The uncensored profile is the negative control: nothing
is found and plain DNS stays in use. The real app is then driven by curl through its SOCKS5
port, and ``sidestep probe dns --json`` is run against a lab config.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import dns.message
import dns.rcode
import pytest
import trio

from proxy.cli import main
from proxy.config import Config, parse_config
from proxy.detect.dnscheck import Verdict
from proxy.detect.dnsprobe_cli import render
from proxy.detect.evidence import EvidenceLog, read_events
from proxy.lab import world
from proxy.lab.ca import LabCA
from proxy.lab.scenarios import open_sidestep
from proxy.lab.world import Lab, open_lab, private_ip
from proxy.resolve.auto import AutoResolver, build_auto

if TYPE_CHECKING:
    from conftest import Curl  # tests/lab/conftest.py

ip = ipaddress.ip_address
CENSORED = ("ru-tspu", "cn", "ir")


def auto_toml(lab: Lab, *, decoy: bool = False, extra: str = "") -> str:
    """An ``auto`` DNS config pointed into ``lab``: the ISP resolver as the plain path, the lab's
    DoH services (the famous one first) as the secure one, lab addresses taken as local."""
    isp = f"{lab.isp_resolver[0]}:{lab.isp_resolver[1]}"
    silent = f"{lab.silent_resolver[0]}:{lab.silent_resolver[1]}"
    endpoints = ""
    for ep in sorted(lab.doh_endpoints, key=lambda e: not e.famous):
        boot = ", ".join(f'"{b}"' for b in ep.bootstrap)
        endpoints += f'\n[[dns.endpoints]]\nurl = "{ep.url}"\nbootstrap = [{boot}]\n'
        endpoints += f'cafile = "{lab.ca_file}"\n'
    return f"""{extra}
[dns]
resolver = "auto"
servers = ["{isp}"]
canaries = ["{world.POISONED}", "{world.OPEN}"]
nxdomain_suffix = "lab"
silent_server = "{silent}"
local_networks = ["127.0.0.0/8"]
blockpage_ips = ["{world.BLOCKPAGE_IP}", "{world.HIJACK_IP}"]
check_cafile = "{lab.ca_file}"
check_port = {lab.ports.https}
timeout = 1.0
decoy = {str(decoy).lower()}
{endpoints}"""


def auto_config(lab: Lab, **kwargs: object) -> Config:
    return parse_config(auto_toml(lab, **kwargs), "lab-auto")  # type: ignore[arg-type]


def isp_queries(lab: Lab) -> int:
    """Queries that reached the lab's ISP resolver (behind the injector too, in cn)."""
    addresses = {world.ISP_RESOLVER_IP, private_ip(world.ISP_RESOLVER_IP)}
    return sum(s.queries for s in lab.dns_servers if s.listen[0] in addresses)


@asynccontextmanager
async def running_auto(
    lab: Lab, evidence: EvidenceLog | None = None, **kwargs: object
) -> AsyncIterator[AutoResolver]:
    auto, parts = build_auto(auto_config(lab, **kwargs).dns, evidence=evidence,
                             network=lambda: "lab")  # fmt: skip
    async with AsyncExitStack() as stack:
        for part in parts:
            await stack.enter_async_context(part)
        with trio.fail_after(10):
            await auto.checked.wait()
        yield auto


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.create()


EXPECTED_FINDINGS = {
    "ru-tspu": {"compare"},
    "cn": {"compare", "injection", "two-answers"},
    "ir": {"compare", "nxdomain-hijack"},
}


@pytest.mark.parametrize("profile", CENSORED)
async def test_auto_switches_and_resolves_the_poisoned_name_truly(
    profile: str, ca: LabCA, tmp_path: Path
) -> None:
    evidence = EvidenceLog(tmp_path / "evidence.jsonl")
    async with open_lab(profile, ca=ca) as lab, running_auto(lab, evidence) as auto:
        assert auto.secure
        found = {v.check for v in auto.reasons}
        assert EXPECTED_FINDINGS[profile] <= found, auto.reasons
        truth = [ip(a) for a in lab.addresses(world.POISONED)]
        before = isp_queries(lab)
        assert await auto.resolve(world.POISONED) == truth
        assert await auto.resolve(world.OPEN) == [ip(a) for a in lab.addresses(world.OPEN)]
        query = dns.message.make_query(world.BLOCKED, "A")
        query.id = 777
        answer = await auto.forward(query)
        assert answer.id == 777 and answer.rcode() == dns.rcode.NOERROR
        await auto.check_now("periodic")  # in secure mode only the endpoints are probed
        assert isp_queries(lab) == before  # not one plaintext query once secure mode is on
        outcomes = {e.outcome for e in read_events(evidence.path)}
        assert {f"dns-{check}" for check in EXPECTED_FINDINGS[profile]} <= outcomes
        assert all(e.worked == "secure-dns" for e in read_events(evidence.path)
                   if e.outcome in {f"dns-{c}" for c in found})  # fmt: skip


async def test_auto_stays_plain_on_an_uncensored_network(ca: LabCA) -> None:
    """The negative control: nothing found, plain DNS kept, answers as the ISP gives them."""
    async with open_lab("none", ca=ca) as lab, running_auto(lab) as auto:
        assert not auto.secure
        assert [v for v in auto.verdicts if v.bad or v.status == "suspect"] == []
        before = isp_queries(lab)
        assert await auto.resolve(world.POISONED) == [ip(a) for a in
                                                      lab.addresses(world.POISONED)]  # fmt: skip
        assert isp_queries(lab) > before


async def test_famous_doh_is_found_blocked_and_the_small_one_used_at_once(ca: LabCA) -> None:
    async with open_lab("cn", ca=ca) as lab:
        started = trio.current_time()
        async with running_auto(lab) as auto:
            status = {(e["address"], e["sni"]): e for e in auto.chain.status()}
            famous_ip, famous_sni = status[(world.FAMOUS_DOH_IPS[0], world.FAMOUS_DOH)], status[
                (world.FAMOUS_DOH_IPS[1], world.FAMOUS_DOH)]  # fmt: skip
            assert famous_ip["state"] == "backing-off"
            assert famous_ip["last_error"].startswith("ip-blocked")
            assert famous_sni["state"] == "backing-off"
            assert famous_sni["last_error"].startswith("sni-blocked")
            small = auto.chain.health.record(auto.chain.members[2].key)
            assert small.key.sni == world.SMALL_DOH and small.failures == 0
            assert small.first_success is not None and small.first_success - started < 2.0
            # queries skip the blocked endpoints: no new connection to the famous service
            famous = [m.upstream for m in auto.chain.members[:2]]
            await auto.resolve(world.POISONED)
            assert [f.connections_opened for f in famous] == [0, 0]  # type: ignore[attr-defined]


async def test_inline_bogus_answer_is_reasked_securely(ca: LabCA) -> None:
    """Before any check says so, a block-page answer is replaced by the secure one and wakes
    the checker."""
    async with open_lab("ru-tspu", ca=ca) as lab:
        config = auto_config(lab)
        auto, parts = build_auto(config.dns, network=lambda: "lab")
        auto.plan.canaries = ()  # the start-up check finds nothing by comparison
        switched: list[str] = []
        auto.on_switch.append(lambda: switched.append(auto.current_network))
        async with AsyncExitStack() as stack:
            for part in parts:
                await stack.enter_async_context(part)
            with trio.fail_after(10):
                await auto.checked.wait()
            assert not auto.secure
            auto.plan.canaries = (world.OPEN,)
            truth = [ip(a) for a in lab.addresses(world.POISONED)]
            assert await auto.resolve(world.POISONED) == truth
            with trio.fail_after(10):
                while not auto.secure:  # the woken check compares the name that lied
                    await trio.sleep(0.01)
            assert any(v.name == world.POISONED for v in auto.reasons)
            assert switched == ["lab"]  # the app empties its DNS cache here


async def test_decoy_sends_plaintext_and_ignores_it(ca: LabCA) -> None:
    async with open_lab("ir", ca=ca) as lab, running_auto(lab, decoy=True) as auto:
        assert auto.secure
        before = isp_queries(lab)
        assert await auto.resolve(world.POISONED) == [ip(a) for a in
                                                      lab.addresses(world.POISONED)]  # fmt: skip
        with trio.fail_after(5):
            while isp_queries(lab) == before:
                await trio.sleep(0.01)
        assert auto.decoys == 1


@pytest.mark.parametrize("profile", CENSORED)
async def test_socks5_path_reaches_the_poisoned_site(
    profile: str, ca: LabCA, curl: Curl, tmp_path: Path
) -> None:
    """The real app on the auto config, and curl asking it for the name (--socks5-hostname)."""
    state = f'[router]\nevidence_file = "{tmp_path / "ev.jsonl"}"\n'
    async with open_lab(profile, ca=ca) as lab:
        config = parse_config(auto_toml(lab, extra=state), "lab-auto")
        async with open_sidestep(lab, config) as side:
            service = side.app.dns_service
            assert service is not None and isinstance(service.upstream, AutoResolver)
            with trio.fail_after(10):
                await service.upstream.checked.wait()
            url = lab.url(world.POISONED)
            result = await curl("--socks5-hostname", f"127.0.0.1:{side.address[1]}",
                                "--cacert", str(lab.ca_file), url)  # fmt: skip
            assert result.returncode == 0, result.stderr
            host = lab.host_header(world.POISONED)
            assert result.stdout == f"hello from {world.POISONED} (host {host})\n".encode()


@pytest.mark.parametrize(("profile", "status"), [("cn", 1), ("none", 0)])
async def test_probe_dns_json_prints_the_verdicts(
    profile: str, status: int, ca: LabCA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with open_lab(profile, ca=ca) as lab:
        path = tmp_path / "auto.toml"
        path.write_text(auto_toml(lab))
        with trio.fail_after(30):
            # the CLI runs its own trio loop: give it a thread while the lab runs in ours
            code = await trio.to_thread.run_sync(main, ["probe", "dns", str(path), "--json"])
    assert code == status
    report = json.loads(capsys.readouterr().out)
    checks = {(v["check"], v["status"]) for v in report["verdicts"]}
    if profile == "cn":
        assert report["tampering"] and report["blocking"]
        assert {("injection", "tampered"), ("two-answers", "tampered")} <= checks
        states = [e["last_error"].split(":")[0] for e in report["endpoints"]]
        assert states == ["ip-blocked", "sni-blocked", ""]
    else:
        assert not report["tampering"] and not report["blocking"]
        assert ("nxdomain-hijack", "ok") in checks


def test_probe_dns_text_output_groups_by_resolver(capsys: pytest.CaptureFixture[str]) -> None:
    verdicts = [
        Verdict("nxdomain-hijack", "udp 192.0.2.1:53", "tampered", ("x.lab resolved",)),
        Verdict("0x20", "udp 192.0.2.1:53", "ok", (), "x.lab"),
        Verdict("endpoint", "https://d/q (doh 192.0.2.9:443)", "ok", ("working",)),
    ]
    text = render(verdicts)
    assert text.splitlines()[0] == "udp 192.0.2.1:53: tampered"
    assert "  ok           0x20 [x.lab]" in text
    assert text.endswith("1 problem(s) found")


def test_probe_dns_config_error_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[dns]\nresolver = "auto"\n')
    assert main(["probe", "dns", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "endpoints" in err and "Traceback" not in err
    assert main(["probe", "dns", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["probe"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["probe", "dns", "--no-such-flag"])
    assert exit_info.value.code == 2


async def test_a_rule_can_send_its_names_to_secure_dns(
    ca: LabCA, curl: Curl, tmp_path: Path
) -> None:
    """Plain DNS for everything (``resolver = "udp"`` at the lying ISP), except one rule's
    names, which only secure DNS is asked for; without the rule the block page wins."""
    async with open_lab("ru-tspu", ca=ca) as lab:
        isp = f"{lab.isp_resolver[0]}:{lab.isp_resolver[1]}"
        small = next(e for e in lab.doh_endpoints if not e.famous)
        base = f"""
[router]
evidence_file = "{tmp_path / "ev.jsonl"}"
[dns]
resolver = "udp"
servers = ["{isp}"]
[[dns.endpoints]]
url = "{small.url}"
bootstrap = ["{small.bootstrap[0]}"]
cafile = "{lab.ca_file}"
"""
        rule = f'[[rule]]\npolicy = "direct"\ndomain = ["{world.POISONED}"]\nresolver = "secure"\n'
        url = lab.url(world.POISONED)
        for text, works in ((base + rule, True), (base, False)):
            async with open_sidestep(lab, parse_config(text, "t")) as side:
                lies = len(lab.dns_log())
                result = await curl("--socks5-hostname", f"127.0.0.1:{side.address[1]}",
                                    "--cacert", str(lab.ca_file), url, max_time=5)  # fmt: skip
                assert (result.returncode == 0) is works, result.stderr
                assert (len(lab.dns_log()) == lies) is works  # the ISP was never asked


@pytest.mark.parametrize("profile", ["cn", "ir"])
async def test_kdig_through_sidesteps_dns_server_gets_the_truth(
    profile: str, ca: LabCA, tmp_path: Path
) -> None:
    """A device using sidestep's DNS server (kdig standing in) gets the true address once
    the auto resolver has switched, without a query reaching the ISP resolver."""
    kdig = shutil.which("kdig") or shutil.which("dig")
    if kdig is None:
        pytest.skip("neither kdig nor dig is installed")
    server = '[dns.server]\nenabled = true\nlisten = "127.0.0.1:0"\n'
    state = f'[router]\nevidence_file = "{tmp_path / "ev.jsonl"}"\n'
    async with open_lab(profile, ca=ca) as lab:
        config = parse_config(auto_toml(lab, extra=state) + server, "lab-auto")
        async with open_sidestep(lab, config) as side:
            upstream = side.app.dns_service.upstream  # type: ignore[union-attr]
            with trio.fail_after(10):
                await upstream.checked.wait()
            assert upstream.secure
            address = side.app.dns_server.address
            assert address is not None
            before = isp_queries(lab)
            with trio.fail_after(15):
                done = await trio.run_process(
                    [kdig, f"@{address[0]}", "-p", str(address[1]), "+short", "+timeout=3",
                     world.POISONED, "A"],
                    capture_stdout=True, capture_stderr=True, check=False,
                )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert done.stdout.decode().split() == list(lab.addresses(world.POISONED))
            assert isp_queries(lab) == before
