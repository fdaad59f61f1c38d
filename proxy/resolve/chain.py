"""Several resolvers tried in order: the first one that answers wins.

Used for the secure endpoints of ``[dns] resolver = "secure"``: when the first DoH provider is
blocked or down, the next one is asked, and the error names every endpoint that failed.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy.errors import ResolveError
from proxy.inbound.base import IPAddress
from proxy.resolve.base import Resolver, ip_literal


class FallbackResolver:
    """Ask ``resolvers`` one after another until one returns addresses."""

    def __init__(self, resolvers: Sequence[Resolver], names: Sequence[str] = ()) -> None:
        if not resolvers:
            raise ValueError("FallbackResolver needs at least one resolver")
        self.resolvers = list(resolvers)
        self.names = list(names) or [f"resolver {i}" for i in range(len(resolvers))]

    async def resolve(self, host: str) -> list[IPAddress]:
        literal = ip_literal(host)
        if literal is not None:
            return [literal]
        failures: list[str] = []
        for name, resolver in zip(self.names, self.resolvers, strict=True):
            try:
                addrs = await resolver.resolve(host)
            except ResolveError as exc:
                failures.append(f"{name}: {exc}")
                continue
            if addrs:
                return addrs
            failures.append(f"{name}: no addresses")
        raise ResolveError(f"{host}: every resolver failed ({'; '.join(failures)})")
