"""`wgpunch node`: its options (flags, environment, TOML: config/node.py) checked into
`Settings`; serve.py runs the agent that steers this host's WireGuard interfaces with them."""

from __future__ import annotations

import argparse
import gc
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .. import config
from ..commands import help_of
from ..config.node import NODE, NodeConfig
from ..errors import ChangeRefused, ConfigError, WgpunchError
from ..keys import Key
from ..ports import API_PORT, LEGACY_PORT, NATPROBE_PORT, RENDEZVOUS_PORT
from ..wg.model import Endpoint

MODES = ("registry", "dns_sd", "natpunch", "natpunch_legacy")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the node runs with; `dns_sd`, `natpunch` or `natpunch_legacy` says which kind of
    registry it follows, else it follows a registry's API (`registry_mode`)."""

    interface: str | None  # None: every WireGuard interface that qualifies (fleet.py)
    # None: with several `registries`, the one IF has (IF having several: registries.py);
    # with none, the peer that serves the registry API (node/discover.py); found at start
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
    portmap: bool  # map the listen port on our NAT (node/portmap/)
    mesh: bool = False
    mesh_exclude: frozenset[Key] = frozenset()
    registries: tuple[Key, ...] = ()  # every --registry given
    natprobe_port: int = 0  # the registry's NAT probe port; 0: the NAT is not measured
    metrics_listen: Endpoint | None = None  # None: no metrics

    @property
    def registry_mode(self) -> bool:
        return self.dns_sd is None and not self.natpunch and not self.natpunch_legacy


def settings_from(args: argparse.Namespace,
                  environ: Mapping[str, str] | None = None) -> Settings:
    options = config.load(NODE, vars(args), config=args.config, environ=environ)
    modes = [m for m in MODES if getattr(options, m)]
    if len(modes) > 1:
        raise ConfigError(
            "node: give one of --registry PUBKEY (HTTP API; without any, the peer that serves "
            "the registry API), --dns-sd ADDR:PORT --zone ZONE, --natpunch HOST:PORT "
            "--natpunch-server-key KEY or --natpunch-legacy HOST[:PORT] (got "
            f"{' and '.join('--' + m.replace('_', '-') for m in modes)})"
        )
    if options.natpunch and not options.natpunch_server_key:
        raise ConfigError("node: --natpunch needs --natpunch-server-key KEY (the public key "
                          "`wgpunch rendezvous --print-key` shows)")
    if options.natpunch_server_key and not options.natpunch:
        raise ConfigError("node: --natpunch-server-key goes with --natpunch")
    if options.dns_sd and not options.zone:
        raise ConfigError("node: --dns-sd needs --zone ZONE (e.g. mesh.internal.)")
    if options.mesh and modes not in ([], ["registry"]):
        raise ConfigError("node: --mesh goes with a registry (--registry, or none given): only "
                          "the registry's API lists every peer with its allowed IPs")
    if options.mesh_exclude and not options.mesh:
        raise ConfigError("node: --mesh-exclude goes with --mesh")
    if options.metrics_listen and not options.interface:
        raise ConfigError("node: --metrics-listen needs --interface IF (without it each "
                          "interface's agent would serve on the one address)")
    registries = tuple(dict.fromkeys(
        options.parsed("registry", lambda t: Key.parse(t, what="registry key"), text)
        for text in options.registry))
    return Settings(
        interface=options.interface,
        registry=registries[0] if len(registries) == 1 else None,
        registries=registries,
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
        mesh=options.mesh,
        mesh_exclude=frozenset(
            options.parsed("mesh_exclude", lambda t: Key.parse(t, what="--mesh-exclude key"), text)
            for text in options.mesh_exclude),
        natprobe_port=options.natprobe_port,
        metrics_listen=_metrics_listen(options),
        portmap=options.portmap,
    )


def _key(options: NodeConfig, name: str) -> Key | None:
    text = getattr(options, name)
    if not text:
        return None
    what = name.replace("_", " ") + " key"
    return options.parsed(name, lambda t: Key.parse(t, what=what), text)


def _metrics_listen(options: NodeConfig) -> Endpoint | None:
    if not options.metrics_listen:
        return None
    from ..exposition import parse_address  # prometheus_client: only when asked for

    return options.parsed("metrics_listen", lambda text: parse_address(text, "node"),
                          options.metrics_listen)


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


def run(args: argparse.Namespace) -> int:
    # Until the agent is built (serve.py), what is made lives as long as the process: the
    # cyclic collector's passes over it meanwhile only delay the first punch (bench/startup.py).
    gc.disable()
    try:
        # Here: `node --help` and a mistaken flag need neither asyncio nor the agent.
        import asyncio

        from .serve import serve

        settings = settings_from(args)
        try:
            return asyncio.run(serve(settings, once=args.once))
        except* WgpunchError as group:
            raise group.exceptions[0] from None
    finally:
        gc.enable()


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
            "are never touched; no peer is added or removed, unless --mesh is given. Without "
            "--interface it steers every WireGuard interface that has the registry's peer "
            "(with --dns-sd or --natpunch: every one), taking up interfaces that appear and "
            "letting go of those that vanish. The registry is one of: a "
            "wgpunch registry that is a WireGuard peer (--registry), a wgsd-compatible DNS-SD "
            "server (--dns-sd), or a natpunch rendezvous server (--natpunch, "
            "--natpunch-legacy); the last two can only be asked, so each side tries alone.",
            88),
        epilog=textwrap.fill(
            "The agent writes its view of each peer's path to /run/wgpunch/IF.json, which "
            "`wgpunch status` shows, and locks /run/wgpunch/IF.lock: a second agent on IF "
            "exits at once, naming the first one's pid.", 88) + "\n\n" + config.epilog(NODE),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-i", "--interface", metavar="IF",
        help="the WireGuard interface to steer (default: every one that has the registry's "
        "peer, looked for every 2 s)")
    parser.add_argument(
        "--registry", metavar="PUBKEY", action="append",
        help="the registry's public key (base64 as wg prints it, hex or base32); the registry "
        "must be a peer of IF. Its peer entry is never touched. Repeatable: each interface "
        "follows the registries it has as peers (one agent, several networks; an interface "
        "with several follows each, and any one that both sides of a pair follow coordinates "
        "their punch). Without "
        "--registry (and no --dns-sd or --natpunch), the registry is the peer with an "
        "endpoint whose tunnel address serves the registry API, asked at start",
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
        "--natprobe-port", type=int, metavar="PORT",
        help="the registry's NAT probe port (UDP, at the registry peer's endpoint address): "
        "the node measures how its NAT maps and filters there and reports it, so that the "
        f"registry can tell who initiates (default {NATPROBE_PORT}; 0: do not "
        "measure)",
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
        "--mesh", action="store_true", default=None,
        help="managed mesh: add to IF every peer the registry lists (public key and allowed "
        "IPs; the endpoint follows), and remove those it drops, recorded in "
        "/var/lib/wgpunch-node/IF.mesh.json. Only peers the mesh added are ever changed: "
        "never your own peers, the registry's, or a preshared key; a listed network that "
        "overlaps one "
        "of your peers' is refused with a log line",
    )
    parser.add_argument(
        "--mesh-exclude", action="append", metavar="KEY",
        help="with --mesh: never add this peer (removed if the mesh added it); repeatable",
    )
    parser.add_argument(
        "--portmap", action=argparse.BooleanOptionalAction, default=None,
        help="map the WireGuard listen port on the NAT in front of us by PCP, NAT-PMP or "
        "UPnP-IGD, renewed while running and deleted on exit, and report it to the registry "
        "as a candidate for peers (default: on; --no-portmap: off)",
    )
    parser.add_argument(
        "--metrics-listen", metavar="ADDR:PORT",
        help="serve Prometheus metrics at http://ADDR:PORT/metrics (docs/metrics.md): each "
        "peer's path, time to direct, punches, the registry link; off by default, and not "
        "served with --once. No authentication: give 127.0.0.1 or the tunnel address (a "
        "wildcard or public address logs a warning)",
    )
    parser.add_argument(
        "--config", metavar="FILE", type=Path,
        help="read options from this TOML file (keys below); flags and the environment win",
    )
    parser.set_defaults(func=run, daemon=True)
