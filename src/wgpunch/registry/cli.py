"""`wgpunch registry`: options from flags, the environment and a TOML file (config/), then
serve until a signal. Every mistake in them is a `ConfigError`: one line, no traceback."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
from collections.abc import Mapping
from pathlib import Path

from .. import config
from ..commands import help_of
from ..config.registry import DEFAULT_RELAY_PORTS, REGISTRY, RegistryConfig
from ..errors import ChangeRefused, ConfigError
from ..ports import API_PORT, NATPROBE_PORT, RELAY_CONTROL_PORT
from ..wg.model import Endpoint, IPAddress, IPNetwork
from .listen import DNS_PORT, parse_dns_listen, parse_listen
from .natprobe import ProbeSettings
from .serve import DnsSettings, RelaySettings, RemoteRelaySettings, Settings, serve

EPILOG = f"""\
The API (docs/api.md) identifies each caller by its tunnel source address: it must lie in
the allowed IPs of exactly one peer of IF. Stop with SIGTERM or SIGINT (exit status 0).

DNS-SD (--dns, wgsd v0.3 compatible: dig, wgsd-client): for each peer with an endpoint, in
zone Z and with K its key in lowercase base32 (56 characters, "====" padding):
  _wireguard._udp.Z PTR K._wireguard._udp.Z
  K._wireguard._udp.Z SRV 0 0 PORT K._wireguard._udp.Z   (+ A or AAAA, then TXT)
  K._wireguard._udp.Z A|AAAA|TXT "txtvers=1" "pub=BASE64" "allowed=CIDR,..."
TTL 0; other names in Z: NXDOMAIN; names outside Z: REFUSED. Like the API, it listens on
IF's tunnel addresses by default, and answers only queries from peers' tunnel addresses (and
networks given with --dns-allow): anyone it answers learns every node's endpoint.

{config.epilog(REGISTRY)}"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "registry",
        help=help_of("registry"),
        description=(
            "Serve the wgpunch registry API for WireGuard interface IF. Every node is an\n"
            "ordinary peer of IF; the registry publishes the endpoint IF observes for each\n"
            "of them, plus what nodes report about themselves, over HTTP inside the tunnel,\n"
            "with a watch stream and punch coordination."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--interface", "-i", metavar="IF",
        help="the registry's WireGuard interface, whose peers are the nodes (required, here "
             "or in the config file)",
    )
    parser.add_argument(
        "--listen", metavar="ADDR:PORT", action="append",
        help=f"listen for the API on ADDR:PORT ([IPv6]:PORT; a bare ADDR means port "
             f"{API_PORT}); repeat for several. Default: every IP address of IF, port "
             f"{API_PORT}. 0.0.0.0 or [::] only when given explicitly (logs a warning)",
    )
    parser.add_argument(
        "--config", metavar="FILE", type=Path,
        help="read options from this TOML file (keys below); flags and the environment "
             "win",
    )
    parser.add_argument(
        "--token-file", metavar="FILE", type=Path,
        help="also require 'Authorization: Bearer TOKEN' on every request but /healthz; "
             "TOKEN is this file's content without surrounding whitespace",
    )
    parser.add_argument(
        "--poll-interval", metavar="SECONDS", type=float,
        help="how often to read IF for peers' endpoints (default 0.2; "
             f"{REGISTRY.option('poll_interval').bounds})",
    )
    parser.add_argument(
        "--dns", metavar="[ADDR:]PORT", action="append",
        help=f"also serve wgsd-compatible DNS-SD on UDP and TCP: PORT alone on every IP "
             f"address of IF (like the API), or ADDR:PORT, [IPv6]:PORT, ADDR (port "
             f"{DNS_PORT}, which needs root); repeat for several. Needs --zone",
    )
    parser.add_argument(
        "--zone", metavar="ZONE",
        help="the DNS-SD zone, e.g. mesh.internal. (names under it are answered, others "
             "refused)",
    )
    parser.add_argument(
        "--dns-self", metavar="ARG", nargs="*",
        help="also publish the registry itself (wgsd's `self`), last in the listing: "
             "[IP:PORT] [CIDR ...]. IP:PORT is the registry's public endpoint (recommended); "
             "without it, the source address of the route toward the querying node and IF's "
             "listen port, which is wrong behind a NAT or port forward. CIDRs are its allowed "
             "IPs in the TXT record",
    )
    parser.add_argument(
        "--dns-allow", metavar="CIDR", action="append",
        help="also answer DNS-SD queries from this network; repeat for several. By default "
             "only queries from peers' tunnel addresses are answered: a query from anywhere "
             "else gets no answer over UDP and a closed connection over TCP",
    )
    parser.add_argument(
        "--relay", metavar="FIRST-LAST", nargs="?", const=DEFAULT_RELAY_PORTS,
        help="also relay WireGuard between nodes that cannot reach each other (docs/api.md, "
             "POST /v1/relay), on these UDP ports, two per pair (default "
             f"{DEFAULT_RELAY_PORTS}); ciphertext only, forwarded by nftables once "
             "both sides are bound",
    )
    parser.add_argument(
        "--relay-address", metavar="IP",
        help="the relay's public IP, handed to nodes (default: the registry's endpoint as "
             "each node's device has it)",
    )
    parser.add_argument(
        "--relay-userspace", action="store_true", default=None,
        help="forward relayed datagrams in this process only, never through nftables",
    )
    parser.add_argument(
        "--relay-remote", metavar="IP[:PORT]", action="append",
        help="also hand out slots on the relay on another host whose control API "
             f"(`wgpunch relay --control`) is at IP:PORT (port {RELAY_CONTROL_PORT} if "
             "none); nodes relayed there send to IP. Repeat for several: a new pair gets the "
             "least loaded that answers, else the registry's own (--relay)",
    )
    parser.add_argument(
        "--relay-secret-file", metavar="FILE",
        help="the secret shared with the remote relays (one word, at least 32 characters)",
    )
    parser.add_argument(
        "--natprobe-port", metavar="PORT", type=int,
        help="answer NAT probes (docs/api.md) on this UDP port of every address: nodes learn "
             f"how their NAT maps and filters (default {NATPROBE_PORT}; 0: off). "
             "Must be reachable from the internet, like the WireGuard port",
    )
    parser.add_argument(
        "--natprobe-alt-port", metavar="PORT", type=int,
        help="the NAT probe's second port, which answers from elsewhere so that a node can "
             "tell its NAT's filtering (default: the probe port + 1; 0: none)",
    )
    parser.add_argument(
        "--natprobe-alt-address", metavar="ADDR",
        help="a second public address of this host: the probe also answers from it (from "
             "the second port), so that nodes can tell address-dependent from "
             "endpoint-independent filtering",
    )
    parser.add_argument(
        "--metrics-listen", metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (docs/metrics.md); off by "
             "default. No authentication: give 127.0.0.1 or a tunnel address (a wildcard or "
             "public address logs a warning)",
    )
    parser.set_defaults(func=run, daemon=True)


# -- options ----------------------------------------------------------------------------------


def settings_from(args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> Settings:
    options = config.load(REGISTRY, vars(args), config=args.config, environ=environ)
    listen = tuple(dict.fromkeys(
        options.parsed("listen", parse_listen, text) for text in options.listen))
    return Settings(options.interface, listen, options.token_file, options.poll_interval,
                    _dns_settings(options), relay=relay_settings(options),
                    remote_relays=_remote_relays(options), natprobe=_natprobe_settings(options),
                    metrics_listen=_metrics_listen(options))


def relay_settings(options: RegistryConfig) -> RelaySettings | None:
    from .relayslots import port_range

    if options.relay is None:
        if options.relay_address is not None or options.relay_userspace:
            raise ConfigError("registry: --relay-address and --relay-userspace need --relay")
        return None
    address = (None if options.relay_address is None
               else options.parsed("relay_address", relay_address, options.relay_address))
    return RelaySettings(options.parsed("relay", port_range, options.relay), address,
                         not options.relay_userspace)


def _remote_relays(options: RegistryConfig) -> RemoteRelaySettings | None:
    if not options.relay_remote:
        if options.relay_secret_file is not None:
            raise ConfigError("registry: --relay-secret-file needs --relay-remote")
        return None
    if options.relay_secret_file is None:
        raise ConfigError("registry: --relay-remote needs --relay-secret-file (the secret "
                          "the remote relays share)")
    controls = tuple(dict.fromkeys(options.parsed("relay_remote", control_endpoint, text)
                                   for text in options.relay_remote))
    return RemoteRelaySettings(controls, options.relay_secret_file)


def control_endpoint(text: str) -> Endpoint:
    """A relay's control API: IP or IP:PORT ([IPv6]:PORT), port RELAY_CONTROL_PORT if none."""
    try:
        return Endpoint.parse(text, RELAY_CONTROL_PORT)
    except ChangeRefused as error:
        raise ConfigError(f"relay control API: {error}") from None


def relay_address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"registry: relay address {text!r} is not an IP address") from None


def _natprobe_settings(options: RegistryConfig) -> ProbeSettings | None:
    port = options.natprobe_port
    if not port:
        if options.natprobe_alt_address or options.natprobe_alt_port:
            raise ConfigError("registry: --natprobe-alt-port and --natprobe-alt-address need "
                              "the probe port (--natprobe-port is 0)")
        return None
    alt_port = options.natprobe_alt_port
    if alt_port is None:
        alt_port = port + 1 if port < 65535 else 0
    if alt_port == port:
        raise ConfigError(f"registry: the NAT probe's second port is its first ({port})")
    alt_address = None
    if options.natprobe_alt_address:
        alt_address = options.parsed("natprobe_alt_address", _address,
                                     options.natprobe_alt_address)
    return ProbeSettings(port, alt_port or None, alt_address)


def _address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"registry: NAT probe address {text!r} is not an IP address") \
            from None


def _metrics_listen(options: RegistryConfig) -> Endpoint | None:
    if not options.metrics_listen:
        return None
    from ..exposition import parse_address  # prometheus_client: only when asked for

    return options.parsed("metrics_listen", lambda text: parse_address(text, "registry"),
                          options.metrics_listen)


def _dns_settings(options: RegistryConfig) -> DnsSettings | None:
    if not options.dns:
        if options.zone or options.dns_self is not None or options.dns_allow:
            raise ConfigError("registry: --zone, --dns-self and --dns-allow need --dns (where "
                              "to serve DNS-SD)")
        return None
    from .dnssd import Zone  # dnspython: only for a registry that serves DNS-SD
    from .dnsserver import SelfConfig

    if not options.zone:
        raise ConfigError("registry: --dns needs --zone ZONE (or 'zone' in the config file)")
    listen = tuple(dict.fromkeys(
        options.parsed("dns", parse_dns_listen, str(text)) for text in options.dns))
    zone = options.parsed("zone", Zone.parse, options.zone)
    self_config = (None if options.dns_self is None else
                   options.parsed("dns_self", SelfConfig.parse, options.dns_self))
    allow = tuple(options.parsed("dns_allow", _network, text) for text in options.dns_allow)
    return DnsSettings(listen, zone, self_config, allow)


def _network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        raise ConfigError(f"registry: DNS allowed network {text!r} is not a network (CIDR, "
                          "with no host bits set)") from None


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(settings_from(args)))
    return 0
