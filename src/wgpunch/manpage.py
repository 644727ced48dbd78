"""The wgpunch(1) manual page, made by argparse-manpage from the parser that `--help` prints.

argparse-manpage writes every command's usage, description and options, but of the epilogs
only the top parser's; ours are on the commands (the config keys and WGPUNCH_* variables,
the DNS-SD records, the path file), so they are added here as NOTES, with FILES and
ENVIRONMENT. argparse-manpage is in the `test` extra, not a runtime dependency:

    python -m wgpunch.manpage > wgpunch.1 && man -l wgpunch.1
"""

from __future__ import annotations

import argparse
import sys

from argparse_manpage.manpage import Manpage  # type: ignore[import-untyped]

from . import __version__
from .cli import build_parser

FILES = (
    ("/etc/wgpunch/IF.env",
     "WGPUNCH_* variables (and ARGS, extra flags) for wgpunch-registry@IF and "
     "wgpunch-node@IF; rendezvous.env for wgpunch-rendezvous (wgpunch systemd install)"),
    ("/run/wgpunch/IF.json", "the node agent's paths, which wgpunch status shows"),
    ("/run/wgpunch/IF.lock", "held by the node agent of IF: one agent per interface"),
    ("/var/lib/wgpunch/rendezvous.key", "the rendezvous server's private key (default)"),
    ("/run/wireguard/IF.sock", "a userspace (wireguard-go) device's control socket"),
)
ENVIRONMENT = (
    ("WGPUNCH_<KEY>", "an option of registry, node or rendezvous (NOTES lists them); a flag "
     "wins over it, and it wins over the --config file"),
    ("NOTIFY_SOCKET", "set by systemd for Type=notify: the daemons send READY=1 and "
     "STOPPING=1 there"),
)


def roff(text: str) -> str:
    """Plain text as roff: no escapes, requests or hyphens taken as roff's own."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line
                     for line in text.splitlines())


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def render(parser: argparse.ArgumentParser | None = None) -> str:
    parser = parser or build_parser()
    page = Manpage(parser)
    page.source = f"wgpunch {__version__}"
    page.manual = "wgpunch manual"
    page.description = "direct WireGuard tunnels between peers behind NATs"
    notes = [f'.SS "wgpunch {name}"\n.nf\n{roff(sub.epilog.rstrip())}\n.fi'
             for name, sub in _commands(parser).items() if sub.epilog]
    page.add_section("notes", "=", "\n".join(notes))
    page.add_section("environment", "=", _items(ENVIRONMENT))
    page.add_section("files", "=", _items(FILES))
    page.add_section("see also", "=", ".BR wg (8),\n.BR systemd.exec (5)")
    return str(page)


def _items(items: tuple[tuple[str, str], ...]) -> str:
    return "\n".join(f".TP\n.B {roff(name)}\n{roff(text)}" for name, text in items)


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(prog="python -m wgpunch.manpage",
                                   description="write the wgpunch(1) manual page")
    args.add_argument("output", nargs="?", help="the file to write (default: stdout)")
    output = args.parse_args(argv).output
    text = render()
    if output:
        with open(output, "w", encoding="utf-8") as file:
            file.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
