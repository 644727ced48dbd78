"""`wgpunch node`: run the agent that steers this host's WireGuard interface."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import signal
import tomllib
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DeviceError, WgpunchError
from ..keys import Key
from ..natpunch.wire import LEGACY_PORT, RENDEZVOUS_PORT
from ..protocol import API_PORT
from ..wg import open_device
from ..wg.device import Endpoint
from .agent import Agent
from .client import RegistryClient
from .decide import Timings
from .dnssd import DnsSdSource
from .natpunch import NatpunchSource, resolve_server
from .source import Source, registry_api_url

log = logging.getLogger(__name__)

CONFIG_KEYS = {"interface", "registry", "api", "token_file", "keepalive", "opener_ttl",
               "dns_sd", "zone", "interval", "natpunch", "natpunch_server_key",
               "natpunch_legacy"}
MODES = ("registry", "dns_sd", "natpunch", "natpunch_legacy")


def load_config(path: str | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            config = tomllib.load(handle)
    except OSError as error:
        raise ConfigError(f"node: cannot read config {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"node: config {path}: {error}") from None
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise ConfigError(
            f"node: config {path}: unknown key {sorted(unknown)[0]!r} "
            f"(known: {', '.join(sorted(CONFIG_KEYS))})"
        )
    return config


def read_token(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        raise ConfigError(f"node: cannot read token file {path}: {error.strerror}") from None
    if not token:
        raise ConfigError(f"node: token file {path} is empty")
    return token


def _option(args: argparse.Namespace, config: dict[str, Any], name: str,
            default: Any = None) -> Any:
    value = getattr(args, name)
    return config.get(name, default) if value is None else value


def _number(value: Any, name: str, low: float, high: float, kind: type = int) -> Any:
    if isinstance(value, bool) or not isinstance(value, kind | int) or not low <= value <= high:
        raise ConfigError(f"node: {name} {value!r} is not in {low:g}-{high:g}")
    return value


async def serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    interface = _option(args, config, "interface")
    registry_text = _option(args, config, "registry")
    dns_sd = _option(args, config, "dns_sd")
    natpunch = _option(args, config, "natpunch")
    natpunch_legacy = _option(args, config, "natpunch_legacy")
    server_key_text = _option(args, config, "natpunch_server_key")
    if not interface:
        raise ConfigError("node: --interface is required (or in --config)")
    modes = [m for m in MODES if _option(args, config, m)]
    if len(modes) != 1:
        raise ConfigError(
            "node: give one of --registry PUBKEY (HTTP API), --dns-sd ADDR:PORT --zone ZONE, "
            "--natpunch HOST:PORT --natpunch-server-key KEY or --natpunch-legacy HOST[:PORT]"
            + (f" (got {' and '.join('--' + m.replace('_', '-') for m in modes)})"
               if modes else "")
        )
    if natpunch and not server_key_text:
        raise ConfigError("node: --natpunch needs --natpunch-server-key KEY (the public key "
                          "`wgpunch rendezvous --print-key` shows)")
    if server_key_text and not natpunch:
        raise ConfigError("node: --natpunch-server-key goes with --natpunch")
    registry = Key.parse(str(registry_text), what="--registry key") if registry_text else None
    server_key = (Key.parse(str(server_key_text), what="--natpunch-server-key")
                  if server_key_text else None)
    keepalive = _number(_option(args, config, "keepalive", 25), "keepalive (s)", 1, 65535)
    ttl_option = _option(args, config, "opener_ttl")  # None: measured (node/punch.py)
    opener_ttl = None if ttl_option is None else _number(ttl_option, "opener TTL", 1, 255)
    interval = _number(_option(args, config, "interval", 5.0), "interval (s)", 0.1, 3600, float)
    zone = _option(args, config, "zone")
    if dns_sd and not zone:
        raise ConfigError("node: --dns-sd needs --zone ZONE (e.g. mesh.internal.)")
    server = Endpoint.parse(str(dns_sd)) if dns_sd else None
    device = open_device(str(interface))
    try:
        state = await device.state()
    except DeviceError as error:
        if error.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(f"node: cannot control {interface}: {error}; the node needs "
                              "root (CAP_NET_ADMIN)") from None
        raise
    source: Source
    if natpunch or natpunch_legacy:
        rendezvous = await resolve_server(natpunch or natpunch_legacy,
                                          RENDEZVOUS_PORT if natpunch else LEGACY_PORT)
        source = NatpunchSource(rendezvous, server_key, device, interval_s=float(interval))
        await source.connect(state.listen_port, state.public_key)  # fail now, not later
        where = (f"natpunch server {rendezvous} (key {server_key})" if server_key
                 else f"natpunch legacy server {rendezvous} (unauthenticated)")
    elif server is not None:
        source = DnsSdSource(server, str(zone), device, interval_s=float(interval))
        where = f"DNS-SD {server}, zone {zone}"
    else:
        assert registry is not None
        token = read_token(_option(args, config, "token_file"))
        api = _option(args, config, "api") or registry_api_url(state, registry)
        source = RegistryClient(str(api), token=token)
        where = f"registry {registry}, API {api}"
    agent = Agent(device, registry, source, timings=Timings(keepalive_s=keepalive),
                  opener_ttl=opener_ttl)
    try:
        if args.once:
            failures = await agent.run_once()
            return 1 if failures else 0
        log.info("node on %s: %s", interface, where,
                 extra={"event": "started", "interface": interface})
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await agent.run()
        except asyncio.CancelledError:
            log.info("node on %s: stopped", interface)
        return 0
    finally:
        await source.close()
        await device.close()


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(serve(args))
    except* WgpunchError as group:
        raise group.exceptions[0] from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "node",
        help="keep this host's WireGuard peers on direct paths, with a registry's help",
        description=(
            "Run the node agent. It follows the registry's view of every peer's public "
            "endpoint and, for each peer of the interface that has no live session, sets "
            "that endpoint and makes WireGuard handshake at once, at the same moment as the "
            "peer does (the registry coordinates the punch). A peer with a live session is "
            "never changed. Peers the registry does not know, and the registry peer itself, "
            "are never touched; no peer is added or removed. The registry is one of: a "
            "wgpunch registry that is a WireGuard peer (--registry), a wgsd-compatible DNS-SD "
            "server (--dns-sd), or a natpunch rendezvous server (--natpunch, "
            "--natpunch-legacy); the last two can only be asked, so each side tries alone."
        ),
        epilog=(
            "--config FILE is TOML with any of the keys: interface, registry, api, "
            "token_file, keepalive, opener_ttl, dns_sd, zone, interval, natpunch, "
            "natpunch_server_key, natpunch_legacy. Flags win over the "
            "file. The agent writes its view of each peer's path to /run/wgpunch/IF.json, "
            "which `wgpunch status` shows."
        ),
    )
    parser.add_argument("-i", "--interface", metavar="IF", help="the WireGuard interface to steer")
    parser.add_argument(
        "--registry", metavar="PUBKEY",
        help="the registry's public key (base64 as wg prints it, hex or base32); the registry "
        "must be a peer of IF. Its peer entry is never touched",
    )
    parser.add_argument(
        "--dns-sd", metavar="ADDR:PORT",
        help="instead of the HTTP API, follow a wgsd-compatible DNS-SD server (wgsd/CoreDNS, or "
        "`wgpunch registry --dns`): one SRV query per peer every --interval seconds. Such a "
        "registry cannot coordinate punches, so each side tries on its own",
    )
    parser.add_argument("--zone", metavar="ZONE", help="the DNS-SD zone, e.g. mesh.internal.")
    parser.add_argument(
        "--natpunch", metavar="HOST[:PORT]",
        help="instead of a registry peer, ask a natpunch rendezvous server (`wgpunch "
        f"rendezvous`, natpunch-go's server; default port {RENDEZVOUS_PORT}) for the peers' "
        "endpoints every --interval seconds. Requests go from IF's listen port on a raw "
        "socket, so the server sees the NAT mapping WireGuard uses: needs CAP_NET_RAW. "
        "The node proves its identity with IF's private key (Noise IK). IPv4 only",
    )
    parser.add_argument(
        "--natpunch-server-key", metavar="KEY",
        help="the rendezvous server's public key (`wgpunch rendezvous --print-key`)",
    )
    parser.add_argument(
        "--natpunch-legacy", metavar="HOST[:PORT]",
        help="as --natpunch, but the wireguard-tools example protocol (default port "
        f"{LEGACY_PORT}). Unauthenticated: anyone can register any key there",
    )
    parser.add_argument(
        "--interval", type=float, metavar="SECONDS",
        help="with --dns-sd or --natpunch: poll every SECONDS, start to start, fractions "
        "honoured (default 5)",
    )
    parser.add_argument(
        "--once", action="store_true",
        help="one pass and exit, as a cron job would run it: every peer without a live "
        "session gets the registry's endpoint and a handshake; exit 1 if any peer failed",
    )
    parser.add_argument(
        "--api", metavar="URL",
        help=f"registry API URL (default: http://<registry peer's tunnel address>:{API_PORT})",
    )
    parser.add_argument(
        "--token-file", metavar="FILE", help="bearer token for a registry that requires one"
    )
    parser.add_argument(
        "--keepalive", type=int, metavar="SECONDS",
        help="persistent keepalive set on peers that have none, to keep NAT mappings open "
        "(default 25)",
    )
    parser.add_argument(
        "--opener-ttl", type=int, metavar="HOPS",
        help="IP TTL of the empty datagram that opens our NAT for a peer's handshake. "
        "Default: measured at start, toward the registry: the hops that pass our own NATs "
        "(up to the first router answering from a public address) but not the peer's, as a "
        "router that keeps state for unsolicited packets (a Linux router without an input "
        "drop rule) needs; 64 when nothing answers",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with the same options")
    parser.set_defaults(func=run, daemon=True)
