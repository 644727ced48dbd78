"""The managed mesh (`wgpunch node --mesh`, DESIGN §10): the registry's peers become peers of
the local device, and only those the mesh added ("managed") are ever changed or removed.

`plan()` is pure: from the device, the registry's list and the managed set it says what to
add, update and remove, and which listed networks it refuses. `Mesh.sync()` applies a plan in
one device transaction, recording its managed set in `MESH_DIR/IF.mesh.json` first (written
atomically), so that a crash between the two leaves at most a recorded peer the device lacks
(added again, or forgotten), never a peer of ours that looks like the user's.

What a managed peer gets: its public key and the allowed IPs the registry's device has for it.
No endpoint (the agent sets one when it has a path), no keepalive (set with the endpoint), no
preshared key (none crosses the API; a user who wants one sets it, and the peer stays managed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ChangeRefused, DeviceError, DeviceNotFound, KeyFormatError
from ..keys import Key
from ..wg.device import Device
from ..wg.model import DeviceState, IPNetwork, PeerConfig

log = logging.getLogger("wgpunch.node.agent")  # the agent's logger, as follow.py's


@dataclass(frozen=True, slots=True)
class Overlap:
    """A listed network refused because it would take over part of a user's peer's routes."""

    peer: Key  # the listed peer
    network: IPNetwork
    user_peer: Key
    user_network: IPNetwork

    def __str__(self) -> str:
        return (f"mesh: peer {self.peer}: allowed IP {self.network} overlaps {self.user_network} "
                f"of peer {self.user_peer}, which the mesh did not add; peer not applied")


@dataclass(frozen=True, slots=True)
class Plan:
    add: tuple[PeerConfig, ...] = ()
    update: tuple[PeerConfig, ...] = ()  # managed peers whose allowed IPs the registry changed
    remove: tuple[Key, ...] = ()
    managed: frozenset[Key] = frozenset()  # the managed set once the plan is applied
    refused: tuple[Overlap, ...] = ()

    @property
    def changes(self) -> tuple[PeerConfig, ...]:
        return (*self.add, *self.update, *(PeerConfig(k, remove=True) for k in self.remove))


def plan(device: DeviceState, listed: Mapping[Key, Iterable[IPNetwork]],
         managed: frozenset[Key], *, registry: Key | None,
         exclude: frozenset[Key] = frozenset()) -> Plan:
    """What brings `device` in line with the registry's `listed` peers (key -> allowed IPs).

    Never touched: a peer not in `managed` (the user's, even when the registry lists it too),
    the registry's peer, the device's own key. A listed network that overlaps a user peer's is
    refused, as WireGuard would move an equal network away from the user's peer and a narrower
    one would take over part of its routes; except that a network strictly inside the
    registry peer's own (a hub's `10.0.0.0/24`) is taken, as that peer already routes it.

    A list without our own key is no registry's whole list (every caller is one of its peers):
    nothing is done on it, so that no table half-read or empty empties the mesh.
    """
    if device.public_key is None or device.public_key not in listed:
        return Plan(managed=managed)
    on_device = {peer.public_key: peer for peer in device.peers}
    never = {k for k in (registry, device.public_key) if k is not None}
    users = [peer for key, peer in on_device.items() if key not in managed and key not in never]
    hub = None if registry is None else on_device.get(registry)
    add: list[PeerConfig] = []
    update: list[PeerConfig] = []
    refused: list[Overlap] = []
    keep: set[Key] = set()
    for key, networks in sorted(listed.items(), key=lambda item: item[0].raw):
        nets = tuple(sorted(set(networks), key=str))
        if key in never or key in exclude or (key in on_device and key not in managed):
            continue
        overlaps = [Overlap(key, net, user.public_key, theirs)
                    for net in nets for user in users for theirs in user.allowed_ips
                    if net.overlaps(theirs)]
        if hub is not None:
            overlaps += [Overlap(key, net, hub.public_key, theirs) for net in nets
                         for theirs in hub.allowed_ips
                         if net.overlaps(theirs) and not _strictly_inside(net, theirs)]
        current = on_device.get(key)
        if overlaps:
            refused += overlaps
            if current is not None:
                keep.add(key)  # ours already: left as it is, not updated into the overlap
            continue
        keep.add(key)
        if current is None:
            add.append(PeerConfig(key, allowed_ips=nets))
        elif set(current.allowed_ips) != set(nets):
            update.append(PeerConfig(key, update_only=True, replace_allowed_ips=True,
                                     allowed_ips=nets))
    remove = tuple(sorted((k for k in managed if k not in keep and k in on_device
                           and k not in never), key=lambda k: k.raw))
    return Plan(tuple(add), tuple(update), remove, frozenset(keep), tuple(refused))


def _strictly_inside(net: IPNetwork, outer: IPNetwork) -> bool:
    return (net.version == outer.version and net.prefixlen > outer.prefixlen
            and net.subnet_of(outer))  # type: ignore[arg-type]


# Persistent, not /run: with wg-quick's `SaveConfig = true` the managed peers are saved into
# the user's config at shutdown, and after a reboot a managed set lost with /run would make
# them look like the user's own, never removed when the registry drops them.
MESH_DIR = Path("/var/lib/wgpunch-node")


def state_file(ifname: str, directory: Path) -> Path:
    return directory / f"{ifname}.mesh.json"


def read_managed(ifname: str, directory: Path) -> frozenset[Key]:
    """The managed set recorded for `ifname`; empty when there is none (a first start, or
    a state directory on tmpfs after a reboot: the device then starts from its config too)."""
    path = state_file(ifname, directory)
    try:
        body = json.loads(path.read_text())
        return frozenset(Key.from_base64(text) for text in body["managed"])
    except FileNotFoundError:
        return frozenset()
    except (OSError, ValueError, KeyError, TypeError, KeyFormatError) as error:
        # Unreadable: treat nothing as ours, so that no peer is removed on a guess.
        log.warning("mesh: cannot read %s (%s); no peer counts as managed", path, error)
        return frozenset()


def write_managed(ifname: str, directory: Path, managed: Iterable[Key]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    target = state_file(ifname, directory)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"managed": sorted(k.base64() for k in managed)}, indent=1))
    os.replace(tmp, target)


@dataclass
class Mesh:
    """The managed mesh of one interface, as the agent applies it each pass."""

    ifname: str
    state_dir: Path
    registry: Key | None
    exclude: frozenset[Key] = frozenset()
    managed: frozenset[Key] = field(init=False)
    _told: set[Overlap] = field(default_factory=set, init=False)  # logged once each
    synced: asyncio.Event = field(default_factory=asyncio.Event, init=False)  # a first sync

    def __post_init__(self) -> None:
        self.managed = read_managed(self.ifname, self.state_dir)

    async def sync(self, device: Device, state: DeviceState,
                   listed: Mapping[Key, Iterable[IPNetwork]]) -> DeviceState:
        """Apply the plan for `state`; the device's state afterwards (`state` itself when
        nothing changed or the change failed, which is logged and tried again next pass)."""
        try:
            return await self._sync(device, state, listed)
        finally:
            self.synced.set()

    async def _sync(self, device: Device, state: DeviceState,
                    listed: Mapping[Key, Iterable[IPNetwork]]) -> DeviceState:
        p = plan(state, listed, self.managed, registry=self.registry, exclude=self.exclude)
        for overlap in p.refused:
            if overlap not in self._told:
                log.warning("%s", overlap, extra={"event": "mesh_refused",
                                                  "peer": str(overlap.peer)})
        self._told = set(p.refused)
        if not p.changes:
            if p.managed != self.managed:  # peers gone from the device and the registry
                self._record(p.managed)
            return state
        # Recorded first: a crash before the device changes leaves a managed key the device
        # lacks, never a peer of ours that would pass for the user's.
        before = self.managed
        if not self._record(before | p.managed):
            return state
        try:
            await device.configure(p.changes)
        except (DeviceError, DeviceNotFound, ChangeRefused) as error:
            log.warning("mesh: changing %s failed: %s", self.ifname, error)
            self._record(before)
            return state
        self._record(p.managed)
        for change in p.add:
            log.info("mesh: added peer %s (%s)", change.public_key,
                     ", ".join(map(str, change.allowed_ips or ())),
                     extra={"event": "mesh_added", "peer": str(change.public_key)})
        for change in p.update:
            log.info("mesh: peer %s: allowed IPs now %s", change.public_key,
                     ", ".join(map(str, change.allowed_ips or ())),
                     extra={"event": "mesh_updated", "peer": str(change.public_key)})
        for key in p.remove:
            log.info("mesh: removed peer %s (no longer listed by the registry, or excluded)", key,
                     extra={"event": "mesh_removed", "peer": str(key)})
        try:
            return await device.state()
        except (DeviceError, DeviceNotFound):
            return state

    def _record(self, managed: frozenset[Key]) -> bool:
        try:
            write_managed(self.ifname, self.state_dir, managed)
        except OSError as error:
            log.warning("mesh: cannot write %s: %s; the device is left unchanged",
                        state_file(self.ifname, self.state_dir), error)
            return False
        self.managed = managed
        return True
