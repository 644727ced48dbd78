"""`wgpunch relay`: the relay core (relay.py) alone, so that relays can live on hosts of
their own. It takes its port range and its nftables table (removing what an earlier relay
process left) and forwards for the slots it is given. Handing it slots from a registry on
another host is not built yet: until then slots come only from `wgpunch registry --relay`,
and this command serves as the check that a host can relay (kernel path or userspace)."""

from __future__ import annotations

import argparse
import asyncio
import signal

from .. import config, sdnotify
from ..commands import help_of
from .cli import RelaySettings, make_relay, relay_address

EPILOG = config.epilog(config.RELAY)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "relay",
        help=help_of("relay"),
        description=(
            "Run the wgpunch relay on its own: UDP ports FIRST-LAST, two per relayed pair,\n"
            "forwarded by nftables once both sides are bound (else in this process). Stop\n"
            "with SIGTERM or SIGINT; the relay's table and conntrack entries go with it."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--ports", metavar="FIRST-LAST",
                        help=f"the UDP ports to relay on (default {config.DEFAULT_RELAY_PORTS})")
    parser.add_argument("--address", metavar="IP",
                        help="the relay's public IP (the kernel path's source address)")
    parser.add_argument("--userspace", action="store_true", default=None,
                        help="forward in this process only, never through nftables")
    parser.add_argument("--config", metavar="FILE",
                        help="read options from this TOML file (keys below)")
    parser.set_defaults(func=run, daemon=True)


def settings_from(args: argparse.Namespace) -> RelaySettings:
    from .relayslots import port_range

    options = config.load(config.RELAY, vars(args), config=args.config)
    address = (None if options.address is None
               else options.parsed("address", relay_address, options.address))
    return RelaySettings(options.parsed("ports", port_range, options.ports), address,
                         not options.userspace)


async def serve(settings: RelaySettings) -> None:
    relay = make_relay(settings, lambda node: None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await relay.start()
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
