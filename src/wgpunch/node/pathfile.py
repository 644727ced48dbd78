"""The node agent's published view of its paths: `/run/wgpunch/IF.json`.

`wgpunch status` is a separate process; the agent is the one that knows when a path came up
and why it is in its state. It writes that here (atomically, only when something changed),
and `status` reads it to add the `path` and `since` columns. Without an agent the path is
still derived from the device alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATE_DIR = Path("/run/wgpunch")


@dataclass(frozen=True, slots=True)
class PeerPath:
    path: str  # a candidates.PathKind
    since: float | None  # Unix time the current path was established (or lost)
    reason: str
    endpoint: str | None  # what the registry reports for the peer
    nat: dict[str, Any] | None = None  # the peer's NAT as it reported it (NatBehaviour JSON)
    mapped: bool = False  # the peer reported a port mapping on its NAT (protocol.has_mapping)


@dataclass(frozen=True, slots=True)
class RegistryHealth:
    """The agent's link to what it follows (registry API, DNS-SD server, natpunch server)."""

    following: str  # what, in words (the source's `following`)
    state: str  # "connecting" (never heard yet), "following", "unreachable"
    since: float | None  # Unix time the state began
    error: str | None  # the last failure, while unreachable
    # With several registries (node/registries.py), each one's: its key and when its
    # stream last delivered (Unix time); None for the one link of a single registry.
    public_key: str | None = None
    last_event: float | None = None


@dataclass(frozen=True, slots=True)
class Published:
    peers: dict[str, PeerPath]
    registry: RegistryHealth | None
    nat: dict[str, Any] | None = None  # our own NAT as measured (NatBehaviour JSON)
    mapped: bool = False  # we hold a port mapping on our NAT (node/portmap/)
    registries: tuple[RegistryHealth, ...] = ()  # each one's, with several


def path_file(ifname: str, directory: Path = STATE_DIR) -> Path:
    return directory / f"{ifname}.json"


def write(ifname: str, peers: dict[str, PeerPath], directory: Path = STATE_DIR,
          registry: RegistryHealth | None = None, nat: dict[str, Any] | None = None,
          mapped: bool = False, registries: tuple[RegistryHealth, ...] = ()) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    target = path_file(ifname, directory)
    tmp = target.with_suffix(".tmp")
    body = {"pid": os.getpid(), "peers": {k: asdict(v) for k, v in sorted(peers.items())},
            "registry": None if registry is None else asdict(registry), "nat": nat,
            "mapped": mapped, "registries": [asdict(r) for r in registries]}
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(target)


def remove(ifname: str, directory: Path = STATE_DIR) -> None:
    path_file(ifname, directory).unlink(missing_ok=True)


def read(ifname: str, directory: Path = STATE_DIR) -> dict[str, PeerPath]:
    """The agent's paths for `ifname`; empty when no live agent wrote them."""
    published = read_published(ifname, directory)
    return {} if published is None else published.peers


def read_published(ifname: str, directory: Path = STATE_DIR) -> Published | None:
    """What a live agent published for `ifname`; None without one."""
    try:
        body = json.loads(path_file(ifname, directory).read_text())
        os.kill(int(body["pid"]), 0)  # a file left by a dead agent tells nothing current
        registry = body.get("registry")
        return Published(
            {key: PeerPath(**value) for key, value in body["peers"].items()},
            None if registry is None else RegistryHealth(**registry), body.get("nat"),
            body.get("mapped") is True,
            tuple(RegistryHealth(**r) for r in body.get("registries", ())))
    except (OSError, ValueError, KeyError, TypeError):
        return None

