"""`wgpunch node`: run the agent that steers this host's WireGuard interface."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import tomllib
from pathlib import Path
from typing import Any

from ..errors import WgpunchError
from ..keys import Key
from ..wg import open_device
from .agent import Agent, ConfigError, registry_api_url
from .client import RegistryClient
from .decide import Timings

log = logging.getLogger(__name__)

CONFIG_KEYS = {"interface", "registry", "api", "token_file", "keepalive", "opener_ttl"}


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


async def serve(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    interface = args.interface or config.get("interface")
    registry_text = args.registry or config.get("registry")
    if not interface or not registry_text:
        raise ConfigError("node: --interface and --registry are required (or in --config)")
    registry = Key.parse(str(registry_text), what="--registry key")
    keepalive = args.keepalive if args.keepalive is not None else config.get("keepalive", 25)
    if not isinstance(keepalive, int) or not 1 <= keepalive <= 65535:
        raise ConfigError(f"node: keepalive {keepalive!r} is not in 1-65535 seconds")
    opener_ttl = args.opener_ttl if args.opener_ttl is not None else config.get("opener_ttl", 64)
    if not isinstance(opener_ttl, int) or not 1 <= opener_ttl <= 255:
        raise ConfigError(f"node: opener TTL {opener_ttl!r} is not in 1-255")
    token = read_token(args.token_file or config.get("token_file"))
    device = open_device(str(interface))
    state = await device.state()
    api = args.api or config.get("api") or registry_api_url(state, registry)
    client = RegistryClient(str(api), token=token)
    agent = Agent(device, registry, client, timings=Timings(keepalive_s=keepalive),
                  opener_ttl=opener_ttl)
    log.info("node on %s: registry %s, API %s", interface, registry, api,
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
    finally:
        await client.close()
        await device.close()


def run(args: argparse.Namespace) -> int:
    try:
        asyncio.run(serve(args))
    except* WgpunchError as group:
        raise group.exceptions[0] from None
    return 0


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
            "are never touched; no peer is added or removed."
        ),
        epilog=(
            "--config FILE is TOML with any of the keys: interface, registry, api, "
            "token_file, keepalive, opener_ttl. Flags win over the file. The agent writes its "
            "view of each peer's path to /run/wgpunch/IF.json, which `wgpunch status` shows."
        ),
    )
    parser.add_argument("-i", "--interface", metavar="IF", help="the WireGuard interface to steer")
    parser.add_argument(
        "--registry", metavar="PUBKEY",
        help="the registry's public key (base64 as wg prints it, hex or base32); the registry "
        "must be a peer of IF",
    )
    parser.add_argument(
        "--api", metavar="URL",
        help="registry API URL (default: http://<registry peer's tunnel address>:51821)",
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
        help="IP TTL of the empty datagram that opens our NAT for a peer's handshake "
        "(default 64). Behind a router that keeps state for unsolicited packets (a Linux "
        "router without an input drop rule), set it to the hops that pass our own NATs but "
        "not the peer's, e.g. 2 for one home router",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file with the same options")
    parser.set_defaults(func=run, daemon=True)
