"""`invite` and `revoke`: a member is a peer of the registry's running device and a block of
its wg-quick config, and both change together or neither does.

Order: everything is checked and every file staged (written beside its target, 0600) before
the device changes; the device changes in one transaction (wg/device.py: all or nothing);
then the staged files are put in place, and should that fail the device change is undone.
A failure at any step is one `ConfigError`, with the device and the files as they were.
(`revoke` changes the file first, and puts it back if the device refuses: see there.)
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import ChangeRefused, ConfigError, DeviceError, DeviceNotFound
from ..keys import Key, generate_keypair
from ..wg.device import Device
from ..wg.model import DeviceState, IPAddress, PeerConfig
from . import members
from .files import Staged, read_text
from .wgquick import WgQuickConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Invitation:
    name: str
    public_key: Key
    address: IPAddress
    registry: Key
    config: str  # the node's wg-quick config: holds its private key, never log it


async def _state(device: Device, layer: str) -> DeviceState:
    try:
        state = await device.state()
    except (DeviceError, DeviceNotFound) as error:
        raise ConfigError(f"{layer}: the registry's interface must be up (wg-quick up "
                          f"{device.name}): {error}") from None
    if state.public_key is None:
        raise ConfigError(f"{layer}: {device.name} has no private key")
    return state


async def _configure(device: Device, change: PeerConfig, layer: str) -> None:
    try:
        await device.configure([change])
    except (DeviceError, DeviceNotFound, ChangeRefused) as error:
        raise ConfigError(f"{layer}: changing {device.name} failed, nothing changed: "
                          f"{error}") from None


async def invite(device: Device, config_path: Path, name: str, *,
                 address: IPAddress | None = None, endpoint: str | None = None,
                 out: Path | None = None) -> Invitation:
    """Add node `name` to the registry: a new key pair, a free address (or `address`), a peer
    on `device` and a block in `config_path`; the node's config is returned, and written to
    `out` (a new file) when given."""
    layer = "invite"
    members.check_name(name, layer)
    config = WgQuickConfig.parse(read_text(config_path, layer))
    own = members.tunnel_interface(config, layer)
    interface = config.interface
    endpoint = endpoint or (interface.mark("endpoint") if interface is not None else None)
    if not endpoint:
        raise ConfigError(f"{layer}: the registry's public endpoint is not in {config_path} "
                          "(`wgpunch init registry` records it); give --endpoint HOST:PORT")
    if members.member(config, name) is not None:
        raise ConfigError(f"{layer}: the name {name!r} is in use; revoke it first or choose "
                          "another")
    state = await _state(device, layer)
    assert state.public_key is not None
    used = members.used_networks(config, (n for p in state.peers for n in p.allowed_ips))
    chosen = members.pick_address(own, used, address, layer)
    private, public = generate_keypair()
    text = members.node_config(name, private, chosen, own, state.public_key, endpoint)
    staged = [] if out is None else [Staged(out, text, new=True, layer=layer)]
    try:
        staged.append(Staged(config_path, config.with_section(
            members.member_section(name, public, chosen)).text(), new=False, layer=layer))
        await _configure(device, PeerConfig(public, allowed_ips=(ipaddress.ip_network(chosen),)),
                         layer)
    except ConfigError:
        for file in staged:
            file.discard()
        raise
    await _commit(staged, device, undo=PeerConfig(public, remove=True), layer=layer)
    log.info("invited %s: %s, %s", name, public, chosen)
    return Invitation(name, public, chosen, state.public_key, text)


async def revoke(device: Device, config_path: Path, name: str) -> Key:
    """Remove node `name` from the registry's device and config; its public key."""
    layer = "revoke"
    config = WgQuickConfig.parse(read_text(config_path, layer))
    block = members.member(config, name)
    if block is None:
        known = members.members(config)
        raise ConfigError(f"{layer}: no node {name!r} in {config_path}"
                          + (f" (invited: {', '.join(known)})" if known else ""))
    try:
        public = Key.from_base64(block.value("PublicKey") or "", what="PublicKey")
    except ValueError as error:
        raise ConfigError(f"{layer}: {name}'s block in {config_path}: {error}") from None
    state = await _state(device, layer)
    staged = Staged(config_path, config.without(block).text(), new=False, layer=layer)
    if state.peer(public) is None:  # already gone from the device (by hand): the file follows
        staged.commit()
        return public
    # Here the file goes first and is put back if the device refuses: re-adding a removed
    # peer could not restore a preshared key set on it by hand (the device never shows it).
    # Both texts are staged before anything changes, so putting back is one rename.
    try:
        backup = Staged(config_path, config.text(), new=False, layer=layer)
    except ConfigError:
        staged.discard()
        raise
    try:
        staged.commit()
    except ConfigError:
        backup.discard()
        raise
    try:
        await _configure(device, PeerConfig(public, remove=True), layer)
    except ConfigError:
        backup.commit()
        raise
    backup.discard()
    log.info("revoked %s: %s", name, public)
    return public


async def _commit(staged: list[Staged], device: Device, *, undo: PeerConfig,
                  layer: str) -> None:
    """Put the staged files in place, new files first and the registry's config (which
    replaces the old one) last; if one fails, the device change is undone and the new files
    already in place are removed."""
    done: list[Staged] = []
    try:
        for file in staged:
            file.commit()
            done.append(file)
    except ConfigError:
        for file in staged:
            file.discard()
        for file in done:
            if file.new:
                file.path.unlink(missing_ok=True)
        await _configure(device, undo, layer)
        raise
