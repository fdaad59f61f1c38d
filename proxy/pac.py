"""Proxy auto-config (PAC) files generated from the router's rules.

A browser pointed at ``http://127.0.0.1:1080/proxy.pac`` asks the script for every URL whether
to go through sidestep or directly. The script mirrors the router: rules are tested in config
order and the first match wins; a rule (or the default policy) whose policy is plain ``direct``
answers ``DIRECT``, every other one answers with sidestep's own address. So censored lists go
through sidestep, and the rest skips it when the user's config sends the rest direct anyway.

What the script can and cannot see, compared with the router:

* Names are compared the router's way (lower case, no trailing dot, punycode as browsers give
  it). Domain criteria match names only and CIDR criteria IP literals only, as in the router.
  The script never calls ``dnsResolve`` or ``isInNet`` on a name: that would make the browser
  send a plaintext DNS query for every URL, the very leak sidestep exists to avoid.
* Ports come from the URL (scheme default when absent).
* A rule limited to other inbounds never matches here; one naming this inbound matches as if
  unconstrained.
* Regular expressions are Python's; the common subset is the same in JavaScript, ``(?P<n>`` and
  ``(?P=n)`` are translated, and a regex JavaScript rejects is skipped (the script still runs).

There is no ``DIRECT`` fallback after sidestep's address: when sidestep is not running, a
censored site fails instead of being fetched in the open. The script is plain ES5 (PAC engines
include old ones) and carries no external references.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Collection

from proxy.route.rules import CIDR, DOMAIN, KEYWORD, REGEX, SUFFIX, RuleSet, RuleView

__all__ = ["PAC_CONTENT_TYPE", "PacScript", "proxy_directive"]

PAC_CONTENT_TYPE = "application/x-ns-proxy-autoconfig"

# Helpers shared by every generated script. ES5 only: no let/const, arrows or endsWith.
_PRELUDE = r"""
var sidestepHas = Object.prototype.hasOwnProperty;
function sidestepName(host) {
    host = String(host).toLowerCase();
    if (host.charAt(0) == "[") host = host.substring(1, host.length - 1);
    if (host.charAt(host.length - 1) == ".") host = host.substring(0, host.length - 1);
    return host;
}
function sidestepPort(url) {
    var m = /^([a-z][a-z0-9+.\-]*):\/\/(?:[^\/?#@]*@)?(\[[^\]]*\]|[^\/:?#]*)(?::(\d+))?/i.exec(url);
    if (!m) return 0;
    if (m[3]) return parseInt(m[3], 10);
    var s = m[1].toLowerCase();
    return (s == "https" || s == "wss") ? 443 : (s == "ftp" ? 21 : 80);
}
function sidestepV4(host) {
    var p = host.split(".");
    if (p.length != 4) return null;
    var n = [];
    for (var i = 0; i < 4; i++) {
        if (!/^\d{1,3}$/.test(p[i]) || parseInt(p[i], 10) > 255) return null;
        n.push(parseInt(p[i], 10));
    }
    return n;
}
function sidestepV6(host) {
    if (host.indexOf(":") < 0) return null;
    var m = /^(.*:)(\d+\.\d+\.\d+\.\d+)$/.exec(host);
    if (m) {
        var q = sidestepV4(m[2]);
        if (!q) return null;
        host = m[1] + (q[0] * 256 + q[1]).toString(16) + ":" + (q[2] * 256 + q[3]).toString(16);
    }
    var halves = host.split("::");
    if (halves.length > 2) return null;
    var left = halves[0] ? halves[0].split(":") : [];
    var right = halves.length == 2 && halves[1] ? halves[1].split(":") : [];
    var missing = 8 - left.length - right.length;
    if (halves.length == 1 ? missing != 0 : missing < 1) return null;
    var words = left.slice(), i;
    for (i = 0; halves.length == 2 && i < missing; i++) words.push("0");
    words = words.concat(right);
    var bytes = [];
    for (i = 0; i < 8; i++) {
        if (!/^[0-9a-f]{1,4}$/.test(words[i])) return null;
        var w = parseInt(words[i], 16);
        bytes.push(w >> 8, w & 255);
    }
    for (i = 0; i < 10 && bytes[i] == 0; i++) {}
    if (i == 10 && bytes[10] == 255 && bytes[11] == 255) return bytes.slice(12);
    return bytes;
}
function sidestepInNets(bytes, nets) {
    for (var i = 0; i < nets.length; i++) {
        var net = nets[i][0], bits = nets[i][1], ok = net.length == bytes.length;
        for (var b = 0; ok && bits > 0; b++, bits -= 8) {
            var mask = bits >= 8 ? 255 : (255 << (8 - bits)) & 255;
            if ((bytes[b] & mask) != net[b]) ok = false;
        }
        if (ok) return true;
    }
    return false;
}
function sidestepSuffix(map, host) {
    while (true) {
        if (sidestepHas.call(map, host)) return true;
        var dot = host.indexOf(".");
        if (dot < 0) return false;
        host = host.substring(dot + 1);
    }
}
function sidestepRegexes(patterns) {
    var out = [];
    for (var i = 0; i < patterns.length; i++) {
        try { out.push(new RegExp(patterns[i])); } catch (e) {}
    }
    return out;
}
function sidestepAnyRegex(list, host) {
    for (var i = 0; i < list.length; i++) if (list[i].test(host)) return true;
    return false;
}
function sidestepAnyKeyword(list, host) {
    for (var i = 0; i < list.length; i++) if (host.indexOf(list[i]) >= 0) return true;
    return false;
}
"""


def _js(value: object) -> str:
    """A JavaScript literal for JSON-compatible ``value`` (safe inside a script)."""
    return json.dumps(value, ensure_ascii=True).replace("</", "<\\/")


def _js_regex(pattern: str) -> str:
    """Python regex syntax -> JavaScript's, for the constructs that differ in spelling."""
    pattern = re.sub(r"\(\?P<", "(?<", pattern)
    pattern = re.sub(r"\(\?P=(\w+)\)", r"\\k<\1>", pattern)
    return pattern.replace("\\A", "^").replace("\\Z", "$")


def proxy_directive(protocol: str, address: str) -> str:
    """What the script answers for traffic that should go through sidestep at ``address``."""
    if protocol == "socks5":
        return f"SOCKS5 {address}"
    if protocol == "socks4":
        return f"SOCKS {address}"
    return f"PROXY {address}"  # mixed and http: names reach us inside CONNECT, never resolved


class PacScript:
    """The PAC script for one inbound; the body is built once, the address filled per request."""

    def __init__(self, rules: RuleSet, direct_policies: Collection[str], inbound: str) -> None:
        self.inbound = inbound
        self._direct = frozenset(direct_policies)
        self._body = self._build(rules.views(), rules.default_policy)

    def render(self, proxy: str) -> bytes:
        """The script, sending proxied traffic to ``proxy`` (a PAC directive such as
        ``"PROXY 127.0.0.1:1080"``, see :func:`proxy_directive`)."""
        header = (
            "// sidestep proxy auto-config, generated from the router's rules.\n"
            f"var sidestepProxy = {_js(proxy)};\n"
        )
        return (header + self._body).encode("ascii")

    def _answer(self, policy: str) -> str:
        return '"DIRECT"' if policy in self._direct else "sidestepProxy"

    def _build(self, views: tuple[RuleView, ...], default_policy: str) -> str:
        tables: list[str] = []
        checks: list[str] = []
        for i, view in enumerate(views):
            if view.inbounds is not None and self.inbound not in view.inbounds:
                continue
            condition = self._condition(i, view, tables)
            if condition is None:
                continue
            label = f" // rule {i}" + (f" ({view.name})" if view.name else "")
            checks.append(
                f"    if ({condition}) return {self._answer(view.policy)};{label.rstrip()}"
            )
        lines = [
            _PRELUDE,
            *tables,
            "function FindProxyForURL(url, host) {",
            "    host = sidestepName(host);",
            "    var port = sidestepPort(url);",
            "    var ip = sidestepV4(host) || sidestepV6(host);",
            "    var name = ip ? null : host;",
            *checks,
            f"    return {self._answer(default_policy)};",
            "}",
            "",
        ]
        return "\n".join(lines)

    def _condition(self, i: int, view: RuleView, tables: list[str]) -> str | None:
        exact = sorted({str(v) for k, v in view.entries if k == DOMAIN})
        suffixes = sorted({str(v) for k, v in view.entries if k == SUFFIX})
        keywords = sorted({str(v) for k, v in view.entries if k == KEYWORD})
        regexes = [_js_regex(str(v)) for k, v in view.entries if k == REGEX]
        nets = [v for k, v in view.entries if k == CIDR]
        alternatives = []
        if exact:
            tables.append(f"var sidestepExact{i} = {_js(dict.fromkeys(exact, 1))};")
            alternatives.append(f"(name && sidestepHas.call(sidestepExact{i}, name))")
        if suffixes:
            tables.append(f"var sidestepSuffix{i} = {_js(dict.fromkeys(suffixes, 1))};")
            alternatives.append(f"(name && sidestepSuffix(sidestepSuffix{i}, name))")
        if keywords:
            tables.append(f"var sidestepKeywords{i} = {_js(keywords)};")
            alternatives.append(f"(name && sidestepAnyKeyword(sidestepKeywords{i}, name))")
        if regexes:
            tables.append(f"var sidestepRegex{i} = sidestepRegexes({_js(regexes)});")
            alternatives.append(f"(name && sidestepAnyRegex(sidestepRegex{i}, name))")
        if nets:
            encoded = [[list(n.network_address.packed), n.prefixlen] for n in nets]
            tables.append(f"var sidestepNets{i} = {_js(encoded)};")
            alternatives.append(f"(ip && sidestepInNets(ip, sidestepNets{i}))")
        has_destination = bool(view.entries) or bool(alternatives)
        if not alternatives and has_destination:
            return None
        parts = []
        if alternatives:
            parts.append("(" + " || ".join(alternatives) + ")")
        if view.ports is not None:
            ranges = " || ".join(
                f"port == {lo}" if lo == hi else f"(port >= {lo} && port <= {hi})"
                for lo, hi in view.ports
            )
            parts.append(f"({ranges})")
        if not parts:
            # a rule constrained only by inbound, and this is that inbound: always matches
            return "true"
        return " && ".join(parts)


def parse_host_header(value: str | None) -> str | None:
    """``host:port`` from a request's Host header when it is a sane address, else None."""
    if not value:
        return None
    host, sep, port = value.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) <= 65535:
        return None
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", bare):
            return None
        return f"{bare}:{port}"
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
