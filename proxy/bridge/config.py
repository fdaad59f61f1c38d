"""The bridge server's config file (``sidestep bridge --config FILE``, see configs/bridge.toml).

Only what the server needs to know who it is and where to listen; validated like the proxy's
config (unknown keys refused, errors name the key and its line).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config import parse_listen
from proxy.configschema import between, from_toml, not_empty, option
from proxy.errors import ConfigError


def _check_listen(value: str) -> None:
    parse_listen(value)


@dataclass(frozen=True, slots=True)
class BridgeSection:
    #: the identity file written by `sidestep keygen` (mode 0600)
    identity: str = option(default="bridge.key", check=not_empty)
    #: where the bridge accepts carrier connections: behind nginx a loopback address
    listen: str = option(default="127.0.0.1:8443", check=_check_listen)
    #: seconds a client's clock may differ from ours before its hello is refused
    clock_window: int = option(default=120, check=between(10, 3600))


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    bridge: BridgeSection = field(default_factory=BridgeSection)

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
