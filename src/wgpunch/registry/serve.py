"""The registry daemon put together: the observer, the API and its sites, and what options
add (DNS-SD, the NAT probe port, the relay, remote relays, metrics), started in order, served
until SIGTERM or SIGINT, and released in order. `Settings` is what it serves (cli.py makes it
from flags, the environment and a TOML file)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .. import config, sdnotify
from ..errors import ConfigError
from ..keys import Key
from ..wg import open_device
from ..wg.model import Endpoint, IPAddress, IPNetwork
from .listen import default_listen, interface_addresses, is_wildcard
from .timings import Timings

if TYPE_CHECKING:  # the serving parts load aiohttp and dnspython: only when serving
    from ..exposition import MetricsServer
    from .dnssd import Zone
    from .dnsserver import DnsServer, SelfConfig
    from .exporter import RegistryExporter
    from .natprobe import ProbeSettings
    from .relay import Relay
    from .state import RegistryState

log = logging.getLogger(__name__)

# The relay's own nftables table (relaykernel.py); one relay per network namespace.
RELAY_TABLE = "wgpunch_relay"


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
