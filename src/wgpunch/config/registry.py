"""`wgpunch registry`'s and `wgpunch relay`'s options: the schemas config/ loads them by.
The two share the relay's ports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..ports import API_PORT, NATPROBE_PORT, RELAY_CONTROL_PORT
from . import (
    ADDRESSES,
    PATH,
    PORT_OR_ADDRESS,
    SECONDS,
    SWITCH,
    TEXT,
    WHOLE,
    Bounds,
    Loaded,
    Option,
    Schema,
    one_or_list,
    switch_or,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RegistryConfig(Loaded):
    interface: str
    listen: tuple[str, ...]  # empty: the interface's own addresses
    token_file: Path | None
    poll_interval: float
    dns: tuple[str | int, ...]  # empty: no DNS-SD server
    zone: str | None
    dns_self: tuple[str, ...] | None  # None: no `self` record
    dns_allow: tuple[str, ...]  # networks answered besides the peers' tunnel addresses
    relay: str | None  # a port range; None: no relay
    relay_address: str | None  # None: nodes use the registry's endpoint address
    relay_userspace: bool  # never the kernel fast path
    relay_remote: tuple[str, ...]  # relays on other hosts: IP[:PORT] of their control APIs
    relay_secret_file: Path | None  # shared with every remote relay
    natprobe_port: int  # 0: no NAT probe port
    natprobe_alt_port: int | None  # None: natprobe_port + 1; 0: none
    natprobe_alt_address: str | None
    metrics_listen: str | None  # None: no metrics


# Our choice: 500 slots of 2 ports, below Linux's ephemeral ports (32768-60999), so that no
# outgoing socket of the registry host ever holds one.
DEFAULT_RELAY_PORTS = "31000-31999"

REGISTRY = Schema("registry", (
    Option("interface", TEXT, "the WireGuard interface whose peers are the nodes", '"wg0"',
           required=True),
    Option("listen", ADDRESSES, f"where the API listens (port {API_PORT} if none); "
           "default: IF's addresses", f'["10.99.0.254:{API_PORT}"]', default=()),
    Option("token_file", PATH, "require the bearer token in this file",
           '"/etc/wgpunch/token"'),
    # Below 10 ms the reads cost more than they tell; above a minute the registry is no help
    # in getting peers connected quickly.
    Option("poll_interval", SECONDS, "how often to read IF's peers while they do not change "
           "(seconds; four times as often for 5 s after a change)", "0.2", default=0.2,
           bounds=Bounds(0.01, 60.0)),
    Option("dns", one_or_list(PORT_OR_ADDRESS, "a port, an address or a list of them",
                              "ports or addresses"),
           "serve DNS-SD on PORT (IF's addresses) or ADDR:PORT; a list for several",
           "5353", default=()),
    Option("zone", TEXT, "the DNS-SD zone", '"mesh.internal."'),
    Option("dns_self", switch_or(one_or_list(TEXT, "a list of texts", "texts"), on=()),
           "publish the registry itself (true, or [IP:PORT] [CIDR ...])",
           '["192.0.2.1:51820"]'),
    Option("dns_allow", one_or_list(TEXT, "a network or a list of networks", "networks"),
           "also answer DNS-SD queries from these networks (default: peers' tunnel "
           "addresses only)", '["192.0.2.0/24"]', default=()),
    Option("relay", switch_or(TEXT, on=DEFAULT_RELAY_PORTS),
           f"relay WireGuard for pairs that cannot reach each other, on UDP ports FIRST-LAST "
           f"(true: {DEFAULT_RELAY_PORTS})", f'"{DEFAULT_RELAY_PORTS}"'),
    Option("relay_address", TEXT, "the relay's public IP handed to nodes (default: the "
           "registry's endpoint as each node has it)", '"192.0.2.1"'),
    Option("relay_userspace", SWITCH, "forward relayed datagrams in the relay process, never "
           "through nftables", "false", default=False),
    Option("relay_remote", ADDRESSES, "relays on other hosts (`wgpunch relay --control`): "
           f"IP or IP:PORT of each one's control API (port {RELAY_CONTROL_PORT} if none); "
           "nodes relayed there send to that IP", '["192.0.2.7"]', default=()),
    Option("relay_secret_file", PATH, "the secret shared with the remote relays (one "
           "word, at least 32 characters)", '"relay.secret"'),
    Option("natprobe_port", WHOLE, "UDP port of the NAT probe on every address (0: off)",
           str(NATPROBE_PORT), default=NATPROBE_PORT, bounds=Bounds(0, 65535)),
    Option("natprobe_alt_port", WHOLE, "the NAT probe's second port, for filtering "
           "(default: natprobe_port + 1; 0: none)", str(NATPROBE_PORT + 1),
           bounds=Bounds(0, 65535)),
    Option("natprobe_alt_address", TEXT, "a second public address of this host, for the NAT "
           "probe's filtering test", '"192.0.2.66"'),
    Option("metrics_listen", TEXT, "serve Prometheus metrics at http://ADDR:PORT/metrics "
           "(default: off)", '"127.0.0.1:9587"'),
), RegistryConfig)



@dataclass(frozen=True, slots=True, kw_only=True)
class RelayConfig(Loaded):
    ports: str
    address: str | None
    userspace: bool
    control: str | None  # None: no control API, no slots
    secret_file: Path | None


RELAY = Schema("relay", (
    Option("ports", TEXT, "the UDP ports to relay on, FIRST-LAST, two per pair",
           f'"{DEFAULT_RELAY_PORTS}"', default=DEFAULT_RELAY_PORTS),
    Option("address", TEXT, "the relay's public IP, for the kernel path's source address "
           "(default: the route's)", '"192.0.2.1"'),
    Option("userspace", SWITCH, "forward in this process only, never through nftables",
           "false", default=False),
    Option("control", TEXT, "serve the control API a registry allocates slots through on "
           f"ADDR or ADDR:PORT (port {RELAY_CONTROL_PORT} if none); without it, no slots",
           '"192.0.2.7"'),
    Option("secret_file", PATH, "the secret shared with the registry (one word, at least 32 "
           "characters; the registry's relay_secret_file)", '"relay.secret"'),
), RelayConfig)
