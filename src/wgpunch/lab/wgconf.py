"""WireGuard configurations of the lab's devices, as a user would write them for `wg setconf`.

- A registry lists every node that has it (`Node.registries`): `AllowedIPs = <node>/32`, no
  endpoint (it learns them). Registries are not each other's peers: they share no state.
- A node lists each of its registries with its public endpoint and `PersistentKeepalive =
  25`, and every other node with `AllowedIPs = <node>/32` and no endpoint: finding those is
  wgpunch's job.

The text holds a private key: callers write it with mode 0600 and never print it.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..keys import Key
from .topology import LISTEN_PORT, Node, Plan

KEEPALIVE_S = 25  # wg(8)'s suggested value; keeps the NAT mappings toward the registry alive


def device_config(plan: Plan, node: Node, private: Key, public: Mapping[str, Key], *,
                  registry_peer: bool = True) -> str:
    """`wg setconf` text for `node`; `public` maps each WireGuard node's name to its key.
    Without `registry_peer` the registry and the nodes are not each other's peers (natpunch:
    the registry host only runs a rendezvous server)."""
    lines = ["[Interface]", f"PrivateKey = {private.base64()}", f"ListenPort = {LISTEN_PORT}"]
    for peer in plan.wireguard_hosts:
        if peer.name == node.name or peer.role == "registry":
            continue
        if node.role == "registry" and (not registry_peer or node.name not in peer.registries):
            continue
        lines += ["", "[Peer]", f"# {peer.name}", f"PublicKey = {public[peer.name].base64()}",
                  f"AllowedIPs = {peer.tunnel_ip}/32"]
    if node.role == "host" and registry_peer:
        for name in node.registries:
            registry = plan.node(name)
            lines += ["", "[Peer]", f"# {name}", f"PublicKey = {public[name].base64()}",
                      f"AllowedIPs = {registry.tunnel_ip}/32",
                      f"Endpoint = {registry.public_ip}:{LISTEN_PORT}",
                      f"PersistentKeepalive = {KEEPALIVE_S}"]
    return "\n".join(lines) + "\n"
