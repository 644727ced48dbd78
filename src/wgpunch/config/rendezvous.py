"""`wgpunch rendezvous`'s options: the schema config/ loads them by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..natpunch.limits import Limits
from ..ports import LEGACY_PORT, RENDEZVOUS_PORT
from . import ADDRESSES, PATH, SECONDS, TEXT, WHOLE, Bounds, Loaded, Option, Schema, switch_or


@dataclass(frozen=True, slots=True, kw_only=True)
class RendezvousConfig(Loaded):
    listen: tuple[str, ...]  # empty: [::] (or 0.0.0.0 where IPv6 is off)
    key: Path
    allow: Path | None
    legacy: str | None  # None: the legacy protocol is off
    peer_ttl: float
    max_peers: int


DEFAULT_LEGACY = f"0.0.0.0:{LEGACY_PORT}"
_LIMITS = Limits()

RENDEZVOUS = Schema("rendezvous", (
    Option("listen", ADDRESSES, f"where to serve natpunch-go's protocol (port "
           f"{RENDEZVOUS_PORT} if none)", f'["[::]:{RENDEZVOUS_PORT}"]', default=()),
    Option("key", PATH, "the server's private key file, made when missing", '"rendezvous.key"',
           default=Path("/var/lib/wgpunch/rendezvous.key")),
    Option("allow", PATH, "only these public keys (one per line) may register",
           '"allowed-keys"'),
    Option("legacy", switch_or(TEXT, on=DEFAULT_LEGACY), "also serve the UNAUTHENTICATED "
           f"wireguard-tools protocol (true: {DEFAULT_LEGACY})", "false"),
    Option("peer_ttl", SECONDS, "forget a node not heard from for this long", "600",
           default=_LIMITS.peer_ttl_s, bounds=Bounds(0, open_low=True)),
    Option("max_peers", WHOLE, "the most nodes remembered per protocol", "65536",
           default=_LIMITS.peers_max, bounds=Bounds(1)),
), RendezvousConfig)
