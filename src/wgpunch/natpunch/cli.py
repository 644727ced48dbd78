"""`wgpunch rendezvous`: a natpunch server for nodes whose registry is not a WireGuard peer."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections import Counter
from pathlib import Path

from ..errors import WgpunchError
from ..keys import Key, public_key
from ..wg.device import Endpoint
from . import keyfile
from .legacy import LegacyRendezvous
from .limits import Limits
from .serve import listen, source_endpoint
from .server import NoiseRendezvous
from .wire import LEGACY_PORT, RENDEZVOUS_PORT

log = logging.getLogger(__name__)

DEFAULT_KEY = "/var/lib/wgpunch/rendezvous.key"
DEFAULTS = Limits()


def parse_endpoint(text: str, default_port: int, what: str) -> Endpoint:
    """`ADDR:PORT`, `[IPv6]:PORT`, or a bare address (with `default_port`)."""
    try:
        return Endpoint.parse(text, default_port)
    except ValueError:
        raise WgpunchError(
            f"rendezvous: {what} {text!r}: expected ADDR:PORT, [IPv6]:PORT or ADDR"
        ) from None


def read_allowed(path: str) -> frozenset[Key]:
    """One public key per line (any form `wg` prints or wgpunch reads); `#` starts a comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise WgpunchError(f"rendezvous: cannot read {path}: {error.strerror}") from None
    keys = set()
    for number, line in enumerate(lines, 1):
        text = line.partition("#")[0].strip()
        if text:
            keys.add(Key.parse(text, what=f"{path} line {number}"))
    return frozenset(keys)


def _default_listen() -> Endpoint:
    # `::` takes IPv4 too; a host with IPv6 turned off cannot bind it.
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::", 0))
    except OSError:
        return Endpoint(ipaddress.ip_address("0.0.0.0"), RENDEZVOUS_PORT)
    return Endpoint(ipaddress.ip_address("::"), RENDEZVOUS_PORT)


async def serve(args: argparse.Namespace) -> int:
    # Every flag is checked before the key file may be made.
    endpoints = [parse_endpoint(text, RENDEZVOUS_PORT, "--listen")
                 for text in args.listen or ()] or [_default_listen()]
    legacy_at = parse_endpoint(args.legacy, LEGACY_PORT, "--legacy") if args.legacy else None
    allowed = read_allowed(args.allow) if args.allow else None
    private = keyfile.load_or_create(Path(args.key))
    public = public_key(private)
    limits = Limits(peers_max=args.max_peers, peer_ttl_s=args.peer_ttl)
    noise = NoiseRendezvous(private, allowed=allowed, limits=limits)
    legacy = LegacyRendezvous(limits)
    transports: list[asyncio.DatagramTransport] = []
    try:
        for endpoint in endpoints:
            transports.append(await listen(noise, endpoint, "natpunch"))
        if legacy_at is not None:
            transports.append(await listen(legacy, legacy_at, "natpunch legacy"))
        where = ", ".join(str(source_endpoint(t.get_extra_info("sockname")))
                          for t in transports)
        log.info("rendezvous on %s; public key %s%s", where, public,
                 f"; {len(allowed)} keys allowed" if allowed is not None else "",
                 extra={"event": "started", "public_key": str(public)})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        totals: Counter[str] = noise.counts + legacy.counts
        log.info("rendezvous: stopped (%s)",
                 ", ".join(f"{k} {v}" for k, v in sorted(totals.items())) or "nothing served")
    finally:
        for transport in transports:
            transport.close()
    return 0


def run(args: argparse.Namespace) -> int:
    if args.max_peers < 1:
        raise WgpunchError(f"rendezvous: --max-peers {args.max_peers} must be at least 1")
    if not args.peer_ttl > 0:
        raise WgpunchError(f"rendezvous: --peer-ttl {args.peer_ttl} must be positive")
    if args.print_key:
        print(public_key(keyfile.load_or_create(Path(args.key))))
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(args))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rendezvous",
        help="a natpunch server: nodes behind NATs find each other without a registry peer",
        description=(
            "Serve endpoint discovery over UDP for nodes that cannot have the registry as a "
            "WireGuard peer (a shared rendezvous host, or one without WireGuard). It speaks "
            "natpunch-go's protocol: a node handshakes (Noise IK) with its WireGuard key, "
            "from its WireGuard port, so the server learns its public endpoint and that the "
            "node holds the key; then the node asks for its peers' endpoints. Run nodes "
            "with `wgpunch node --natpunch HOST:PORT --natpunch-server-key KEY` (or "
            "natpunch-go's client). The server holds no WireGuard device."
        ),
        epilog=(
            f"Entries expire after --peer-ttl seconds without a request (clients ask every "
            f"few seconds); at most --max-peers are kept, the least recently heard going "
            f"first. Handshakes are limited to {DEFAULTS.handshakes_per_source_s:g}/s per "
            f"source, an IPv4 address or an IPv6 /64 (burst {DEFAULTS.handshake_burst:g}). "
            "IPv4 and IPv6: an IPv6 endpoint is answered in 18 bytes, which natpunch-go's "
            "client cannot read; the legacy protocol carries IPv4 only."
        ),
    )
    parser.add_argument(
        "--listen", action="append", metavar="ADDR[:PORT]",
        help=f"where to serve natpunch-go's protocol; repeatable (default [::]:{RENDEZVOUS_PORT}, "
        f"IPv4 and IPv6; 0.0.0.0:{RENDEZVOUS_PORT} where IPv6 is off)",
    )
    parser.add_argument(
        "--key", metavar="FILE", default=DEFAULT_KEY,
        help="the server's private key, base64 as `wg genkey` writes it; made (mode 0600) "
        f"when missing, and kept across restarts (default {DEFAULT_KEY})",
    )
    parser.add_argument(
        "--print-key", action="store_true",
        help="print the server's public key (what nodes need) and exit",
    )
    parser.add_argument(
        "--allow", metavar="FILE",
        help="only these WireGuard public keys (one per line) may register and be found; "
        "handshakes from other keys get no answer (default: anyone with the server's key)",
    )
    parser.add_argument(
        "--legacy", nargs="?", const=f"0.0.0.0:{LEGACY_PORT}", metavar="ADDR[:PORT]",
        help="also serve the wireguard-tools example protocol (default port "
        f"{LEGACY_PORT}). UNAUTHENTICATED: anyone can register any key at any address, so "
        "anyone can redirect (and so block) any node's traffic; use it only where every "
        "sender is trusted. Its entries are kept apart from the authenticated ones",
    )
    parser.add_argument(
        "--peer-ttl", type=float, default=DEFAULTS.peer_ttl_s, metavar="SECONDS",
        help=f"forget a node not heard from for this long (default {DEFAULTS.peer_ttl_s:g})",
    )
    parser.add_argument(
        "--max-peers", type=int, default=DEFAULTS.peers_max, metavar="N",
        help=f"the most nodes remembered per protocol (default {DEFAULTS.peers_max})",
    )
    parser.set_defaults(func=run, daemon=True)

