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

from . import __version__, demo, logs
from . import status as status_cli
from .errors import WgpunchError
from .lab import cli as lab_cli
from .natpunch import cli as rendezvous_cli
from .node import cli as node_cli
from .registry import cli as registry_cli

SUBCOMMANDS = (registry_cli, rendezvous_cli, node_cli, status_cli, lab_cli, demo)


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
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more log output: -v for events (INFO), -vv for debugging",
    )
    parser.add_argument(
        "--log-format", choices=("text", "json"), default="text",
        help="log lines as text (default) or one JSON object per line, on stderr",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.verbose, args.log_format, daemon=getattr(args, "daemon", False))
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
