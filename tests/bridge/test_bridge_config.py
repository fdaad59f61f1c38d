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
    ],
)
def test_bridge_config_bad_values_name_key_and_line(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_bridge_config(text, "t.toml")
    assert str(caught.value).startswith(expected)


def test_bridge_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_bridge_config(tmp_path / "none.toml")
