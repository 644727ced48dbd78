"""`wgpunch relay`: the relay core (relay.py) alone, so that relays can live on hosts of
their own. It takes its port range and its nftables table (removing what an earlier relay
process left) and forwards for the slots a registry allocates through its control API
(`--control`, relaycontrol.py; the registry's `--relay-remote`). Without `--control` it
gets no slots, and serves as the check that a host can relay (kernel path or userspace)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
from dataclasses import dataclass
from pathlib import Path

from .. import config, sdnotify
from ..commands import help_of
from ..config.registry import DEFAULT_RELAY_PORTS, RELAY
from ..errors import ConfigError
from ..keys import Key
from ..ports import RELAY_CONTROL_PORT
from ..wg.model import Endpoint
from .cli import control_endpoint, relay_address
from .serve import RelaySettings, make_relay

EPILOG = config.epilog(RELAY)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "relay",
        help=help_of("relay"),
        description=(
            "Run the wgpunch relay on its own: UDP ports FIRST-LAST, two per relayed pair,\n"
            "forwarded by nftables once both sides are bound (else in this process). Stop\n"
            "with SIGTERM or SIGINT; the relay's table and conntrack entries go with it.\n"
            "With --control, a registry (--relay-remote) allocates slots here through a\n"
            "signed HTTP API (docs/api.md, \"Remote relays\")."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ports", metavar="FIRST-LAST",
                        help=f"the UDP ports to relay on (default {DEFAULT_RELAY_PORTS})")
    parser.add_argument("--address", metavar="IP",
                        help="the relay's public IP (the kernel path's source address)")
    parser.add_argument("--userspace", action="store_true", default=None,
                        help="forward in this process only, never through nftables")
    parser.add_argument("--control", metavar="IP[:PORT]",
                        help="serve the control API a registry allocates slots through on "
                             f"IP:PORT (port {RELAY_CONTROL_PORT} if none); open it to "
                             "the registry's address only")
    parser.add_argument("--secret-file", metavar="FILE",
                        help="the secret shared with the registry (its --relay-secret-file)")
    parser.add_argument("--config", metavar="FILE",
                        help="read options from this TOML file (keys below)")
    parser.set_defaults(func=run, daemon=True)


@dataclass(frozen=True, slots=True)
class ControlSettings:
    listen: Endpoint
    secret_file: Path


@dataclass(frozen=True, slots=True)
class StandaloneSettings:
    relay: RelaySettings
    control: ControlSettings | None  # None: no control API, no slots

    @property
    def ports(self) -> range:
        return self.relay.ports


def settings_from(args: argparse.Namespace) -> StandaloneSettings:
    from .relayslots import port_range

    options = config.load(RELAY, vars(args), config=args.config)
    address = (None if options.address is None
               else options.parsed("address", relay_address, options.address))
    relay = RelaySettings(options.parsed("ports", port_range, options.ports), address,
                          not options.userspace)
    if options.control is None:
        if options.secret_file is not None:
            raise ConfigError("relay: --secret-file needs --control")
        return StandaloneSettings(relay, None)
    if options.secret_file is None:
        raise ConfigError("relay: --control needs --secret-file (the secret the registry "
                          "shares)")
    listen = options.parsed("control", control_endpoint, options.control)
    return StandaloneSettings(relay, ControlSettings(listen, options.secret_file))


async def serve(settings: StandaloneSettings) -> None:
    from .relayauth import read_secret
    from .relaycontrol import serving

    control = settings.control
    secret = None if control is None else read_secret(control.secret_file, "relay")
    ips: dict[Key, str] = {}  # each node's public IP, as the registry last gave it
    relay = make_relay(settings.relay, ips.get)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await relay.start()
        async with contextlib.AsyncExitStack() as stack:
            if control is not None and secret is not None:
                await stack.enter_async_context(serving(relay, secret, ips, control.listen))
            sdnotify.notify("READY=1", f"STATUS=relaying on ports {settings.ports.start}-"
                                       f"{settings.ports.stop - 1}")
            await stop.wait()
            sdnotify.notify("STOPPING=1")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await relay.close()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(settings_from(args)))
    return 0
