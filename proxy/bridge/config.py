"""The bridge server's config file (``sidestep bridge --config FILE``, see configs/bridge.toml).

Only what the server needs to know who it is and where to listen; validated like the proxy's
config (unknown keys refused, errors name the key and its line).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from proxy.config import parse_listen
from proxy.configschema import between, from_toml, not_empty, option, positive
from proxy.errors import ConfigError


def _check_listen(value: str) -> None:
    parse_listen(value)


def _check_network(value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a network like 10.0.0.0/8 or fd00::/8") from None


_NAME = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
)


def _check_destination(value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
        return
    except ValueError:
        pass
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is neither a network (10.0.0.0/8) nor a lowercase domain (example.org)"
        )


def _check_tor(value: str) -> None:
    host, _, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host.strip("[]"))
        ok = port.isdigit() and 1 <= int(port) <= 65535
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{value[:60]!r} is not a Tor SOCKS address like 127.0.0.1:9050")


def _check_path(value: str) -> None:
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", value):
        raise ValueError(f"{value[:40]!r} is not a path like /a1b2c3 (letters, digits, . _ ~ -)")


def _check_delay(value: tuple[float, ...]) -> None:
    if len(value) != 2 or not 0 <= value[0] <= value[1] <= 600:
        raise ValueError("must be [shortest, longest] seconds, 0 <= shortest <= longest <= 600")


@dataclass(frozen=True, slots=True)
class BridgeSection:
    #: the identity file written by `sidestep keygen` (mode 0600)
    identity: str = option(default="bridge.key", check=not_empty)
    #: where the bridge accepts carrier connections: behind nginx a loopback address
    listen: str = option(default="127.0.0.1:8443", check=_check_listen)
    #: seconds a client's clock may differ from ours before its hello is refused
    clock_window: int = option(default=120, check=between(10, 3600))
    #: how clients reach the bridge: "raw" TCP, or "ws": the web carriers on the secret
    #: ``path`` (WebSocket, and for CDNs split HTTP and polling, all on that one path)
    carrier: Literal["raw", "ws"] = "raw"
    #: ws: the secret path, as in the bridge URI (nginx forwards only this path)
    path: str | None = option(default=None, check=_check_path)
    #: ws standalone: certificate chain and key files, when the bridge terminates TLS itself
    tls_certificate: str | None = option(default=None, check=not_empty)
    tls_key: str | None = option(default=None, check=not_empty)
    #: raw carrier: what the client sends before its hello (must match the bridge URI)
    prefix: Literal["none", "ascii", "tls"] = "none"
    #: seconds (shortest, longest) to keep reading a connection that failed the handshake
    #: before closing it in silence
    probe_close_delay: tuple[float, ...] = option(default=(10.0, 60.0), check=_check_delay)
    #: new sessions one client address may open per minute (0: no limit)
    sessions_per_minute: int = option(default=30, check=between(0, 100000))
    #: most streams (connections) one session may carry at once
    max_streams: int = option(default=1024, check=between(1, 65535))
    #: seconds a session whose carrier broke is kept, streams and their connections open,
    #: waiting for its client to resume it over a new carrier (0: sessions end with the carrier)
    resume_window: int = option(default=60, check=between(0, 3600))

    def validate(self) -> None:
        if self.carrier == "ws":
            if self.path is None:
                raise ConfigError('the ws carrier needs path = "/your-secret-path"', key="path")
            if self.prefix != "none":
                raise ConfigError("only the raw carrier takes a prefix", key="prefix")
        else:
            for key in ("path", "tls_certificate", "tls_key"):
                if getattr(self, key) is not None:
                    raise ConfigError(f"only the ws carrier takes {key}", key=key)
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise ConfigError("give both tls_certificate and tls_key, or neither", key="tls_key")


@dataclass(frozen=True, slots=True)
class DestinationsSection:
    """Where the bridge agrees to connect for its clients."""

    #: loopback, private and link-local networks the bridge may still reach (refused otherwise)
    allow_networks: tuple[str, ...] = option(default=(), each=_check_network)
    #: when not empty, only these networks and domains (with their subdomains) are reachable
    allow: tuple[str, ...] = option(default=(), each=_check_destination)
    #: networks and domains (with their subdomains) never reached
    deny: tuple[str, ...] = option(default=(), each=_check_destination)
    #: seconds to connect to a destination
    connect_timeout: float = option(default=10.0, check=positive)
    #: send every stream through the Tor client's SOCKS port at this "IP:port" (Tor resolves)
    tor: str | None = option(default=None, check=_check_tor)


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    bridge: BridgeSection = field(default_factory=BridgeSection)
    destinations: DestinationsSection = field(default_factory=DestinationsSection)

    def identity_path(self, config_path: str | os.PathLike[str] | None) -> Path:
        """The identity file, relative paths taken from the config file's folder."""
        path = Path(self.bridge.identity).expanduser()
        if config_path is not None and not path.is_absolute():
            path = Path(config_path).parent / path
        return path


def parse_bridge_config(text: str, source: str) -> BridgeConfig:
    return from_toml(BridgeConfig, text, source)


def load_bridge_config(path: str | os.PathLike[str]) -> BridgeConfig:
    source = os.fspath(path)
    try:
        text = Path(source).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", source=source) from None
    except UnicodeDecodeError:
        raise ConfigError("the file is not UTF-8 text", source=source) from None
    return parse_bridge_config(text, source)
