"""``sidestep probe dns [CONFIG] [--json]``: run the DNS checks now and print the verdicts.

The checks are those the ``auto`` resolver runs (:mod:`proxy.detect.dnscheck`), against the
resolvers CONFIG names (the embedded default without one): the plain resolver (``[dns] servers``,
else the system's from /etc/resolv.conf), the injection probe at ``silent_server``, every secure
endpoint at every bootstrap address, and the comparison of the ``canaries`` between plain and
secure DNS. It sends plaintext test queries whatever ``[dns] resolver`` says: the user asked for
them.

Exit status: 0 nothing found, 1 tampering or blocking found, 2 a usage or config error.

``probe`` is a command group: ``probe dns`` lives here, ``probe SITE...`` (anything but ``dns``
after ``probe``) in :mod:`proxy.checkcli`, which parses its own arguments and has its own exit
statuses (:func:`proxy.cli.main` hands such a command line over before this parser sees it).
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import AsyncExitStack
from typing import Any

import trio

from proxy.config import Config, load_config
from proxy.detect.dnscheck import Verdict
from proxy.detect.dnsplan import check_plan, run_checks
from proxy.errors import ProxyError
from proxy.resolve.chain import ResolverChain, secure_chain

EXIT_CLEAN = 0
EXIT_FOUND = 1
EXIT_USAGE = 2


def add_probe_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``probe`` (with its ``dns`` action) on the ``sidestep`` subcommands."""
    probe = sub.add_parser(
        "probe",
        help="test the network now: probe SITE... (through each strategy), probe dns",
        description="Run censorship probes now and print what they found. "
        "`sidestep probe SITE... [-c CONFIG] [--json] [--strategies A,B]` tries each site "
        "through each strategy (see `sidestep probe SITE --help`); `sidestep probe dns` checks "
        "the resolvers.",
    )
    probe_sub = probe.add_subparsers(dest="probe_command", metavar="PROBE")
    dns_p = probe_sub.add_parser(
        "dns",
        help="check the configured resolvers for tampering and blocking",
        description="Check the resolvers CONFIG names: lying plain DNS (block pages, bogus "
        "addresses, NXDOMAIN hijack, injection, answers that fail TLS) and blocked secure "
        "endpoints. Sends plaintext test queries. Exit status: 0 nothing found, 1 tampering "
        "or blocking found, 2 usage or config error.",
    )
    dns_p.add_argument("config", metavar="CONFIG", nargs="?", help="TOML config file")
    dns_p.add_argument("--json", action="store_true", help="print one JSON document")
    probe.set_defaults(handler=run_probe, probe_parser=probe)


def run_probe(args: argparse.Namespace) -> int:
    """The ``probe`` command: returns the exit status."""
    if getattr(args, "probe_command", None) != "dns":
        args.probe_parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        config = load_config(args.config)
        verdicts, endpoints = trio.run(probe_dns, config)
    except ProxyError as exc:
        print(f"sidestep: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError) as exc:
        print(f"sidestep: probe dns: {exc}", file=sys.stderr)
        return EXIT_USAGE
    found = any(v.bad for v in verdicts)
    if args.json:
        print(json.dumps(report(verdicts, endpoints), indent=2))
    else:
        print(render(verdicts))
    return EXIT_FOUND if found else EXIT_CLEAN


async def probe_dns(config: Config) -> tuple[list[Verdict], list[dict[str, Any]]]:
    """Run every check once; the verdicts and the secure endpoints' health afterwards."""
    plan = check_plan(config.dns)
    chain: ResolverChain | None = None
    async with AsyncExitStack() as stack:
        if config.dns.endpoints:
            chain, managed = secure_chain(config.dns)
            for resolver in managed:
                await stack.enter_async_context(resolver)
        verdicts = await run_checks(plan, chain)
        return verdicts, chain.status() if chain is not None else []


def report(verdicts: list[Verdict], endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document ``--json`` prints."""
    return {
        "tampering": any(v.status == "tampered" for v in verdicts),
        "blocking": any(v.status == "blocked" for v in verdicts),
        "verdicts": [v.to_json() for v in verdicts],
        "endpoints": endpoints,
    }


def render(verdicts: list[Verdict]) -> str:
    """One block per resolver or endpoint: its overall verdict, then each check's line."""
    by_subject: dict[str, list[Verdict]] = {}
    for v in verdicts:
        by_subject.setdefault(v.subject, []).append(v)
    order = ("tampered", "blocked", "suspect", "inconclusive", "ok")
    lines = []
    for subject, group in by_subject.items():
        worst = min((v.status for v in group), key=order.index)
        lines.append(f"{subject}: {worst}")
        for v in group:
            about = f" [{v.name}]" if v.name else ""
            why = f": {'; '.join(v.evidence)}" if v.evidence else ""
            lines.append(f"  {v.status:<12} {v.check}{about}{why}")
    if not verdicts:
        lines.append("nothing to check: no plain resolver found and no secure endpoint configured")
    bad = sum(v.bad for v in verdicts)
    lines.append(f"{bad} problem(s) found" if bad else "no tampering or blocking found")
    return "\n".join(lines)
