"""The device interface: the operations every backend shares (validation, rollback,
handshake-now) on the values of model.py.

Backends (`uapi.py`, `netlink.py`) only translate two primitives: read the device with its
peers' preshared keys (`_read`), and apply a list of peer changes in one transaction (`_write`).
Everything else is built here once, so both backends behave the same.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence

from ..errors import ChangeRefused, DeviceError
from ..keys import Key
from .model import (
    SESSION_LIVE_S,
    DeviceChanges,
    DeviceState,
    Endpoint,
    PeerConfig,
    PeerState,
)

log = logging.getLogger(__name__)


def _duplicate_keys(changes: Sequence[PeerConfig]) -> set[Key]:
    seen: set[Key] = set()
    dup: set[Key] = set()
    for change in changes:
        (dup if change.public_key in seen else seen).add(change.public_key)
    return dup


def _restore_config(
    before: PeerState | None, after: PeerState | None, psk: Key | None, key: Key
) -> list[PeerConfig]:
    """The changes that bring one peer from `after` back to `before` (None: absent)."""
    if before is None:
        return [PeerConfig(key, remove=True)]
    restored = PeerConfig(
        key,
        endpoint=before.endpoint,
        persistent_keepalive=before.persistent_keepalive,
        preshared_key=psk if psk is not None else Key(bytes(32), secret=True),
        replace_allowed_ips=True,
        allowed_ips=before.allowed_ips,
    )
    # Neither protocol can clear an endpoint in place; only a fresh peer has none.
    if after is not None and before.endpoint is None and after.endpoint is not None:
        return [PeerConfig(key, remove=True), restored]
    return [restored]


def _same_config(a: PeerState | None, b: PeerState | None) -> bool:
    if a is None or b is None:
        return a is b
    return (
        a.endpoint == b.endpoint
        and set(a.allowed_ips) == set(b.allowed_ips)
        and a.persistent_keepalive == b.persistent_keepalive
        and a.has_preshared_key == b.has_preshared_key
    )


class Device(ABC):
    """A WireGuard interface in this network namespace."""

    backend: str = "?"

    def __init__(self, name: str) -> None:
        self.name = name
        self._seen: dict[Key, PeerState] | None = None  # as the last `changes()` read them
        # The last `state()`: when its read began (monotonic), `_changes` then, the snapshot.
        self._last: tuple[float, int, DeviceState] | None = None
        self._changes = 0  # writes through this object (counted as each ends)
        self.read_listeners: list[Callable[[], None]] = []  # called after each `state()` read

    # -- what a backend provides ------------------------------------------------------------

    @abstractmethod
    async def _read(self) -> tuple[DeviceState, dict[Key, Key]]:
        """The snapshot, plus each peer's preshared key (only peers that have one)."""

    @abstractmethod
    async def _write(self, changes: Sequence[PeerConfig]) -> None:
        """Apply validated changes in one transaction of the backend."""

    async def private_key(self) -> Key | None:
        """The device's private key (None: it has none), for a protocol in which the device
        proves its identity (natpunch's Noise handshake). Never log or show it."""
        raise DeviceError(f"{self.backend}: {self.name}: this backend cannot read the private key")

    async def close(self) -> None:  # noqa: B027 - a backend without resources needs nothing
        """Release what the backend holds."""

    # -- reading ----------------------------------------------------------------------------

    async def state(self, *, fresh_s: float = 0.0) -> DeviceState:
        """The device as a read shows it. With `fresh_s`, the snapshot of the last read
        instead, if that read began at most `fresh_s` ago and nothing was written through
        this object since it began: a loop that follows another's read at once shares it
        (node/pace.py)."""
        started, last = time.monotonic(), self._last
        if (fresh_s > 0 and last is not None and last[1] == self._changes
                and started - last[0] <= fresh_s):
            return last[2]
        changes = self._changes
        state, _secrets = await self._read()
        self._last = (started, changes, state)
        for listener in self.read_listeners:
            listener()
        return state

    async def changes(self) -> DeviceChanges:
        """Read the device and tell what changed since the previous call (the first call:
        everything). This compares full snapshots; a backend that can tell unchanged peers
        apart before building them overrides it."""
        state = await self.state()
        seen, self._seen = self._seen, {peer.public_key: peer for peer in state.peers}
        if seen is None:
            return DeviceChanges(state.name, state.public_key, state.listen_port,
                                 state.fwmark, state.peers, (), True)
        changed = tuple(peer for peer in state.peers if seen.get(peer.public_key) != peer)
        removed = tuple(key for key in seen if key not in self._seen)
        return DeviceChanges(state.name, state.public_key, state.listen_port, state.fwmark,
                             changed, removed, False)

    # -- changing ---------------------------------------------------------------------------

    async def configure(self, changes: Sequence[PeerConfig]) -> None:
        """Apply `changes` so that they all take effect or none does.

        Everything is validated before a byte is sent. If the device then refuses part of
        the transaction, the peers it touched are put back as they were, and the error is
        raised.
        """
        changes = list(changes)
        if not changes:
            return
        dup = _duplicate_keys(changes)
        if dup:
            raise ChangeRefused(
                f"{self.name}: change names peer {next(iter(dup))} twice; "
                "use handshake_now for remove-and-re-add"
            )
        before, secrets = await self._read()
        own = [c for c in changes if not c.remove and c.public_key == before.public_key]
        if own:
            raise ChangeRefused(
                f"{self.name}: peer {own[0].public_key} is this device's own public key"
            )
        await self._write_or_restore(changes, before, secrets, "configure")

    async def _write_or_restore(
        self,
        changes: Sequence[PeerConfig],
        before: DeviceState,
        secrets: dict[Key, Key],
        operation: str,
    ) -> None:
        try:
            await self._write(changes)
        except DeviceError as error:
            touched = {change.public_key for change in changes}
            await self._restore(before, secrets, touched, operation, error)
            raise
        finally:  # a read that began before this write ended is no snapshot to share
            self._changes += 1

    async def _restore(
        self,
        before: DeviceState,
        secrets: dict[Key, Key],
        touched: Iterable[Key],
        operation: str,
        cause: DeviceError,
    ) -> None:
        try:
            after = await self.state()
            fixes: list[PeerConfig] = []
            for key in touched:
                old, new = before.peer(key), after.peer(key)
                if not _same_config(old, new):
                    fixes += _restore_config(old, new, secrets.get(key), key)
            if fixes:
                await self._write(fixes)
                log.warning("%s: %s failed; restored %d peer(s)", self.name, operation, len(fixes))
        except DeviceError as error:
            raise DeviceError(
                f"{cause}; restoring the previous configuration failed too ({error}): "
                f"the device may be partly changed",
                cause.errno,
            ) from cause

    async def _existing(self, public_key: Key) -> PeerState:
        peer = (await self.state()).peer(public_key)
        if peer is None:
            raise ChangeRefused(f"{self.name}: no peer {public_key}")
        return peer

    async def set_endpoint(self, public_key: Key, endpoint: Endpoint) -> None:
        await self._existing(public_key)
        await self.configure([PeerConfig(public_key, update_only=True, endpoint=endpoint)])

    async def set_keepalive(self, public_key: Key, seconds: int) -> None:
        await self._existing(public_key)
        await self.configure(
            [PeerConfig(public_key, update_only=True, persistent_keepalive=seconds)]
        )

    async def set_peer(self, change: PeerConfig) -> None:
        """Add or update one peer."""
        await self.configure([change])

    async def remove_peer(self, public_key: Key) -> None:
        await self._existing(public_key)
        await self.configure([PeerConfig(public_key, remove=True)])

    async def handshake_now(
        self,
        public_key: Key,
        endpoint: Endpoint,
        *,
        persistent_keepalive: int | None = None,
        live_s: float = SESSION_LIVE_S,
        now: float | None = None,
    ) -> None:
        """Point a peer at `endpoint` and make WireGuard send an initiation at once.

        Setting an endpoint alone waits out WireGuard's 5 s REKEY_TIMEOUT from the previous
        attempt (DESIGN.md §3). Removing the peer and adding it back with its full
        configuration in one transaction resets that timer. That also drops any session,
        so it is refused for a peer with a live one.
        """
        before, secrets = await self._read()
        peer = before.peer(public_key)
        if peer is None:
            raise ChangeRefused(f"{self.name}: handshake-now: no peer {public_key}")
        now = time.time() if now is None else now
        if peer.has_live_session(now, live_s):
            age = peer.handshake_age(now)
            raise ChangeRefused(
                f"{self.name}: handshake-now refused for peer {public_key}: it has a live "
                f"session (handshake {age:.0f} s ago)"
            )
        readd = PeerConfig(
            public_key,
            endpoint=endpoint,
            persistent_keepalive=(
                peer.persistent_keepalive if persistent_keepalive is None else persistent_keepalive
            ),
            preshared_key=secrets.get(public_key),
            replace_allowed_ips=True,
            allowed_ips=peer.allowed_ips,
        )
        await self._write_or_restore(
            [PeerConfig(public_key, remove=True), readd], before, secrets, "handshake-now"
        )

