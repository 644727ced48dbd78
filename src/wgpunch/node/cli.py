"""`wgpunch node`: run the agent that steers this host's WireGuard interface."""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .. import config, sdnotify
from ..commands import help_of
from ..errors import ChangeRefused, ConfigError, DeviceError, WgpunchError
from ..keys import Key
from ..natpunch.wire import LEGACY_PORT, RENDEZVOUS_PORT
from ..protocol import API_PORT
from ..wg.device import Endpoint
from . import pathfile
from .lock import agent_lock

if TYPE_CHECKING:
    from .source import Source

log = logging.getLogger(__name__)

MODES = ("registry", "dns_sd", "natpunch", "natpunch_legacy")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the node runs with; exactly one of `registry`, `dns_sd`, `natpunch` and
    `natpunch_legacy` says which kind of registry it follows."""

    interface: str
    registry: Key | None
    api: str | None  # None: http://<the registry peer's tunnel address>:API_PORT
    token_file: Path | None
    dns_sd: Endpoint | None
    zone: str | None
    natpunch: str | None  # HOST[:PORT], resolved at start
    natpunch_server_key: Key | None
    natpunch_legacy: str | None  # HOST[:PORT], resolved at start
    keepalive_s: int
    opener_ttl: int | None  # None: measured (node/punch.py)
    interval_s: float


def settings_from(args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> Settings:
    options = config.load(config.NODE, vars(args), config=args.config, environ=environ)
    modes = [m for m in MODES if getattr(options, m)]
    if len(modes) != 1:
        raise ConfigError(
            "node: give one of --registry PUBKEY (HTTP API), --dns-sd ADDR:PORT --zone ZONE, "
            "--natpunch HOST:PORT --natpunch-server-key KEY or --natpunch-legacy HOST[:PORT]"
            + (f" (got {' and '.join('--' + m.replace('_', '-') for m in modes)})"
               if modes else "")
        )
    if options.natpunch and not options.natpunch_server_key:
        raise ConfigError("node: --natpunch needs --natpunch-server-key KEY (the public key "
                          "`wgpunch rendezvous --print-key` shows)")
    if options.natpunch_server_key and not options.natpunch:
        raise ConfigError("node: --natpunch-server-key goes with --natpunch")
    if options.dns_sd and not options.zone:
        raise ConfigError("node: --dns-sd needs --zone ZONE (e.g. mesh.internal.)")
    return Settings(
        interface=options.interface,
        registry=_key(options, "registry"),
        api=options.parsed("api", _api_url, options.api) if options.api else None,
        token_file=options.token_file,
        dns_sd=(options.parsed("dns_sd", _dns_sd_server, options.dns_sd)
                if options.dns_sd else None),
        zone=options.zone,
        natpunch=options.natpunch,
        natpunch_server_key=_key(options, "natpunch_server_key"),
        natpunch_legacy=options.natpunch_legacy,
        keepalive_s=options.keepalive,
        opener_ttl=options.opener_ttl,
        interval_s=options.interval,
    )


def _key(options: config.NodeConfig, name: str) -> Key | None:
    text = getattr(options, name)
    if not text:
        return None
    what = name.replace("_", " ") + " key"
    return options.parsed(name, lambda t: Key.parse(t, what=what), text)


def _api_url(text: str) -> str:
    """The registry API's URL, checked now: a URL the client cannot use would otherwise only
    show as a failing request, retried forever."""
    try:
        url = urlsplit(text)
        url.port  # noqa: B018 (raises ValueError for a port out of range or not a number)
    except ValueError as error:
        raise ConfigError(f"node: API URL {text[:80]!r}: {error}") from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError(f"node: API URL {text[:80]!r}: expected http://HOST[:PORT] or "
                          "https://HOST[:PORT]")
    return text


def _dns_sd_server(text: str) -> Endpoint:
    try:
        return Endpoint.parse(text)
    except ChangeRefused as error:
        raise ConfigError(f"node: DNS-SD server: {error}") from None


async def serve(settings: Settings, *, once: bool = False,
                state_dir: Path = pathfile.STATE_DIR) -> int:
    """Run the agent (one pass with `once`) while holding the interface's lock
    (node/lock.py), taken before the device is opened: a second agent on IF exits at once."""
    with agent_lock(settings.interface, state_dir):
        return await _serve(settings, once=once, state_dir=state_dir)


async def _serve(settings: Settings, *, once: bool, state_dir: Path) -> int:
    # Imported here, and each source only in its own mode: `--help` and a mistaken flag
    # answer without loading asyncio, the device backends or any client, and each mode
    # loads only its own client (bench/startup.py).
    import asyncio

    from ..wg import open_device
    from .agent import Agent
    from .decide import Timings
    from .registrylink import LinkTimings

    interface = settings.interface
    device = open_device(interface)
    try:
        state = await device.state()
    except DeviceError as error:
        if error.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(f"node: cannot control {interface}: {error}; the node needs "
                              "root (CAP_NET_ADMIN)") from None
        raise
    source: Source
    server_key = settings.natpunch_server_key
    natpunch = settings.natpunch or settings.natpunch_legacy
    if natpunch:
        from .natpunch import NatpunchSource, resolve_server

        rendezvous = await resolve_server(natpunch, RENDEZVOUS_PORT if settings.natpunch
                                          else LEGACY_PORT)
        source = NatpunchSource(rendezvous, server_key, device, interval_s=settings.interval_s)
        await source.connect(state.listen_port, state.public_key)  # fail now, not later
        where = (f"natpunch server {rendezvous} (key {server_key})" if server_key
                 else f"natpunch legacy server {rendezvous} (unauthenticated)")
    elif settings.dns_sd is not None:
        from .dnssd import DnsSdSource

        source = DnsSdSource(settings.dns_sd, str(settings.zone), device,
                             interval_s=settings.interval_s)
        where = f"DNS-SD {settings.dns_sd}, zone {settings.zone}"
    else:
        assert settings.registry is not None
        from .client import RegistryClient
        from .source import registry_api_url

        token = (None if settings.token_file is None
                 else config.read_token(settings.token_file, "node"))
        api = settings.api or registry_api_url(state, settings.registry)
        source = RegistryClient(api, token=token)
        where = f"registry {settings.registry}, API {api}"
    agent = Agent(device, settings.registry, source,
                  timings=Timings(keepalive_s=settings.keepalive_s),
                  opener_ttl=settings.opener_ttl, state_dir=state_dir,
                  registry_link=LinkTimings() if settings.registry is not None else None)
    try:
        if once:
            failures = await agent.run_once()
            return 1 if failures else 0
        log.info("node on %s: %s", interface, where,
                 extra={"event": "started", "interface": interface})
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop() -> None:
            sdnotify.notify("STOPPING=1")
            task.cancel()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop)
        sdnotify.notify("READY=1", f"STATUS=steering {interface}: {where}")
        try:
            await agent.run()
        except asyncio.CancelledError:
            log.info("node on %s: stopped", interface)
        return 0
    finally:
        await source.close()
        await device.close()


def run(args: argparse.Namespace) -> int:
    import asyncio  # here, as _serve's imports: `node --help` needs none of it

    settings = settings_from(args)
    try:
        return asyncio.run(serve(settings, once=args.once))
    except* WgpunchError as group:
        raise group.exceptions[0] from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "node",
        help=help_of("node"),
        description=textwrap.fill(
            "Run the node agent. It follows the registry's view of every peer's public "
            "endpoint and, for each peer of the interface that has no live session, sets "
            "that endpoint and makes WireGuard handshake at once, at the same moment as the "
            "peer does (the registry coordinates the punch). A peer with a live session is "
            "never changed. Peers the registry does not know, and the registry peer itself, "
            "are never touched; no peer is added or removed. The registry is one of: a "
            "wgpunch registry that is a WireGuard peer (--registry), a wgsd-compatible DNS-SD "
            "server (--dns-sd), or a natpunch rendezvous server (--natpunch, "
            "--natpunch-legacy); the last two can only be asked, so each side tries alone.",
            88),
        epilog=textwrap.fill(
            "The agent writes its view of each peer's path to /run/wgpunch/IF.json, which "
            "`wgpunch status` shows, and locks /run/wgpunch/IF.lock: a second agent on IF "
            "exits at once, naming the first one's pid.", 88) + "\n\n" + config.epilog(config.NODE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    parser.add_argument(
        "--config", metavar="FILE", type=Path,
        help="read options from this TOML file (keys below); flags and the environment win",
    )
    parser.set_defaults(func=run, daemon=True)
