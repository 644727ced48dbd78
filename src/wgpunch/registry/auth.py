"""Who is calling: the source address of a request, proven by WireGuard's cryptokey routing.

A packet that arrives through the registry's interface from a tunnel address was decrypted
with the session of the one peer whose AllowedIPs contain that address. So the caller is the
peer whose AllowedIPs contain the source, if exactly one does; an address that two peers claim
(overlapping prefixes) names nobody for sure, and is refused like a stranger.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Protocol

from ..keys import Key
from ..wg.model import IPAddress, IPNetwork


class HasAllowedIPs(Protocol):
    @property
    def public_key(self) -> Key: ...

    @property
    def allowed_ips(self) -> tuple[IPNetwork, ...]: ...


def identify(ip: IPAddress, peers: Iterable[HasAllowedIPs]) -> Key | None:
    """The key of the one peer whose allowed IPs contain `ip`; None for none or several."""
    found: Key | None = None
    for peer in peers:
        if any(ip in net for net in peer.allowed_ips):
            if found is not None and found != peer.public_key:
                return None
            found = peer.public_key
    return found


class PeerTable(Protocol):
    """What `Identities` reads of the registry's state: its peers and its roster revision,
    which moves whenever a peer appears, goes or changes its allowed IPs (state.py); a
    report or a new endpoint leaves it."""

    @property
    def roster_revision(self) -> int: ...

    @property
    def peers(self) -> Mapping[Key, HasAllowedIPs]: ...


class SourceIndex:
    """The peers of one table by their allowed networks, to find the few that may contain an
    address; `identify` decides among them (the same answer as on the whole table: a peer
    contains the address exactly when one of its networks is the address's own network at
    that network's length). An address costs one dict probe per prefix length in use, ~10 us,
    where `identify` over 10,000 peers costs 9-13 ms: every connection, request and DNS query
    asks, and a flood from outside must not cost that per packet."""

    __slots__ = ("_lengths",)

    def __init__(self, peers: Iterable[HasAllowedIPs]) -> None:
        by_length: dict[tuple[int, int], dict[int, list[HasAllowedIPs]]] = defaultdict(dict)
        for peer in peers:
            for net in peer.allowed_ips:
                filed = by_length[(net.version, net.prefixlen)]
                filed.setdefault(int(net.network_address), []).append(peer)
        # Per IP version: (bits to drop, networks at that length), longest prefixes first.
        self._lengths: dict[int, list[tuple[int, dict[int, list[HasAllowedIPs]]]]] = {4: [], 6: []}
        for (version, length), filed in sorted(by_length.items(), key=lambda i: -i[0][1]):
            self._lengths[version].append(((32 if version == 4 else 128) - length, filed))

    def candidates(self, ip: IPAddress) -> list[HasAllowedIPs]:
        """The peers with an allowed network that contains `ip`."""
        value = int(ip)
        found: list[HasAllowedIPs] = []
        for drop, filed in self._lengths[ip.version]:
            peers = filed.get(value >> drop << drop)
            if peers:
                found += peers
        return found

    def identify(self, ip: IPAddress) -> Key | None:
        return identify(ip, self.candidates(ip))


class Identities:
    """`identify` over the registry's table as it is now: through a `SourceIndex`, rebuilt
    when the table's roster revision moves, on the first question after (12-18 ms at 10,000
    peers, once per roster revision at most: not after reports or endpoint changes). The
    API and DNS-SD both ask it."""

    def __init__(self, table: PeerTable) -> None:
        self._table = table
        self._revision: int | None = None
        self._index = SourceIndex(())

    def __call__(self, ip: IPAddress) -> Key | None:
        if self._revision != self._table.roster_revision:
            self._index = SourceIndex(self._table.peers.values())
            self._revision = self._table.roster_revision
        return self._index.identify(ip)


def source_ip(remote: str | None) -> IPAddress | None:
    """The request's source as an address: a scope is dropped, an IPv4-mapped IPv6 address
    (dual-stack socket) becomes the IPv4 address it carries. None if there is none."""
    if not remote:
        return None
    try:
        ip = ipaddress.ip_address(remote.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def bearer_matches(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    if header is None:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
