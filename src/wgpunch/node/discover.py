"""Which peer of a device is the registry, when no `--registry` key is given: the one whose
tunnel address serves a wgpunch registry's `/healthz` (docs/api.md) on the API port.

So `wg-quick up ./NAME.conf && wgpunch node --mesh` is all a node invited with `wgpunch
invite` needs: its configuration has one peer with an endpoint, the registry, whose allowed
IPs hold the registry's own tunnel address. Only peers with an endpoint and a single-host
allowed IP are asked (a registry is reached, not found); the question goes through the
tunnel, so an answer comes from the key WireGuard authenticated for that address.
"""

from __future__ import annotations

import asyncio
import json
import logging

from ..errors import ApiError, ConfigError
from ..keys import Key
from ..protocol import API_PORT
from ..wg.model import DeviceState, PeerState
from .http import HttpClient
from .probe import tunnel_address

log = logging.getLogger(__name__)

ASK_TIMEOUT_S = 3.0  # a first handshake with the registry plus a request, on a slow link


def candidates(state: DeviceState) -> list[PeerState]:
    return [peer for peer in state.peers
            if peer.endpoint is not None and tunnel_address(peer.allowed_ips) is not None
            and any(n.prefixlen == n.max_prefixlen for n in peer.allowed_ips)]


async def find_registry(state: DeviceState, *, timeout_s: float = ASK_TIMEOUT_S) -> Key:
    """The key of the one peer of `state` that serves a registry API; ConfigError naming
    what was asked when none or several do."""
    asked = candidates(state)
    answers = await asyncio.gather(*(_is_registry(peer, timeout_s) for peer in asked))
    found = [peer.public_key for peer, yes in zip(asked, answers, strict=True) if yes]
    if len(found) == 1:
        log.info("node: %s: the registry is peer %s (it serves the registry API at its "
                 "tunnel address)", state.name, found[0],
                 extra={"event": "registry_found", "peer": str(found[0])})
        return found[0]
    if not found:
        raise ConfigError(
            f"node: no peer of {state.name} serves a wgpunch registry API at its tunnel "
            f"address (asked {len(asked)} peer(s) with an endpoint and a single-host allowed "
            f"IP, port {API_PORT}, {timeout_s:g} s); give --registry PUBKEY")
    raise ConfigError(
        f"node: several peers of {state.name} serve a registry API "
        f"({', '.join(map(str, found))}); give --registry PUBKEY")


async def _is_registry(peer: PeerState, timeout_s: float) -> bool:
    address = tunnel_address(peer.allowed_ips)
    assert address is not None
    host = f"[{address}]" if address.version == 6 else str(address)
    client = HttpClient(f"http://{host}:{API_PORT}", limit=1)
    try:
        response = await client.request("GET", "/healthz", timeout_s=timeout_s)
    except ApiError as error:
        log.debug("node: peer %s is no registry: %s", peer.public_key, error)
        return False
    finally:
        await client.close()
    try:
        health = json.loads(response.body)
    except (ValueError, RecursionError):
        return False
    return (response.status == 200 and isinstance(health, dict)
            and isinstance(health.get("epoch"), str) and isinstance(health.get("peers"), int))
