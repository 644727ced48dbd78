"""What a WireGuard device holds, as values: the snapshot types a read returns (`DeviceState`,
`PeerState`, `Endpoint`), the change type a write takes (`PeerConfig`, checked as it is made),
and the parsing both backends share. The operations on a device are in device.py.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from ..errors import ChangeRefused
from ..keys import Key

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
