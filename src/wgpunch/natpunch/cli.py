"""`wgpunch rendezvous`: a natpunch server for nodes whose registry is not a WireGuard peer."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .. import config, sdnotify
from ..commands import help_of
from ..config.rendezvous import RENDEZVOUS, RendezvousConfig
from ..errors import ConfigError
from ..keys import Key, public_key
from ..wg.model import Endpoint
from . import keyfile
from .legacy import LegacyRendezvous
from .limits import Limits
from .serve import listen, source_endpoint
from .server import NoiseRendezvous
from .wire import LEGACY_PORT, RENDEZVOUS_PORT

log = logging.getLogger(__name__)

DEFAULTS = Limits()
DEFAULT_KEY: Path = RENDEZVOUS.option("key").default


def parse_endpoint(text: str, default_port: int, what: str) -> Endpoint:
    """`ADDR:PORT`, `[IPv6]:PORT`, or a bare address (with `default_port`)."""
    try:
        return Endpoint.parse(text, default_port)
    except ValueError:
        raise ConfigError(
            f"rendezvous: {what} {text!r}: expected ADDR:PORT, [IPv6]:PORT or ADDR"
        ) from None


@dataclass(frozen=True, slots=True)
class Settings:
    listen: tuple[Endpoint, ...]  # empty: [::] (or 0.0.0.0 where IPv6 is off)
    key: Path
    allow: Path | None  # None: anyone with the server's key
    legacy: Endpoint | None  # None: the legacy protocol is off
    limits: Limits


def settings_from(options: RendezvousConfig) -> Settings:
    """The addresses parsed; the files (key, allow-list) are read only when serving."""
    listen = tuple(parse_endpoint(text, RENDEZVOUS_PORT, options.origin("listen"))
                   for text in options.listen)
    legacy = (None if options.legacy is None
              else parse_endpoint(options.legacy, LEGACY_PORT, options.origin("legacy")))
    return Settings(listen, options.key, options.allow, legacy,
                    Limits(peers_max=options.max_peers, peer_ttl_s=options.peer_ttl))


def read_allowed(path: Path) -> frozenset[Key]:
    """One public key per line (any form `wg` prints or wgpunch reads); `#` starts a comment."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as error:
        raise ConfigError(f"rendezvous: cannot read {path}: {error.strerror}") from None
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


async def serve(settings: Settings) -> int:
    # Every option is checked before the key file may be made.
    endpoints = list(settings.listen) or [_default_listen()]
    allowed = None if settings.allow is None else read_allowed(settings.allow)
    private = keyfile.load_or_create(settings.key)
    public = public_key(private)
    limits = settings.limits
    noise = NoiseRendezvous(private, allowed=allowed, limits=limits)
    legacy = LegacyRendezvous(limits)
    transports: list[asyncio.DatagramTransport] = []
    try:
        for endpoint in endpoints:
            transports.append(await listen(noise, endpoint, "natpunch"))
        if settings.legacy is not None:
            transports.append(await listen(legacy, settings.legacy, "natpunch legacy"))
        where = ", ".join(str(source_endpoint(t.get_extra_info("sockname")))
                          for t in transports)
        log.info("rendezvous on %s; public key %s%s", where, public,
                 f"; {len(allowed)} keys allowed" if allowed is not None else "",
                 extra={"event": "started", "public_key": str(public)})
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sdnotify.notify("READY=1", f"STATUS=serving on {where}")
        await stop.wait()
        sdnotify.notify("STOPPING=1")
        totals: Counter[str] = noise.counts + legacy.counts
        log.info("rendezvous: stopped (%s)",
                 ", ".join(f"{k} {v}" for k, v in sorted(totals.items())) or "nothing served")
    finally:
        for transport in transports:
            transport.close()
    return 0


def run(args: argparse.Namespace) -> int:
    options = config.load(RENDEZVOUS, vars(args), config=args.config)
    if args.print_key:
        print(public_key(keyfile.load_or_create(options.key)))
        return 0
    settings = settings_from(options)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(serve(settings))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rendezvous",
        help=help_of("rendezvous"),
        description=textwrap.fill(
            "Serve endpoint discovery over UDP for nodes that cannot have the registry as a "
            "WireGuard peer (a shared rendezvous host, or one without WireGuard). It speaks "
            "natpunch-go's protocol: a node handshakes (Noise IK) with its WireGuard key, "
            "from its WireGuard port, so the server learns its public endpoint and that the "
            "node holds the key; then the node asks for its peers' endpoints. Run nodes "
            "with `wgpunch node --natpunch HOST:PORT --natpunch-server-key KEY` (or "
            "natpunch-go's client). The server holds no WireGuard device.", 88),
        epilog=textwrap.fill(
            f"Entries expire after --peer-ttl seconds without a request (clients ask every "
            f"few seconds); at most --max-peers are kept, the least recently heard going "
            f"first. Handshakes are limited to {DEFAULTS.handshakes_per_source_s:g}/s per "
            f"source, an IPv4 address or an IPv6 /64 (burst {DEFAULTS.handshake_burst:g}). "
            "IPv4 and IPv6: an IPv6 endpoint is answered in 18 bytes, which natpunch-go's "
            "client cannot read; the legacy protocol carries IPv4 only.", 88)
        + "\n\n" + config.epilog(RENDEZVOUS),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--listen", action="append", metavar="ADDR[:PORT]",
        help=f"where to serve natpunch-go's protocol; repeatable (default [::]:{RENDEZVOUS_PORT}, "
        f"IPv4 and IPv6; 0.0.0.0:{RENDEZVOUS_PORT} where IPv6 is off)",
    )
    parser.add_argument(
        "--key", metavar="FILE", type=Path,
        help="the server's private key, base64 as `wg genkey` writes it; made (mode 0600) "
        f"when missing, and kept across restarts (default {DEFAULT_KEY})",
    )
    parser.add_argument(
        "--print-key", action="store_true",
        help="print the server's public key (what nodes need) and exit",
    )
    parser.add_argument(
        "--allow", metavar="FILE", type=Path,
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
        "--peer-ttl", type=float, metavar="SECONDS",
        help=f"forget a node not heard from for this long (default {DEFAULTS.peer_ttl_s:g})",
    )
    parser.add_argument(
        "--max-peers", type=int, metavar="N",
        help=f"the most nodes remembered per protocol (default {DEFAULTS.peers_max})",
    )
    parser.add_argument(
        "--config", metavar="FILE", type=Path,
        help="read options from this TOML file (keys below); flags and the environment win",
    )
    parser.set_defaults(func=run, daemon=True)

