"""`wgpunch status --json` in a lab host's namespace, for the lab tests.

The interface is always named: wireguard-go's control sockets of every namespace share one
directory, so a bare `status` lists every lab's interfaces on the machine."""

from __future__ import annotations

import json
from typing import Any

from wgpunch.lab import Lab
from wgpunch.lab.netns import python_module


def device_status(lab: Lab, host: str) -> dict[str, Any]:
    """`host`'s interface as `wgpunch status --interface IF --json` shows it."""
    ifname = lab.host(host).ifname
    assert ifname is not None
    argv, env = python_module("wgpunch.cli", "status", "--interface", ifname, "--json")
    [device] = json.loads(lab.ns(host).run(argv, env=env).stdout)["interfaces"]
    return device


def peer_status(lab: Lab, host: str, peer: str) -> dict[str, Any]:
    """`peer` as `host`'s `wgpunch status --json` shows it."""
    key = lab.host(peer).public_key
    assert key is not None
    [found] = [p for p in device_status(lab, host)["peers"]
               if p["public_key"] == key.base64()]
    return found
