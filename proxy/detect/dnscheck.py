"""Checks that tell a lying or blocked resolver from an honest one.

Each check is a function returning :class:`Verdict` s: which check, about what, a status, and
the evidence in words. Statuses:

``ok``            nothing wrong was seen
``tampered``      plaintext DNS lies here (switch to secure DNS)
``blocked``       a secure endpoint cannot be reached (skip it)
``suspect``       a sign worth a closer look, not proof on its own (it triggers the comparisons)
``inconclusive``  the check could not decide (no answer to compare, no certificate to test)

A mere difference between two resolvers is *not* tampering: CDNs hand out different addresses
per resolver location, and shared CDN addresses serve many unrelated names. The comparison
(:func:`compare_answers`) therefore settles disagreements with TLS: an address that completes a
handshake whose certificate is valid for the name is a true address of that name, whichever
resolver gave it. Plain DNS is called lying only when its answer is bogus (a private, reserved
or known block-page address), a random name resolves (NXDOMAIN hijack), a query to an address
with no resolver is answered (injection), one query gets two different answers, or its answer
fails TLS where the secure answer passes. The same test guards the secure side: a secure answer
that is bogus is reported against the secure resolver.

Plaintext probes here use their own UDP code (:func:`udp_exchange`): a fresh socket per query,
and the socket is kept open a little after the first answer so a second, different one is seen.
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import ssl
import string
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import trio

from proxy.errors import ResolveError, UpstreamError
from proxy.inbound.base import IPAddress
from proxy.net.dial import format_address, open_tcp
from proxy.resolve.chain import EndpointKey
from proxy.route.site import site_of

Status = Literal["ok", "tampered", "blocked", "suspect", "inconclusive"]
Server = tuple[str, int]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: block-page and poison addresses seen in the wild (OONI's DNS fingerprints list): Iran's
#: 10.10.34.34-36 and Turkey's 195.175.254.2. Private ones are caught as bogons anyway.
KNOWN_BLOCKPAGES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a) for a in ("10.10.34.34", "10.10.34.35", "10.10.34.36", "195.175.254.2")
)
#: how long a probe keeps listening after the first answer, for a second one
DEFAULT_LINGER = 0.3
_LABEL_CHARS = string.ascii_lowercase + string.digits


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of one check."""

    #: "bogus-answer", "shared-address", "compare", "nxdomain-hijack", "injection",
    #: "two-answers", "0x20", "endpoint", "secure-answer"
    check: str
    #: what it is about: a resolver ("udp 192.0.2.53:53"), an endpoint, a name
    subject: str
    status: Status
    evidence: tuple[str, ...] = ()
    #: the name the check concerned, when there is one
    name: str = ""

    @property
    def bad(self) -> bool:
        """Tampering or blocking was found."""
        return self.status in ("tampered", "blocked")

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "subject": self.subject,
            "status": self.status,
            "name": self.name,
            "evidence": list(self.evidence),
        }

    def line(self) -> str:
        about = f" ({self.name})" if self.name and self.name not in self.subject else ""
        why = f": {'; '.join(self.evidence)}" if self.evidence else ""
        return f"{self.status:<12} {self.check:<15} {self.subject}{about}{why}"


def server_text(server: Server) -> str:
    return f"udp {format_address(ipaddress.ip_address(server[0]), server[1])}"


# --- answers on their own ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnswerPolicy:
    """What counts as a bogus answer: any non-public address outside ``local_networks`` (a
    LAN's own names, the censor lab) and every known block-page address."""

    local_networks: tuple[IPNetwork, ...] = ()
    blockpages: frozenset[IPAddress] = KNOWN_BLOCKPAGES

    def why_bogus(self, address: IPAddress) -> str | None:
        """Why ``address`` cannot be a true public answer, or None."""
        if address in self.blockpages:
            return "a known block-page address"
        if any(address in net for net in self.local_networks):
            return None
        if address.is_unspecified:
            return "the unspecified address"
        if address.is_loopback:
            return "a loopback address"
        if address.is_private or address.is_link_local or address.is_reserved:
            return "a private or reserved address"
        if address.is_multicast or not address.is_global:
            return "not a public address"
        return None


def check_bogus(
    subject: str, name: str, addresses: Sequence[IPAddress], policy: AnswerPolicy
) -> Verdict:
    """(b) An answer holding bogon, private or block-page addresses."""
    found = [f"{a} is {why}" for a in addresses if (why := policy.why_bogus(a)) is not None]
    if found:
        return Verdict("bogus-answer", subject, "tampered", tuple(found), name)
    return Verdict("bogus-answer", subject, "ok", (), name)


def check_shared_address(
    subject: str, answers: Mapping[str, Sequence[IPAddress]], threshold: int = 3
) -> list[Verdict]:
    """(b) One address given as the *only* answer for ``threshold`` or more unrelated sites.

    Only ``suspect``: big CDNs serve many sites from one anycast address. It earns the names a
    comparison with secure DNS, which decides.
    """
    sites: dict[IPAddress, set[str]] = {}
    for name, addresses in answers.items():
        if len(set(addresses)) == 1:
            try:
                sites.setdefault(addresses[0], set()).add(site_of(name))
            except ValueError:
                continue
    out = []
    for address, named in sorted(sites.items(), key=lambda kv: str(kv[0])):
        if len(named) >= threshold:
            shown = ", ".join(sorted(named)[:6])
            out.append(
                Verdict(
                    "shared-address",
                    subject,
                    "suspect",
                    (f"{address} is the only answer for {len(named)} unrelated sites ({shown})",),
                )
            )
    return out


# --- plaintext probes -------------------------------------------------------------------------


def make_query(name: str | dns.name.Name, rdtype: int | str = "A") -> dns.message.Message:
    """A recursive query with a random ID and EDNS(0)."""
    query = dns.message.make_query(name, rdtype, use_edns=0, payload=1232)
    query.id = secrets.randbelow(1 << 16)
    return query


async def udp_exchange(
    query: dns.message.Message,
    server: Server,
    *,
    timeout: float,
    linger: float = 0.0,
    ignore_refused: bool = False,
) -> list[dns.message.Message]:
    """Every answer to ``query`` from ``server`` within ``timeout``, listening ``linger`` more
    seconds after the first one. A fresh socket (random port), answers matched by source, ID
    and question; garbage is ignored. Empty when nothing answered; OSError when unsendable or
    refused (an ICMP "port unreachable"), unless ``ignore_refused``: an on-path injector may
    still answer after the real host said nobody listens."""
    family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
    answers: list[dns.message.Message] = []
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        await sock.connect(server)
        await sock.send(query.to_wire())
        with trio.move_on_after(timeout) as scope:
            while True:
                try:
                    data = await sock.recv(65535)
                except ConnectionRefusedError:
                    if not ignore_refused:
                        raise
                    continue
                try:
                    response = dns.message.from_wire(data)
                except dns.exception.DNSException:
                    continue
                if not query.is_response(response):
                    continue
                answers.append(response)
                if len(answers) == 1:
                    scope.deadline = min(scope.deadline, trio.current_time() + linger)
    return answers


def addresses_of(response: dns.message.Message) -> list[IPAddress]:
    """Every A/AAAA address in the answer section."""
    out: list[IPAddress] = []
    for rrset in response.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            out.extend(ipaddress.ip_address(r.address) for r in rrset)
    return out


def random_name(suffix: str) -> str:
    """A name nobody registered: 20 random letters and digits under ``suffix``."""
    label = "".join(secrets.choice(_LABEL_CHARS) for _ in range(20))
    return f"{label}.{suffix.strip('.')}"


def randomize_case(name: str) -> str:
    """``name`` with each letter's case chosen at random (DNS 0x20)."""
    return "".join(c.upper() if c.isalpha() and secrets.randbits(1) else c.lower() for c in name)


async def check_nxdomain_hijack(
    server: Server, suffix: str, *, timeout: float, tries: int = 2
) -> Verdict:
    """(c) Random names under ``suffix`` must not resolve."""
    subject = server_text(server)
    evidence = []
    answered = 0
    for _ in range(tries):
        name = random_name(suffix)
        try:
            answers = await udp_exchange(make_query(name), server, timeout=timeout)
        except OSError as exc:
            return Verdict("nxdomain-hijack", subject, "inconclusive", (f"cannot send: {exc}",))
        if not answers:
            continue
        answered += 1
        addresses = addresses_of(answers[0])
        if addresses:
            shown = ", ".join(map(str, addresses))
            evidence.append(f"the random name {name} resolved to {shown}")
    if evidence:
        return Verdict("nxdomain-hijack", subject, "tampered", tuple(evidence))
    if not answered:
        return Verdict("nxdomain-hijack", subject, "inconclusive", ("no answer to random names",))
    return Verdict("nxdomain-hijack", subject, "ok", ("random names do not resolve",))


async def check_silent_address(
    silent: Server, names: Sequence[str], control_suffix: str, *, timeout: float
) -> Verdict:
    """(d) Queries to an address where no resolver listens must go unanswered.

    An answer for the test names only means the path injects them; when a random control
    name is answered too, all port-53 traffic is intercepted (suspect, not selective lying).
    """
    subject = f"path to {format_address(ipaddress.ip_address(silent[0]), silent[1])}"
    if not names:
        return Verdict("injection", subject, "inconclusive", ("no canary names configured",))

    async def answered(name: str) -> list[IPAddress] | None:
        try:
            got = await udp_exchange(make_query(name), silent, timeout=timeout, ignore_refused=True)
        except OSError:
            return None
        return addresses_of(got[0]) if got else None

    results: dict[str, list[IPAddress] | None] = {}

    async def ask(name: str) -> None:
        results[name] = await answered(name)

    control = random_name(control_suffix)
    async with trio.open_nursery() as nursery:
        for name in (*names, control):
            nursery.start_soon(ask, name)
    hits = [
        f"{n} was answered ({', '.join(map(str, a)) or 'no address'})"
        for n in names
        if (a := results.get(n)) is not None
    ]
    if results.get(control) is not None:
        return Verdict(
            "injection",
            subject,
            "suspect",
            (*hits, f"the control {control} was answered too: all DNS is intercepted"),
        )
    if hits:
        return Verdict("injection", subject, "tampered", tuple(hits))
    return Verdict("injection", subject, "ok", ("no answer, as expected",))


async def check_two_answers(
    server: Server, name: str, *, timeout: float, linger: float = DEFAULT_LINGER
) -> tuple[Verdict, list[list[IPAddress]]]:
    """(d) One query, two different answers: the first was forged on the path. Also returns
    the address sets seen (first first) for the caller's other checks."""
    subject = server_text(server)
    try:
        answers = await udp_exchange(make_query(name), server, timeout=timeout, linger=linger)
    except OSError as exc:
        return Verdict("two-answers", subject, "inconclusive", (f"cannot send: {exc}",), name), []
    seen = [addresses_of(a) for a in answers]
    distinct = list(dict.fromkeys(tuple(sorted(map(str, s))) for s in seen))
    if len(distinct) > 1:
        shown = " then ".join("[" + ", ".join(d) + "]" for d in distinct)
        evidence = (f"{len(answers)} answers to one query: {shown}",)
        return Verdict("two-answers", subject, "tampered", evidence, name), seen
    if not answers:
        return Verdict("two-answers", subject, "inconclusive", ("no answer",), name), seen
    return Verdict("two-answers", subject, "ok", (), name), seen


async def check_case(server: Server, name: str, *, timeout: float) -> Verdict:
    """(e) DNS 0x20: the answer must repeat the question's letter case exactly.

    A mismatch means something other than the resolver wrote the answer (or a resolver that
    normalizes case): suspect, as on its own it cannot say which.
    """
    subject = server_text(server)
    asked = randomize_case(name.rstrip(".")) + "."
    try:
        answers = await udp_exchange(make_query(asked), server, timeout=timeout)
    except OSError as exc:
        return Verdict("0x20", subject, "inconclusive", (f"cannot send: {exc}",), name)
    if not answers:
        return Verdict("0x20", subject, "inconclusive", ("no answer",), name)
    got = [a.question[0].name.to_text() for a in answers if a.question]
    wrong = [g for g in got if g != asked]
    if wrong:
        evidence = (f"asked {asked}, the answer says {wrong[0]}",)
        return Verdict("0x20", subject, "suspect", evidence, name)
    return Verdict("0x20", subject, "ok", (), name)


# --- TLS: who tells the truth, and is the endpoint reachable ----------------------------------


async def tls_handshake(
    address: IPAddress, port: int, server_name: str, context: ssl.SSLContext, *, timeout: float
) -> str | None:
    """None when a TLS handshake with ``server_name`` at ``address`` succeeds (the certificate
    checked by ``context``); otherwise why not, prefixed "connect:" or "tls:"."""
    try:
        tcp = await open_tcp([address], port, timeout=timeout)
    except UpstreamError as exc:
        return f"connect: {exc}"
    stream = trio.SSLStream(tcp, context, server_hostname=server_name or None)
    try:
        with trio.move_on_after(timeout) as scope:
            await stream.do_handshake()
        if scope.cancelled_caught:
            return "tls: no answer to the ClientHello"
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        return f"tls: {exc.__cause__ or exc}"
    finally:
        await trio.aclose_forcefully(stream)


Verifier = Callable[[str, Sequence[IPAddress]], Awaitable[list[IPAddress]]]


def tls_verifier(context: ssl.SSLContext, port: int = 443, *, timeout: float = 3.0) -> Verifier:
    """A function giving the addresses among those given that prove themselves for a name
    (a handshake whose certificate is valid for it)."""

    async def verify(name: str, addresses: Sequence[IPAddress]) -> list[IPAddress]:
        good: list[IPAddress] = []

        async def one(address: IPAddress) -> None:
            if await tls_handshake(address, port, name, context, timeout=timeout) is None:
                good.append(address)

        async with trio.open_nursery() as nursery:
            for address in list(dict.fromkeys(addresses))[:4]:
                nursery.start_soon(one, address)
        return good

    return verify


async def compare_answers(
    subject: str,
    name: str,
    plain: Sequence[IPAddress] | str,
    secure: Sequence[IPAddress] | str,
    verify: Verifier,
    policy: AnswerPolicy,
) -> Verdict:
    """(a) The plain answer against the secure one. Each side is addresses or an error text.

    Overlap: ok. A bogus plain answer: tampered. Otherwise disagreement is settled by TLS: a
    plain address that proves itself makes the difference a CDN's (ok); a plain answer that
    fails while a secure address proves itself is a lie (tampered).
    """
    if isinstance(plain, list | tuple) and plain:
        bogus = check_bogus(subject, name, plain, policy)
        if bogus.bad:
            return Verdict("compare", subject, "tampered", bogus.evidence, name)
    if isinstance(secure, str):
        return Verdict("compare", subject, "inconclusive", (f"secure DNS: {secure}",), name)
    if isinstance(secure, list | tuple) and any(policy.why_bogus(a) for a in secure):
        return Verdict(
            "compare", subject, "inconclusive", ("the secure answer is bogus too",), name
        )
    shown_secure = ", ".join(map(str, secure)) or "no address"
    if isinstance(plain, str):
        if not secure:
            return Verdict("compare", subject, "ok", (f"both fail: {plain}",), name)
        if await verify(name, secure):
            evidence = (
                f"plain DNS said {plain}; secure DNS gave {shown_secure}, which passed TLS",
            )
            return Verdict("compare", subject, "tampered", evidence, name)
        evidence = (f"plain DNS said {plain}; secure DNS gave {shown_secure}, unproven",)
        return Verdict("compare", subject, "inconclusive", evidence, name)
    if set(plain) & set(secure) or (not plain and not secure):
        return Verdict("compare", subject, "ok", (), name)
    shown_plain = ", ".join(map(str, plain)) or "no address"
    if plain and await verify(name, plain):
        evidence = (f"answers differ ({shown_plain} / {shown_secure}) but the plain one passed "
                    "TLS: a CDN, not a lie",)  # fmt: skip
        return Verdict("compare", subject, "ok", evidence, name)
    if secure and await verify(name, secure):
        evidence = (f"plain DNS gave {shown_plain}, which failed TLS for the name; secure DNS "
                    f"gave {shown_secure}, which passed",)  # fmt: skip
        return Verdict("compare", subject, "tampered", evidence, name)
    evidence = (f"answers differ ({shown_plain} / {shown_secure}); neither passed TLS",)
    return Verdict("compare", subject, "inconclusive", evidence, name)


def check_secure_answer(
    subject: str, name: str, addresses: Sequence[IPAddress], policy: AnswerPolicy
) -> Verdict:
    """A secure answer holding bogus addresses: the secure resolver is polluted (or filters)."""
    bogus = check_bogus(subject, name, addresses, policy)
    return Verdict("secure-answer", subject, bogus.status, bogus.evidence, name)


EndpointState = Literal["working", "ip-blocked", "sni-blocked", "tls-error"]


async def probe_endpoint(
    key: EndpointKey, label: str, context: ssl.SSLContext, *, timeout: float
) -> Verdict:
    """(f) Can a secure endpoint be reached at this address? ``ip-blocked``: the TCP connect
    fails; ``sni-blocked``: it connects but the handshake is reset or ignored after the
    ClientHello; ``tls-error``: the handshake completes with a wrong certificate (a middlebox
    impersonating it); ``working``."""
    address = ipaddress.ip_address(key.address)
    why = await tls_handshake(address, key.port, key.sni, context, timeout=timeout)
    subject = f"{label} ({key})"
    name = key.sni or key.address
    if why is None:
        return Verdict("endpoint", subject, "ok", ("working",), name)
    if why.startswith("connect:"):
        return Verdict("endpoint", subject, "blocked", (f"ip-blocked: {why[9:]}",), name)
    text = why[5:]
    if "CERTIFICATE" in text.upper():
        return Verdict("endpoint", subject, "blocked", (f"tls-error: {text}",), name)
    return Verdict("endpoint", subject, "blocked", (f"sni-blocked: {text}",), name)


def endpoint_state(verdict: Verdict) -> EndpointState:
    """The short state a :func:`probe_endpoint` verdict carries."""
    if verdict.status == "ok":
        return "working"
    head = verdict.evidence[0].split(":", 1)[0] if verdict.evidence else "tls-error"
    return head if head in ("ip-blocked", "sni-blocked") else "tls-error"  # type: ignore[return-value]


# --- plain answers for the comparison ---------------------------------------------------------


async def plain_addresses(
    server: Server, name: str, *, timeout: float
) -> tuple[list[IPAddress] | str, list[list[IPAddress]]]:
    """The A answer of ``server`` for ``name`` (or why none), and every address set seen."""
    try:
        answers = await udp_exchange(
            make_query(name), server, timeout=timeout, linger=DEFAULT_LINGER
        )
    except OSError as exc:
        return f"cannot ask: {exc}", []
    if not answers:
        return f"no answer within {timeout:g} s", []
    seen = [addresses_of(a) for a in answers]
    first = answers[0]
    if first.rcode() != dns.rcode.NOERROR:
        return dns.rcode.to_text(first.rcode()), seen
    return seen[0], seen


async def secure_addresses(
    query: Callable[[str, int], Awaitable[dns.message.Message]], name: str
) -> list[IPAddress] | str:
    """The secure A answer for ``name`` through ``query`` (or why none)."""
    try:
        response = await query(name, dns.rdatatype.A)
    except ResolveError as exc:
        return str(exc)
    if response.rcode() != dns.rcode.NOERROR:
        return dns.rcode.to_text(response.rcode())
    return addresses_of(response)


def networks(texts: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t, strict=False) for t in texts)
