"""The ``sidestep`` command.

Every user mistake (a bad config, a port in use) ends in one line on stderr and exit status 1,
never a traceback.

Only the module of the command being run is imported: the bridge, the censor lab and the probes
register their own options, and importing them all (cryptography, the lab's servers) would
cost the running proxy megabytes of memory it never uses. ``sidestep --help`` lists them from
:data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from proxy import __version__
from proxy.config import load_config, render_config
from proxy.errors import ConfigError

#: the commands other modules define: name -> (module, its function that registers the
#: command's parser, the line ``sidestep --help`` shows; it must match the module's own)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "lab": ("proxy.lab.cli", "add_lab_parser", "run the censor lab, or check a config against it"),
    "learned": (
        "proxy.learncli",
        "add_learned_parser",
        "show or edit which strategy was learned per site",
    ),
    "report": ("proxy.learncli", "add_report_parser", "summarize the evidence log per site"),
    "system-proxy": (
        "proxy.sysproxy",
        "add_system_proxy_parser",
        "point the system's proxy setting at sidestep, or restore it",
    ),
    "router-rules": (
        "proxy.routerrules",
        "add_router_rules_parser",
        "print, apply or remove the nftables rules for router (transparent) mode",
    ),
    "keygen": (
        "proxy.bridge.keygen",
        "add_keygen_parser",
        "make a bridge identity (0600 file) and print the bridge URI for clients",
    ),
    "bridge": (
        "proxy.bridge.server",
        "add_bridge_parser",
        "run a bridge server for sidestep clients (see configs/bridge.toml)",
    ),
    "probe": (
        "proxy.detect.dnsprobe_cli",
        "add_probe_parser",
        "test the network now: probe SITE... (through each strategy), probe dns",
    ),
    "check": (
        "proxy.checkcli",
        "add_check_parser",
        "self-test: config, resolvers and well-known sites through every strategy",
    ),
}


def _command_word(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (the top level has no option that takes a value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def add_command_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    """Register command ``name`` of :data:`COMMANDS` with its module's full parser."""
    module, function, _ = COMMANDS[name]
    getattr(importlib.import_module(module), function)(sub)


def _parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``sidestep`` parser. With ``argv``, only the command it names gets its full parser
    (the others are listed by name and help line); without, every command gets its own."""
    chosen = None if argv is None else _command_word(argv)
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
    for name, (_, _, line) in COMMANDS.items():
        if argv is None or name == chosen:
            add_command_parser(sub, name)
        else:
            sub.add_parser(name, help=line, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["check"] or words[:1] == ["probe"]:
        from proxy.checkcli import run_check, run_site_probe, wants_site_probe

        if words[0] == "check" or wants_site_probe(words[1:]):
            # they parse their own arguments: a usage error is status 3 (2 means "unreachable")
            try:
                return run_check(words[1:]) if words[0] == "check" else run_site_probe(words[1:])
            except KeyboardInterrupt:
                return 130
    parser = _parser(words)
    args = parser.parse_args(words)
    try:
        if args.command == "run":
            return _run(args)
        if args.command in ("learned", "report", "probe", "system-proxy", "router-rules"):
            return int(args.handler(args))
        if args.command == "keygen":
            from proxy.bridge.keygen import run_keygen

            return run_keygen(args)
        if args.command == "bridge":
            from proxy.bridge.server import run_bridge

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
    import trio

    from proxy.app import App, StartupError
    from proxy.logsetup import setup_logging
    from proxy.sysproxy import (
        SystemProxyError,
        choose_backend,
        target_from_config,
        turn_off,
        turn_on,
    )

    config = load_config(args.config)
    _lighten_log_records()
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


def _lighten_log_records() -> None:
    """Skip what our log lines never show: the calling file and line (a walk up the stack),
    thread, process and multiprocessing names (the logging HOWTO's "Optimization" switches).
    Every connection logs a line, so this is per-connection work saved."""
    import logging

    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


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
