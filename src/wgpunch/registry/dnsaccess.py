"""Who may ask the DNS-SD server: peers through the tunnel, and networks allowed explicitly.

Linux takes packets for the tunnel address on any interface (the weak host model), so a host
outside the tunnel with a route to that address via the registry's public address reaches the
server too. The API refuses such callers (403); so does DNS-SD, by the API's rule: the source
must lie in the allowed IPs of exactly one peer of the registry's device (`auth.identify`), or
in a network the operator allowed. Anything else is dropped before it is parsed: over UDP
without a reply (a spoofed source gets nothing reflected), over TCP by closing the connection.

Finding the peer is `auth.Identities`, the API's own lookup (an index by allowed network,
rebuilt once per roster revision): a refused query costs ~10 us.

Refusals are logged at most once per source per period, and at most once per
`interval_s` for all sources together: spoofed source addresses are free, and one line for
each would flood the log.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable

from ..throttle import Throttle
from ..wg.model import IPNetwork
from .auth import Identities, PeerTable, source_ip


class Access:
    """The rule of one server: the peers of `table` by their tunnel addresses, then the
    networks in `allow`."""

    def __init__(self, table: PeerTable, allow: Iterable[IPNetwork] = ()) -> None:
        self.identify = Identities(table)  # `auth.identify` on the table as it is now
        self.allow = tuple(allow)

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
