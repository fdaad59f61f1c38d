"""Russia 2025 in the lab: TCP flows to foreign hosting freeze after 16 KiB. A bridge hosted
there still carries a multi-MiB download: the first frozen carrier is noticed and resumed, the
volume is learned, and from then on carriers are rotated before they freeze."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import trio

from proxy.bridge.config import parse_bridge_config
from proxy.bridge.identity import BridgeURI, generate_identity
from proxy.bridge.server import BridgeServer
from proxy.config import parse_config
from proxy.lab.ca import LabCA
from proxy.lab.middlebox import Middlebox
from proxy.lab.origin import pattern_bytes
from proxy.lab.profiles import FREEZE_LIMIT
from proxy.lab.scenarios import open_sidestep
from proxy.lab.world import OPEN, AbroadResolver, Lab, open_lab
from proxy.strategies.bridge import BridgeStrategy

CURL = shutil.which("curl")
#: a "foreign hosting" address (the ru-2025 freeze applies to 127.62.0.0/16) and the private
#: twin where the bridge really listens
BRIDGE_PUBLIC = "127.62.0.77"
BRIDGE_HIDDEN = "127.162.0.77"
SIZE = 2 * 1024 * 1024


async def foreign_bridge(lab: Lab) -> tuple[BridgeServer, BridgeURI]:
    """A bridge behind the censor at a foreign-hosting address."""
    config = parse_bridge_config(
        '[bridge]\nprobe_close_delay = [0.0, 0.05]\n[destinations]\nallow_networks = ["127.0.0.0/8"]\n',
        "<test>",
    )
    identity = generate_identity()
    server = BridgeServer(config, identity, resolver=AbroadResolver(lab))
    listening = await lab.start_service(server.serve, f"{BRIDGE_HIDDEN}:0")
    port = listening.addresses[0][1]
    box = Middlebox(lab.engine, listen=(BRIDGE_PUBLIC, port), upstream=(BRIDGE_HIDDEN, port))
    await lab.start_service(box.serve)
    uri = BridgeURI(
        short_id=identity.short_id, public_key=identity.public_key, secret=identity.secret,
        carrier="raw", host=BRIDGE_PUBLIC, port=port,
    )  # fmt: skip
    return server, uri


CLIENT = """
[[strategy]]
name = "my-bridge"
type = "bridge"
uri = "{uri}"

[[policy]]
name = "via-bridge"
strategies = ["my-bridge"]
attempt_timeout = 10.0

[router]
default_policy = "via-bridge"
learn = true
"""


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
async def test_bridge_download_survives_the_ru_2025_freeze_by_learned_rotation() -> None:
    async with open_lab("ru-2025", ca=LabCA.create()) as lab:
        server, uri = await foreign_bridge(lab)
        config = parse_config(CLIENT.format(uri=uri), "<test>")
        async with open_sidestep(lab, config) as side:
            strategy = side.app.dispatcher.router.strategies["my-bridge"]
            assert isinstance(strategy, BridgeStrategy)
            assert strategy.rotate_after == "auto" and strategy.rotate_limit() == 0
            assert CURL is not None
            with trio.fail_after(120):
                result = await trio.run_process(
                    [CURL, "--silent", "--show-error", "--max-time", "100",
                     "--proxy", f"socks5h://{side.address[0]}:{side.address[1]}",
                     "--cacert", str(lab.ca_file), lab.url(OPEN, f"/bytes/{SIZE}")],
                    capture_stdout=True, capture_stderr=True, check=False,
                )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert hashlib.sha256(result.stdout).digest() == (
                hashlib.sha256(pattern_bytes(SIZE)).digest()
            )
            # the first carrier froze, was noticed and resumed; the volume was learned...
            assert strategy.resumes >= 1
            learned = side.app.memory.carrier_limit(side.app.network, strategy.limit_key)
            assert learned is not None and 4096 <= learned <= FREEZE_LIMIT
            print(
                f"learned freeze volume: {learned} bytes; rotate at {strategy.rotate_limit()};"
                f" {strategy.rotations} rotations, {strategy.resumes} resume(s)"
            )
            # ...and from then on carriers were replaced before they froze, one session
            assert strategy.rotate_limit() == int(learned * 0.75)
            assert strategy.rotations >= SIZE // FREEZE_LIMIT
            assert strategy.resumes <= 3
            assert server.sessions_opened == 1 and strategy.sessions_opened == 1
        frozen = [hit for hit in lab.engine.log if hit.action.value == "freeze_after"]
        assert frozen  # the censor really did freeze the carriers
