"""`wgpunch registry`: options from flags and a TOML file (flags win), then serve until a
signal. Every mistake in either is a `ConfigError`: one line, no traceback."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import math
import signal
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ..errors import ConfigError
from ..protocol import API_PORT
from ..wg import open_device
from ..wg.device import Endpoint, IPAddress
from .api import create_app
from .dnssd import Zone
from .dnsserver import DnsServer, SelfConfig
from .listen import (
    DNS_PORT,
    default_listen,
    interface_addresses,
    is_wildcard,
    parse_dns_listen,
    parse_listen,
)
from .observer import Observer
from .site import ApiSite
from .state import RegistryState
from .timings import Timings

log = logging.getLogger(__name__)

# Bounds on --poll-interval: below 10 ms the reads cost more than they tell; above a minute
# the registry is no help in getting peers connected quickly.
POLL_MIN_S, POLL_MAX_S = 0.01, 60.0
CONFIG_KEYS = ("interface", "listen", "token_file", "poll_interval", "dns", "zone", "dns_self")

EPILOG = f"""\
config file (--config FILE, TOML): the same options as the flags; a flag wins over the file.
  interface = "wg0"                      # like --interface
  listen = ["10.99.0.254:{API_PORT}"]         # like --listen (a list, or one string)
  token_file = "/etc/wgpunch/token"      # like --token-file (relative: to the config file)
  poll_interval = 0.2                    # like --poll-interval
  dns = 53                               # like --dns: a port, "ADDR:PORT", or a list
  zone = "mesh.internal."                # like --zone
  dns_self = ["192.0.2.1:51820", "10.99.0.254/32"]  # like --dns-self (true: no arguments)

The API (docs/api.md) identifies each caller by its tunnel source address: it must lie in
the allowed IPs of exactly one peer of IF. Stop with SIGTERM or SIGINT (exit status 0).

DNS-SD (--dns, wgsd v0.3 compatible: dig, wgsd-client): for each peer with an endpoint, in
zone Z and with K its key in lowercase base32 (56 characters, "====" padding):
  _wireguard._udp.Z PTR K._wireguard._udp.Z
  K._wireguard._udp.Z SRV 0 0 PORT K._wireguard._udp.Z   (+ A or AAAA, then TXT)
  K._wireguard._udp.Z A|AAAA|TXT "txtvers=1" "pub=BASE64" "allowed=CIDR,..."
TTL 0; other names in Z: NXDOMAIN; names outside Z: REFUSED. Like the API, it listens on
IF's tunnel addresses by default: anyone who can query it learns every node's endpoint.
"""


@dataclass(frozen=True, slots=True)
class DnsSettings:
    listen: tuple[Endpoint | int, ...]  # a bare port: that port on every address of IF
    zone: Zone
    self_config: SelfConfig | None  # None: no `self` record


@dataclass(frozen=True, slots=True)
class Settings:
    interface: str
    listen: tuple[Endpoint, ...]  # empty: the interface's own addresses
    token_file: Path | None
    poll_interval_s: float
    dns: DnsSettings | None = None  # None: no DNS-SD server


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "registry",
        help="run the registry: publish peers' observed endpoints to nodes",
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
        help="read options from this TOML file (keys below); flags win",
    )
    parser.add_argument(
        "--token-file", metavar="FILE", type=Path,
        help="also require 'Authorization: Bearer TOKEN' on every request but /healthz; "
             "TOKEN is this file's content without surrounding whitespace",
    )
    parser.add_argument(
        "--poll-interval", metavar="SECONDS", type=float,
        help="how often to read IF for peers' endpoints (default 0.2; "
             f"{POLL_MIN_S}-{POLL_MAX_S:.0f})",
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
    parser.set_defaults(func=run, daemon=True)


# -- options ----------------------------------------------------------------------------------


def load_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            config = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"registry: cannot read config {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"registry: config {str(path)!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"registry: config {str(path)!r}: unknown key {unknown[0]!r}; "
                          f"known: {', '.join(CONFIG_KEYS)}")
    return config


def _config_value(config: Mapping[str, Any], key: str, kinds: tuple[type, ...],
                  what: str) -> Any:
    value = config.get(key)
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
        raise ConfigError(f"registry: config key {key!r} must be {what}, got {value!r}")
    return value


def settings_from(args: argparse.Namespace) -> Settings:
    config: dict[str, Any] = {} if args.config is None else load_config(args.config)
    base = Path(".") if args.config is None else args.config.parent

    interface = args.interface or _config_value(config, "interface", (str,), "text")
    if not interface:
        raise ConfigError("registry: no interface: give --interface IF or 'interface' in "
                          "the config file")

    listen_texts = args.listen
    if listen_texts is None:
        value = _config_value(config, "listen", (str, list), "an address or a list")
        listen_texts = [value] if isinstance(value, str) else value or []
        if not all(isinstance(text, str) for text in listen_texts):
            raise ConfigError("registry: config key 'listen' must list addresses as text")
    listen = tuple(dict.fromkeys(parse_listen(text) for text in listen_texts))

    token_file = args.token_file
    if token_file is None:
        value = _config_value(config, "token_file", (str,), "a file name")
        token_file = None if value is None else base / value

    poll = args.poll_interval
    if poll is None:
        poll = _config_value(config, "poll_interval", (int, float), "a number of seconds")
    poll = 0.2 if poll is None else float(poll)
    if math.isnan(poll) or not POLL_MIN_S <= poll <= POLL_MAX_S:
        raise ConfigError(f"registry: poll interval {poll} s is not in "
                          f"{POLL_MIN_S}-{POLL_MAX_S:.0f} s")
    return Settings(interface, listen, token_file, poll, _dns_settings(args, config))


def _dns_settings(args: argparse.Namespace, config: Mapping[str, Any]) -> DnsSettings | None:
    texts = args.dns
    if texts is None:
        value = _config_value(config, "dns", (str, int, list), "a port, an address or a list")
        texts = [] if value is None else value if isinstance(value, list) else [value]
        if not all(isinstance(t, str | int) and not isinstance(t, bool) for t in texts):
            raise ConfigError("registry: config key 'dns' must list ports or addresses")
    zone = args.zone or _config_value(config, "zone", (str,), "text")
    self_args = args.dns_self
    if self_args is None:
        value = config.get("dns_self")
        if isinstance(value, bool):
            self_args = [] if value else None
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            self_args = value
        elif value is not None:
            raise ConfigError("registry: config key 'dns_self' must be true, false or a list "
                              f"of texts, got {value!r}")
    if not texts:
        if zone or self_args is not None:
            raise ConfigError("registry: --zone and --dns-self need --dns (where to serve "
                              "DNS-SD)")
        return None
    if not zone:
        raise ConfigError("registry: --dns needs --zone ZONE (or 'zone' in the config file)")
    listen = tuple(dict.fromkeys(parse_dns_listen(str(text)) for text in texts))
    return DnsSettings(listen, Zone.parse(zone),
                       None if self_args is None else SelfConfig.parse(self_args))


def read_token(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"registry: cannot read token file {str(path)!r}: {reason}") from None
    token = text.strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"registry: token file {str(path)!r} must hold one token "
                          "(printable, no spaces)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by other users (chmod 600 it)", path)
    return token


# -- serving ----------------------------------------------------------------------------------


async def serve(settings: Settings, timings: Timings | None = None) -> None:
    """Run the registry until SIGTERM or SIGINT, then release everything."""
    timings = timings or Timings(poll_interval_s=settings.poll_interval_s)
    token = None if settings.token_file is None else read_token(settings.token_file)
    listen = list(settings.listen) or await default_listen(settings.interface)
    state = RegistryState(punch_window_s=timings.punch_coalesce_s)
    observer = Observer(lambda: open_device(settings.interface), state, timings)
    app = create_app(state, timings=timings, observer=observer, token=token)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                           access_log=None, shutdown_timeout=timings.shutdown_grace_s)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    caught: list[str] = []
    dns_server: DnsServer | None = None

    def on_signal(sig: signal.Signals) -> None:
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
        await stop.wait()
        log.info("stopping on %s", caught[0], extra={"event": "stopping"})
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # DNS first: it answers from the table that the application's observer keeps.
        if dns_server is not None:
            await dns_server.close()
            log.info("DNS-SD stopped: %s", ", ".join(f"{k} {v}" for k, v in
                                                     dns_server.counts.items()),
                     extra={"event": "dns_stopped", **dns_server.counts})
        await runner.cleanup()


async def _start_dns(interface: str, dns: DnsSettings, state: RegistryState,
                     timings: Timings) -> DnsServer:
    """The DNS-SD server on its addresses: a bare port means every address of `interface`."""
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
    addresses = list(dict.fromkeys(
        (ip, entry) if isinstance(entry, int) else (entry.ip, entry.port)
        for entry in dns.listen for ip in (own if isinstance(entry, int) else [None])))
    for ip, _port in addresses:
        if ip.is_unspecified:
            log.warning("serving DNS-SD on every address (%s): every node's endpoint is "
                        "visible from outside the tunnel", ip)
    server = DnsServer(dns.zone, state, self_config=dns.self_config, tunnel_ips=own,
                       timings=timings)
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
