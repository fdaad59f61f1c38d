"""``sidestep probe SITE...`` and ``sidestep check``: test sites now through every strategy.

* ``sidestep probe SITE... [-c CONFIG] [--json] [--strategies a,b] [--timeout S]`` tries each
  site through each strategy of CONFIG (the built-in tricks included) and prints, per strategy,
  the outcome, the time to the first answer and the verdict (:mod:`proxy.detect.siteprobe`).
* ``sidestep check [CONFIG] [--sites FILE] [--json]`` is the headless self-test: it validates
  CONFIG, runs the DNS checks of ``sidestep probe dns`` against its resolvers, probes a list of
  sites (:data:`DEFAULT_SITES`, or FILE: one a line, ``#`` comments) and prints what works where.

SITE is ``host``, ``host:port`` or a URL: https on 443 unless ``http://`` says plain HTTP on 80.

Both share their exit status, for scripts:

====  ==========================================================================
0     every site answered a plain connection (``direct``)
1     some sites answered only through a strategy that circumvents (a trick, a proxy)
2     some sites answered through nothing (censored everywhere, or down)
3     a usage or config error (one line on stderr)
====  ==========================================================================

Each command parses its own arguments (``proxy.cli`` hands them over) so that even a mistyped
option ends with status 3, never with argparse's 2, which here means "unreachable".

While sites are probed, a progress line on stderr is redrawn when stderr is a terminal; otherwise
one line is written per finished site.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

if TYPE_CHECKING:
    from proxy.config import Config
    from proxy.detect.siteprobe import ProbeEnv, SiteReport

# the probing machinery is imported when a command runs: `sidestep --help` stays quick

#: a usage or config error (the same value as :data:`proxy.detect.siteprobe.EXIT_USAGE`)
EXIT_USAGE = 3

#: what ``sidestep check`` probes without ``--sites``: well-known sites that are often blocked
#: somewhere, and a few that rarely are (controls)
DEFAULT_SITES = (
    "www.wikipedia.org",
    "www.youtube.com",
    "x.com",
    "www.facebook.com",
    "www.instagram.com",
    "telegram.org",
    "signal.org",
    "www.torproject.org",
    "www.bbc.com",
    "github.com",
    "www.google.com",
    "www.cloudflare.com",
)

_STATUS_TEXT = {
    "direct": "reachable directly",
    "circumvented": "reachable only through circumvention",
    "unreachable": "unreachable",
}

_EXIT_TEXT = (
    "Exit status: 0 every site reachable directly, 1 some reachable only through "
    "circumvention, 2 some unreachable, 3 usage or config error."
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors end with status 3 (2 means "unreachable")."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.add_argument(
        "--strategies",
        metavar="A,B",
        help="only these strategies, in this order (default: every one the config has)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long one attempt may take (default: the default policy's attempt_timeout)",
    )


def probe_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sidestep probe",
        description="Try each SITE now through each strategy of the config (plain, the "
        "ClientHello tricks, your proxies) and print, per strategy, the outcome, the time to "
        "the first answer and the verdict. SITE is host, host:port or a URL (https on 443 "
        "unless http:// is given). `sidestep probe dns` checks the resolvers instead. "
        + _EXIT_TEXT,
    )
    p.add_argument("sites", metavar="SITE", nargs="+", help="host[:port] or http(s) URL")
    p.add_argument("-c", "--config", metavar="FILE", help="TOML config file")
    _common(p)
    return p


def check_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sidestep check",
        description="Self-test on this network: validate CONFIG, check its resolvers for "
        "tampering, and try a list of well-known sites through every configured strategy. "
        + _EXIT_TEXT,
    )
    p.add_argument("config", metavar="CONFIG", nargs="?", help="TOML config file")
    p.add_argument(
        "--sites", metavar="FILE", help="sites to try, one a line, # comments (default: built in)"
    )
    _common(p)
    return p


def add_check_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """List ``check`` among the ``sidestep`` subcommands (it parses its own arguments)."""
    sub.add_parser(
        "check",
        help="self-test: config, resolvers and well-known sites through every strategy",
        add_help=False,
    )


def wants_site_probe(argv: Sequence[str]) -> bool:
    """Whether ``sidestep probe`` + ``argv`` names sites (rather than ``dns``, or nothing)."""
    words = [a for a in argv if not a.startswith("-")]
    return bool(words) and words[0] != "dns"


# --- the two commands ----------------------------------------------------------------------------


def run_site_probe(argv: Sequence[str], env: ProbeEnv | None = None) -> int:
    """``sidestep probe SITE...``; returns the exit status."""
    args = probe_parser().parse_args(argv)
    return _run(args, args.config, args.sites, env=env, dns=False)


def run_check(argv: Sequence[str], env: ProbeEnv | None = None) -> int:
    """``sidestep check``; returns the exit status."""
    args = check_parser().parse_args(argv)
    if args.sites:
        try:
            with open(args.sites, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            return _usage(f"cannot read {args.sites}: {exc.strerror or exc}")
        except UnicodeDecodeError:
            return _usage(f"{args.sites} is not a UTF-8 text file")
        names: list[str] | str = text
    else:
        names = list(DEFAULT_SITES)
    return _run(args, args.config, names, env=env, dns=True)


def _usage(message: str) -> int:
    print(f"sidestep: {message}", file=sys.stderr)
    return EXIT_USAGE


def _run(
    args: argparse.Namespace, path: str | None, sites: list[str] | str, *, env: ProbeEnv | None,
    dns: bool,
) -> int:  # fmt: skip
    if args.timeout is not None and not args.timeout > 0:
        return _usage("--timeout must be a positive number of seconds")
    import trio

    from proxy.config import load_config
    from proxy.detect.siteprobe import ProbeEnv
    from proxy.errors import ProxyError

    only = [s.strip() for s in args.strategies.split(",") if s.strip()] if args.strategies else []
    try:
        config = load_config(path)
    except ProxyError as exc:
        return _usage(str(exc))
    try:
        return trio.run(
            lambda: run_command(
                config,
                sites,
                path=path,
                as_json=args.json,
                only=only,
                timeout=args.timeout,
                dns=dns,
                env=env or ProbeEnv(),
                out=sys.stdout,
                err=sys.stderr,
            )
        )
    except ProxyError as exc:
        return _usage(str(exc))
    except OSError as exc:
        return _usage(f"cannot start the probe: {exc.strerror or exc}")


async def run_command(
    config: Config,
    sites: Sequence[str] | str,
    *,
    path: str | None = None,
    as_json: bool = False,
    only: Sequence[str] = (),
    timeout: float | None = None,
    dns: bool = False,
    env: ProbeEnv,
    out: TextIO,
    err: TextIO,
) -> int:
    """Both commands once their arguments are read: ``dns`` makes it ``check`` (DNS checks, a
    table of sites), else it is ``probe`` (one block per site). ``sites`` is a list of SITE
    texts, or the text of a sites file. Config errors raise :class:`ProxyError`."""
    from proxy.detect.siteprobe import exit_status, open_setup, parse_site, probe_sites, read_sites

    try:
        if isinstance(sites, str):
            parsed = read_sites(sites, https_port=env.https_port, http_port=env.http_port)
        else:
            parsed = [parse_site(s, https_port=env.https_port, http_port=env.http_port)
                      for s in sites]  # fmt: skip
    except ValueError as exc:
        print(f"sidestep: {exc}", file=err)
        return EXIT_USAGE
    if not parsed:
        print("sidestep: no sites to probe", file=err)
        return EXIT_USAGE
    config = env.prepare(config)
    dns_doc: dict[str, Any] | None = None
    dns_text = ""
    if dns:
        from proxy.detect.dnsprobe_cli import probe_dns, render, report

        verdicts, endpoints = await probe_dns(config)
        dns_doc, dns_text = report(verdicts, endpoints), render(verdicts)
    async with open_setup(config, only=only, attempt_timeout=timeout, env=env) as setup:
        progress = Progress(len(parsed), err)
        try:
            reports = await probe_sites(setup, parsed, on_done=progress.done)
        finally:
            progress.close()
        names = [s.name for s in setup.strategies]
    status = exit_status(reports)
    if as_json:
        doc: dict[str, Any] = {
            "exit": status,
            "summary": summary(reports),
            "strategies": names,
            "sites": [r.to_json() for r in reports],
        }
        if dns:
            doc = {"config": path or "(embedded default)", "valid": True, "dns": dns_doc, **doc}
        out.write(json.dumps(doc, indent=2) + "\n")
    elif dns:
        shown = path or "the embedded default config"
        out.write(f"config: {shown} is valid; strategies: {', '.join(names)}\n\n")
        out.write("DNS\n" + _indent(dns_text) + "\n\nsites\n" + render_table(reports) + "\n")
        out.write(render_summary(reports) + "\n")
    else:
        out.write("\n".join(render_site(r) for r in reports) + "\n")
        out.write(render_summary(reports) + "\n")
    return status


# --- what is printed -----------------------------------------------------------------------------


class Progress:
    """Progress on stderr: a redrawn line on a terminal, else one line per finished site."""

    def __init__(self, total: int, stream: TextIO, *, tty: bool | None = None) -> None:
        self.total = total
        self.stream = stream
        self.count = 0
        self.tty = stream.isatty() if tty is None else tty
        if self.tty:
            self._draw(f"probing {total} site(s)...")

    def done(self, report: SiteReport) -> None:
        self.count += 1
        line = f"[{self.count}/{self.total}] {report.site}: {_STATUS_TEXT[report.status]}"
        if self.tty:
            self._draw(line)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self._draw("")

    def _draw(self, line: str) -> None:
        self.stream.write("\r\033[K" + line)
        self.stream.flush()


def _columns(rows: Sequence[Sequence[str]], indent: str = "") -> str:
    sizes = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        indent + "  ".join(c.ljust(w) for c, w in zip(r, sizes, strict=True)).rstrip() for r in rows
    ]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _cut(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def render_site(report: SiteReport) -> str:
    """``probe``'s block for one site: its conclusion, then one row per strategy."""
    head = f"{report.site} ({report.site.scheme}): {_STATUS_TEXT[report.status]}"
    if report.status != "direct":
        head += f" (direct: {report.verdict})"
    rows = [("strategy", "outcome", "time", "verdict", "detail")]
    for r in report.results:
        took = "-" if r.outcome == "skipped" else f"{r.time:.2f}s"
        rows.append((r.strategy, r.outcome, took, r.verdict, _cut(r.detail)))
    return head + "\n" + _columns(rows, "  ") + "\n"


def render_table(reports: Sequence[SiteReport]) -> str:
    """``check``'s compact table: one row per site, what works where."""
    rows = [("site", "result", "direct", "works through")]
    for r in reports:
        works = ", ".join(r.working) or "-"
        rows.append((str(r.site), r.status, r.verdict, _cut(works, 70)))
    return _columns(rows, "  ")


def summary(reports: Sequence[SiteReport]) -> dict[str, int]:
    counts = {"direct": 0, "circumvented": 0, "unreachable": 0}
    for r in reports:
        counts[r.status] += 1
    return counts


def render_summary(reports: Sequence[SiteReport]) -> str:
    c = summary(reports)
    return (
        f"{len(reports)} site(s): {c['direct']} reachable directly, {c['circumvented']} only "
        f"through circumvention, {c['unreachable']} unreachable"
    )


__all__ = [
    "DEFAULT_SITES", "EXIT_USAGE", "Progress", "add_check_parser", "check_parser",
    "probe_parser", "render_site", "render_summary", "render_table", "run_check", "run_command",
    "run_site_probe", "summary", "wants_site_probe",
]  # fmt: skip
