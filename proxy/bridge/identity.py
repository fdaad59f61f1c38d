"""A bridge's identity (its keys) and the one-line bridge URI that hands it to clients.

The identity is three values: the X25519 static private key, a 32-byte secret and an 8-byte
short id. It lives in a small TOML file created with mode 0600. :func:`load_identity` refuses
a file that its group or other users can read or write (as OpenSSH does for private keys): a
leaked identity lets anyone impersonate the bridge, and a leaked secret lets a censor confirm
it, so a warning that scrolls by is not enough.

The bridge URI carries everything a client needs and nothing the server keeps private::

    sidestep://SHORTID@HOST:PORT[/PATH]?pk=PUBLIC&secret=SECRET&carrier=CARRIER[&front=F][&sni=S]
                                                                            [&prefix=P]

``SHORTID`` is 16 hex digits, ``PUBLIC`` and ``SECRET`` are 32 bytes in unpadded base64url.
Carrier ``raw`` dials ``HOST:PORT`` directly and has no path. The web carriers (``ws``,
``split``, ``poll``) reach ``https://HOST:PORT/PATH``, the secret location behind the web
server; ``front`` is the innocuous name a CDN is dialled by (domain fronting) and ``sni`` the
TLS server name to send when it is not the URL's host. ``prefix`` (raw only: ``ascii`` or
``tls``) shapes the first bytes the client sends, and must match the server's ``prefix``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from proxy.errors import ConfigError
from proxy.protocols.bridge.handshake import KEY_LEN, SECRET_LEN, SHORT_ID_LEN, BridgeLine

SCHEME = "sidestep"
CARRIERS = ("raw", "ws", "split", "poll")
WEB_CARRIERS = ("ws", "split", "poll")
URI_SOURCE = "bridge URI"
_NAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?"
)
_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+/?")
_QUERY_KEYS = ("pk", "secret", "carrier", "front", "sni", "prefix")
PREFIX_KINDS = ("none", "ascii", "tls")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str, length: int) -> bytes | None:
    """``length`` bytes from unpadded base64url, or ``None`` when ``text`` is not exactly that."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == length and _b64(raw) == text else None


# ------------------------------------------------------------------------------------ identity


@dataclass(frozen=True, slots=True)
class BridgeIdentity:
    """The bridge's private identity; ``repr`` never shows the key or the secret."""

    private_key: bytes = field(repr=False)
    secret: bytes = field(repr=False)
    short_id: bytes

    def __post_init__(self) -> None:
        if len(self.private_key) != KEY_LEN or len(self.secret) != SECRET_LEN:
            raise ValueError("an identity needs a 32-byte private key and a 32-byte secret")
        if len(self.short_id) != SHORT_ID_LEN:
            raise ValueError(f"a short id is {SHORT_ID_LEN} bytes")

    def static_private(self) -> X25519PrivateKey:
        return X25519PrivateKey.from_private_bytes(self.private_key)

    @property
    def public_key(self) -> bytes:
        return self.static_private().public_key().public_bytes_raw()

    def line(self) -> BridgeLine:
        return BridgeLine(self.public_key, self.secret, self.short_id)


def generate_identity() -> BridgeIdentity:
    """A fresh identity from the operating system's random source."""
    return BridgeIdentity(os.urandom(KEY_LEN), os.urandom(SECRET_LEN), os.urandom(SHORT_ID_LEN))


def identity_text(identity: BridgeIdentity) -> str:
    """The identity file's contents."""
    return (
        "# sidestep bridge identity, made by `sidestep keygen`.\n"
        "# Keep it private (mode 0600): whoever holds it can impersonate this bridge.\n"
        f'private_key = "{_b64(identity.private_key)}"\n'
        f'secret = "{_b64(identity.secret)}"\n'
        f'short_id = "{identity.short_id.hex()}"\n'
    )


def write_identity(path: str | os.PathLike[str], identity: BridgeIdentity, *, force: bool) -> None:
    """Create ``path`` with mode 0600 holding ``identity``.

    An existing file is never overwritten unless ``force``; then the new file is written beside
    it and renamed over it, so there is never a moment with a half-written or readable key.
    """
    target = os.fspath(path)
    if os.path.lexists(target) and not force:
        raise ConfigError(
            "already exists; pass --force to replace it (its bridge URI then stops working)",
            source=target,
        )
    temp = f"{target}.{os.getpid()}.tmp" if force else target
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot create the file: {exc.strerror or exc}", source=temp) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(identity_text(identity))
            out.flush()
            os.fsync(out.fileno())
        if force:
            os.replace(temp, target)
    except OSError as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise ConfigError(f"cannot write the file: {exc.strerror or exc}", source=target) from None


def load_identity(path: str | os.PathLike[str]) -> BridgeIdentity:
    """Read an identity file, refusing one that others may read or write."""
    source = os.fspath(path)
    try:
        fd = os.open(source, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(
            f"cannot read the identity: {exc.strerror or exc}", source=source
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("the identity is not a regular file", source=source)
        mode = stat.S_IMODE(info.st_mode)
        if os.name == "posix" and mode & 0o077:
            raise ConfigError(
                f"the identity is open to other users (mode {mode:04o}); "
                f"run `chmod 600 {source}`, and make a new one if others may have read it",
                source=source,
            )
        raw = os.read(fd, 64 * 1024)
    finally:
        os.close(fd)
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        raise ConfigError("the identity file is not valid TOML", source=source) from None
    unknown = sorted(set(data) - {"private_key", "secret", "short_id"})
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in the identity file", source=source)
    values: dict[str, bytes] = {}
    for key, length in (("private_key", KEY_LEN), ("secret", SECRET_LEN)):
        value = data.get(key)
        decoded = _unb64(value, length) if isinstance(value, str) else None
        if decoded is None:
            raise ConfigError(f"must be {length} bytes in base64url", key=key, source=source)
        values[key] = decoded
    short = data.get("short_id")
    if not isinstance(short, str) or not re.fullmatch(r"[0-9a-f]{16}", short):
        raise ConfigError("must be 16 lowercase hex digits", key="short_id", source=source)
    return BridgeIdentity(values["private_key"], values["secret"], bytes.fromhex(short))


# ---------------------------------------------------------------------------------- bridge URI


def _uri_error(part: str, message: str) -> ConfigError:
    return ConfigError(message, key=part, source=URI_SOURCE)


def check_host(host: str, part: str = "host") -> str:
    """``host`` as an IP literal (IPv6 compressed) or a lowercase DNS name, else an error."""
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    if not _NAME.fullmatch(host) or host.replace(".", "").isdigit():
        raise _uri_error(part, f"{host[:64]!r} is neither an IP address nor a DNS name")
    return host.lower()


def split_host_port(text: str, part: str = "address") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` into a checked host and port."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or ":" not in host:
            raise _uri_error(part, f"{text[:80]!r} is not [IPv6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise _uri_error(part, f"{text[:80]!r} is not HOST:PORT (IPv6 needs [brackets])")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise _uri_error(part, f"port {port[:10]!r} is not a number from 1 to 65535")
    return check_host(host, part), int(port)


@dataclass(frozen=True, slots=True)
class BridgeURI:
    """A parsed bridge URI. Build with keyword arguments; fields are checked and normalised."""

    short_id: bytes
    public_key: bytes
    secret: bytes = field(repr=False)
    carrier: str
    host: str
    port: int
    path: str = ""
    front: str | None = None
    sni: str | None = None
    prefix: str = "none"

    def __post_init__(self) -> None:
        if len(self.short_id) != SHORT_ID_LEN:
            raise _uri_error("short id", f"must be {SHORT_ID_LEN} bytes")
        if len(self.public_key) != KEY_LEN:
            raise _uri_error("pk", f"must be {KEY_LEN} bytes")
        if len(self.secret) != SECRET_LEN:
            raise _uri_error("secret", f"must be {SECRET_LEN} bytes")
        if self.carrier not in CARRIERS:
            raise _uri_error(
                "carrier", f"{self.carrier[:20]!r} is not one of {', '.join(CARRIERS)}"
            )
        object.__setattr__(self, "host", check_host(self.host))
        if not 1 <= self.port <= 65535:
            raise _uri_error("port", "must be a number from 1 to 65535")
        if self.carrier == "raw":
            if self.path:
                raise _uri_error("path", "the raw carrier dials HOST:PORT and takes no path")
            if self.front is not None:
                raise _uri_error("front", "fronting needs a web carrier (ws, split or poll)")
            if self.prefix not in PREFIX_KINDS:
                raise _uri_error("prefix", f"{self.prefix[:20]!r} is not one of none, ascii, tls")
        elif self.prefix != "none":
            raise _uri_error("prefix", "only the raw carrier takes a prefix")
        elif not _PATH.fullmatch(self.path):
            raise _uri_error(
                "path",
                f"carrier {self.carrier} needs the secret path, like /a1b2c3 (letters, "
                "digits, . _ ~ -)",
            )
        for part in ("front", "sni"):
            value = getattr(self, part)
            if value is not None:
                object.__setattr__(self, part, check_host(value, part))

    @property
    def url(self) -> str | None:
        """The HTTPS URL of the secret location for web carriers, ``None`` for ``raw``."""
        if self.carrier == "raw":
            return None
        return f"https://{self._authority(default_port=443)}{self.path}"

    def line(self) -> BridgeLine:
        return BridgeLine(self.public_key, self.secret, self.short_id)

    def _authority(self, default_port: int | None = None) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == default_port else f"{host}:{self.port}"

    def __str__(self) -> str:
        query = f"pk={_b64(self.public_key)}&secret={_b64(self.secret)}&carrier={self.carrier}"
        if self.front is not None:
            query += f"&front={self.front}"
        if self.sni is not None:
            query += f"&sni={self.sni}"
        if self.prefix != "none":
            query += f"&prefix={self.prefix}"
        path = quote(self.path, safe="/")
        return f"{SCHEME}://{self.short_id.hex()}@{self._authority()}{path}?{query}"


def parse_bridge_uri(text: str) -> BridgeURI:
    """Parse a bridge URI; a ``ConfigError`` names the part that is wrong (never the secret)."""
    text = text.strip()
    prefix = f"{SCHEME}://"
    if not text.lower().startswith(prefix):
        raise _uri_error("scheme", f"must start with {prefix}")
    if "#" in text:
        raise _uri_error("fragment", "a bridge URI has no #fragment")
    rest = text[len(prefix) :]
    location, _, query = rest.partition("?")
    userinfo, at, hostpart = location.rpartition("@")
    if not at:
        raise _uri_error("short id", "missing: the URI starts sidestep://SHORTID@HOST:PORT")
    if not re.fullmatch(r"[0-9a-fA-F]{16}", userinfo):
        raise _uri_error("short id", "must be 16 hex digits")
    slash = hostpart.find("/", hostpart.find("]") + 1 if hostpart.startswith("[") else 0)
    authority, path = (hostpart, "") if slash < 0 else (hostpart[:slash], hostpart[slash:])
    host, port = split_host_port(authority)
    values: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _QUERY_KEYS:
            raise _uri_error(
                key[:20] or "query", f"unknown parameter; known: {', '.join(_QUERY_KEYS)}"
            )
        if key in values:
            raise _uri_error(key, "given twice")
        values[key] = value
    keys: dict[str, bytes] = {}
    for key in ("pk", "secret"):
        if key not in values:
            raise _uri_error(key, "missing")
        decoded = _unb64(values[key], KEY_LEN)
        if decoded is None:
            raise _uri_error(key, "must be 32 bytes in unpadded base64url (43 characters)")
        keys[key] = decoded
    if "carrier" not in values:
        raise _uri_error("carrier", f"missing; one of {', '.join(CARRIERS)}")
    return BridgeURI(
        short_id=bytes.fromhex(userinfo),
        public_key=keys["pk"],
        secret=keys["secret"],
        carrier=values["carrier"],
        host=host,
        port=port,
        path=unquote(path),
        front=values.get("front"),
        sni=values.get("sni"),
        prefix=values.get("prefix", "none"),
    )


def split_url(url: str) -> tuple[str, int, str]:
    """Host, port and path of the ``https://`` URL of a web carrier's secret location."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _uri_error("url", f"not a URL: {exc}") from None
    if parts.scheme != "https":
        raise _uri_error("url", "must start with https:// (the web carriers run over TLS)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise _uri_error("url", "write only https://HOST[:PORT]/PATH")
    if not parts.hostname:
        raise _uri_error("url", "has no host")
    return check_host(parts.hostname, "url"), port or 443, parts.path
