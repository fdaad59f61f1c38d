"""Time to first byte through sidestep: an SNI-reset site on the first and on the repeat visit,
an uncensored site, and the plain direct path, all in one run (issue #6, item 7).

``python -m bench ttfb`` starts the censor lab under ``ru-tspu`` (first-record SNI reset of
``blocked.lab``) in this process, and two in-process sidesteps pointed into it: one whose
default policy is the built-in ``fragment`` (``direct`` first, then the tricks), one on the plain
``direct`` policy. Real ``curl`` processes fetch through them; each figure is curl's own
``time_starttransfer`` (TCP to the proxy, SOCKS5, TLS handshake with the origin, request, first
byte of the answer), the median of ``--repeat`` fetches. Fetches of the different kinds are
interleaved so that a slow moment of the machine hits them alike.

* **uncensored**: ``open.lab`` through the fragment policy (the plain attempt gets through);
* **direct path**: ``open.lab`` through the direct policy (sidestep's connect-then-reply path);
* **first visit**: ``blocked.lab`` with the learned memory forgotten before each fetch: the
  plain attempt is reset, the first trick gets through;
* **repeat visit**: ``blocked.lab`` once learned: straight to the trick;
* **no proxy**: ``open.lab`` by curl straight to the lab, for scale;
* **direct again**: the direct path measured a second time in each round, the noise floor:
  on a busy machine two medians of the very same thing differ by a few per cent.

Targets: first visit <= uncensored + 300 ms, repeat visit <= uncensored x 1.05, and the policy
path within about 5 % of the direct path.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from proxy.config import parse_config
from proxy.lab import world
from proxy.lab.scenarios import RunningSidestep, open_sidestep
from proxy.lab.world import Lab, open_lab
from proxy.route.site import site_of

#: the built-in fragment policy for what no rule matches
FRAGMENT = (
    '[router]\ndefault_policy = "fragment"\n[log]\nlevel = "warning"\n[web]\nenabled = false\n'
)
#: the plain direct path
DIRECT = '[router]\ndefault_policy = "direct"\n[log]\nlevel = "warning"\n[web]\nenabled = false\n'

KINDS = ("no proxy", "direct path", "uncensored", "first visit", "repeat visit", "direct again")


@dataclass
class Samples:
    """Seconds per kind of fetch."""

    times: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})

    def median_ms(self, kind: str) -> float:
        return statistics.median(self.times[kind]) * 1e3


class CurlFailed(Exception):
    pass


async def curl_ttfb(curl: str, lab: Lab, name: str, proxy: RunningSidestep | None) -> float:
    """curl's time to first byte for ``https://name/`` (through ``proxy`` when given)."""
    args = [curl, "--silent", "--show-error", "--output", "/dev/null", "--max-time", "20",
            "--write-out", "%{time_starttransfer}", "--cacert", str(lab.ca_file)]  # fmt: skip
    if proxy is None:
        ip, port = lab.address(name)
        args += ["--resolve", f"{name}:{port}:{ip}"]
    else:
        args += ["--proxy", f"socks5h://{proxy.address[0]}:{proxy.address[1]}"]
    args.append(lab.url(name))
    done = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    if done.returncode != 0:
        raise CurlFailed(f"curl {name}: {done.stderr.decode(errors='replace').strip()}")
    return float(done.stdout)


async def measure(curl: str, repeat: int) -> Samples:
    samples = Samples()
    fragment_config = parse_config(FRAGMENT, "<bench ttfb>")
    direct_config = parse_config(DIRECT, "<bench ttfb>")
    async with (
        open_lab("ru-tspu") as lab,
        open_sidestep(lab, fragment_config) as side,
        open_sidestep(lab, direct_config) as plain,
    ):
        memory = side.app.memory
        if memory is None:
            raise RuntimeError("the fragment sidestep has no learned memory")
        blocked_site = site_of(world.BLOCKED)

        async def first_visit() -> float:
            memory.forget(blocked_site)
            return await curl_ttfb(curl, lab, world.BLOCKED, side)

        async def repeat_visit() -> float:
            return await curl_ttfb(curl, lab, world.BLOCKED, side)

        runs: dict[str, Callable[[], Awaitable[float]]] = {
            "no proxy": lambda: curl_ttfb(curl, lab, world.OPEN, None),
            "direct path": lambda: curl_ttfb(curl, lab, world.OPEN, plain),
            "uncensored": lambda: curl_ttfb(curl, lab, world.OPEN, side),
            "first visit": first_visit,
            # runs right after a first visit, which taught the memory
            "repeat visit": repeat_visit,
            # the direct path once more: how far two runs of the same thing differ here
            "direct again": lambda: curl_ttfb(curl, lab, world.OPEN, plain),
        }
        # warm up every path once (imports, certificate caches, the learned entry)
        for run in runs.values():
            await run()
        for _ in range(repeat):
            for kind, run in runs.items():
                samples.times[kind].append(await run())
        lines = side.connections.lines.values()
        strategies = {str(x["strategy"]) for x in lines if x["target"].startswith(world.BLOCKED)}
        if not any(s.startswith("tls-record-split (after direct") for s in strategies):
            raise RuntimeError(f"the first visits did not recover as expected: {strategies}")
    return samples


def report(samples: Samples, repeat: int) -> None:
    m = {k: samples.median_ms(k) for k in KINDS}
    unc, first, again = m["uncensored"], m["first visit"], m["repeat visit"]
    plain = (m["direct path"] + m["direct again"]) / 2
    print(f"time to first byte (curl time_starttransfer), median of {repeat}, lab ru-tspu")
    for kind in KINDS:
        print(f"  {kind:<14} {m[kind]:8.2f} ms")
    ok_first = first <= unc + 300
    ok_again = again <= unc * 1.05
    ok_path = unc <= plain * 1.05
    print(
        f"  first visit - uncensored   {first - unc:+8.2f} ms  "
        f"(target <= +300 ms: {'met' if ok_first else 'MISSED'})"
    )
    print(
        f"  repeat visit / uncensored  {again / unc:8.3f}x    "
        f"(target <= 1.05x: {'met' if ok_again else 'MISSED'})"
    )
    print(
        f"  fragment policy / direct path {unc / plain:5.3f}x  "
        f"(cost of the policy path, aim <= 1.05x: {'met' if ok_path else 'MISSED'}; "
        f"noise: direct again / direct path {m['direct again'] / m['direct path']:5.3f}x)"
    )


def run_ttfb_bench(args: argparse.Namespace) -> None:
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("bench ttfb needs curl")
    samples = trio.run(measure, curl, args.repeat)
    report(samples, args.repeat)
