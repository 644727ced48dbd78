"""`wgpunch systemd install`: write the daemons' systemd units, never run systemctl.

The units ship in the package (wgpunch/systemd/*.service) with `@WGPUNCH@` where the
command goes; installing puts in the `wgpunch` of the interpreter that runs this command
(a virtual environment's, say), prints what it wrote and the systemctl commands to run.
What each unit allows, and why, is written in the unit itself; README.md "Running as a
service" has the summary.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from importlib import resources
from pathlib import Path

from .commands import help_of
from .errors import ConfigError

log = logging.getLogger(__name__)

UNITS = ("wgpunch-registry@.service", "wgpunch-node@.service", "wgpunch-rendezvous.service")
PLACEHOLDER = "@WGPUNCH@"
DEFAULT_DIR = Path("/etc/systemd/system")
# What the units' sandbox hides (ProtectHome=yes, PrivateTmp=yes): a wgpunch under one of
# these cannot start from a unit.
HIDDEN = (Path("/home"), Path("/root"), Path("/run/user"), Path("/tmp"), Path("/var/tmp"))


def template(name: str) -> str:
    return (resources.files("wgpunch") / "systemd" / name).read_text(encoding="utf-8")


def command() -> tuple[str, ...]:
    """How a unit runs this wgpunch: the `wgpunch` script beside the running interpreter,
    else the interpreter with `-m wgpunch`."""
    script = Path(sys.executable).parent / "wgpunch"
    if os.access(script, os.X_OK):
        return (str(script),)
    return (sys.executable, "-m", "wgpunch")


def hidden_by_sandbox(path: Path) -> Path | None:
    """The directory of HIDDEN that `path` lies under, if any."""
    return next((top for top in HIDDEN if path.is_relative_to(top)), None)


def exec_words(words: tuple[str, ...]) -> str:
    """`words` as the start of an ExecStart= line: '%' doubled (systemd's specifiers), '$'
    doubled (its variables), a word with a space or a quote quoted."""
    out = []
    for word in words:
        word = word.replace("%", "%%").replace("$", "$$")
        if any(c.isspace() or c in "\"'\\" for c in word):
            word = '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(word)
    return " ".join(out)


def render(name: str, words: tuple[str, ...]) -> str:
    return template(name).replace(PLACEHOLDER, exec_words(words))


def install(directory: Path, words: tuple[str, ...], *, dry_run: bool = False) -> list[str]:
    """Write every unit into `directory` (nothing with `dry_run`); one line per unit saying
    what happened, in order."""
    if not dry_run and not directory.is_dir():
        raise ConfigError(f"systemd: {directory} is no directory")
    lines = []
    for name in UNITS:
        path = directory / name
        text = render(name, words)
        try:
            old = path.read_text(encoding="utf-8") if path.exists() else None
            if dry_run:
                verb = "would write" if old != text else "unchanged"
            elif old == text:
                verb = "unchanged"
            else:
                tmp = path.with_name(f".{name}.tmp")
                tmp.write_text(text, encoding="utf-8")
                tmp.chmod(0o644)
                tmp.replace(path)
                verb = "wrote" if old is None else "replaced"
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"systemd: cannot write {path}: "
                              f"{getattr(error, 'strerror', None) or error}") from None
        lines.append(f"{verb} {path}")
    return lines


NEXT = """\
then, as root (wgpunch runs no systemctl itself):
  systemctl daemon-reload
  systemctl enable --now wgpunch-registry@IF.service   # the registry host, IF = wg0 say
  systemctl enable --now wgpunch-node@IF.service       # every node
  systemctl enable --now wgpunch-rendezvous.service    # a rendezvous server
options: WGPUNCH_* variables in /etc/wgpunch/IF.env (rendezvous.env), and a TOML file with
ARGS=--config /etc/wgpunch/IF.toml there; see README.md, "Running as a service\""""


def run(args: argparse.Namespace) -> int:
    words = command()
    directory: Path = args.dir
    for line in install(directory, words, dry_run=args.dry_run):  # bad input fails first
        print(line)
    for path in (Path(words[0]), Path(__file__).parent):  # the program, the package
        hidden = hidden_by_sandbox(path)
        if hidden is not None:
            log.warning("%s is under %s, which the units' sandbox hides (ProtectHome=, "
                        "PrivateTmp=): install wgpunch elsewhere (/opt, /usr/local) or the "
                        "units will not start", path, hidden)
            break
    if args.dry_run:
        for name in UNITS:
            print(f"\n# {directory / name}\n{render(name, words)}", end="")
        print()
    print(f"ExecStart runs: {exec_words(words)}")
    print(NEXT)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "systemd",
        help=help_of("systemd"),
        description=textwrap.fill(
            "systemd units for the three daemons: wgpunch-registry@IF and wgpunch-node@IF "
            "(the instance is the WireGuard interface) and wgpunch-rendezvous. Each is "
            "Type=notify, sandboxed, and allowed only the capabilities it needs (the units "
            "say which and why).", 88),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    install_parser = actions.add_parser(
        "install",
        help="write the unit files (never runs systemctl)",
        description=textwrap.fill(
            f"Write {', '.join(UNITS)} into DIR, with ExecStart running the wgpunch of "
            "the Python that runs this command; print what was written and the systemctl "
            "commands to run. A file that differs is replaced: change a unit with a drop-in "
            "(systemctl edit UNIT), which survives the next install.", 88),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    install_parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, metavar="DIR",
        help=f"where to write the units (default {DEFAULT_DIR})",
    )
    install_parser.add_argument(
        "--dry-run", action="store_true",
        help="write nothing; print the units as they would be written",
    )
    install_parser.set_defaults(func=run)
