"""The DNS checks as one run: what ``[dns]`` asks to check, and running it all at once.

:func:`check_plan` turns the config into a :class:`CheckPlan` (the plain resolvers - the
configured ``servers`` or the system's from /etc/resolv.conf -, the canaries, the injection
probe address, what counts as a bogus answer, the certificate check, every secure endpoint at
every bootstrap address). :func:`run_checks` runs the checks of :mod:`proxy.detect.dnscheck`
concurrently and feeds the endpoint findings into the secure chain's health. Both the ``auto``
resolver and ``sidestep probe dns`` use it.
"""

from __future__ import annotations

import ipaddress
import ssl
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.resolver
import trio

from proxy.config import DnsConfig, parse_dns_server
from proxy.detect import dnscheck
from proxy.detect.dnscheck import AnswerPolicy, Server, Verdict, Verifier
from proxy.inbound.base import IPAddress
from proxy.resolve.chain import EndpointKey, ResolverChain
from proxy.resolve.doh import secure_context

#: seconds an endpoint a check found blocked is skipped (queries do not retry it sooner)
BLOCKED_HOLD = 60.0
#: seconds the injection probe waits for an answer that should never come
SILENT_WAIT = 1.0


# --- the checks, as one run -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointProbe:
    """One secure endpoint at one address, and how to check its certificate."""

    key: EndpointKey
    label: str
    context: ssl.SSLContext


@dataclass(slots=True)
class CheckPlan:
    """Everything a check run needs, from the config."""

    plain_servers: list[Server]
    canaries: tuple[str, ...]
    nxdomain_suffix: str
    silent_server: Server | None
    policy: AnswerPolicy
    verify: Verifier
    endpoints: list[EndpointProbe] = field(default_factory=list)
    timeout: float = 3.0


def system_servers() -> list[Server]:
    """The plain resolvers of /etc/resolv.conf (empty when it cannot be read)."""
    try:
        found = dns.resolver.Resolver(configure=True).nameservers
    except (dns.resolver.NoResolverConfiguration, OSError):
        return []
    out: list[Server] = []
    for ns in found:
        try:
            out.append((str(ipaddress.ip_address(str(ns))), 53))
        except ValueError:
            continue  # a DoH URL or other nameserver object: not plain DNS
    return out


def check_plan(config: DnsConfig) -> CheckPlan:
    """The checks ``[dns]`` asks for."""
    servers = list(config.server_addresses) or system_servers()
    policy = AnswerPolicy(
        dnscheck.networks(config.local_networks),
        dnscheck.KNOWN_BLOCKPAGES | {ipaddress.ip_address(a) for a in config.blockpage_ips},
    )
    site_context = ssl.create_default_context(cafile=config.check_cafile)
    verify = dnscheck.tls_verifier(site_context, config.check_port, timeout=config.timeout)
    probes = []
    for ep in config.endpoints:
        url = urllib.parse.urlsplit(ep.url)
        https = url.scheme == "https"
        context = secure_context(cafile=ep.cafile, alpn=("h2",) if https else ("dot",))
        for ip in ep.bootstrap:
            transport, port = ("doh", url.port or 443) if https else ("dot", url.port or 853)
            key = EndpointKey(str(ipaddress.ip_address(ip)), port, transport, url.hostname or "")
            probes.append(EndpointProbe(key, ep.url, context))
    silent = parse_dns_server(config.silent_server) if config.silent_server else None
    return CheckPlan(
        plain_servers=servers,
        canaries=config.canaries,
        nxdomain_suffix=config.nxdomain_suffix,
        silent_server=silent,
        policy=policy,
        verify=verify,
        endpoints=probes,
        timeout=config.timeout,
    )


async def run_checks(
    plan: CheckPlan,
    chain: ResolverChain | None,
    *,
    plaintext: bool = True,
    names: Sequence[str] = (),
) -> list[Verdict]:
    """Every check of ``plan``: endpoint probes always; with ``plaintext``, the plain resolver
    checks and the comparison of ``canaries`` + ``names`` between plain and secure DNS.
    Endpoint findings go into ``chain``'s health."""
    verdicts: list[Verdict] = []
    found: dict[int, list[Verdict]] = {}

    async def probe(i: int, ep: EndpointProbe) -> None:
        verdict = await dnscheck.probe_endpoint(ep.key, ep.label, ep.context, timeout=plan.timeout)
        found[i] = [verdict]
        if chain is not None:
            if verdict.bad:
                chain.health.failure(ep.key, verdict.evidence[0], hold=BLOCKED_HOLD)
            else:
                chain.health.success(ep.key, 0.0)

    async with trio.open_nursery() as nursery:
        for i, ep in enumerate(plan.endpoints):
            nursery.start_soon(probe, i, ep)
        if plaintext:
            nursery.start_soon(_plain_checks, plan, chain, list(names), found)
    for i in sorted(found):
        verdicts.extend(found[i])
    return verdicts


async def _plain_checks(
    plan: CheckPlan, chain: ResolverChain | None, names: list[str], out: dict[int, list[Verdict]]
) -> None:
    timeout = plan.timeout
    verdicts: list[Verdict] = []
    canaries = list(dict.fromkeys([*plan.canaries, *names]))
    results: dict[tuple[Server, str], Verdict] = {}
    plain_answers: dict[Server, dict[str, list[IPAddress]]] = {}

    async def compare(server: Server, name: str) -> None:
        subject = dnscheck.server_text(server)
        plain, seen = await dnscheck.plain_addresses(server, name, timeout=timeout)
        distinct = list(dict.fromkeys(tuple(sorted(map(str, s))) for s in seen))
        if len(distinct) > 1:
            shown = " then ".join("[" + ", ".join(d) + "]" for d in distinct)
            two = Verdict("two-answers", subject, "tampered", (f"one query, {shown}",), name)
            results[(server, f"two:{name}")] = two
        if isinstance(plain, list) and plain:
            plain_answers.setdefault(server, {})[name] = plain
        if chain is None:
            if isinstance(plain, list) and plain:
                results[(server, name)] = dnscheck.check_bogus(subject, name, plain, plan.policy)
            return
        secure = await dnscheck.secure_addresses(chain.query, name)
        if isinstance(secure, list) and secure:
            polluted = dnscheck.check_secure_answer("secure DNS", name, secure, plan.policy)
            if polluted.bad:
                results[(("secure", 0), name)] = polluted
        results[(server, name)] = await dnscheck.compare_answers(
            subject, name, plain, secure, plan.verify, plan.policy
        )

    async with trio.open_nursery() as nursery:
        for server in plan.plain_servers:
            nursery.start_soon(_one, verdicts, dnscheck.check_nxdomain_hijack(
                server, plan.nxdomain_suffix, timeout=timeout))  # fmt: skip
            if canaries:
                nursery.start_soon(_one, verdicts, dnscheck.check_case(
                    server, canaries[0], timeout=timeout))  # fmt: skip
            for name in canaries:
                nursery.start_soon(compare, server, name)
        if plan.silent_server is not None and plan.canaries:
            # an injected answer comes within a round trip to the censor: no need to wait long
            nursery.start_soon(_one, verdicts, dnscheck.check_silent_address(
                plan.silent_server, plan.canaries, plan.nxdomain_suffix,
                timeout=min(timeout, SILENT_WAIT)))  # fmt: skip
    verdicts.extend(results.values())
    for server, answers in plain_answers.items():
        verdicts.extend(dnscheck.check_shared_address(dnscheck.server_text(server), answers))
    out[-1] = verdicts


async def _one(into: list[Verdict], check: Any) -> None:
    into.append(await check)
