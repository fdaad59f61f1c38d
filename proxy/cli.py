"""The ``sidestep`` command.

Every user mistake (a bad config, a port in use) ends in one line on stderr and exit status 1,
never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import trio

from proxy import __version__
from proxy.bridge.keygen import add_keygen_parser, run_keygen
from proxy.bridge.server import add_bridge_parser, run_bridge
from proxy.checkcli import add_check_parser, wants_site_probe
from proxy.config import load_config, render_config
from proxy.detect.dnsprobe_cli import add_probe_parser
from proxy.errors import ConfigError
from proxy.lab.cli import add_lab_parser
from proxy.learncli import add_learned_parser, add_report_parser
from proxy.routerrules import add_router_rules_parser
from proxy.sysproxy import (
    SystemProxyError,
    add_system_proxy_parser,
    choose_backend,
    target_from_config,
    turn_off,
    turn_on,
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sidestep",
        description="A local SOCKS5/HTTP proxy that detects censorship and routes around it.",
    )
    p.add_argument("--version", action="version", version=f"sidestep {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy (the embedded default config if no --config)")
    run.add_argument("-c", "--config", metavar="FILE", help="TOML config file")
    run.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override [log] level",
    )
    run.add_argument("--json-logs", action="store_true", default=None, help="log JSON lines")
    run.add_argument(
        "--system-proxy",
        choices=["proxy", "pac"],
        help="point the system's proxy setting at sidestep while it runs (restored on exit)",
    )

    cfg = sub.add_parser("config", help="check or show a config file")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    check = cfg_sub.add_parser("check", help="validate FILE; exit status 0 when valid, 1 if not")
    check.add_argument("file", metavar="FILE")
    show = cfg_sub.add_parser("show", help="print the effective config (secrets masked)")
    show.add_argument("file", metavar="FILE", nargs="?")
    cfg_sub.add_parser("reference", help="print every config key with its type and default")
    add_lab_parser(sub)
    add_learned_parser(sub)
    add_report_parser(sub)
    add_system_proxy_parser(sub)
    add_router_rules_parser(sub)
    add_keygen_parser(sub)
    add_bridge_parser(sub)
    add_probe_parser(sub)
    add_check_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["check"] or (words[:1] == ["probe"] and wants_site_probe(words[1:])):
        # they parse their own arguments: a usage error is status 3 (2 means "unreachable")
        from proxy.checkcli import run_check, run_site_probe

        try:
            return run_check(words[1:]) if words[0] == "check" else run_site_probe(words[1:])
        except KeyboardInterrupt:
            return 130
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command in ("learned", "report", "probe", "system-proxy", "router-rules"):
            return int(args.handler(args))
        if args.command == "keygen":
            return run_keygen(args)
        if args.command == "bridge":
            return run_bridge(args)
        if args.command == "lab":
            from proxy.lab.cli import run_lab

            return run_lab(args)
        if args.command == "config":
            if args.config_command == "check":
                load_config(args.file)
                print(f"{args.file}: ok")
                return 0
            if args.config_command == "show":
                sys.stdout.write(render_config(load_config(args.file)))
                return 0
            if args.config_command == "reference":
                from proxy.configdoc import render

                sys.stdout.write(render())
                return 0
            parser.parse_args(["config", "--help"])
        parser.print_help()
        return 2
    except ConfigError as exc:
        print(f"sidestep: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    from proxy.app import App, StartupError
    from proxy.logsetup import setup_logging

    config = load_config(args.config)
    level = args.log_level or config.log.level
    json_lines = config.log.json if args.json_logs is None else args.json_logs
    try:
        setup_logging(level, json_lines=json_lines, file=config.log.file)
    except OSError as exc:
        print(f"sidestep: cannot open log file {config.log.file}: {exc.strerror}", file=sys.stderr)
        return 1
    _raise_fd_limit()
    app = App(config, config_path=args.config)
    backend = None
    try:
        if args.system_proxy:
            backend = choose_backend()
            turn_on(target_from_config(config, pac=args.system_proxy == "pac"), backend)
        trio.run(app.run)
    except (StartupError, SystemProxyError) as exc:
        print(f"sidestep: {exc}", file=sys.stderr)
        return 1
    finally:
        if backend is not None:
            try:
                turn_off(backend)
            except SystemProxyError as exc:
                print(f"sidestep: restoring the system proxy: {exc}", file=sys.stderr)
    return 0


def _raise_fd_limit() -> None:
    """Each tunnel holds two sockets: lift the soft open-files limit to the hard one."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY:
            hard = 1 << 20
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


if __name__ == "__main__":
    raise SystemExit(main())
