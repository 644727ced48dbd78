"""`wgpunch demo`, the README's first command: exit 0 and a direct, pinging tunnel exactly
when every pair is direct; with a registry peer, and with a natpunch rendezvous server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.lab


def demo(*args: str) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, "-m", "wgpunch", "demo", "--json", *args],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize("flags", [[], ["--natpunch", "noise"], ["--natpunch", "legacy"]],
                         ids=["registry", "natpunch", "natpunch-legacy"])
def test_demo_shows_a_direct_tunnel(lab_prefix, flags):
    code, result = demo("--prefix", lab_prefix, *flags)
    assert code == 0 and result["ok"], result
    (pair,) = result["pairs"]
    assert pair["direct"] and pair["ping_ms"] is not None
    assert pair["a_endpoint_for_b"].startswith(pair["b_public_ip"] + ":")


def test_demo_relays_a_pair_that_cannot_go_direct(lab_prefix):
    # A symmetric NAT against a filtering one: no direct path, the registry's relay.
    code, result = demo("symmetric", "--timeout", "10", "--prefix", lab_prefix)
    assert code == 0 and result["ok"], result
    (pair,) = result["pairs"]
    assert pair["path"] == "relay" and not pair["direct"] and pair["ping_ms"] is not None


def test_demo_says_so_when_a_pair_has_no_path(lab_prefix):
    # The same pair without a registry (natpunch: no relay) has no path at all.
    code, result = demo("symmetric", "--natpunch", "noise", "--timeout", "3",
                        "--prefix", lab_prefix)
    assert code == 1 and not result["ok"]
    assert [p["path"] for p in result["pairs"]] == ["none"]
