"""``sidestep keygen``: make a bridge identity file and print its bridge URI."""

from __future__ import annotations

import argparse
import sys

from proxy.bridge.identity import (
    CARRIERS,
    WEB_CARRIERS,
    BridgeURI,
    generate_identity,
    split_host_port,
    split_url,
    write_identity,
)
from proxy.errors import ConfigError

DEFAULT_OUT = "bridge.key"


def add_keygen_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "keygen",
        help="make a bridge identity (0600 file) and print the bridge URI for clients",
        description=(
            "Write a new bridge identity (X25519 key, secret, short id) to FILE, readable by "
            "you only, and print one line: the bridge URI to give to clients. The private key "
            "never leaves the file; the URI holds the public key and the shared secret."
        ),
    )
    p.add_argument("--out", metavar="FILE", default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", metavar="HOST:PORT", help="where clients dial (raw carrier)")
    where.add_argument(
        "--url", metavar="URL", help="https://HOST[:PORT]/SECRETPATH for the web carriers"
    )
    p.add_argument(
        "--carrier",
        choices=CARRIERS,
        help="how clients reach the bridge (default: raw with --address, ws with --url)",
    )
    p.add_argument("--front", metavar="NAME", help="CDN front name for domain fronting")
    p.add_argument("--sni", metavar="NAME", help="TLS server name, when not the URL's host")
    p.add_argument(
        "--prefix",
        choices=("none", "ascii", "tls"),
        default="none",
        help="raw carrier: first bytes shaped like text or a TLS record (set the same "
        "`prefix` in the bridge's config)",
    )


def build_uri(
    args: argparse.Namespace, public_key: bytes, secret: bytes, short_id: bytes
) -> BridgeURI:
    """The bridge URI the keygen arguments describe (raises ``ConfigError`` on a bad one)."""
    if args.address is not None:
        carrier = args.carrier or "raw"
        if carrier in WEB_CARRIERS:
            raise ConfigError(f"carrier {carrier} needs --url, not --address", source="keygen")
        host, port = split_host_port(args.address, "address")
        path = ""
    else:
        carrier = args.carrier or "ws"
        if carrier == "raw":
            raise ConfigError("carrier raw needs --address, not --url", source="keygen")
        host, port, path = split_url(args.url)
    return BridgeURI(
        short_id=short_id,
        public_key=public_key,
        secret=secret,
        carrier=carrier,
        host=host,
        port=port,
        path=path,
        front=args.front,
        sni=args.sni,
        prefix=getattr(args, "prefix", "none") or "none",
    )


def run_keygen(args: argparse.Namespace) -> int:
    identity = generate_identity()
    # Check the arguments before touching the file system.
    uri = build_uri(args, identity.public_key, identity.secret, identity.short_id)
    write_identity(args.out, identity, force=args.force)
    sys.stdout.write(f"{uri}\n")
    return 0
