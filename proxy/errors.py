"""The one exception tree of sidestep.

Everything we raise on purpose derives from :class:`ProxyError`. Protocol errors caused by the
peer carry the reply code the inbound should send back, so an inbound never has to guess how to
translate a failure into SOCKS or HTTP.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error sidestep raises deliberately."""


class ConfigError(ProxyError):
    """A configuration file or value is wrong.

    ``key`` is the dotted key path (``inbound[0].listen``), ``line`` the 1-based line in ``source``
    where that key is written, when it could be found.
    """

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        line: int | None = None,
        source: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.key = key
        self.line = line
        self.source = source

    def __str__(self) -> str:
        where = self.source or "config"
        if self.line is not None:
            where = f"{where}:{self.line}"
        if self.key:
            return f"{where}: {self.key}: {self.message}"
        return f"{where}: {self.message}"


class ProtocolError(ProxyError):
    """Bytes on the wire broke a protocol's rules."""


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol does not allow: a bug on our side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid.

    ``reply_code`` is the protocol's own error code to send back before closing (a SOCKS reply
    code or an HTTP status), or ``None`` when the connection should simply be closed.
    """

    def __init__(self, message: str, *, reply_code: int | None = None) -> None:
        super().__init__(message)
        self.reply_code = reply_code


class UpstreamError(ProxyError):
    """Reaching the destination failed."""


class ConnectRefused(UpstreamError):
    """Every address refused the TCP connection (RST to our SYN)."""


class ConnectTimeout(UpstreamError):
    """No address answered within the connect timeout."""


class Unreachable(UpstreamError):
    """The network or host is unreachable (ICMP error, no route)."""


class ResolveError(UpstreamError):
    """The destination name could not be resolved."""


class NotAllowed(ProxyError):
    """The request is forbidden by our own policy (access list, rule, authentication)."""


class DnsError(ProxyError):
    """A DNS message or exchange failed."""
