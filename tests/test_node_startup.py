"""`wgpunch node` starts with the cyclic collector paused (node/cli.py `run`): whatever
happens, it is on again once the command is over."""

from __future__ import annotations

import gc

import pytest

from wgpunch.cli import build_parser
from wgpunch.errors import ConfigError
from wgpunch.node.cli import run

KEY = "Rm9yIGV4YW1wbGUgb25seSwgbm90IGEgcmVhbCBrZXk="


def test_a_node_that_cannot_start_leaves_the_collector_on():
    args = build_parser().parse_args(["node", "--once", "--registry", KEY])
    assert gc.isenabled()
    with pytest.raises(ConfigError, match="--once steers one interface"):
        run(args)
    assert gc.isenabled()
