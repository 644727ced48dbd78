"""`wgpunch init registry`, `wgpunch invite NAME`, `wgpunch revoke NAME`: a registry host and
its nodes in three commands (README "Setting it up"). Run on the registry host, as root."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

from ..commands import help_of
from ..errors import ConfigError, DeviceNotFound
from ..keys import generate_keypair
from ..protocol import API_PORT
from ..wg import open_device
from ..wg.device import Device
from ..wg.model import IPInterface
from . import members
from .files import Staged
from .invite import invite, revoke

WG_DIR = Path("/etc/wireguard")
T = TypeVar("T")


def parse_endpoint(text: str, layer: str) -> str:
    """HOST:PORT or [IPv6]:PORT, HOST a name or an address, as wg-quick's Endpoint takes;
    checked, and spelled as wg-quick wants it."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{layer}: endpoint {text!r}: an IPv6 address needs brackets, "
                          "[IP]:PORT")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{layer}: endpoint {text!r}: expected HOST:PORT (the registry's "
                          "public name or address and its WireGuard port)")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def registry_interface(text: str) -> IPInterface:
    """`--network`: a network (the registry takes its last host address) or the registry's
    address with the network's prefix."""
    try:
        given = ipaddress.ip_interface(text)
    except ValueError:
        raise ConfigError(f"init: network {text!r} is not a CIDR such as 10.99.0.0/24") \
            from None
    network = given.network
    if network.num_addresses < 4:
        raise ConfigError(f"init: network {network} is too small for a registry and nodes")
    if given.ip != network.network_address:
        return given
    last = network.broadcast_address - (1 if network.version == 4 else 0)
    return ipaddress.ip_interface(f"{last}/{network.prefixlen}")


def _init(args: argparse.Namespace) -> int:
    endpoint = parse_endpoint(args.endpoint, "init")
    port = int(endpoint.rpartition(":")[2])
    own = registry_interface(args.network)
    directory: Path = args.dir
    key_file = directory / f"{args.interface}.key"
    conf_file = directory / f"{args.interface}.conf"
    private, public = generate_keypair()
    conf = members.registry_config(own, port, str(key_file.absolute()), endpoint)
    staged = [Staged(key_file, private.base64() + "\n", new=True, layer="init")]
    try:
        staged.append(Staged(conf_file, conf, new=True, layer="init"))
    except ConfigError:
        staged[0].discard()
        raise
    staged[0].commit()
    try:
        staged[1].commit()
    except ConfigError:
        key_file.unlink(missing_ok=True)
        raise
    print(textwrap.dedent(f"""\
        wrote {key_file} (the registry's private key, mode 0600) and {conf_file}
        registry: public key {public}, tunnel address {own}, endpoint {endpoint}
        firewall: let UDP port {port} in (WireGuard). Nothing else: the API (TCP {API_PORT})
          and DNS-SD answer inside the tunnel only.
        next:
          wg-quick up {args.interface}
          wgpunch registry --interface {args.interface}     (or the systemd unit)
          wgpunch invite NAME                  (per node: writes NAME.conf for it)"""))
    return 0


def _open(interface: str, layer: str) -> Device:
    try:
        return open_device(interface)
    except DeviceNotFound as error:
        raise ConfigError(f"{layer}: the registry's interface must be up (wg-quick up "
                          f"{interface}): {error}") from None


async def _with_device(interface: str, layer: str,
                       work: Callable[[Device], Awaitable[T]]) -> T:
    device = _open(interface, layer)
    try:
        return await work(device)
    finally:
        await device.close()


def _invite(args: argparse.Namespace) -> int:
    config = args.config or WG_DIR / f"{args.interface}.conf"
    address = None
    if args.address:
        try:
            address = ipaddress.ip_address(args.address)
        except ValueError:
            raise ConfigError(f"invite: address {args.address!r} is not an IP address") \
                from None
    endpoint = parse_endpoint(args.endpoint, "invite") if args.endpoint else None
    name = members.check_name(args.name, "invite")
    out = None if args.out == "-" else Path(args.out or f"{name}.conf")
    invitation = asyncio.run(_with_device(args.interface, "invite", lambda device: invite(
        device, config, args.name, address=address, endpoint=endpoint, out=out)))
    if out is None:
        sys.stdout.write(invitation.config)
    where = "above" if out is None else f"in {out} (mode 0600: it holds the node's private key)"
    print(textwrap.dedent(f"""\
        invited {invitation.name}: address {invitation.address}, public key {invitation.public_key}
        its config is {where}; copy it to the node, then there:
          wg-quick up ./{invitation.name if out is None else out.stem}.conf
          wgpunch node --mesh"""),
          file=sys.stderr if out is None else sys.stdout)
    return 0


def _revoke(args: argparse.Namespace) -> int:
    config = args.config or WG_DIR / f"{args.interface}.conf"
    public = asyncio.run(_with_device(args.interface, "revoke", lambda device: revoke(
        device, config, args.name)))
    print(f"revoked {args.name} ({public}): removed from {args.interface} and {config}; nodes "
          "running `wgpunch node --mesh` drop it within seconds")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    init = subparsers.add_parser(
        "init", help=help_of("init"),
        description="Write the registry's private key (IF.key, mode 0600) and a wg-quick "
        "config (IF.conf: Address, ListenPort, the key file) in --dir, and print what to "
        "open in the firewall and what to run next. Existing files are never replaced.")
    init.add_argument("what", choices=("registry",), help="what to set up: registry")
    init.add_argument("--endpoint", required=True, metavar="HOST:PORT",
                      help="the registry's public name or address and WireGuard UDP port, as "
                      "nodes will reach it (the port is also its ListenPort)")
    init.add_argument("--network", required=True, metavar="CIDR",
                      help="the tunnel network, e.g. 10.99.0.0/24 (the registry takes its "
                      "last address) or 10.99.0.1/24 (that address)")
    init.add_argument("-i", "--interface", default="wg0", metavar="IF",
                      help="the interface name (default wg0)")
    init.add_argument("--dir", type=Path, default=WG_DIR, metavar="DIR",
                      help=f"where to write IF.key and IF.conf (default {WG_DIR})")
    init.set_defaults(func=_init)

    inv = subparsers.add_parser(
        "invite", help=help_of("invite"),
        description="On the registry host: generate the node's key pair, pick a free tunnel "
        "address, add the node as a peer of the running interface and to its config file "
        "(both or neither), and write the node's wg-quick config (its key, address, a listen "
        "port, the registry peer with endpoint and keepalive) to NAME.conf, mode 0600.")
    inv.add_argument("name", metavar="NAME", help="the node's name (letters, digits, . _ -)")
    inv.add_argument("--address", metavar="IP", help="its tunnel address (default: the lowest "
                     "free one)")
    inv.add_argument("-i", "--interface", default="wg0", metavar="IF",
                     help="the registry's interface (default wg0)")
    inv.add_argument("--config", type=Path, metavar="FILE",
                     help=f"the registry's wg-quick config (default {WG_DIR}/IF.conf)")
    inv.add_argument("--endpoint", metavar="HOST:PORT", help="the registry's public endpoint "
                     "(default: the one `init registry` recorded in the config)")
    inv.add_argument("-o", "--out", metavar="FILE", help="where to write the node's config "
                     "(default ./NAME.conf; - for standard output)")
    inv.set_defaults(func=_invite)

    rev = subparsers.add_parser(
        "revoke", help=help_of("revoke"),
        description="Remove node NAME from the registry's running interface and its config "
        "file (both or neither). Nodes running `wgpunch node --mesh` remove it too.")
    rev.add_argument("name", metavar="NAME")
    rev.add_argument("-i", "--interface", default="wg0", metavar="IF",
                     help="the registry's interface (default wg0)")
    rev.add_argument("--config", type=Path, metavar="FILE",
                     help=f"the registry's wg-quick config (default {WG_DIR}/IF.conf)")
    rev.set_defaults(func=_revoke)
