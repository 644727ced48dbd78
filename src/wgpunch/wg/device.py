"""The device interface: snapshot types for reading, change types for writing, and the
operations every backend shares (validation, rollback, handshake-now).

Backends (`uapi.py`, `netlink.py`) only translate two primitives: read the device with its
peers' preshared keys (`_read`), and apply a list of peer changes in one transaction (`_write`).
Everything else is built here once, so both backends behave the same.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ..errors import ChangeRefused, DeviceError
from ..keys import Key

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

# WireGuard whitepaper §6.1, Reject-After-Time: 180 s after a handshake its session keys are
# dead. A handshake younger than this means a session that may still carry traffic, which
# handshake-now would throw away.
SESSION_LIVE_S = 180.0
MAX_KEEPALIVE_S = 65535  # a u16 in both UAPI and netlink


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """A UDP endpoint given as an IP literal (never a host name: nothing here resolves)."""

    ip: IPAddress
    port: int

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ChangeRefused(f"endpoint: port {self.port} is not in 1-65535")

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> Endpoint:
        """`192.0.2.1:51820` or `[2001:db8::1]:51820`; with `default_port`, also a bare
        address (`192.0.2.1`, `2001:db8::1`) on that port."""
        if default_port is not None:
            try:
                return cls(ipaddress.ip_address(text), default_port)
            except ValueError:
                pass
        host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit():
            raise ChangeRefused(f"endpoint {text!r}: expected IP:PORT or [IPv6]:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ChangeRefused(f"endpoint {text!r}: an IPv6 address needs brackets, [IP]:PORT")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ChangeRefused(f"endpoint {text!r}: {host!r} is not an IP address") from None
        return cls(ip, int(port_text))

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"


def handshake_time(sec: int, nsec: int) -> float | None:
    """Unix time of a handshake from the two halves both backends report; None = never.

    "Never" is both halves zero: a handshake exactly on a second has nsec == 0. Microseconds
    are kept, not nanoseconds: near 1.8e9 a float resolves 0.24 us, so sec + 0.999999999
    would round up to the next second and disagree with `wg show`.
    """
    if sec == 0 and nsec == 0:
        return None
    return sec + (nsec // 1000) / 1e6


def parse_allowed_ip(text: str) -> IPNetwork:
    """A CIDR such as `10.0.0.2/32`; host bits must be zero, as `wg` requires."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ChangeRefused(f"allowed IP {text!r}: {exc}") from None


@dataclass(frozen=True, slots=True)
class PeerState:
    public_key: Key
    endpoint: Endpoint | None
    allowed_ips: tuple[IPNetwork, ...]
    latest_handshake: float | None  # Unix time; None = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int  # seconds; 0 = off
    has_preshared_key: bool

    def handshake_age(self, now: float) -> float | None:
        if self.latest_handshake is None:
            return None
        return max(0.0, now - self.latest_handshake)

    def has_live_session(self, now: float, live_s: float = SESSION_LIVE_S) -> bool:
        age = self.handshake_age(now)
        return age is not None and age < live_s


@dataclass(frozen=True, slots=True)
class DeviceState:
    name: str
    public_key: Key | None  # None when the device has no private key
    listen_port: int
    fwmark: int
    peers: tuple[PeerState, ...]

    def peer(self, public_key: Key) -> PeerState | None:
        for peer in self.peers:
            if peer.public_key == public_key:
                return peer
        return None


@dataclass(frozen=True, slots=True)
class DeviceChanges:
    """One read of a device, told as what differs from the previous `Device.changes()` of the
    same `Device` object. A poller of a large device needs only this: at 10,000 peers a full
    snapshot costs far more to build and compare than the few peers that changed."""

    name: str
    public_key: Key | None  # None when the device has no private key
    listen_port: int
    fwmark: int
    changed: tuple[PeerState, ...]  # peers that are new or differ in any field
    removed: tuple[Key, ...]  # peers gone
    complete: bool  # the first read: `changed` holds every peer and `removed` is empty


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """A change to one peer. `None` leaves a field alone.

    `remove` deletes the peer (every other field must be unset). `update_only` never creates
    the peer. `replace_allowed_ips` swaps the whole list instead of adding to it. A zero
    `preshared_key` clears it.
    """

    public_key: Key
    remove: bool = False
    update_only: bool = False
    endpoint: Endpoint | None = None
    persistent_keepalive: int | None = None
    preshared_key: Key | None = field(default=None, repr=False)
    replace_allowed_ips: bool = False
    allowed_ips: tuple[IPNetwork, ...] | None = None

    def __post_init__(self) -> None:
        who = f"peer {self.public_key}"
        if self.public_key.secret:
            raise ChangeRefused("change: a peer is named by its public key, not a secret key")
        if self.persistent_keepalive is not None and not (
            0 <= self.persistent_keepalive <= MAX_KEEPALIVE_S
        ):
            raise ChangeRefused(
                f"change: {who}: keepalive {self.persistent_keepalive} is not in "
                f"0-{MAX_KEEPALIVE_S} seconds"
            )
        if self.remove and (
            self.update_only
            or self.endpoint is not None
            or self.persistent_keepalive is not None
            or self.preshared_key is not None
            or self.replace_allowed_ips
            or self.allowed_ips is not None
        ):
            raise ChangeRefused(f"change: {who}: remove takes no other field")
        if self.allowed_ips is not None:
            for net in self.allowed_ips:
                if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
                    raise ChangeRefused(f"change: {who}: allowed IP {net!r} is not a network")
        if self.replace_allowed_ips and self.allowed_ips is None:
            raise ChangeRefused(f"change: {who}: replace_allowed_ips needs allowed_ips")


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

