"""Tests for proxy.bridge.config and the example configs/bridge.toml."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.bridge.config import load_bridge_config, parse_bridge_config
from proxy.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "bridge.toml"


def test_bridge_config_example_loads() -> None:
    config = load_bridge_config(EXAMPLE)
    assert config.bridge.identity == "/etc/sidestep/bridge.key"
    assert config.bridge.listen == "127.0.0.1:8443"
    assert config.bridge.clock_window == 120


def test_bridge_config_relative_identity_is_beside_the_config(tmp_path: Path) -> None:
    config = parse_bridge_config('[bridge]\nidentity = "keys/b.key"\n', "t.toml")
    assert config.identity_path(tmp_path / "bridge.toml") == tmp_path / "keys" / "b.key"
    assert config.identity_path(None) == Path("keys/b.key")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[bridge]\nlisten = "nowhere"\n', "t.toml:2: bridge.listen: 'nowhere' is not an address"),
        (
            "[bridge]\n\nclock_window = 5\n",
            "t.toml:3: bridge.clock_window: must be between 10 and 3600",
        ),
        ('[bridge]\nidentity = ""\n', "t.toml:2: bridge.identity: must not be empty"),
        (
            '[bridge]\nlisen = "127.0.0.1:1"\n',
            "t.toml:2: bridge.lisen: unknown key (did you mean 'listen'?)",
        ),
        ('[bridge]\nprefix = "http"\n', 't.toml:2: bridge.prefix: must be one of "none"'),
        (
            "[bridge]\nprobe_close_delay = [5.0, 1.0]\n",
            "t.toml:2: bridge.probe_close_delay: must be [shortest, longest] seconds",
        ),
        (
            "[bridge]\nsessions_per_minute = -1\n",
            "t.toml:2: bridge.sessions_per_minute: must be between 0 and 100000",
        ),
        ("[bridge]\nmax_streams = 0\n", "t.toml:2: bridge.max_streams: must be between 1"),
        (
            '[destinations]\nallow_networks = ["10.0.0.0/33"]\n',
            "t.toml:2: destinations.allow_networks[0]: '10.0.0.0/33' is not a network",
        ),
        (
            '[destinations]\ndeny = ["Not A Name"]\n',
            "t.toml:2: destinations.deny[0]: 'Not A Name' is neither a network",
        ),
        ("[destinations]\nconnect_timeout = 0\n", "t.toml:2: destinations.connect_timeout:"),
        ('[bridge]\ncarrier = "ws"\n', "t.toml:1: bridge.path: the ws carrier needs path"),
        ('[bridge]\npath = "/abc"\n', "t.toml:2: bridge.path: only the ws carrier takes path"),
        ('[bridge]\ncarrier = "ws"\npath = "abc"\n', "t.toml:3: bridge.path: 'abc' is not"),
        (
            '[bridge]\ncarrier = "ws"\npath = "/a"\nprefix = "tls"\n',
            "t.toml:4: bridge.prefix: only the raw carrier takes a prefix",
        ),
        (
            '[bridge]\ncarrier = "ws"\npath = "/a"\ntls_key = "k.pem"\n',
            "t.toml:4: bridge.tls_key: give both",
        ),
    ],
)
def test_bridge_config_bad_values_name_key_and_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bridge_config(text, "t.toml")
    assert str(caught.value).startswith(expected)


def test_bridge_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_bridge_config(tmp_path / "none.toml")
