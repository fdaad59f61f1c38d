"""``sidestep lab``: run the censor lab in the foreground, or check a config against it.

* ``sidestep lab [--profile P]`` starts the lab, prints a table of its hosts (name, address,
  what the profile's censor does to each), the CA file and a config fragment that points
  sidestep into the lab, then runs until Ctrl-C.
* ``sidestep lab --check CONFIG [--profile P|all] [--json]`` starts the lab and an in-process
  sidestep running CONFIG (its inbounds replaced by one SOCKS5 port, its system resolver by the
  lab's ISP resolver), fetches every scenario of :mod:`proxy.lab.scenarios` through it and prints
  one row per scenario. Exit status: 0 when every scenario got its content, 1 when some did not,
  2 for usage and config errors (or a lab that cannot start).
* ``sidestep lab --probe SITE... [--profile P] [--config FILE] [--strategies A,B] [--json]``
  starts the lab and runs ``sidestep probe`` inside it (:func:`probe_env`); a SITE without a
  port gets the lab's. Exit status as for ``sidestep probe`` (0 direct, 1 circumvented, 2
  unreachable, 3 config error), except 2 for a lab that cannot start or a clash with --check.

Heavy imports wait until the command runs, so registering the parser costs nothing.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from proxy.detect.siteprobe import ProbeEnv
    from proxy.lab.scenarios import CheckReport
    from proxy.lab.world import Lab, LabPorts

#: the presets of proxy.lab.profiles, spelled out for --help (a test keeps them in step)
PROFILE_NAMES = ("none", "ru-2021", "ru-tspu", "ru-2025", "cn", "ir", "allowlist")

EXIT_PASSED, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_lab_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``lab`` on the ``sidestep`` subcommands."""
    p = sub.add_parser(
        "lab",
        help="run the censor lab, or check a config against it",
        description="Run a simulated censored network on 127.0.0.0/8, or (--check) run "
        "sidestep with CONFIG inside it and fetch every scenario through it. Exit status with "
        "--check: 0 all scenarios passed, 1 some failed, 2 usage or config error.",
    )
    p.add_argument(
        "--profile",
        default="none",
        metavar="P",
        help=f"censor profile: {', '.join(PROFILE_NAMES)}; with --check also 'all' (default: none)",
    )
    p.add_argument("--check", metavar="CONFIG", help="check this sidestep config against the lab")
    p.add_argument("--json", action="store_true", help="with --check: print a JSON document")
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="with --check: how long each scenario may take; with --probe: each attempt "
        "(default: 5)",
    )
    p.add_argument(
        "--probe",
        nargs="+",
        metavar="SITE",
        help="run `sidestep probe SITE...` inside the lab (with --config, --strategies, --json); "
        "exit status as for `sidestep probe`",
    )
    p.add_argument("--config", metavar="FILE", help="with --probe: the sidestep config")
    p.add_argument("--strategies", metavar="A,B", help="with --probe: only these strategies")
    p.add_argument(
        "--high-ports",
        action="store_true",
        help="use ports 10443/10080/10053 even where 443/80/53 could be bound",
    )


def run_lab(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Carry out ``sidestep lab`` as parsed by :func:`add_lab_parser`."""
    out = out or sys.stdout
    from proxy.lab.profiles import PROFILES
    from proxy.lab.world import HIGH_PORTS

    wanted = list(PROFILES) if args.profile == "all" and args.check else [args.profile]
    for name in wanted:
        if name not in PROFILES:
            choices = ", ".join(PROFILES) + (", all" if args.check else "")
            return _usage(f"unknown profile {name!r}; choose one of {choices}")
    if args.probe:
        if args.check:
            return _usage("--probe and --check are two different runs: choose one")
        return _probe(args, wanted[0], HIGH_PORTS if args.high_ports else None)
    if args.json and not args.check:
        return _usage("--json goes with --check or --probe")
    if not args.timeout > 0:
        return _usage("--timeout must be a positive number of seconds")
    ports = HIGH_PORTS if args.high_ports else None
    try:
        if args.check:
            return _check(args.check, wanted, ports, args.timeout, args.json, out)
        import trio

        trio.run(_foreground, wanted[0], ports, out)
        return EXIT_PASSED
    except OSError as exc:
        why = exc.strerror or str(exc)
        return _usage(f"cannot start the lab: {why} (is another lab running? try --high-ports)")


def _usage(message: str) -> int:
    print(f"sidestep lab: {message}", file=sys.stderr)
    return EXIT_USAGE


# --- the foreground lab ------------------------------------------------------------------------


async def _foreground(profile: str, ports: LabPorts | None, out: TextIO) -> None:
    import trio

    from proxy.lab.world import open_lab

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_lab(profile, ports=ports) as lab:
            out.write(render_lab(lab))
            out.write("\nThe lab is running; Ctrl-C stops it.\n")
            out.flush()
            async for _ in signals:
                break
    out.write("lab stopped\n")


def _table(rows: Sequence[Sequence[str]], widths: Sequence[int | None] = ()) -> str:
    """Left-aligned columns; a column with a width cap is cut with '...'."""
    caps = list(widths) + [None] * (len(rows[0]) - len(widths))
    cut = [
        [
            c if cap is None or len(c) <= cap else c[: cap - 3] + "..."
            for c, cap in zip(r, caps, strict=True)
        ]
        for r in rows
    ]
    sizes = [max(len(r[i]) for r in cut) for i in range(len(cut[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, sizes, strict=True)).rstrip() for r in cut]
    return "\n".join(lines) + "\n"


def _at(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


def lab_rows(lab: Lab) -> list[tuple[str, str, str]]:
    """One row per lab host: name, address(es), what the censor does to it."""
    from proxy.lab import world
    from proxy.lab.dnsserver import DnsMode, DnsRule
    from proxy.lab.profiles import predict_tcp

    profile, ports = lab.profile, lab.ports
    lies = []
    for suffix, given in profile.isp.rules.items():
        rule = given if isinstance(given, DnsRule) else DnsRule(DnsMode(given))
        v4 = [a for a in profile.isp.addresses(rule) if ":" not in a]
        lies.append(f"{suffix} {rule.mode.value}" + (f" -> {', '.join(v4)}" if v4 else ""))
    inject = profile.injection
    forged = ", ".join(inject.names) if inject is not None else ""
    isp = "lies: " + "; ".join(lies) if lies else "honest"
    if forged:
        isp += f"; on the path, UDP answers for {forged} are forged"
    public = f"honest; on the path, UDP answers for {forged} are forged first" if forged else ""
    rows = [
        ("resolver.isp.lab", f"{_at(lab.isp_resolver)} udp+tcp", f"ISP resolver: {isp}"),
        ("ns.lab", f"{_at(lab.authoritative)} udp+tcp", "authoritative for .lab: honest"),
        ("(public resolver)", f"{_at(lab.public_resolver)} udp+tcp", public or "honest"),
        (
            "(no resolver)",
            f"{_at(lab.silent_resolver)} udp",
            f"nothing listens, yet forged answers for {forged} come back"
            if forged
            else "nothing listens",
        ),
    ]
    for endpoint in lab.doh_endpoints:
        kind = "DoH, well-known" if endpoint.famous else "DoH, lesser-known"
        for ip in endpoint.bootstrap:
            verdict = predict_tcp(profile, endpoint.name, (ip, ports.https), "https")
            rows.append((endpoint.name, f"{ip}:{ports.https}", f"{kind}: {verdict}"))
    for spec in lab.origins:
        schemes = [f":{ports.https}"] * spec.https + [f":{ports.http}"] * spec.http
        rows.append((spec.name, spec.ip + " " + " ".join(schemes), lab.describe(spec.name)))
    cdn = (world.CDN_IP, ports.https)
    rows.append((world.CDN_FRONT, _at(cdn), "CDN edge (routes by Host): "
                 + lab.describe(world.CDN_FRONT, "https")))  # fmt: skip
    rows.append((world.CDN_BACKEND, _at(cdn), "site behind the CDN: "
                 + lab.describe(world.CDN_BACKEND, "https")))  # fmt: skip
    for slot in lab.bridge_slots:
        verdict = predict_tcp(profile, slot.name, slot.public, "https")
        rows.append((slot.name, _at(slot.public), f"bridge slot (empty): {verdict}"))
    for name, ip, what in (
        (world.BLOCKPAGE_NAME, world.BLOCKPAGE_IP, "the ISP's block page"),
        (world.HIJACK_NAME, world.HIJACK_IP, "the ISP's NXDOMAIN search page"),
    ):
        rows.append((name, f"{ip} :{ports.https} :{ports.http}", what))
    return rows


def config_fragment(lab: Lab) -> str:
    """TOML to paste into a sidestep config so that it resolves (and so connects) in the lab."""
    lines = [
        f"# sidestep lab (profile {lab.profile.name}): resolve with the lab's ISP resolver, as",
        "# a client on this censored network would. Clients must trust the lab CA:",
        f"#   {lab.ca_file}",
        "[dns]",
        'resolver = "udp"',
        f'servers = ["{_at(lab.isp_resolver)}"]',
        "# The lab's DoH endpoints and their bootstrap addresses, for a DoH resolver:",
    ]
    for endpoint in lab.doh_endpoints:
        lines.append(f"#   {endpoint.url}  bootstrap {', '.join(endpoint.bootstrap)}")
    return "\n".join(lines) + "\n"


def render_lab(lab: Lab) -> str:
    """Everything ``sidestep lab`` prints about a running lab."""
    from proxy.lab import world

    p = lab.ports
    example_ip = lab.addresses(world.OPEN)[0]
    header = [
        f"sidestep lab, profile {lab.profile.name}: {lab.profile.summary}",
        f"ports: https {p.https}, http {p.http}, dns {p.dns}; everything on 127.0.0.0/8",
        "",
    ]
    rows = [("name", "address", "what the censor does"), *lab_rows(lab)]
    tail = [
        "",
        f"lab CA: {lab.ca_file} (removed when the lab stops)",
        f"  try: curl --cacert {lab.ca_file} --resolve {world.OPEN}:{p.https}:{example_ip} "
        f"{lab.url(world.OPEN)}",
        "",
        "config fragment:",
        "",
    ]
    return "\n".join(header) + _table(rows) + "\n".join(tail) + config_fragment(lab)


# --- lab --probe -------------------------------------------------------------------------------


def probe_env(lab: Lab) -> ProbeEnv:
    """Where ``sidestep probe``/``check`` run inside ``lab``: the config pointed into it
    (:func:`~proxy.lab.scenarios.lab_config`, the DNS checks' own targets too), answers outside
    the lab never dialled, each fragment piece read by the lab's censor on its own, and the
    lab's ports for a SITE without one."""
    from dataclasses import replace

    from proxy.config import Config
    from proxy.detect.siteprobe import ProbeEnv, ProbeSetup
    from proxy.lab.scenarios import LabOnlyResolver, lab_config, pace_strategies

    def prepare(config: Config) -> Config:
        inside = lab_config(config, lab)
        silent = f"{lab.silent_resolver[0]}:{lab.silent_resolver[1]}"
        dns = replace(
            inside.dns,
            silent_server=silent,
            check_cafile=str(lab.ca_file),
            check_port=lab.ports.https,
        )
        return replace(inside, dns=dns)

    def adapt(setup: ProbeSetup) -> None:
        setup.resolver = LabOnlyResolver(setup.resolver)
        table = {s.name: s for s in setup.strategies}
        pace_strategies(table, lab)
        setup.strategies = list(table.values())

    return ProbeEnv(prepare, adapt, https_port=lab.ports.https, http_port=lab.ports.http)


def _probe(args: argparse.Namespace, profile: str, ports: LabPorts | None) -> int:
    """``sidestep lab --probe SITE...``: a lab under ``profile`` and the probe inside it, in
    the same trio loop (the lab's censor and the probe's paced tricks wait on each other)."""
    import trio

    from proxy.checkcli import probe_parser, run_command
    from proxy.config import load_config
    from proxy.detect.siteprobe import EXIT_USAGE
    from proxy.errors import ProxyError
    from proxy.lab.world import open_lab

    argv = [*args.probe] + (["--config", args.config] if args.config else [])
    parsed = probe_parser().parse_args(argv)  # a bad SITE list exits 3 here
    only = [s.strip() for s in (args.strategies or "").split(",") if s.strip()]
    try:
        config = load_config(parsed.config)
    except ProxyError as exc:
        print(f"sidestep lab: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def inside() -> int:
        async with open_lab(profile, ports=ports) as lab:
            return await run_command(
                config,
                parsed.sites,
                as_json=args.json,
                only=only,
                timeout=args.timeout,
                env=probe_env(lab),
                out=sys.stdout,
                err=sys.stderr,
            )

    try:
        return trio.run(inside)
    except ProxyError as exc:
        print(f"sidestep lab: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        why = exc.strerror or str(exc)
        print(f"sidestep lab: cannot start the lab: {why} (try --high-ports)", file=sys.stderr)
        return EXIT_USAGE


# --- lab --check -------------------------------------------------------------------------------


def _check(
    path: str,
    profiles: list[str],
    ports: LabPorts | None,
    timeout: float,
    as_json: bool,
    out: TextIO,
) -> int:
    import trio

    from proxy.app import StartupError
    from proxy.config import load_config
    from proxy.errors import ConfigError
    from proxy.lab.scenarios import run_check
    from proxy.logsetup import setup_logging

    try:
        config = load_config(path)
    except ConfigError as exc:
        return _usage(str(exc))
    setup_logging("warning", json_lines=False)  # sidestep's own troubles go to stderr
    reports: list[CheckReport] = []

    async def check_all() -> None:
        for name in profiles:
            reports.append(await run_check(config, name, timeout=timeout, ports=ports))

    try:
        trio.run(check_all)
    except StartupError as exc:
        return _usage(f"sidestep cannot start: {exc}")
    if as_json:
        doc = {
            "config": path,
            "passed": all(r.passed for r in reports),
            "profiles": [r.to_json() for r in reports],
        }
        out.write(json.dumps(doc, indent=2) + "\n")
    else:
        out.write(render_check(path, reports))
    return EXIT_PASSED if all(r.passed for r in reports) else EXIT_FAILED


def _short(verdict: str) -> str:
    return verdict.split(":", 1)[0]


def render_check(path: str, reports: Sequence[CheckReport]) -> str:
    """The ``lab --check`` table for each profile, and a closing summary."""
    parts = []
    for report in reports:
        rows: list[Any] = [("scenario", "censor", "got", "time", "result", "verdict", "strategy")]
        for r in report.results:
            rows.append(
                (
                    r.scenario.id,
                    r.censor,
                    r.fetch.got,
                    f"{r.fetch.elapsed:.2f}s",
                    "pass" if r.passed else "FAIL",
                    _short(r.verdict),
                    r.strategy,
                )
            )
        passed = sum(r.passed for r in report.results)
        parts.append(
            f"{path} against profile {report.profile.name}: {report.profile.summary}\n"
            + _table(rows, (None, 48, 48))
            + f"{passed} of {len(report.results)} scenarios passed\n"
        )
    if len(reports) > 1:
        clean = [r.profile.name for r in reports if r.passed]
        parts.append(f"{len(clean)} of {len(reports)} profiles passed: {', '.join(clean) or '-'}\n")
    return "\n".join(parts)
