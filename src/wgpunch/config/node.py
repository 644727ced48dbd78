"""`wgpunch node`'s options (and `wgpunch netcheck`'s, which reads the node's file): the
schema config/ loads them by."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..ports import API_PORT, LEGACY_PORT, NATPROBE_PORT, RENDEZVOUS_PORT
from . import PATH, SECONDS, SWITCH, TEXT, WHOLE, Bounds, Loaded, Option, Schema, one_or_list


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig(Loaded):
    interface: str | None  # None: every WireGuard interface (node/fleet.py)
    registry: tuple[str, ...]  # several: each interface follows those it has as peers
    api: str | None
    token_file: Path | None
    keepalive: int
    opener_ttl: int | None  # None: measured (node/punch.py)
    dns_sd: str | None
    zone: str | None
    interval: float
    natpunch: str | None
    natpunch_server_key: str | None
    natpunch_legacy: str | None
    mesh: bool
    mesh_exclude: tuple[str, ...]
    natprobe_port: int  # 0: do not measure the NAT
    metrics_listen: str | None  # None: no metrics
    portmap: bool


NODE = Schema("node", (
    Option("interface", TEXT, "the WireGuard interface to steer (default: every one that has "
           "the registry's peer)", '"wg0"'),
    Option("registry", one_or_list(TEXT, "a key or a list of keys", "keys as text"),
           "the registry's public key (a peer of IF); a list: each interface follows those "
           "it has (several at once: each of them)",
           '"Rm9yIGV4YW1wbGUgb25seSwgbm90IGEgcmVhbCBrZXk="', default=()),
    Option("api", TEXT, f"the registry API's URL (default: its tunnel address, port {API_PORT})",
           f'"http://10.99.0.254:{API_PORT}"'),
    Option("token_file", PATH, "bearer token for the registry", '"/etc/wgpunch/token"'),
    Option("keepalive", WHOLE, "persistent keepalive (seconds) set on peers that have none", "25",
           default=25, bounds=Bounds(1, 65535)),
    Option("opener_ttl", WHOLE, "IP TTL of the NAT-opening datagram (default: measured)", "3",
           bounds=Bounds(1, 255)),
    Option("dns_sd", TEXT, "follow this wgsd-compatible DNS-SD server (ADDR:PORT) instead",
           '"10.99.0.254:5353"'),
    Option("zone", TEXT, "the DNS-SD zone", '"mesh.internal."'),
    Option("interval", SECONDS, "with dns_sd or natpunch: seconds between polls", "5", default=5.0,
           bounds=Bounds(0.1, 3600.0)),
    Option("natpunch", TEXT, f"follow this natpunch server (port {RENDEZVOUS_PORT} if none)",
           '"rendezvous.example"'),
    Option("natpunch_server_key", TEXT, "the natpunch server's public key",
           '"Rm9yIGV4YW1wbGUgb25seSwgbm90IGEgcmVhbCBrZXk="'),
    Option("natpunch_legacy", TEXT, f"follow this wireguard-tools server (port {LEGACY_PORT} "
           "if none)", '"rendezvous.example"'),
    Option("mesh", SWITCH, "add the registry's peers to IF and remove those it drops (only "
           "peers the mesh added)", "true", default=False),
    Option("mesh_exclude", one_or_list(TEXT, "a key or a list of keys", "keys as text"),
           "with mesh: never add these peers", '["Rm9yIGV4YW1wbGUgb25seSwgbm90IGEgcmVhbCBrZXk="]',
           default=()),
    Option("natprobe_port", WHOLE, "the registry's NAT probe port (UDP, at its public "
           "address; 0: do not measure the NAT)", str(NATPROBE_PORT), default=NATPROBE_PORT,
           bounds=Bounds(0, 65535)),
    Option("metrics_listen", TEXT, "serve Prometheus metrics at http://ADDR:PORT/metrics "
           "(default: off)", '"127.0.0.1:9588"'),
    Option("portmap", SWITCH, "map the listen port on our NAT (PCP, NAT-PMP, UPnP-IGD)",
           "true", default=True),
), NodeConfig)
