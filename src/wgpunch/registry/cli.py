"""`wgpunch registry`: options from flags, the environment and a TOML file (config.py), then
serve until a signal. Every mistake in them is a `ConfigError`: one line, no traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import config, sdnotify
from ..commands import help_of
from ..errors import ChangeRefused, ConfigError
from ..keys import Key
from ..protocol import API_PORT
from ..wg import open_device
from ..wg.device import Endpoint, IPAddress, IPNetwork
from .listen import (
    DNS_PORT,
    default_listen,
    interface_addresses,
    is_wildcard,
    parse_dns_listen,
    parse_listen,
)
from .natprobe import ProbeSettings
from .timings import Timings

if TYPE_CHECKING:  # the serving parts load aiohttp and dnspython: only when serving
    from ..exposition import MetricsServer
    from .dnssd import Zone
    from .dnsserver import DnsServer, SelfConfig
    from .exporter import RegistryExporter
    from .relay import Relay
    from .state import RegistryState

log = logging.getLogger(__name__)

# The relay's own nftables table (relaykernel.py); one relay per network namespace.
RELAY_TABLE = "wgpunch_relay"

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

{config.epilog(config.REGISTRY)}"""


@dataclass(frozen=True, slots=True)
class DnsSettings:
    listen: tuple[Endpoint | int, ...]  # a bare port: that port on every address of IF
    zone: Zone
    self_config: SelfConfig | None  # None: no `self` record
    allow: tuple[IPNetwork, ...] = ()  # answered besides the peers' tunnel addresses


@dataclass(frozen=True, slots=True)
class RelaySettings:
    ports: range
    address: IPAddress | None  # handed to nodes; None: the registry's endpoint as they have it
    kernel: bool  # try the nftables fast path


@dataclass(frozen=True, slots=True)
class RemoteRelaySettings:
    controls: tuple[Endpoint, ...]  # each relay's control API; its IP is where nodes send
    secret_file: Path


@dataclass(frozen=True, slots=True)
class Settings:
    interface: str
    listen: tuple[Endpoint, ...]  # empty: the interface's own addresses
    token_file: Path | None
    poll_interval_s: float
    dns: DnsSettings | None = None  # None: no DNS-SD server
    relay: RelaySettings | None = None  # None: no relay
    remote_relays: RemoteRelaySettings | None = None  # None: no relays on other hosts
    natprobe: ProbeSettings | None = None  # None: no NAT probe port
    metrics_listen: Endpoint | None = None  # None: no metrics


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
             f"{config.REGISTRY.option('poll_interval').bounds})",
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
        "--relay", metavar="FIRST-LAST", nargs="?", const=config.DEFAULT_RELAY_PORTS,
        help="also relay WireGuard between nodes that cannot reach each other (docs/api.md, "
             "POST /v1/relay), on these UDP ports, two per pair (default "
             f"{config.DEFAULT_RELAY_PORTS}); ciphertext only, forwarded by nftables once "
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
             f"(`wgpunch relay --control`) is at IP:PORT (port {config.RELAY_CONTROL_PORT} if "
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
             f"how their NAT maps and filters (default {config.NATPROBE_PORT}; 0: off). "
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
    options = config.load(config.REGISTRY, vars(args), config=args.config, environ=environ)
    listen = tuple(dict.fromkeys(
        options.parsed("listen", parse_listen, text) for text in options.listen))
    return Settings(options.interface, listen, options.token_file, options.poll_interval,
                    _dns_settings(options), relay=relay_settings(options),
                    remote_relays=_remote_relays(options), natprobe=_natprobe_settings(options),
                    metrics_listen=_metrics_listen(options))


def relay_settings(options: config.RegistryConfig) -> RelaySettings | None:
    from .relayslots import port_range

    if options.relay is None:
        if options.relay_address is not None or options.relay_userspace:
            raise ConfigError("registry: --relay-address and --relay-userspace need --relay")
        return None
    address = (None if options.relay_address is None
               else options.parsed("relay_address", relay_address, options.relay_address))
    return RelaySettings(options.parsed("relay", port_range, options.relay), address,
                         not options.relay_userspace)


def _remote_relays(options: config.RegistryConfig) -> RemoteRelaySettings | None:
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
        return Endpoint.parse(text, config.RELAY_CONTROL_PORT)
    except ChangeRefused as error:
        raise ConfigError(f"relay control API: {error}") from None


def relay_address(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ConfigError(f"registry: relay address {text!r} is not an IP address") from None


def _natprobe_settings(options: config.RegistryConfig) -> ProbeSettings | None:
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


def _metrics_listen(options: config.RegistryConfig) -> Endpoint | None:
    if not options.metrics_listen:
        return None
    from ..exposition import parse_address  # prometheus_client: only when asked for

    return options.parsed("metrics_listen", lambda text: parse_address(text, "registry"),
                          options.metrics_listen)


def _dns_settings(options: config.RegistryConfig) -> DnsSettings | None:
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


# -- serving ----------------------------------------------------------------------------------


async def serve(settings: Settings, timings: Timings | None = None) -> None:
    """Run the registry until SIGTERM or SIGINT, then release everything."""
    from aiohttp import web

    from .api import create_app
    from .metrics import RegistryMetrics
    from .natprobe import ProbeServer
    from .observer import Observer
    from .site import ApiSite
    from .state import RegistryState

    timings = timings or Timings(poll_interval_s=settings.poll_interval_s)
    token = (None if settings.token_file is None
             else config.read_token(settings.token_file, "registry"))
    listen = list(settings.listen) or await default_listen(settings.interface)
    state = RegistryState(punch_window_s=timings.punch_coalesce_s)
    exporter = None if settings.metrics_listen is None else _exporter(state)
    metrics = exporter or RegistryMetrics()
    observer = Observer(lambda: open_device(settings.interface), state, timings,
                        metrics=metrics)
    app = create_app(state, timings=timings, observer=observer, token=token, metrics=metrics)
    if settings.relay is not None or settings.remote_relays is not None:
        from . import relayroute
        from .relayauth import read_secret
        from .relayremote import RemoteRelay

        remotes: list[RemoteRelay] = []
        if settings.remote_relays is not None:
            secret = read_secret(settings.remote_relays.secret_file, "registry")
            remotes = [RemoteRelay(control, secret)
                       for control in settings.remote_relays.controls]
        relay, address = None, None
        if settings.relay is not None:
            relay = make_relay(settings.relay, relayroute.observed_ip(state))
            metrics.watch_relay(relay.metrics_counts)
            address = settings.relay.address
        relayroute.install(app, relay, address, remotes)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                           access_log=None, shutdown_timeout=timings.shutdown_grace_s)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    caught: list[str] = []
    dns_server: DnsServer | None = None
    probe_server: ProbeServer | None = None
    metrics_server: MetricsServer | None = None

    def on_signal(sig: signal.Signals) -> None:
        sdnotify.notify("STOPPING=1")
        caught.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await runner.setup()  # the observer has read the device once by now
        # What start-up made (modules, the first table: ~150,000 objects at 10,000 peers)
        # lives as long as the process. Frozen, it is left out of garbage collections: a full
        # one would otherwise go through all of it, ~25 ms with the loop held, each time the
        # objects that changed peers leave behind add up to a quarter of it (measured with a
        # device whose every reply has 1,000 peers' counters changed: every ~2 s).
        gc.freeze()
        # DNS before the API, so that an API that answers means DNS-SD answers too.
        if settings.dns is not None:
            dns_server = await _start_dns(settings.interface, settings.dns, state, timings)
            metrics.watch_dns(dns_server)
        if exporter is not None and settings.metrics_listen is not None:
            from ..exposition import serve as serve_metrics

            metrics_server = await serve_metrics(exporter.registry, settings.metrics_listen,
                                                 "registry")
        if settings.natprobe is not None:
            probe_server = ProbeServer(settings.natprobe)
            await probe_server.start()
            log.info("NAT probe on UDP port %d%s%s", settings.natprobe.port,
                     "" if settings.natprobe.alt_port is None
                     else f", second port {settings.natprobe.alt_port}",
                     "" if settings.natprobe.alt_address is None
                     else f", second address {settings.natprobe.alt_address}",
                     extra={"event": "natprobe_serving"})
        for endpoint in listen:
            if is_wildcard(endpoint):
                log.warning("listening on every address (%s): the API is reachable from "
                            "outside the tunnel; only peers' tunnel addresses are served",
                            endpoint)
            try:
                await ApiSite(runner, str(endpoint.ip), endpoint.port).start()
            except OSError as exc:
                raise ConfigError(f"registry: cannot listen on {endpoint}: "
                                  f"{exc.strerror or exc}") from None
        log.info("registry for %s serving on %s, epoch %s", settings.interface,
                 ", ".join(map(str, listen)), state.epoch,
                 extra={"event": "serving", "listen": [str(e) for e in listen]})
        sdnotify.notify("READY=1", f"STATUS=serving {settings.interface} on "
                        f"{', '.join(map(str, listen))}")
        await stop.wait()
        log.info("stopping on %s", caught[0], extra={"event": "stopping"})
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if probe_server is not None:
            await probe_server.close()
            log.info("NAT probe stopped: %s", ", ".join(
                f"{k} {v}" for k, v in probe_server.counts.items()) or "nothing received",
                extra={"event": "natprobe_stopped", **probe_server.counts})
        # DNS first: it answers from the table that the application's observer keeps.
        if dns_server is not None:
            await dns_server.close()
            log.info("DNS-SD stopped: %s", ", ".join(f"{k} {v}" for k, v in
                                                     dns_server.counts.items()),
                     extra={"event": "dns_stopped", **dns_server.counts})
        await runner.cleanup()
        if metrics_server is not None:
            await metrics_server.close()


def _exporter(state: RegistryState) -> RegistryExporter:
    from .exporter import RegistryExporter  # prometheus_client: only with --metrics-listen

    return RegistryExporter(state)


def make_relay(relay: RelaySettings, observed: Callable[[Key], str | None]) -> Relay:
    """The relay for `relay`, with the kernel path when asked for and possible here."""
    from .relay import Relay
    from .relaykernel import KernelPath, unavailable

    kernel = None
    if relay.kernel:
        why = unavailable()
        if why is None:
            kernel = KernelPath(RELAY_TABLE, relay.ports,
                                None if relay.address is None else str(relay.address))
        else:
            log.warning("relay: forwarding in userspace: %s", why,
                        extra={"event": "relay_userspace"})
    return Relay(observed, ports=relay.ports, kernel=kernel)


async def _start_dns(interface: str, dns: DnsSettings, state: RegistryState,
                     timings: Timings) -> DnsServer:
    """The DNS-SD server on its addresses: a bare port means every address of `interface`."""
    from .dnsserver import DnsServer

    own: list[IPAddress] = []
    if any(isinstance(entry, int) for entry in dns.listen):
        own = await interface_addresses(interface)
        if not own:
            raise ConfigError(f"registry: interface {interface!r} has no IP address to serve "
                              "DNS on; give --dns ADDR:PORT")
    elif dns.self_config is not None and dns.self_config.endpoint is None:
        # Only to never serve a tunnel address as the registry's endpoint (dnsserver.py).
        with contextlib.suppress(ConfigError):
            own = await interface_addresses(interface)
    addresses: list[tuple[IPAddress, int]] = list(dict.fromkeys(
        pair for entry in dns.listen
        for pair in ([(ip, entry) for ip in own] if isinstance(entry, int)
                     else [(entry.ip, entry.port)])))
    for ip, _port in addresses:
        if ip.is_unspecified:
            log.warning("serving DNS-SD on every address (%s): queries from outside the "
                        "tunnel are still refused unless --dns-allow lets them in", ip)
    server = DnsServer(dns.zone, state, self_config=dns.self_config, tunnel_ips=own,
                       allow=dns.allow, timings=timings)
    await server.start([(str(ip), port) for ip, port in addresses])
    where = ", ".join(str(Endpoint(ipaddress.ip_address(h), p)) for h, p in server.addresses)
    log.info("DNS-SD for zone %s serving on %s (UDP and TCP)", dns.zone.name, where,
             extra={"event": "dns_serving", "zone": dns.zone.name.to_text()})
    if dns.self_config is not None and dns.self_config.endpoint is None:
        log.info("DNS-SD self record without an endpoint: serving the route's source address "
                 "toward each querying node; give --dns-self IP:PORT if the registry is "
                 "behind a NAT", extra={"event": "dns_self_derived"})
    return server


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(settings_from(args)))
    return 0
