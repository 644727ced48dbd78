"""`wgpunch lab`: build, inspect and remove NAT labs.

    wgpunch lab up SCENARIO [--prefix P] [--json]   build it and leave it running
    wgpunch lab down --prefix P                     remove every trace of lab P
    wgpunch lab list [--json]                       labs currently on this machine
    wgpunch lab exec P HOST -- CMD...               run CMD inside HOST of lab P
    wgpunch lab scenarios                           named scenarios and NAT kinds
    wgpunch lab matrix [--kinds K,K] [--runs N]     every pair of NAT kinds, as a grid
                       [--cells K1:K2,...]          ... or just these cells
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from ..commands import help_of
from ..errors import LabError
from . import catalog, matrix, state
from .nat import NAT_KINDS
from .netns import Namespace, require_root


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lab", help=help_of("lab"),
        description="A small internet in network namespaces: a core router, a registry with a "
        "public address, hosts behind NAT routers of several kinds, each running "
        "wireguard-go. Needs root; nothing outside the lab's own namespaces is touched.",
    )
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    commands = parser.add_subparsers(dest="lab_command", metavar="ACTION")

    up = commands.add_parser(
        "up", help="build a lab and leave it running",
        description="Build a lab from SCENARIO and leave it running (wireguard-go keeps "
        "running after this command exits); print what was built. Ctrl-C while building "
        "removes what was built so far.",
    )
    up.add_argument("scenario", metavar="SCENARIO",
                    help=f"a named scenario ({', '.join(catalog.NAMED)}), "
                    f"{' or '.join(catalog.PATTERNS)}, or a path to a .toml file "
                    "(schema: docs/lab.md)")
    up.add_argument("--prefix", metavar="P", type=_prefix,
                    help="name prefix of every object of the lab: 1-8 lowercase letters/digits "
                    "(default: random, wl + 4 hex digits); must not be in use")
    up.add_argument("--json", action="store_true", help="print the description as JSON")
    up.add_argument("--agents", action="store_true",
                    help="also start `wgpunch registry` in each registry host and `wgpunch node` "
                    "in every WireGuard host (they keep running; logs in /run/wgpunch-lab/P/)")
    up.add_argument("--no-registry-peer", dest="registry_peer", action="store_false",
                    help="nodes do not have the registry as a WireGuard peer (for trying "
                    "`wgpunch rendezvous` and `wgpunch node --natpunch`, docs/natpunch.md); "
                    "not with --agents")
    up.set_defaults(func=_up)

    down = commands.add_parser(
        "down", help="remove a lab",
        description="Stop every process in the lab's namespaces and delete the namespaces, "
        "wireguard-go sockets and state directory (/run/wgpunch-lab/P). Works for a lab "
        "whose `up` was killed, too.",
    )
    down.add_argument("--prefix", metavar="P", type=_prefix, required=True,
                      help="prefix of the lab to remove")
    down.set_defaults(func=_down)

    listing = commands.add_parser("list", help="labs currently on this machine",
                                  description="Labs found by state directory or namespaces.")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(func=_list)

    run = commands.add_parser(
        "exec", help="run a command inside a lab host",
        description="Run CMD inside the namespace of HOST (a host, a NAT router, `core` or "
        "`registry`) of lab P, with this terminal; exit with CMD's exit code.",
    )
    run.add_argument("prefix", metavar="P", type=_prefix, help="prefix of the lab")
    run.add_argument("host", metavar="HOST", help="node name, e.g. a, registry, na")
    run.add_argument("cmd", metavar="-- CMD", nargs=argparse.REMAINDER,
                     help="the command and its arguments")
    run.set_defaults(func=_exec)

    scenarios = commands.add_parser("scenarios", help="named scenarios and NAT kinds",
                                    description="List named scenarios and NAT kinds.")
    scenarios.set_defaults(func=_scenarios)

    grid = commands.add_parser(
        "matrix", help="run every pair of NAT kinds and print the grid",
        description="For every pair of KINDS (a kind with itself included), run the demo of "
        "`matrix-K1-K2` RUNS times (a fresh lab each time, new keys, so both key orders come "
        "up) and print a grid: the path most runs got (direct, lan, relay, none), in how "
        "many runs, and the median time to it from starting the agents. Cells where one "
        "WireGuard socket cannot punch are listed with the reason. Exit 0 only if every "
        "punchable cell was direct in every run. Needs root; one cell takes a few seconds, "
        "a cell that needs the relay up to --timeout.",
    )
    grid.add_argument("--kinds", type=_kinds, default=matrix.KINDS, metavar="K,K,...",
                      help=f"NAT kinds to pair (default: all: {','.join(matrix.KINDS)})")
    grid.add_argument("--cells", type=_cells, metavar="K1:K2,...",
                      help="only these cells (e.g. eim-full-cone:symmetric,collision:eim), "
                      "instead of every pair of --kinds")
    grid.add_argument("--runs", type=_runs, default=1, metavar="N",
                      help="runs per cell (default 1, at most 100)")
    grid.add_argument("--timeout", type=_seconds, default=15.0, metavar="SECONDS",
                      help="how long a run waits for a path (default 15)")
    grid.add_argument("--json", action="store_true", help="print the grid as JSON")
    grid.set_defaults(func=_matrix)


def _prefix(text: str) -> str:
    try:
        return state.check_prefix(text)
    except LabError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _up(args: argparse.Namespace) -> int:
    require_root()
    from .lab import Lab  # the heavier imports only when building

    if args.agents and not args.registry_peer:
        raise LabError("lab: --agents runs a registry, which needs the registry peer; start "
                       "`wgpunch rendezvous` and the nodes with `lab exec` instead")
    lab = Lab(catalog.resolve(args.scenario), prefix=args.prefix,
              registry_peer=args.registry_peer)
    lab.build()
    if args.agents:
        from .agents import Agents

        try:
            agents = Agents(lab)
            agents.start_registries()
            agents.start_nodes()
        except BaseException:
            lab.close()
            raise
    description = lab.describe()
    print(json.dumps(description, indent=2) if args.json else render(description))
    return 0


def render(lab: dict[str, Any]) -> str:
    rows = [("host", "namespace", "interface", "tunnel ip", "port", "public ip", "private ip",
             "nat", "public key")]
    for h in lab["hosts"]:
        rows.append((h["name"], h["namespace"], h["interface"] or "-", h["tunnel_ip"] or "-",
                     str(h["listen_port"] or "-"), h["public_ip"], h["private_ip"] or "-",
                     "/".join(h["nat_chain"]) + f" ({h['nat']})" if h["nat"] else "-",
                     h["public_key"] or "-"))
    lines = [f"lab {lab['prefix']} ({lab['scenario']}): {lab['description']}", *_columns(rows)]
    if lab["nats"]:
        nat_rows = [("nat", "namespace", "kind", "hairpin", "public ip", "lan", "behind")]
        nat_rows += [(n["name"], n["namespace"], n["kind"], "on" if n["hairpin"] else "off",
                      n["public_ip"], n["lan"], n["behind"] or "-") for n in lab["nats"]]
        lines += ["", *_columns(nat_rows)]
    lines += ["", f"run in a host:  wgpunch lab exec {lab['prefix']} a -- wg show",
              f"remove:         wgpunch lab down --prefix {lab['prefix']}"]
    return "\n".join(lines)


def _columns(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _kinds(text: str) -> tuple[str, ...]:
    try:
        return matrix.parse_kinds(text)
    except LabError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _cells(text: str) -> list[matrix.Cell]:
    try:
        return matrix.parse_cells(text)
    except LabError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _runs(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number in 1-100")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 1 <= value <= 600:
        raise argparse.ArgumentTypeError(f"{text!r} is not in 1-600 seconds")
    return value


def _matrix(args: argparse.Namespace) -> int:
    require_root()
    cells: list[matrix.Cell] = args.cells or matrix.cells_of(args.kinds)
    kinds = matrix.kinds_of(cells) if args.cells else args.kinds
    total = len(cells) * args.runs
    done = itertools.count(1)

    def progress(cell: matrix.Cell, run: matrix.Run) -> None:
        took = "" if run.seconds is None else f" in {run.seconds:.2f} s"
        order = "" if run.lower_key is None else f" (lower key: {run.lower_key})"
        print(f"[{next(done)}/{total}] matrix-{cell.first}-{cell.second}: {run.path}{took}"
              f"{order}", file=sys.stderr, flush=True)

    matrix.run_cells(cells, args.runs, args.timeout, progress)
    ok = all(cell.met for cell in cells)
    if args.json:
        print(json.dumps({"kinds": list(kinds), "runs": args.runs, "ok": ok,
                          "cells": [cell.to_json() for cell in cells]}, indent=2))
    else:
        print(matrix.render(kinds, cells))
    return 0 if ok else 1


def _down(args: argparse.Namespace) -> int:
    require_root()
    removed = state.remove(args.prefix)
    if not (removed.namespaces or removed.sockets or removed.state_dir):
        print(f"lab {args.prefix}: nothing to remove")
    else:
        print(f"lab {args.prefix}: removed {removed.namespaces} namespaces, "
              f"{removed.processes} processes, {removed.sockets} sockets"
              f"{', state directory' if removed.state_dir else ''}")
    return 0


def _list(args: argparse.Namespace) -> int:
    labs = state.list_labs()
    if args.json:
        print(json.dumps([vars(lab) for lab in labs], indent=2))
    elif not labs:
        print("no labs")
    else:
        rows = [("prefix", "scenario", "namespaces", "sockets")]
        rows += [(lab.prefix, lab.scenario or "? (no state)", str(lab.namespaces),
                  str(lab.sockets)) for lab in labs]
        print("\n".join(_columns(rows)))
    return 0


def _exec(args: argparse.Namespace) -> int:
    require_root()
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise LabError("lab exec: no command given (wgpunch lab exec P HOST -- CMD...)")
    ns = Namespace(f"{args.prefix}-{args.host}")
    if not ns.exists():
        raise LabError(f"lab {args.prefix}: no node {args.host!r} (no namespace {ns.name})")
    return subprocess.run(ns.argv(cmd), check=False).returncode


def _scenarios(args: argparse.Namespace) -> int:
    print("named scenarios:")
    for name, make in catalog.NAMED.items():
        print(f"  {name:<12} {make().description}")
    for pattern in catalog.PATTERNS:
        print(f"  {pattern}")
    print("NAT kinds (RFC 4787):")
    for kind in NAT_KINDS.values():
        print(f"  {kind.name:<14} {kind.summary}")
    return 0
