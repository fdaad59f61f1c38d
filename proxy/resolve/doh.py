"""DNS over HTTPS (RFC 8484) on one pooled HTTP/2 connection per endpoint.

A :class:`DohResolver` is one endpoint: a URL plus the *bootstrap* IPs of its host, so the
resolver's own name is never looked up in plaintext (a censor reading port 53 would otherwise
see, and could block, the move to encryption). What it does on the wire:

* one TLS connection (ALPN ``h2``), dialled with Happy Eyeballs over the bootstrap IPs in order
  and shared by every query: A and AAAA go out together as two streams;
* the certificate is checked against the CA bundle given (or the system store), and against an
  SPKI pin (``pin_sha256``, RFC 7469 style: base64 of the SHA-256 of the SubjectPublicKeyInfo)
  when one is set; a pin alone (no CA named) authenticates a self-signed private resolver;
* queries use ID 0 (RFC 8484 4.1) and EDNS(0) padding to a multiple of 128 octets (RFC 8467
  block-length padding, RFC 7830 option), sent by POST (default) or GET (base64url without
  padding), ``application/dns-message`` both ways, no User-Agent or cookies;
* an answer counts only with status 200, the right content type, and a question that matches
  ours; anything else is a :class:`~proxy.errors.ResolveError`;
* a lost connection (GOAWAY, reset, server gone) is replaced lazily by the next query, and a
  query that was caught by one is sent once more (DNS queries are idempotent).

The TLS helpers here (:func:`secure_context`, :func:`open_secure_stream`) and the A+AAAA fan-out
(:func:`resolve_both`) are shared with the DoT resolver.

Use it as an async context manager, which owns the connection's reader task::

    async with DohResolver("https://dns.example/dns-query", ["192.0.2.53"]) as doh:
        addresses = await doh.resolve("example.org")
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Self

import dns.edns
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import trio

from proxy.errors import ResolveError, UpstreamError
from proxy.inbound.base import IPAddress
from proxy.net.dial import format_address, open_tcp
from proxy.resolve.base import ip_literal

if TYPE_CHECKING:
    from proxy.net.h2client import H2ClientConnection

# cryptography (x509) and h2 are imported where they are used: the DNS cache imports this module
# for resolve_both, and a proxy on the system resolver should not carry them in memory

logger = logging.getLogger("sidestep.resolve")

DNS_MESSAGE = "application/dns-message"
#: RFC 8467 4.1: pad queries to a multiple of this many octets
QUERY_BLOCK = 128
#: EDNS payload we advertise (DNS Flag Day 2020)
PAYLOAD = 1232
_MAX_ANSWER = 65535

Pins = frozenset[str]


# --- TLS for secure endpoints ---------------------------------------------------------------


def spki_sha256(der_certificate: bytes) -> str:
    """base64 SHA-256 of a DER certificate's SubjectPublicKeyInfo (the RFC 7469 pin form)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_der_x509_certificate(der_certificate)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def normalize_pins(pin_sha256: str | Sequence[str] | None) -> Pins:
    """The pins as a set of canonical base64 strings; ``ValueError`` for malformed ones."""
    if pin_sha256 is None:
        return frozenset()
    pins = [pin_sha256] if isinstance(pin_sha256, str) else list(pin_sha256)
    out = set()
    for pin in pins:
        try:
            raw = base64.b64decode(pin, validate=True)
        except ValueError:
            raise ValueError(f"pin {pin!r} is not base64") from None
        if len(raw) != 32:
            raise ValueError(f"pin {pin!r} is not a SHA-256 digest ({len(raw)} bytes)")
        out.add(base64.b64encode(raw).decode())
    return frozenset(out)


def secure_context(
    *,
    ssl_context: ssl.SSLContext | None = None,
    cafile: str | None = None,
    cadata: str | bytes | None = None,
    pins: Pins = frozenset(),
    alpn: Sequence[str] = (),
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """The client TLS context of a secure DNS endpoint.

    ``ssl_context`` wins when given (ALPN is set on it). Otherwise the context trusts ``cafile``
    / ``cadata`` when named, else the system store; with pins and no CA named, the pin is the
    only authentication (a self-signed private resolver). TLS 1.2 is the minimum (RFC 8310).
    """
    if ssl_context is not None:
        ctx = ssl_context
    elif pins and cafile is None and cadata is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        text = cadata.decode() if isinstance(cadata, bytes) else cadata
        ctx = ssl.create_default_context(cafile=cafile, cadata=text)
        ctx.check_hostname = check_hostname
    ctx.minimum_version = max(ctx.minimum_version, ssl.TLSVersion.TLSv1_2)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


async def open_secure_stream(
    bootstrap: Sequence[IPAddress],
    port: int,
    server_name: str,
    context: ssl.SSLContext,
    pins: Pins,
    *,
    label: str,
    timeout: float,
    alpn: str | None = None,
    dial: Callable[[], Awaitable[trio.abc.Stream]] | None = None,
) -> trio.SSLStream[trio.abc.Stream]:
    """Connect to one of ``bootstrap`` (Happy Eyeballs), handshake, check ALPN and pins.

    ``server_name`` is sent as SNI and checked in the certificate ("" sends no SNI). Every
    failure becomes a :class:`ResolveError` naming ``label``; certificate problems say
    "certificate". ``dial`` replaces the direct TCP connection (to go through a proxy).
    """
    with trio.move_on_after(timeout):
        try:
            if dial is not None:
                tcp = await dial()
            else:
                tcp = await open_tcp(bootstrap, port, timeout=timeout)
        except UpstreamError as exc:
            raise ResolveError(f"{label}: {exc}") from exc
        peer = _peer_text(tcp, port)
        stream = trio.SSLStream(tcp, context, server_hostname=server_name or None)
        try:
            try:
                await stream.do_handshake()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                cause = exc.__cause__ or exc
                what = "certificate rejected" if _is_cert_error(cause) else "TLS handshake failed"
                raise ResolveError(f"{label}: {what} at {peer} ({cause})") from exc
            if alpn is not None and stream.selected_alpn_protocol() != alpn:
                got = stream.selected_alpn_protocol()
                raise ResolveError(f"{label}: {peer} did not agree to ALPN {alpn!r} (got {got!r})")
            if pins:
                der = stream.getpeercert(binary_form=True)
                if der is None or spki_sha256(der) not in pins:
                    raise ResolveError(f"{label}: certificate pin mismatch at {peer}")
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return stream
    raise ResolveError(f"{label}: no TLS connection within {timeout:g} s")


def _is_cert_error(exc: BaseException) -> bool:
    return isinstance(exc, ssl.SSLCertVerificationError) or "CERTIFICATE" in str(exc).upper()


def _peer_text(tcp: trio.abc.Stream, port: int) -> str:
    sock = getattr(tcp, "socket", None)
    try:
        host = sock.getpeername()[0] if sock is not None else "?"
        return format_address(ipaddress.ip_address(host), port)
    except (OSError, ValueError):
        return f"?:{port}"


def parse_bootstrap(bootstrap: Sequence[str], host: str) -> list[IPAddress]:
    """Bootstrap IP strings as addresses; an IP-literal ``host`` needs none."""
    try:
        addresses = [ipaddress.ip_address(ip) for ip in bootstrap]
    except ValueError as exc:
        raise ValueError(f"bootstrap must be IP addresses: {exc}") from None
    literal = ip_literal(host)
    if literal is not None and literal not in addresses:
        addresses.append(literal)
    if not addresses:
        raise ValueError(
            f"{host}: a secure endpoint needs bootstrap IPs (its name is not looked up)"
        )
    return addresses


# --- DNS messages ---------------------------------------------------------------------------


def padded_query(name: str | dns.name.Name, rdtype: int | str) -> dns.message.Message:
    """A recursive query with EDNS(0), padded to a multiple of :data:`QUERY_BLOCK`, ID 0."""
    query = dns.message.make_query(name, rdtype, use_edns=0, payload=PAYLOAD, pad=QUERY_BLOCK)
    query.id = 0
    return query


def repad(query: dns.message.Message) -> dns.message.Message:
    """A copy of a client's ``query`` ready for an encrypted transport: ID 0, padded."""
    copy = dns.message.from_wire(query.to_wire())
    options = [o for o in copy.options if o.otype != dns.edns.OptionType.PADDING]
    edns = max(copy.edns, 0)
    payload = max(copy.payload, 512) if copy.edns >= 0 else PAYLOAD
    copy.use_edns(edns, copy.ednsflags, payload, options=options, pad=QUERY_BLOCK)
    copy.id = 0
    return copy


def to_name(host: str) -> dns.name.Name:
    """``host`` as an absolute DNS name; :class:`ResolveError` when it is not one."""
    try:
        return dns.name.from_text(host.rstrip(".") + ".")
    except (dns.exception.DNSException, UnicodeError) as exc:
        raise ResolveError(f"{host}: not a valid name ({exc})") from None


def addresses_in(response: dns.message.Message, rdtype: int) -> list[IPAddress]:
    """The ``rdtype`` (A/AAAA) addresses of a response; ResolveError for error rcodes."""
    rcode = response.rcode()
    name = response.question[0].name.to_text(True) if response.question else "?"
    if rcode == dns.rcode.NXDOMAIN:
        raise ResolveError(f"{name}: no such name (NXDOMAIN)")
    if rcode != dns.rcode.NOERROR:
        raise ResolveError(f"{name}: server answered {dns.rcode.to_text(rcode)}")
    out: list[IPAddress] = []
    for rrset in response.answer:
        if rrset.rdtype == rdtype:
            out.extend(ipaddress.ip_address(r.address) for r in rrset)
    return out


QueryFn = Callable[[dns.name.Name, int], Awaitable[dns.message.Message]]


async def resolve_both(host: str, query: QueryFn, timeout: float) -> list[IPAddress]:
    """Ask A and AAAA at once through ``query``; IPv4 then IPv6 addresses, or ResolveError."""
    literal = ip_literal(host)
    if literal is not None:
        return [literal]
    name = to_name(host)
    answers: dict[int, list[IPAddress] | ResolveError] = {}

    async def ask(rdtype: int) -> None:
        try:
            answers[rdtype] = addresses_in(await query(name, rdtype), rdtype)
        except ResolveError as exc:
            answers[rdtype] = exc

    with trio.move_on_after(timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ask, dns.rdatatype.AAAA)
            await ask(dns.rdatatype.A)
    parts = [answers.get(dns.rdatatype.A), answers.get(dns.rdatatype.AAAA)]
    addresses = list(dict.fromkeys(a for p in parts if isinstance(p, list) for a in p))
    if addresses:
        return addresses
    for part in parts:
        if isinstance(part, ResolveError):
            raise part
    if all(isinstance(p, list) for p in parts):
        raise ResolveError(f"{host}: the name has no addresses")
    raise ResolveError(f"{host}: no answer within {timeout:g} s")


# --- the resolver ---------------------------------------------------------------------------


class PooledConnectionOwner:
    """Owns a background nursery for a pooled connection's reader task; use as ``async with``.

    Subclasses set ``_conn`` and implement :meth:`aclose` (close the connection, then call
    :meth:`_stop_tasks`).
    """

    def _init_pool(self) -> None:
        self._dial_lock = trio.Lock()
        self._nursery: trio.Nursery | None = None
        self._stack: AsyncExitStack | None = None
        #: TCP connections opened so far (for health tracking and tests)
        self.connections_opened = 0

    async def __aenter__(self) -> Self:
        stack = AsyncExitStack()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        await self.aclose()
        stack, self._stack, self._nursery = self._stack, None, None
        if stack is None:
            return None
        return await stack.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        raise TypeError("subclasses close their own connection")  # pragma: no cover

    # --- the pooled connection, dialled the same way over every secure transport ---------------

    #: the ALPN protocol the server must agree to (None: not checked)
    alpn: ClassVar[str | None] = None
    #: how errors name this endpoint
    label: str
    bootstrap: list[IPAddress]
    port: int
    pins: Pins
    _ssl: ssl.SSLContext
    _conn: Any

    async def _connection(self) -> Any:
        """The pooled connection, dialled anew when there is none or it is unusable."""
        async with self._dial_lock:
            if self._conn is not None and self._conn.usable:
                return self._conn
            if self._nursery is None:
                raise ResolveError(f"{self.label}: resolver is not running (use 'async with')")
            stream = await open_secure_stream(
                self.bootstrap,
                self.port,
                self._tls_name(),
                self._ssl,
                self.pins,
                label=self.label,
                timeout=self.timeout,
                alpn=self.alpn,
                dial=self._dialer(),
            )
            self.connections_opened += 1
            self._conn = await self._start(self._nursery, stream)
            return self._conn

    def _tls_name(self) -> str:
        """The name sent as SNI and checked in the certificate ("" sends none)."""
        raise TypeError("subclasses say which name they send")  # pragma: no cover

    def _dialer(self) -> Callable[[], Awaitable[trio.abc.Stream]] | None:
        """How the TCP connection is opened; None: directly to the bootstrap addresses."""
        return None

    async def _start(self, nursery: trio.Nursery, stream: trio.SSLStream[trio.abc.Stream]) -> Any:
        """Wrap a fresh TLS stream in the transport's connection and start its reader task."""
        raise TypeError("subclasses run their own connection")  # pragma: no cover

    # --- queries, the same over every secure transport ----------------------------------------

    #: "DoH" / "DoT", for messages
    transport: ClassVar[str] = "secure DNS"
    timeout: float

    async def resolve(self, host: str) -> list[IPAddress]:
        return await resolve_both(host, self.query, self.timeout)

    async def query(self, name: str | dns.name.Name, rdtype: int | str) -> dns.message.Message:
        """Ask one question; the response (any rcode) or ResolveError."""
        return await self._exchange(padded_query(name, rdtype))

    async def forward(self, query: dns.message.Message) -> dns.message.Message:
        """Send a client's query (padded, with the transport's own ID on the wire); the
        answer comes back with the client's ID."""
        if len(query.question) != 1:
            raise ResolveError(f"{self.transport} forwards queries with exactly one question")
        response = await self._exchange(repad(query))
        response.id = query.id
        return response

    async def _exchange(self, query: dns.message.Message) -> dns.message.Message:
        raise TypeError("subclasses exchange messages their own way")  # pragma: no cover


class DohResolver(PooledConnectionOwner):
    """An RFC 8484 endpoint at ``url`` (``https://host[:port]/path``), reached at ``bootstrap``.

    ``method`` is "POST" or "GET". ``timeout`` bounds each query, retry included. TLS:
    ``ssl_context``, or ``cafile``/``cadata`` (else the system store); ``pin_sha256`` adds SPKI
    pins; ``server_name`` overrides the name sent as SNI and checked in the certificate.
    """

    transport: ClassVar[str] = "DoH"

    def __init__(
        self,
        url: str,
        bootstrap: Sequence[str],
        *,
        method: str = "POST",
        timeout: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
        cafile: str | None = None,
        cadata: str | bytes | None = None,
        pin_sha256: str | Sequence[str] | None = None,
        server_name: str | None = None,
    ) -> None:
        parts = urllib.parse.urlsplit(url.replace("{?dns}", ""))
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"{url}: a DoH URL is https://host[:port]/path")
        if method not in ("POST", "GET"):
            raise ValueError(f"method must be POST or GET, not {method!r}")
        self.url = url
        self.method = method
        self.timeout = timeout
        self.host = parts.hostname
        self.port = parts.port or 443
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_text = f"[{self.host}]" if ":" in self.host else self.host
        self.authority = host_text if self.port == 443 else f"{host_text}:{self.port}"
        self.bootstrap = parse_bootstrap(bootstrap, self.host)
        self.server_name = self.host if server_name is None else server_name
        self.pins = normalize_pins(pin_sha256)
        self._ssl = secure_context(
            ssl_context=ssl_context,
            cafile=cafile,
            cadata=cadata,
            pins=self.pins,
            alpn=("h2",),
            check_hostname=bool(self.server_name),
        )
        self._conn: H2ClientConnection | None = None
        self._init_pool()

    async def aclose(self) -> None:
        """Close the pooled connection; queries after this fail."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.aclose()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # --- internals ----------------------------------------------------------------------------

    async def _exchange(self, query: dns.message.Message) -> dns.message.Message:
        from proxy.net.h2client import H2Error, H2StreamReset

        wire = query.to_wire()
        qname = query.question[0].name.to_text(True)
        with trio.move_on_after(self.timeout):
            for attempt in (1, 2):
                conn = await self._connection()
                try:
                    status, headers, body = await self._request(conn, wire)
                except H2Error as exc:
                    retry = exc.retryable or isinstance(exc, H2StreamReset)
                    if attempt == 1 and retry:
                        logger.debug("doh %s: %s; asking again", self.url, exc)
                        continue
                    raise ResolveError(f"{qname}: {self.url}: {exc}") from exc
                return self._response(query, qname, status, headers, body)
        raise ResolveError(f"{qname}: {self.url}: no answer within {self.timeout:g} s")

    async def _request(
        self, conn: H2ClientConnection, wire: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        if self.method == "GET":
            encoded = base64.urlsafe_b64encode(wire).rstrip(b"=").decode()
            joiner = "&" if "?" in self.path else "?"
            path = f"{self.path}{joiner}dns={encoded}"
            return await conn.request("GET", path, [("accept", DNS_MESSAGE)])
        headers = [("accept", DNS_MESSAGE), ("content-type", DNS_MESSAGE)]
        return await conn.request("POST", self.path, headers, wire)

    def _response(
        self,
        query: dns.message.Message,
        qname: str,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
    ) -> dns.message.Message:
        where = f"{qname}: {self.url}"
        if status != 200:
            raise ResolveError(f"{where}: HTTP status {status}")
        ctype = dict(headers).get("content-type", "").split(";")[0].strip().lower()
        if ctype != DNS_MESSAGE:
            raise ResolveError(f"{where}: answer is {ctype or 'untyped'}, not {DNS_MESSAGE}")
        if len(body) > _MAX_ANSWER:
            raise ResolveError(f"{where}: answer larger than a DNS message can be")
        try:
            response = dns.message.from_wire(body)
        except dns.exception.DNSException as exc:
            raise ResolveError(f"{where}: malformed answer ({exc})") from None
        if not query.is_response(response):
            raise ResolveError(f"{where}: answer does not match the question")
        return response

    alpn: ClassVar[str | None] = "h2"

    @property
    def label(self) -> str:  # type: ignore[override]
        """How errors name this endpoint."""
        return self.url

    def _tls_name(self) -> str:
        return self.server_name

    async def _start(
        self, nursery: trio.Nursery, stream: trio.SSLStream[trio.abc.Stream]
    ) -> H2ClientConnection:
        from proxy.net.h2client import H2ClientConnection, H2Error

        conn = H2ClientConnection(stream, self.authority, max_body=_MAX_ANSWER + 1)
        try:
            await nursery.start(self._run, conn)
        except H2Error as exc:
            raise ResolveError(f"{self.label}: {exc}") from exc
        return conn

    async def _run(self, conn: H2ClientConnection, *, task_status: trio.TaskStatus[None]) -> None:
        from proxy.net.h2client import H2Error

        try:
            await conn.run(task_status=task_status)
        except H2Error:
            raise  # before started(): nursery.start reports it to the dialler
        except Exception as exc:  # one broken connection must not take the resolver down
            logger.warning("doh %s: connection task failed: %r", self.url, exc)
