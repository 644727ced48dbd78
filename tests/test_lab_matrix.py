"""`wgpunch lab matrix`: which cells one WireGuard socket can punch (from the kinds' RFC 4787
behaviour, table-tested), the grid's text, and a CI-sized grid run with the real agents."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from wgpunch.errors import LabError
from wgpunch.lab import matrix
from wgpunch.lab.matrix import Cell, Expectation, Run

# The cells that need a relay: a per-destination mapping against per-port filtering or
# against another per-destination mapping. Every other pair of kinds punches.
NEEDS_RELAY = {
    frozenset({"symmetric"}),
    frozenset({"symmetric", "eim"}),
    frozenset({"symmetric", "eim-port"}),
    frozenset({"symmetric", "collision"}),
}


@pytest.mark.parametrize("first,second",
                         list(itertools.combinations_with_replacement(matrix.KINDS, 2)))
def test_expectation_of_every_cell(first, second):
    expected = matrix.expectation(first, second)
    assert expected.path == matrix.expectation(second, first).path
    wanted = "relay" if frozenset({first, second}) in NEEDS_RELAY else "direct"
    assert expected.path == wanted, expected


def test_the_reason_names_the_behaviour():
    assert matrix.expectation("symmetric", "symmetric").why == (
        "both NATs map per destination: needs a relay")
    assert "the other filters per port" in matrix.expectation("eim", "symmetric").why
    assert "symmetric initiates" in matrix.expectation("eim-addr", "symmetric").why


def test_a_side_with_port_mapping_is_reached_by_every_kind():
    for kind in matrix.KINDS:
        expected = matrix.expectation(kind, "symmetric+upnp")
        assert expected.path == "direct", (kind, expected)
    assert matrix.expectation("eim", "symmetric+upnp").why == (
        "eim sends to the port symmetric+upnp maps on its NAT")
    assert "symmetric+upnp" in matrix.KINDS
    assert matrix.parse_kinds("eim,collision+upnp") == ("eim", "collision+upnp")


def test_kinds_are_checked():
    assert matrix.parse_kinds("eim, symmetric,eim") == ("eim", "symmetric")
    with pytest.raises(LabError, match=r"unknown kind.*cone"):
        matrix.parse_kinds("eim,cone")
    with pytest.raises(LabError, match="none given"):
        matrix.parse_kinds(" , ")


def test_a_cell_says_what_most_runs_got_and_whether_it_met_its_expectation():
    cell = Cell("eim", "eim", Expectation("direct", "x"),
                [Run("direct", 0.5), Run("direct", 0.7), Run("none", None)])
    assert cell.text() == "direct 2/3 0.60s !" and not cell.met
    relay = Cell("symmetric", "symmetric", Expectation("relay", "x"), [Run("none", None)])
    assert relay.text() == "none 1/1" and relay.met
    grid = matrix.render(("eim", "symmetric"), [
        cell, Cell("eim", "symmetric", matrix.expectation("eim", "symmetric")), relay])
    assert grid.splitlines()[1].split() == ["eim", "direct", "2/3", "0.60s", "!", "-"]
    assert "cells that missed" in grid
    assert "eim with symmetric: one NAT maps per destination" in grid


@pytest.mark.lab
def test_a_small_grid_with_the_real_agents():
    done = subprocess.run(
        [sys.executable, "-m", "wgpunch", "lab", "matrix", "--json",
         "--kinds", "public,eim-port,collision"],
        capture_output=True, text=True, timeout=240)
    assert "Traceback" not in done.stderr, done.stderr
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["ok"], result
    assert len(result["cells"]) == 6
    assert {c["counts"].get("direct") for c in result["cells"]} == {1}, result


def test_cells_are_named_in_either_order_and_drawn_in_the_grids():
    cells = matrix.parse_cells("symmetric:eim-full-cone, collision:collision,eim-short:eim,"
                               "eim-full-cone:symmetric")
    assert [(c.first, c.second) for c in cells] == [
        ("eim-full-cone", "symmetric"), ("collision", "collision"), ("eim", "eim-short")]
    assert matrix.kinds_of(cells) == ("eim", "eim-full-cone", "symmetric", "collision",
                                      "eim-short")
    assert cells[2].expected.path == "direct"
    for bad, match in (("eim", "not KIND1:KIND2"), ("eim:cone", "unknown kind"),
                       (" , ", "no cells given")):
        with pytest.raises(LabError, match=match):
            matrix.parse_cells(bad)
    grid = matrix.render(matrix.kinds_of(cells), cells)
    assert grid.splitlines()[0].split() == ["eim", "eim-full-cone", "symmetric", "collision",
                                            "eim-short"]
