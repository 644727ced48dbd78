"""Who is calling: the source address of a request, proven by WireGuard's cryptokey routing.

A packet that arrives through the registry's interface from a tunnel address was decrypted
with the session of the one peer whose AllowedIPs contain that address. So the caller is the
peer whose AllowedIPs contain the source, if exactly one does; an address that two peers claim
(overlapping prefixes) names nobody for sure, and is refused like a stranger.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Protocol

from ..keys import Key
from ..wg.device import IPAddress, IPNetwork


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
    """What `Identities` reads of the registry's state: its peers and its revision, which
    moves whenever a peer appears, goes or changes its allowed IPs (state.py)."""

    @property
    def revision(self) -> int: ...

    @property
    def peers(self) -> Mapping[Key, HasAllowedIPs]: ...


class Identities:
    """`identify` over the registry's table, with each answer kept until the revision moves.

    Every connection and every request asks; a scan of the table costs ~1 ms per 1,000 peers,
    and the answers change only with a revision. At most `max_cached` addresses are kept (a
    stranger can try many), after that the cache starts over."""

    def __init__(self, table: PeerTable, max_cached: int = 4096) -> None:
        self._table = table
        self._max_cached = max_cached
        self._revision = -1
        self._cache: dict[IPAddress, Key | None] = {}

    def __call__(self, ip: IPAddress) -> Key | None:
        revision = self._table.revision
        if revision != self._revision or len(self._cache) >= self._max_cached:
            self._cache.clear()
            self._revision = revision
        try:
            return self._cache[ip]
        except KeyError:
            found = self._cache[ip] = identify(ip, self._table.peers.values())
            return found


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
