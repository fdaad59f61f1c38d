"""What a failed or degraded attempt means: the verdict (DESIGN.md, "Detection").

An :class:`~proxy.detect.outcome.Outcome` says what one attempt saw ("reset after the first
flight"); a :class:`Verdict` says what that means for the site once a *control* has been
consulted, in the spirit of OONI's web connectivity test:

* the same name through another path got a first response (a strategy that worked for this very
  connection): the site is up, so the failure was done to the path;
* the same address answered a ClientHello for an innocuous name (:func:`neutral_hello`): the
  server is up, so what failed was about the name;
* a secure resolver's view of the name shares no address with what the attempt dialled: the
  local DNS lied.

When no control could reach the site, every failure is :attr:`Verdict.SITE_DOWN`: an outage is
not censorship, nothing is learned from it and no strategy changes because of it. The two
in-line verdicts, :attr:`Verdict.FROZEN` and :attr:`Verdict.THROTTLED`, come from the relay's
monitor (:mod:`proxy.net.monitor`) while data flows; their controls are the TLS record framing
and the throughput the same path achieved for other sites.

The values are stable strings: they appear in the connection log line, in the evidence log, in
the learned memory and in ``sidestep report``. No I/O here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from proxy.detect.outcome import Outcome
from proxy.protocols.tls_hello import build_client_hello


class Verdict(enum.StrEnum):
    #: the attempt got through
    OK = "ok"
    #: the local resolver's answer shares nothing with a secure resolver's, or it failed to
    #: resolve a name another path reached
    DNS_TAMPERING = "dns-tampering"
    #: no TCP connection to the address while the site is reachable another way
    IP_BLOCKED = "ip-blocked"
    #: reset or closed right after the ClientHello (or the Host header, for plain HTTP) while
    #: the server is up
    SNI_RESET = "sni-reset"
    #: silence after the ClientHello while the server is up
    SNI_TIMEOUT = "sni-timeout"
    #: data flows far below what the same path achieved for other sites
    THROTTLED = "throttled"
    #: the server's data stopped mid-record after 14-22 KB, the connection still open
    FROZEN = "frozen"
    #: an answer that is not the site's: an HTTP block page or redirect, or HTTP where a TLS
    #: ServerHello should be
    BLOCKPAGE = "blockpage"
    #: no control reached the site either: it is down for everyone, nothing is learned
    SITE_DOWN = "site-down"
    #: the strategy itself failed (its proxy refused us, it errored): nothing about the site
    PATH_FAILED = "path-failed"


#: verdicts that name censorship (what ``sidestep report`` counts as blocked)
CENSORSHIP: frozenset[Verdict] = frozenset(
    {
        Verdict.DNS_TAMPERING,
        Verdict.IP_BLOCKED,
        Verdict.SNI_RESET,
        Verdict.SNI_TIMEOUT,
        Verdict.THROTTLED,
        Verdict.FROZEN,
        Verdict.BLOCKPAGE,
    }
)

#: the innocuous name of :func:`neutral_hello`
NEUTRAL_NAME = "www.example.com"

_CONNECT = frozenset({Outcome.CONNECT_REFUSED, Outcome.CONNECT_TIMEOUT, Outcome.UNREACHABLE})
_RESET = frozenset({Outcome.RESET_AFTER_FIRST_FLIGHT, Outcome.EOF_BEFORE_RESPONSE})


@dataclass(frozen=True, slots=True)
class Controls:
    """What the controls of one connection found (``None``: that control was not run)."""

    #: another strategy got a first response from the site during this connection
    site_reached: bool = False
    #: the address answered a ClientHello for :data:`NEUTRAL_NAME` (or accepted a TCP
    #: connection, for plain HTTP)
    address_answers: bool | None = None
    #: a secure resolver's view shares no address with the local answer
    dns_mismatch: bool = False


def classify(outcome: Outcome, controls: Controls, *, resolved_locally: bool = True) -> Verdict:
    """The verdict for one failed attempt, given what the controls found.

    ``resolved_locally``: the attempt dialled addresses from the local resolver (not a
    strategy that resolves names itself), so a DNS lie could explain its failure.
    """
    if outcome is Outcome.OK:
        return Verdict.OK
    up = controls.site_reached or bool(controls.address_answers)
    if resolved_locally and controls.dns_mismatch and outcome is not Outcome.NOT_ALLOWED:
        return Verdict.DNS_TAMPERING
    if outcome is Outcome.RESOLVE_ERROR:
        # the name did not resolve here, yet another path reached the site
        return Verdict.DNS_TAMPERING if controls.site_reached else Verdict.SITE_DOWN
    if outcome in (Outcome.NOT_ALLOWED, Outcome.ERROR):
        return Verdict.PATH_FAILED
    if not up:
        return Verdict.SITE_DOWN
    if outcome in _CONNECT:
        # the address may answer a neutral hello (it accepts connections) only when the block
        # is on the name: a refused connection with the site up elsewhere is the address
        return Verdict.IP_BLOCKED
    if outcome in _RESET:
        return Verdict.SNI_RESET
    if outcome is Outcome.TIMEOUT_AFTER_FIRST_FLIGHT:
        return Verdict.SNI_TIMEOUT
    if outcome in (Outcome.NOT_SERVER_HELLO, Outcome.BLOCKPAGE):
        return Verdict.BLOCKPAGE
    return Verdict.PATH_FAILED


def needs_address_control(outcome: Outcome) -> bool:
    """Whether the neutral-name control to the same address could change ``outcome``'s verdict
    (it tells a server that is up from one that is down)."""
    return outcome in _RESET or outcome in (
        Outcome.TIMEOUT_AFTER_FIRST_FLIGHT,
        Outcome.NOT_SERVER_HELLO,
        Outcome.BLOCKPAGE,
    )


def neutral_hello(name: str = NEUTRAL_NAME) -> bytes:
    """A ClientHello for an innocuous name: sent to a blocked site's address, an answer proves
    the address is reachable and the server alive."""
    return build_client_hello(name, ("http/1.1",))
