"""`wgpunch status`: what every WireGuard interface of this host is doing, peer by peer.

The JSON form is a stable interface (README documents it): field names only ever get added.
Numbers agree with `wg show IF dump`: `latest_handshake` is the same whole Unix second, the
counters are the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from .commands import help_of
from .errors import MalformedMessage
from .node import pathfile
from .node.candidates import PathKind
from .node.pathfile import PeerPath, RegistryHealth
from .protocol import NatBehaviour, nat_from_json, relay_reason
from .wg import Device, DeviceState, PeerState, list_devices, open_device

JSON_VERSION = 1


def peer_json(peer: PeerState, now: float, agent: PeerPath | None = None,
              own_nat: dict[str, Any] | None = None, own_mapped: bool = False
              ) -> dict[str, Any]:
    age = peer.handshake_age(now)
    relay = None
    if agent is not None:
        path, since, reason = agent.path, agent.since, agent.reason
        # A pair on a direct path needs no relay, whatever the IPv4 NATs say: it may go
        # around them (IPv6, a port mapping).
        if path not in (PathKind.DIRECT, PathKind.LAN):
            relay = relay_reason(_nat(own_nat), _nat(agent.nat),
                                 mapped=own_mapped or agent.mapped)
        if relay is not None and path == PathKind.NONE:
            reason = relay  # the root cause, rather than the attempt that failed
    else:  # no agent runs here: the device alone says whether a session is up
        path = PathKind.DIRECT if peer.has_live_session(now) else PathKind.NONE
        since, reason = None, device_reason(peer, now)
    return {
        "public_key": peer.public_key.base64(),
        "endpoint": None if peer.endpoint is None else str(peer.endpoint),
        "allowed_ips": [str(net) for net in peer.allowed_ips],
        "latest_handshake": None if peer.latest_handshake is None else int(peer.latest_handshake),
        "handshake_age_s": None if age is None else round(age, 3),
        "rx_bytes": peer.rx_bytes,
        "tx_bytes": peer.tx_bytes,
        "persistent_keepalive": peer.persistent_keepalive,
        "preshared_key": peer.has_preshared_key,
        "path": str(path),
        "path_since": since,
        "reason": reason,
        "nat": None if agent is None else agent.nat,  # the peer's NAT as it reported it
        "needs_relay": relay,  # why no direct path can exist (protocol/roles.py), or null
    }


def _nat(value: dict[str, Any] | None) -> NatBehaviour | None:
    """A NAT behaviour from the agent's file; None for one this version cannot read."""
    if value is None:
        return None
    try:
        return nat_from_json(value)
    except MalformedMessage:
        return None


def device_reason(peer: PeerState, now: float) -> str:
    """Why the path is what it is, from the device alone (no agent on the interface)."""
    age = peer.handshake_age(now)
    if peer.has_live_session(now):
        return "live session (no wgpunch node agent on this interface)"
    if age is None:
        return ("never a handshake" + ("" if peer.endpoint else ", and no endpoint")
                + " (no wgpunch node agent on this interface)")
    return f"no handshake for {_duration(age)} (no wgpunch node agent on this interface)"


def device_json(state: DeviceState, backend: str, now: float) -> dict[str, Any]:
    published = pathfile.read_published(state.name)
    agent = {} if published is None else published.peers
    return {
        "name": state.name,
        "backend": backend,
        "public_key": None if state.public_key is None else state.public_key.base64(),
        "listen_port": state.listen_port,
        "fwmark": state.fwmark,
        "agent": None if published is None else {
            "registry": registry_json(published.registry), "nat": published.nat,
            "registries": [registries_json(r, state, now) for r in published.registries]},
        "peers": [peer_json(p, now, agent.get(p.public_key.base64()),
                            None if published is None else published.nat,
                            published is not None and published.mapped)
                  for p in state.peers],
    }


def registry_json(health: RegistryHealth | None) -> dict[str, Any] | None:
    if health is None:
        return None
    return {"following": health.following, "state": health.state, "since": health.since,
            "error": health.error}


def registries_json(health: RegistryHealth, state: DeviceState, now: float) -> dict[str, Any]:
    """One of several registries an interface follows (node/registries.py): its stream's
    state and last event, and the age of the device's session with it."""
    peer = None if health.public_key is None else next(
        (p for p in state.peers if p.public_key.base64() == health.public_key), None)
    age = None if peer is None else peer.handshake_age(now)
    return {"public_key": health.public_key, **(registry_json(health) or {}),
            "last_event": health.last_event,
            "handshake_age_s": None if age is None else round(age, 3)}


def registries_line(registry: dict[str, Any], now: float) -> str:
    """One of several registries, in words: its stream and the device's session with it."""
    since = registry["since"]
    took = "" if since is None else f" for {_duration(now - since)}"
    state = {"connecting": "not reached yet"}.get(registry["state"], registry["state"])
    error = f" ({registry['error']})" if registry["error"] else ""
    event = registry["last_event"]
    heard = _age(None if event is None else now - event)
    return (f"{registry['public_key']}: {state}{took}{error}, last event {heard}, "
            f"handshake {_age(registry['handshake_age_s'])}")


def registry_line(registry: dict[str, Any], now: float) -> str:
    """The agent's link to its registry, in words."""
    since = registry["since"]
    took = "" if since is None else f" for {_duration(now - since)}"
    if registry["state"] == "following":
        return f"{registry['following']}{took}"
    what = "not reached yet" if registry["state"] == "connecting" else "unreachable"
    error = f": {registry['error']}" if registry["error"] else ""
    return (f"{what}{took}{error}; live sessions do not need it, new paths and changed "
            "endpoints wait for it")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _age(seconds: float | None) -> str:
    return "never" if seconds is None else f"{_duration(seconds)} ago"


def _bytes(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _path(peer: dict[str, Any], now: float) -> str:
    since = peer["path_since"]
    # An IPv6 endpoint is a path around every NAT (node/candidates.py, `ipv6`): say so.
    path = peer["path"]
    if path != str(PathKind.NONE) and (peer["endpoint"] or "").startswith("["):
        path += " (IPv6)"
    return path if since is None else f"{path} for {_duration(now - since)}"


def render_table(devices: list[dict[str, Any]], now: float) -> str:
    header = ("PEER", "PATH", "ENDPOINT", "ALLOWED IPS", "HANDSHAKE", "RX", "TX", "KEEPALIVE",
              "WHY")
    out: list[str] = []
    for device in devices:
        out.append(
            f"interface {device['name']} ({device['backend']}): public key "
            f"{device['public_key'] or '(none)'}, listening on {device['listen_port']}"
        )
        agent = device["agent"]
        if agent is None:
            out.append("  agent: none (`wgpunch node` is not running on this interface)")
        else:
            if agent["registry"] is not None:
                out.append(f"  registry: {registry_line(agent['registry'], now)}")
            for registry in agent.get("registries", ()):
                out.append(f"  registry {registries_line(registry, now)}")
            nat = _nat(agent.get("nat"))
            if nat is not None:
                out.append(f"  NAT: {nat.words()}")
        rows = [
            (
                peer["public_key"],
                _path(peer, now),
                peer["endpoint"] or "(none)",
                ",".join(peer["allowed_ips"]) or "(none)",
                _age(peer["handshake_age_s"]),
                _bytes(peer["rx_bytes"]),
                _bytes(peer["tx_bytes"]),
                f"{peer['persistent_keepalive']}s" if peer["persistent_keepalive"] else "off",
                peer["reason"] or "",
            )
            for peer in device["peers"]
        ]
        if not rows:
            out.append("  (no peers)")
            continue
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            out.append(("  " + "  ".join(cells)).rstrip())
    return "\n".join(out)


async def collect(interface: str | None) -> list[dict[str, Any]]:
    names = [interface] if interface else await list_devices()
    devices: list[Device] = [open_device(name) for name in names]
    try:
        states = await asyncio.gather(*(device.state() for device in devices))
    finally:
        for device in devices:
            await device.close()
    now = time.time()
    return [device_json(s, d.backend, now) for s, d in zip(states, devices, strict=True)]


def run(args: argparse.Namespace) -> int:
    devices = asyncio.run(collect(args.interface))
    if args.json:
        print(json.dumps({"version": JSON_VERSION, "interfaces": devices}, indent=2))
    elif devices:
        print(render_table(devices, time.time()))
    else:
        print("no WireGuard interfaces in this network namespace")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help=help_of("status"),
        description=(
            "Show every WireGuard interface in this network namespace (kernel or userspace), "
            "and per peer: public key, path (direct: a live session on the peer's own "
            "public address; lan: on one of its LAN addresses; relay: through a relay; none: "
            "no live session; with the time it was established when a `wgpunch node` agent "
            "runs, which tells lan and relay apart), endpoint, allowed IPs, time since the latest "
            "handshake, bytes received/sent, persistent keepalive, and why the path is what it "
            "is (the agent's reason, or the device's). Keys shown are public keys; "
            "private and preshared keys are never printed."
        ),
    )
    parser.add_argument(
        "-i", "--interface", metavar="IF", help="show only this interface (default: all)"
    )
    parser.add_argument(
        "--json", action="store_true", help="print stable JSON (fields documented in README)"
    )
    parser.set_defaults(func=run)
