"""`wgpunch lab matrix`: every pair of NAT kinds, N runs each, printed as a grid.

A run of a cell is the demo of `matrix-K1-K2` (a fresh lab, the real registry and nodes, the
path judged by what `wg` shows). Every lab has new keys, so runs fall on both key orders.

What a cell should give follows from the kinds alone (`expectation`): one WireGuard socket
can punch unless one side maps per destination (its port toward the peer cannot be known in
advance) and the other filters per port (so it cannot let that unknown port in), or both map
per destination. Those cells need the relay; every other cell must be direct (or `lan`). A
side whose NAT offers port mapping (`K+upnp`) is reachable at its mapped port from anyone,
so every cell with one is direct.
"""

from __future__ import annotations

import itertools
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import LabError
from ..protocol import roles
from ..protocol.natinfo import NatBehaviour
from .catalog import KIND_LETTERS, MAPPED_LETTERS, MATRIX_KINDS, PORTMAP_SUFFIX, PUBLIC
from .nat import NAT_KINDS

KINDS = (*KIND_LETTERS, *MAPPED_LETTERS)  # the default grid


@dataclass(frozen=True)
class Expectation:
    path: str  # "direct" (or lan) | "relay"
    why: str


def expectation(first: str, second: str) -> Expectation:
    mapped = [kind for kind in (first, second) if kind.endswith(PORTMAP_SUFFIX)]
    reason = roles.relay_reason(behaviour(first), behaviour(second), mapped=bool(mapped))
    if reason is not None:
        return Expectation("relay", reason)
    if len(mapped) == 2:
        return Expectation("direct", "both map a port on their NAT: either reaches the other")
    if mapped:
        other = second if mapped[0] == first else first
        return Expectation("direct", f"{other} sends to the port {mapped[0]} maps on its NAT")
    for initiator, other in ((first, second), (second, first)):
        nat = behaviour(initiator)
        if nat is not None and nat.endpoint_dependent:
            return Expectation("direct", f"{initiator} initiates; {other} lets it in")
    return Expectation("direct", "both map endpoint-independently")


def behaviour(kind: str) -> NatBehaviour | None:
    """A lab kind's NAT behaviour as a node measures and reports it (protocol/natinfo.py),
    so the grid's verdict is the agents' own rule (protocol/roles.py)."""
    if kind == PUBLIC:
        return NatBehaviour("none", "endpoint-independent", True)
    nat = NAT_KINDS[kind.removesuffix(PORTMAP_SUFFIX)]
    return NatBehaviour(nat.mapping, nat.filtering, nat.port == "preserved")


@dataclass(frozen=True)
class Run:
    path: str  # direct | lan | relay | none
    seconds: float | None  # time to that path from starting the agents


@dataclass
class Cell:
    first: str
    second: str
    expected: Expectation
    runs: list[Run] = field(default_factory=list)

    @property
    def counts(self) -> Counter[str]:
        return Counter(run.path for run in self.runs)

    @property
    def median_s(self) -> float | None:
        times = [run.seconds for run in self.runs if run.seconds is not None]
        return statistics.median(times) if times else None

    @property
    def met(self) -> bool:
        """Punchable cells must be direct (or lan) in every run; a relay cell is met by a
        relayed path, and by no path while no relay runs (the grid still says `none`)."""
        wanted = {"direct", "lan"} if self.expected.path == "direct" else {"relay", "none"}
        return all(run.path in wanted for run in self.runs)

    def text(self) -> str:
        if not self.runs:
            return "-"
        counts = self.counts
        best = max(counts, key=lambda path: (counts[path], path))
        median = self.median_s
        took = "" if median is None or best == "none" else f" {median:.2f}s"
        mark = "" if self.met else " !"
        return f"{best} {counts[best]}/{len(self.runs)}{took}{mark}"

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first, "second": self.second,
            "expected": self.expected.path, "why": self.expected.why,
            "runs": [{"path": r.path, "seconds": r.seconds} for r in self.runs],
            "counts": dict(self.counts), "median_s": self.median_s, "met": self.met,
        }


def parse_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(dict.fromkeys(k.strip() for k in text.split(",") if k.strip()))
    unknown = [k for k in kinds if k not in MATRIX_KINDS]
    if unknown or not kinds:
        raise LabError(f"lab matrix: unknown kind(s) {', '.join(unknown) or '(none given)'} "
                       f"(known: {', '.join(KIND_LETTERS)}, and K{PORTMAP_SUFFIX} for a NAT "
                       "kind K with port mapping)")
    return kinds


def cells_of(kinds: Sequence[str]) -> list[Cell]:
    return [Cell(x, y, expectation(x, y))
            for x, y in itertools.combinations_with_replacement(kinds, 2)]


def run_matrix(kinds: Sequence[str], runs: int, timeout_s: float,
               progress: Callable[[Cell, Run], None] | None = None) -> list[Cell]:
    """Runs round-robin over the cells (run 1 of every cell, then run 2, ...), so a machine
    that is busier for a while spreads its effect over the grid instead of one cell."""
    from ..demo import run_demo

    cells = cells_of(kinds)
    for _ in range(runs):
        for cell in cells:
            [pair] = run_demo(f"matrix-{cell.first}-{cell.second}", timeout_s, prefix=None)
            run = Run(pair.path, pair.time_to_direct_s)
            cell.runs.append(run)
            if progress is not None:
                progress(cell, run)
    return cells


def render(kinds: Sequence[str], cells: Sequence[Cell]) -> str:
    by_pair = {(c.first, c.second): c for c in cells}
    header = ("", *kinds)
    rows = [header]
    for i, row_kind in enumerate(kinds):
        row = [row_kind]
        for j, column_kind in enumerate(kinds):
            cell = by_pair.get((row_kind, column_kind) if i <= j else (column_kind, row_kind))
            row.append("" if j < i or cell is None else cell.text())
        rows.append(tuple(row))
    widths = [max(len(r[k]) for r in rows) for k in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    relay = [c for c in cells if c.expected.path == "relay"]
    if relay:
        lines += ["", "cells that need a relay:"]
        lines += [f"  {c.first} with {c.second}: {c.expected.why}" for c in relay]
    missed = [c for c in cells if not c.met]
    if missed:
        lines += ["", "cells that missed (marked !):"]
        lines += [f"  {c.first} with {c.second}: expected {c.expected.path} ({c.expected.why}); "
                  f"got {', '.join(f'{p} {n}' for p, n in sorted(c.counts.items()))}"
                  for c in missed]
    return "\n".join(lines)
