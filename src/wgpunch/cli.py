"""`wgpunch` command line: one parser, one module per subcommand.

Each subcommand module (commands.py lists them) exposes `add_parser(subparsers)`, which
registers its parser and sets `func` to a callable taking the parsed arguments and returning
the exit code; long-running commands also set `daemon=True`, which makes INFO (one line per
event) the default log level. Errors that a user can cause are `WgpunchError`s: printed as one
line on stderr, exit code 1.

`main` imports only the module of the subcommand named on the command line; the others are
listed from commands.py alone, so `wgpunch --help` and a daemon's start load nothing they do
not use (bench/startup.py).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Collection, Sequence

from . import __version__, logs
from .commands import COMMANDS
from .errors import WgpunchError


def build_parser(full: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `full`, only the subcommands named there, or with none named,
    every one with only its name and help (enough to list them: `wgpunch --help`)."""
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
    wanted = None if full is None else {COMMANDS[name][0] for name in full}
    loaded: set[str] = set()
    for name, (module, help_text) in COMMANDS.items():
        if wanted is not None and module not in wanted:
            if not wanted:  # a named command's run needs no parser of the others (startup.py)
                subparsers.add_parser(name, help=help_text)
        elif module not in loaded:  # one module may add several subcommands (onboard)
            importlib.import_module(module).add_parser(subparsers)
            loaded.add(module)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    # The first word that names a subcommand is the subcommand: the options before it take
    # no such word as their value (--log-format text|json).
    named = next((word for word in argv if word in COMMANDS), None)
    args = build_parser(full=() if named is None else (named,)).parse_args(argv)
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
