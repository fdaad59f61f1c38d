"""The configuration reference (``docs/configuration.md``), rendered from the schema itself.

The config dataclasses (:mod:`proxy.config`, :mod:`proxy.routerconfig`) are the one source of
truth: this module walks them and writes, per section, every key with its type, its default,
what values are allowed (``Literal`` choices and the ``option(check=...)`` rules) and the
``#:`` comment written above the field in the source. A test regenerates the file and fails
when the committed copy is stale, so the reference cannot drift from what the loader accepts.

Run ``python -m proxy.configdoc --out docs/configuration.md`` (or ``sidestep config
reference``) to refresh it. Nothing here depends on the platform or the clock: the output is
the same on every machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

from proxy.config import Config
from proxy.configschema import to_toml

#: the command that rewrites the committed reference, for messages telling people to run it
REFRESH_COMMAND = ".venv/bin/python -m proxy.configdoc --out docs/configuration.md"

_HEAD = """\
# Configuration reference

<!-- Generated from the config schema by proxy/configdoc.py; do not edit by hand.
     Refresh with: {command} -->

The proxy reads one TOML file (`sidestep run --config FILE`); with none it uses its embedded
default, `configs/default.toml`, which repeats every key below with a longer explanation. A
bridge server reads its own, smaller file. Every key has a default unless marked *required*, so
an empty file is a valid config. Unknown keys,
wrong types and bad values are refused at start with the file, the line, the key and what is
allowed; `sidestep config check FILE` runs the same checks without starting anything.

Types: *string*, *integer*, *number* (an integer is accepted too), *boolean* (`true` or
`false`), *array of X* (`[...]`), *table* (a `[section]`), *array of tables* (repeated
`[[section]]` blocks; inside a section also an array of inline tables, as in
`users = [{{ username = "me", password = "..." }}]`). An *optional* key
has no default value: leave it out to get the behaviour its description gives.
"""

# what each value rule allows, by the module and name of the check function; a check missing
# here is described by the first line of its docstring
_CS, _PC, _RC, _BC = (
    "proxy.configschema",
    "proxy.config",
    "proxy.routerconfig",
    "proxy.bridge.config",
)
_CHECK_WORDS: dict[str, str] = {
    f"{_CS}.positive": "a number above 0",
    f"{_CS}.non_negative": "0 or more",
    f"{_CS}.not_empty": "not empty",
    f"{_PC}._check_listen": '"host:port" with an IP address or localhost, e.g. "127.0.0.1:1080", '
    '"[::1]:1080"',
    f"{_PC}._check_network": 'an IP address or network, e.g. "192.168.0.0/16"',
    f"{_PC}._check_name": "letters, digits, `-`, `_` and `.`",
    f"{_PC}._check_credential": "1 to 255 bytes",
    f"{_PC}._check_endpoint_url": "https://host[:port]/path or tls://host[:port]",
    f"{_PC}._check_dns_server_ip": "an IP address",
    f"{_PC}._check_dns_server": '"ip" or "ip:port", e.g. "192.0.2.53", "[2001:db8::53]:53"',
    f"{_PC}._check_optional_dns_server": '"ip", "ip:port" or "" (off)',
    f"{_PC}._check_dns_name": 'a DNS name, e.g. "example.com"',
    f"{_RC}._check_server": '"ip:port", e.g. "127.0.0.1:9050" (an address, not a name)',
    f"{_RC}._check_control": '"host:port", e.g. "example.org:443"',
    f"{_RC}._factor": "0 (off) or above 1",
    f"{_RC}._check_cidr": 'an IP network, e.g. "10.0.0.0/8"',
    f"{_RC}._check_regex": "a valid regular expression",
    f"{_RC}._check_port": 'a port or a range, e.g. "443", "8000-8999"',
    f"{_RC}._check_split": "start+N, sni-ext, sni, sni-middle, sni-end, host-line, host, "
    "host-middle, host-end, each optionally +N or -N",
    f"{_RC}._check_delay": "0 to 2 seconds",
    f"{_RC}._check_host_header": '"host" in any letter case, e.g. "hOsT"',
    f"{_RC}._check_host_space": "up to 8 spaces or tabs, or empty",
    f"{_RC}._check_bridge_uri": 'a "sidestep://..." bridge URI from `sidestep keygen`',
    f"{_RC}._check_rotate_after": "0 (never) or a number of bytes from 4096",
    f"{_BC}._check_listen": '"host:port", e.g. "127.0.0.1:8443"',
    f"{_BC}._check_network": 'an IP network, e.g. "10.0.0.0/8", "fd00::/8"',
    f"{_BC}._check_destination": 'an IP network ("10.0.0.0/8") or a lower-case domain '
    '("example.org", its subdomains included)',
    f"{_BC}._check_path": 'a path like "/a1b2c3" (letters, digits, `.`, `_`, `~`, `-`)',
    f"{_BC}._check_tor": '"IP:port" of a local Tor SOCKS port, e.g. "127.0.0.1:9050"',
    f"{_BC}._check_delay": "[shortest, longest] seconds, 0 <= shortest <= longest <= 600",
}

#: what :func:`describe_check` says of a rule it knows nothing about
UNDESCRIBED = "checked when loaded"

# descriptions of fields that carry no ``#:`` comment in the source, by "Class.field"; a field
# in neither place fails tests/test_docs.py (write a ``#:`` comment above the new field)
_FIELD_WORDS: dict[str, str] = {
    "UserConfig.username": "the login name; may not contain `:`",
    "UserConfig.password": "the password for that name",
    "LogConfig.level": "how much to write: debug (everything), info, warning or error (only "
    "failures)",
    "StrategyConfig.name": "how policies refer to this strategy; unique",
    "StrategyConfig.username": "login at the upstream proxy, together with password",
    "StrategyConfig.password": "password at the upstream proxy, together with username",
    "PolicyConfig.name": "how rules and default_policy refer to this policy; unique",
    "PolicyConfig.strategies": "names of the strategies to try, in order",
    "RuleConfig.policy": "the policy matching connections use",
    "RuleConfig.name": "a name for this rule in logs",
    "RuleConfig.domain": "names matched exactly",
    "RuleConfig.domain_suffix": "a name and every name under it",
    "RuleConfig.domain_keyword": "names containing this text",
    "RuleConfig.domain_regex": "names matching this regular expression",
    "RuleConfig.ip_cidr": "destination addresses in these networks",
    "RuleConfig.inbound": "only connections arriving on these inbounds (by name)",
    "RuleConfig.ip_list": "files with one CIDR per line; `#` starts a comment",
    "RouterConfig.default_policy": "the policy for connections that no rule matches",
    "RouterConfig.freeze_max_bytes": "the upper end of the freeze window (see freeze_min_bytes)",
    "BridgeSection.tls_key": "ws standalone: the private key file of tls_certificate",
}


@dataclass(frozen=True, slots=True)
class KeyDoc:
    """One key of one section, as the reference shows it."""

    name: str
    type: str
    default: str
    allowed: str
    description: str


@dataclass(frozen=True, slots=True)
class SectionDoc:
    """One table of the config: its header as written in TOML, and its keys."""

    #: as written in TOML: ``[dns.server]``, ``[[dns.endpoints]]``
    header: str
    summary: str
    keys: tuple[KeyDoc, ...]
    #: for a top-level section: what an empty file gets ("" for the nested ones, whose default
    #: is in their parent's table)
    default: str = ""


# --- reading the schema ------------------------------------------------------------------------


def sections(cls: type = Config) -> list[SectionDoc]:
    """Every section reachable from ``cls``, parents before children, in declaration order."""
    return list(_walk(cls, path="", array=False, default=""))


def _walk(cls: Any, path: str, array: bool, default: str) -> Iterator[SectionDoc]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    keys: list[KeyDoc] = []
    children: list[tuple[Any, str, bool, str]] = []
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        key_path = f"{path}.{field.name}" if path else field.name
        inner, is_array = _table_type(tp)
        if inner is not None:
            children.append((inner, key_path, is_array, "" if path else _default(field, tp)))
            if path:
                keys.append(_key_doc(cls, field, tp, comments))
            continue
        keys.append(_key_doc(cls, field, tp, comments))
    if path:
        header = f"[[{path}]]" if array else f"[{path}]"
        yield SectionDoc(header, _summary(cls), tuple(keys), default)
    for child in children:
        yield from _walk(*child)


def _table_type(tp: Any) -> tuple[Any, bool]:
    """(dataclass, is_array) when ``tp`` is a table or an array of tables, else (None, False)."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    if typing.get_origin(tp) is tuple:
        item = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item):
            return item, True
    return None, False


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


def _summary(cls: Any) -> str:
    return " ".join((inspect.getdoc(cls) or "").split())


@functools.cache
def field_comments(cls: Any) -> dict[str, str]:
    """The ``#:`` comment lines written right above each field of ``cls``, joined into one."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    pending: list[str] = []
    field_line = re.compile(r"\s+([A-Za-z_]\w*)\s*:")
    for line in source.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = field_line.match(line)
        if match and pending:
            found.setdefault(match[1], " ".join(pending))
        if stripped.startswith("#"):
            continue  # an ordinary comment between the doc comment and its field
        pending = []
    return found


def _key_doc(cls: Any, field: dataclasses.Field[Any], tp: Any, comments: dict[str, str]) -> KeyDoc:
    description = comments.get(field.name) or _FIELD_WORDS.get(f"{cls.__name__}.{field.name}", "")
    return KeyDoc(
        name=field.name,
        type=describe_type(tp),
        default=_default(field, tp),
        allowed=_allowed(field, tp),
        description=description,
    )


def describe_type(tp: Any) -> str:
    """A config field's type in the reference's words: ``array of strings``, ``string, optional``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) > 1:  # like int | Literal["auto"]
            return " or ".join(describe_type(a) for a in members)
        return f"{describe_type(_strip_optional(tp))}, optional"
    if origin is Literal:
        return describe_type(type(typing.get_args(tp)[0]))
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item):
            return "array of tables"
        return f"array of {_PLURAL[describe_type(item)]}"
    if dataclasses.is_dataclass(tp):
        return "table"
    return _TYPE_WORDS[tp]


_TYPE_WORDS = {str: "string", int: "integer", float: "number", bool: "boolean"}
_PLURAL = {"string": "strings", "integer": "integers", "number": "numbers", "boolean": "booleans"}


def _default(field: dataclasses.Field[Any], tp: Any) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "*required*"
    if value is None:
        return "*not set*"
    if dataclasses.is_dataclass(value):
        return "*see its section*"
    if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
        return "; ".join(_changed_fields(item) for item in value)
    if value == () and _table_type(tp)[1]:
        return "none"
    return f"`{_toml_value(value)}`"


def _changed_fields(item: Any) -> str:
    """An array-of-tables default item, by the keys that differ from a bare item's defaults."""
    pairs = []
    for field in dataclasses.fields(item):
        value = getattr(item, field.name)
        if field.default is dataclasses.MISSING or value != field.default:
            pairs.append(f"{field.name} = {_toml_value(value)}")
    return "one table: `" + ", ".join(pairs) + "`"


def _toml_value(value: Any) -> str:
    """``value`` written as TOML, using the schema's own renderer."""

    @dataclass(frozen=True)
    class _Holder:
        v: Any

    return to_toml(_Holder(value), mask_secrets=False).strip().removeprefix("v = ")


def _allowed(field: dataclasses.Field[Any], tp: Any) -> str:
    tp = _strip_optional(tp)
    parts: list[str] = []
    literals = [tp] if typing.get_origin(tp) is Literal else []
    if typing.get_origin(tp) in (Union, types.UnionType):  # like int | Literal["auto"]
        literals = [a for a in typing.get_args(tp) if typing.get_origin(a) is Literal]
    for literal in literals:
        parts.append(", ".join(f"`{_toml_value(v)}`" for v in typing.get_args(literal)))
    for rule, prefix in (("check", ""), ("each", "each: ")):
        check = field.metadata.get(rule)
        if check is not None:
            parts.append(prefix + describe_check(check))
    if field.metadata.get("secret"):
        parts.append('shown as `"***"` by `config show`')
    return "; ".join(parts)


def describe_check(check: Callable[[Any], None]) -> str:
    """What a value rule from :func:`~proxy.configschema.option` allows, in words."""
    qualname = getattr(check, "__qualname__", "")
    if qualname.startswith("between.") and check.__closure__:
        cells = {
            name: cell.cell_contents
            for name, cell in zip(check.__code__.co_freevars, check.__closure__, strict=True)
        }
        return f"{cells['low']} to {cells['high']}"
    name = f"{getattr(check, '__module__', '')}.{qualname}"
    if name in _CHECK_WORDS:
        return _CHECK_WORDS[name]
    doc = inspect.getdoc(check)
    if doc:
        return doc.splitlines()[0].rstrip(".")
    return UNDESCRIBED


# --- writing -----------------------------------------------------------------------------------


def parts() -> list[tuple[str, str, type]]:
    """(title, introduction, root dataclass) of each config file sidestep reads."""
    from proxy.bridge.config import BridgeConfig

    return [
        ("The proxy config", _PROXY_INTRO, Config),
        ("The bridge server config", _BRIDGE_INTRO, BridgeConfig),
    ]


_PROXY_INTRO = (
    "Read by `sidestep run --config FILE` and the other commands that take a config "
    "(`check`, `probe`, `lab --check`, `system-proxy`, `router-rules`)."
)
_BRIDGE_INTRO = (
    "Read by `sidestep bridge --config FILE` on a bridge server (example: `configs/bridge.toml`)."
    " It is a separate file: the proxy config's sections are not allowed in it."
)


def render() -> str:
    """The whole reference as Markdown: every config file, every section, every key."""
    out = [_HEAD.format(command=REFRESH_COMMAND)]
    documents = [(title, intro, sections(root)) for title, intro, root in parts()]
    for title, _, docs in documents:
        out.append(f"- [{title}](#{_anchor(title)})")
        for section in docs:
            out.append(f"  - [`{section.header}`](#{_anchor(section.header)})")
    out.append("")
    for title, intro, docs in documents:
        out.append(f"## {title}\n")
        out.append(f"{intro}\n")
        for section in docs:
            _render_section(section, out)
    return "\n".join(out).rstrip("\n") + "\n"


def _render_section(section: SectionDoc, out: list[str]) -> None:
    out.append(f"### `{section.header}`\n")
    if section.summary:
        out.append(f"{section.summary}\n")
    if section.default and section.default != "*see its section*":
        out.append(f"Default: {section.default}.\n")
    out.append("| key | type | default | allowed values | description |")
    out.append("|---|---|---|---|---|")
    for key in section.keys:
        cells = (f"`{key.name}`", key.type, key.default, key.allowed, key.description)
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    out.append("")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") if text else "-"


def _anchor(header: str) -> str:
    """The anchor GitHub gives a heading (lower case, punctuation dropped, spaces to dashes)."""
    text = re.sub(r"[^\w\- ]", "", header.lower())
    return text.replace(" ", "-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proxy.configdoc",
        description="Render the configuration reference from the config schema.",
    )
    parser.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    parser.add_argument(
        "--check", metavar="FILE", help="exit 1 if FILE differs from what would be written"
    )
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        try:
            current = Path(args.check).read_text(encoding="utf-8")
        except OSError as exc:
            print(f"{args.check}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if current != text:
            print(f"{args.check} is stale; refresh it with: {REFRESH_COMMAND}", file=sys.stderr)
            return 1
        return 0
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
