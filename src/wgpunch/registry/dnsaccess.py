"""Who may ask the DNS-SD server: peers through the tunnel, and networks allowed explicitly.

Linux takes packets for the tunnel address on any interface (the weak host model), so a host
outside the tunnel with a route to that address via the registry's public address reaches the
server too. The API refuses such callers (403); so does DNS-SD, by the API's rule: the source
must lie in the allowed IPs of exactly one peer of the registry's device (`auth.identify`), or
in a network the operator allowed. Anything else is dropped before it is parsed: over UDP
without a reply (a spoofed source gets nothing reflected), over TCP by closing the connection.

Finding the peer fast: `identify` looks at every peer (9-13 ms at 10,000 peers, measured on
this shared 2-core machine), so a flood from outside would cost that per packet. `SourceIndex`
files the peers under each of their allowed networks, per prefix length; an address costs one
dict probe per prefix length in use, and `identify` decides among the peers found there (the
same answer as on the whole table: a peer contains the address exactly when one of its
networks is the address's own at that network's length). A refused query then costs ~10 us
in all. The index is rebuilt when the table's revision moves, on the first query after:
12-18 ms at 10,000 peers, once per revision at most.

Refusals are logged at most once per source per period, and at most once per
`interval_s` for all sources together: spoofed source addresses are free, and one line for
each would flood the log.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from typing import Protocol

from ..keys import Key
from ..throttle import Throttle
from ..wg.device import IPAddress, IPNetwork
from .auth import HasAllowedIPs, identify, source_ip


class PeerTable(Protocol):
    """The registry's peer table (state.RegistryState fits)."""

    @property
    def peers(self) -> Mapping[Key, HasAllowedIPs]: ...

    @property
    def revision(self) -> int: ...


class SourceIndex:
    """The peers of one table by their allowed networks, to find the few that may contain an
    address; `auth.identify` decides among them."""

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


class Access:
    """The rule of one server: the peers of `table` by their tunnel addresses, then the
    networks in `allow`."""

    def __init__(self, table: PeerTable, allow: Iterable[IPNetwork] = ()) -> None:
        self._table = table
        self.allow = tuple(allow)
        self._index = SourceIndex(())
        self._revision: int | None = None

    def identify(self, ip: IPAddress) -> Key | None:
        """`auth.identify` on the table as it is now."""
        if self._revision != self._table.revision:
            self._index = SourceIndex(self._table.peers.values())
            self._revision = self._table.revision
        return self._index.identify(ip)

    def client(self, source: str | None) -> Hashable | None:
        """Who `source` (a socket's address) is, for the limits per client: the peer's key,
        or the address itself in an allowed network. None: not to be answered."""
        ip = source_ip(source)
        if ip is None:
            return None
        key = self.identify(ip)
        if key is not None:
            return key
        if any(ip in net for net in self.allow):
            return ip
        return None


class RefusalLog:
    """Whether to log a refusal: at most once per source per `per_source_s`, and for all
    sources together at most once per `interval_s`. At most `sources_max` sources are
    remembered; past that, the memory starts over (spoofed sources are unbounded)."""

    def __init__(self, per_source_s: float, interval_s: float, sources_max: int) -> None:
        self._per_source = Throttle(per_source_s)
        self._overall = Throttle(interval_s)
        self._sources_max = sources_max
        self._remembered = 0

    def allow(self, source: Hashable, now: float) -> bool:
        if self._per_source.allow(source, now) is None:
            return False
        self._remembered += 1  # `allow` adds a source only when it does not hold it back
        if self._remembered > self._sources_max:
            self._per_source = Throttle(self._per_source.period_s)
            self._remembered = 0
        return self._overall.allow(None, now) is not None
