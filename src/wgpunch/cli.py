"""`wgpunch` command line: one parser, one module per subcommand.

Each subcommand module exposes `add_parser(subparsers)`, which registers its parser and sets
`func` to a callable taking the parsed arguments and returning the exit code; long-running
commands also set `daemon=True`, which makes INFO (one line per event) the default log level.
Errors that a user can cause are `WgpunchError`s: printed as one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__, completion, demo, logs, service
from . import status as status_cli
from .errors import WgpunchError
from .lab import cli as lab_cli
from .natpunch import cli as rendezvous_cli
from .node import cli as node_cli
from .onboard import cli as onboard_cli
from .registry import cli as registry_cli
from .registry import relaycli as relay_cli

SUBCOMMANDS = (registry_cli, relay_cli, rendezvous_cli, node_cli, onboard_cli, status_cli,
               lab_cli, demo, service, completion)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wgpunch",
        description=(
            "Direct WireGuard tunnels between peers behind NATs. A registry that every node "
            "has as a WireGuard peer publishes each node's public endpoint; node agents set "
            "those endpoints so that peers punch through their NATs and talk directly."
        ),
    )
    parser.add_argument("--version", action="version", version=f"wgpunch {__version__}")
    add_log_options(parser, defaults=True)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    for subparser in subparsers.choices.values():
        add_log_options(subparser, defaults=False)
    return parser


def add_log_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The logging options, before the command or after it (`wgpunch node -v ...`). After it
    they have no defaults of their own, so they never undo what was given before it; `-v`s
    after it count on their own and add up with those before (`-v node -v` is `-vv`)."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "-v", "--verbose", action="count", dest="verbose" if defaults else "verbose_after",
        default=0 if defaults else argparse.SUPPRESS,
        help="more log output from wgpunch: -v for events (INFO), -vv for debugging",
    )
    group.add_argument(
        "--log-format", choices=("text", "json"),
        default="text" if defaults else argparse.SUPPRESS,
        help="log lines as text (default) or one JSON object per line, on stderr",
    )
    group.add_argument(
        "--debug-libraries", action="store_true",
        default=False if defaults else argparse.SUPPRESS,
        help="let -v/-vv raise the libraries' loggers too (aiohttp, dnspython; pyroute2 to "
        "INFO); a record that names a secret key field is withheld even then",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.verbose + getattr(args, "verbose_after", 0), args.log_format,
               daemon=getattr(args, "daemon", False), debug_libraries=args.debug_libraries)
    try:
        return int(args.func(args) or 0)
    except WgpunchError as error:
        print(f"wgpunch: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("wgpunch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
