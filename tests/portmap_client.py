"""The node's port-mapping client for tests/test_portmap_lab.py, run inside a lab host:
`python portmap_client.py MODE ...`, with wgpunch on PYTHONPATH. One JSON object per line.

- `map METHOD PORT LIFETIME`: map UDP PORT on the default gateway by METHOD (pcp, nat-pmp,
  upnp) or by the first that works (`any`); prints the mapping, or {"error": message}.
- `unmap MAPPING`: delete a mapping (the JSON `map` printed); prints {"deleted": true} or
  {"error": message}.
- `keep PORT LIFETIME`: the node's task (`keep_mapped`): prints each change of the mapping
  ({"mapping": ... or null}) until SIGTERM, after which it deletes the mapping and prints
  {"stopped": true}.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import signal
import sys
from typing import Any

from wgpunch.errors import PortMapError
from wgpunch.node.portmap.gateway import default_gateway
from wgpunch.node.portmap.mapper import (
    METHODS,
    Mapping,
    PortmapTimings,
    keep_mapped,
    map_once,
    unmap,
)
from wgpunch.wg.model import Endpoint


def to_json(mapping: Mapping | None) -> Any:
    if mapping is None:
        return None
    return {**dataclasses.asdict(mapping), "gateway": str(mapping.gateway),
            "external": str(mapping.external), "nonce": mapping.nonce.hex()}


def from_json(obj: Any) -> Mapping:
    return Mapping(obj["method"], ipaddress.IPv4Address(obj["gateway"]), obj["internal_port"],
                   Endpoint.parse(obj["external"]), obj["lifetime_s"], bytes.fromhex(obj["nonce"]))


def say(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


async def main(mode: str, args: list[str]) -> None:
    if mode == "map":
        method, port, lifetime = args[0], int(args[1]), int(args[2])
        gateway = default_gateway()
        assert gateway is not None
        methods = tuple(METHODS) if method == "any" else (method,)
        try:
            say(to_json(await map_once(gateway, port, PortmapTimings(lifetime_s=lifetime),
                                       methods=methods)))
        except PortMapError as error:
            say({"error": str(error)})
    elif mode == "unmap":
        try:
            await unmap(from_json(json.loads(args[0])), PortmapTimings())
            say({"deleted": True})
        except PortMapError as error:
            say({"error": str(error)})
    elif mode == "keep":
        port, lifetime = int(args[0]), int(args[1])
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await keep_mapped(port, lambda m: say({"mapping": to_json(m)}),
                              PortmapTimings(lifetime_s=lifetime, min_renew_s=0.5))
        except asyncio.CancelledError:
            say({"stopped": True})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2:]))
