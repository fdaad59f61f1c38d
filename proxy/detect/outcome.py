"""Naming what happened to one attempt.

Every attempt to reach a site through a strategy ends in exactly one :class:`Outcome`. The names
are stable strings: they appear in log lines, in the evidence log and in ``sidestep report``, so
users and scripts can rely on them.
"""

from __future__ import annotations

import enum
import re

import trio

from proxy.errors import (
    ConnectRefused,
    ConnectTimeout,
    NotAllowed,
    ResolveError,
    Unreachable,
    UpstreamError,
)


class Outcome(enum.StrEnum):
    OK = "ok"
    #: the TCP connection (or the upstream proxy's connect) was refused
    CONNECT_REFUSED = "connect-refused"
    #: no answer to the connection attempt in time
    CONNECT_TIMEOUT = "connect-timeout"
    #: no route, or the upstream said the host is unreachable
    UNREACHABLE = "unreachable"
    #: the name could not be resolved
    RESOLVE_ERROR = "resolve-error"
    #: an upstream proxy refused us (authentication, rules)
    NOT_ALLOWED = "not-allowed"
    #: connected, sent the first flight, then the connection was reset
    RESET_AFTER_FIRST_FLIGHT = "reset-after-first-flight"
    #: connected, sent the first flight, then silence
    TIMEOUT_AFTER_FIRST_FLIGHT = "timeout-after-first-flight"
    #: connected, sent the first flight, then the server closed without a byte
    EOF_BEFORE_RESPONSE = "eof-before-response"
    #: a TLS client hello was answered with something other than a ServerHello
    NOT_SERVER_HELLO = "not-server-hello"
    #: a plain-HTTP request was answered like a censor answers: status 451, or a redirect to
    #: another site (checked against the next strategy before it counts, see
    #: :func:`looks_like_blockpage`)
    BLOCKPAGE = "blockpage"
    #: any other failure of the strategy
    ERROR = "error"


def outcome_of_connect_error(exc: BaseException) -> Outcome:
    """The outcome for an error raised while a strategy was opening its path."""
    if isinstance(exc, ConnectRefused):
        return Outcome.CONNECT_REFUSED
    if isinstance(exc, ConnectTimeout | trio.TooSlowError | TimeoutError):
        return Outcome.CONNECT_TIMEOUT
    if isinstance(exc, Unreachable):
        return Outcome.UNREACHABLE
    if isinstance(exc, ResolveError):
        return Outcome.RESOLVE_ERROR
    if isinstance(exc, NotAllowed):
        return Outcome.NOT_ALLOWED
    if isinstance(exc, ConnectionResetError | trio.BrokenResourceError):
        return Outcome.RESET_AFTER_FIRST_FLIGHT
    if isinstance(exc, UpstreamError | OSError):
        return Outcome.ERROR
    return Outcome.ERROR


def judge_first_response(first_flight: bytes, response: bytes, *, tls: bool) -> Outcome:
    """Is ``response`` a plausible first answer to ``first_flight``?

    For TLS the answer must be a handshake record (type 22) whose first message is a
    ServerHello (type 2), or at least the start of one. A TLS alert, an HTTP block page or any
    other bytes mean the path does not reach the real server.
    """
    if not response:
        return Outcome.EOF_BEFORE_RESPONSE
    if not tls:
        return Outcome.BLOCKPAGE if looks_like_blockpage(first_flight, response) else Outcome.OK
    if response[0] != 0x16:
        return Outcome.NOT_SERVER_HELLO
    if len(response) >= 2 and response[1] != 0x03:
        return Outcome.NOT_SERVER_HELLO
    if len(response) >= 6 and response[5] != 0x02:
        return Outcome.NOT_SERVER_HELLO
    return Outcome.OK


_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*\r\n")
_HOST = re.compile(rb"\r\nhost:[ \t]*([^\s:]+)", re.IGNORECASE)
_LOCATION = re.compile(rb"\r\nlocation:[ \t]*(?:https?:)?//([^\s/:?#]+)", re.IGNORECASE)


def looks_like_blockpage(request: bytes, response: bytes) -> bool:
    """Whether a plain-HTTP ``response`` to ``request`` is what censors typically answer.

    Status 451 (RFC 7725), or a redirect whose ``Location`` names another site than the
    request's ``Host`` (TSPU's redirect to the ISP's page). Legitimate sites redirect across
    sites too, so the dispatcher only believes it when another strategy's answer differs.
    Only the head of the response is looked at; an incomplete head is not judged.
    """
    status = _STATUS.match(response)
    if status is None:
        return False
    code = int(status.group(1))
    if code == 451:
        return True
    if code not in (301, 302, 303, 307, 308):
        return False
    host = _HOST.search(request)
    location = _LOCATION.search(response)
    if host is None or location is None:
        return False
    return _site(location.group(1)) != _site(host.group(1))


def _site(host: bytes) -> bytes:
    """The last two labels: enough to tell ``www.example.com`` from ``isp.example``."""
    return b".".join(host.strip().lower().rstrip(b".").split(b".")[-2:])
