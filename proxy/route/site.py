"""What "a site" and "a network" are, for the learned memory and the evidence log.

**Site.** Censors block names, and they almost always block a whole registrable domain
(``example.co.uk`` with every subdomain), so sidestep learns per registrable domain: what worked for
``www.example.com`` is tried first for ``cdn.example.com``. :func:`site_of` computes it from a
compact built-in list of the common multi-label public suffixes (``co.uk``, ``com.br``,
``github.io``, ...) and otherwise takes the last two labels.

This is an approximation of the Public Suffix List (https://publicsuffix.org/). We deliberately do
not download the real list at runtime: fetching it is itself a request a censor can see or block,
a proxy that needs the network to start would fail exactly where it is needed, and a stale or
tampered copy would silently change how memory is keyed. Getting a rare suffix wrong costs little:
two unrelated sites under an unknown multi-label suffix share one memory entry, which at worst
means the first attempt uses the other site's strategy and falls back as usual.

**Network.** A strategy that works at home may be useless on a phone hotspot, so memory is also
keyed by a network identity (:func:`network_id`): a profile name the user configured, or a short
hash of the default route's gateway and interface read from ``/proc/net/route`` (IPv4, preferred
because it is stable) or ``/proc/net/ipv6_route``. The gateway's MAC address would separate two
home networks that both use ``192.168.1.1``, but an ARP entry comes and goes, and an identity that
flips would split the memory in two; a configured profile name is the precise answer.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

# Multi-label public suffixes under which every label is a separate owner. A compact subset of the
# Public Suffix List: the country second levels and hosting platforms users meet most often.
_SUFFIXES = """
    co.uk org.uk ac.uk gov.uk me.uk ltd.uk plc.uk net.uk sch.uk nhs.uk
    com.au net.au org.au edu.au gov.au asn.au id.au
    co.nz org.nz net.nz govt.nz ac.nz
    co.jp ne.jp or.jp ac.jp go.jp ad.jp gr.jp
    co.kr or.kr ne.kr go.kr ac.kr
    com.br net.br org.br gov.br edu.br
    com.cn net.cn org.cn gov.cn edu.cn ac.cn
    com.hk org.hk net.hk edu.hk gov.hk
    com.tw org.tw net.tw edu.tw gov.tw
    co.in net.in org.in firm.in gen.in ind.in ac.in gov.in
    com.tr net.tr org.tr gov.tr edu.tr gen.tr
    co.ir ac.ir gov.ir org.ir net.ir sch.ir id.ir
    com.ua net.ua org.ua gov.ua edu.ua in.ua
    com.by com.kz
    com.mx org.mx gob.mx edu.mx net.mx
    com.ar gob.ar org.ar net.ar
    co.za org.za gov.za ac.za net.za
    com.sg edu.sg gov.sg org.sg net.sg
    com.my org.my gov.my edu.my net.my
    co.id or.id ac.id go.id web.id net.id
    com.vn net.vn org.vn gov.vn edu.vn
    co.th or.th ac.th go.th in.th net.th
    com.pk org.pk net.pk gov.pk edu.pk
    com.eg gov.eg edu.eg org.eg net.eg
    com.sa gov.sa edu.sa org.sa net.sa
    co.il org.il ac.il gov.il
    com.pe com.co com.ve com.ec com.uy com.bd com.ng com.ph com.mm com.sy com.ly
    com.tn com.lb com.qa com.kw com.bh com.om com.jo com.af com.et
    co.ke or.ke
    github.io gitlab.io blogspot.com appspot.com herokuapp.com firebaseapp.com web.app
    netlify.app vercel.app pages.dev workers.dev azurewebsites.net cloudfront.net
    s3.amazonaws.com onrender.com fly.dev glitch.me neocities.org
"""
#: The multi-label public suffixes :func:`site_of` knows.
MULTI_LABEL_SUFFIXES: frozenset[str] = frozenset(_SUFFIXES.split())

_MAX_SUFFIX_LABELS = max(s.count(".") + 1 for s in MULTI_LABEL_SUFFIXES)

#: What :func:`network_id` returns when no network identity can be found.
UNKNOWN_NETWORK = "unknown"


def site_of(host: str) -> str:
    """The registrable domain of ``host`` (``www.bbc.co.uk`` -> ``bbc.co.uk``).

    Names are lower-cased and lose a trailing dot. An IP literal (brackets allowed for IPv6) is its
    own site, in canonical form (``2001:DB8:0::1`` -> ``2001:db8::1``). A name with no registrable
    part (``co.uk``, ``localhost``) gives at most its last two labels. Raises :class:`ValueError` for an
    empty name or one with empty labels.
    """
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    name = text.lower().removesuffix(".")
    labels = name.split(".")
    if not name or any(not label for label in labels):
        raise ValueError(f"not a host name: {host!r}")
    # The longest listed suffix wins; that keeps site_of idempotent.
    for n in range(min(_MAX_SUFFIX_LABELS, len(labels) - 1), 1, -1):
        if ".".join(labels[-n:]) in MULTI_LABEL_SUFFIXES:
            return ".".join(labels[-n - 1 :])
    return ".".join(labels[-2:])


# -- network identity ----------------------------------------------------------------------------

_RTF_UP = 0x0001
_RTF_REJECT = 0x0200


@dataclass(frozen=True, slots=True)
class DefaultRoute:
    """The default route as the kernel reports it."""

    interface: str
    gateway: str
    metric: int


def parse_ipv4_routes(text: str) -> DefaultRoute | None:
    """The default route (lowest metric) from the contents of ``/proc/net/route``.

    Columns: Iface, Destination, Gateway, Flags, RefCnt, Use, Metric, Mask, ...; addresses are
    little-endian hex. Malformed lines are skipped.
    """
    best: DefaultRoute | None = None
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        try:
            dest, gw, flags = int(cols[1], 16), int(cols[2], 16), int(cols[3], 16)
            metric, mask = int(cols[6]), int(cols[7], 16)
        except ValueError:
            continue
        if dest != 0 or mask != 0 or not flags & _RTF_UP or flags & _RTF_REJECT:
            continue
        gateway = str(ipaddress.IPv4Address(gw.to_bytes(4, "little")))
        route = DefaultRoute(cols[0], gateway, metric)
        if best is None or route.metric < best.metric:
            best = route
    return best


def parse_ipv6_routes(text: str) -> DefaultRoute | None:
    """The default route (lowest metric) from the contents of ``/proc/net/ipv6_route``.

    Columns: destination, prefix length, source, source prefix length, next hop, metric, refcnt,
    use, flags, interface; all hex. Loopback and reject routes (the kernel's "unreachable"
    default on ``lo``) are skipped, as are malformed lines.
    """
    best: DefaultRoute | None = None
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 10:
            continue
        try:
            dest, plen = int(cols[0], 16), int(cols[1], 16)
            hop = ipaddress.IPv6Address(bytes.fromhex(cols[4]))
            metric, flags = int(cols[5], 16), int(cols[8], 16)
        except ValueError:
            continue
        iface = cols[9]
        if dest != 0 or plen != 0 or iface == "lo" or not flags & _RTF_UP or flags & _RTF_REJECT:
            continue
        route = DefaultRoute(iface, str(hop), metric)
        if best is None or route.metric < best.metric:
            best = route
    return best


def route_network_id(route: DefaultRoute) -> str:
    """A short stable id for a default route: ``gw-`` and six hex digits of a hash."""
    digest = hashlib.sha256(f"{route.interface}|{route.gateway}".encode()).hexdigest()
    return f"gw-{digest[:6]}"


def network_id(
    profile: str | None = None,
    *,
    ipv4_routes: Path = Path("/proc/net/route"),
    ipv6_routes: Path = Path("/proc/net/ipv6_route"),
) -> str:
    """The identity of the network we are on.

    A configured ``profile`` name wins. Otherwise the IPv4 default route names the network, then
    the IPv6 one; :data:`UNKNOWN_NETWORK` when neither can be read (not Linux, no default route).
    Reads two small files: cheap enough to call when the network may have changed.
    """
    if profile:
        return profile
    for path, parse in ((ipv4_routes, parse_ipv4_routes), (ipv6_routes, parse_ipv6_routes)):
        try:
            text = path.read_text(encoding="ascii", errors="replace")
        except OSError:
            continue
        route = parse(text)
        if route is not None:
            return route_network_id(route)
    return UNKNOWN_NETWORK
