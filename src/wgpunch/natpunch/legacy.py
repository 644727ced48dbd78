"""The wireguard-tools example protocol, server side: datagram in, reply out.

Every request `my_key ‖ their_key` registers the sender's source address under `my_key` and
answers with the endpoint of `their_key`, or an empty datagram. Nothing is authenticated:
anyone can register any key at any address, and so send a key's traffic elsewhere (WireGuard
then refuses it, so the harm is a denial of service). That is why it is off unless asked
for, and why its table is its own: an entry made here is never served to a natpunch-go
client, whose server does check who registers.

Unlike the reference, entries expire, the table is a hash table, and the all-zero key is
neither stored nor found (the reference answers it with 0.0.0.0:0 from an empty slot).
"""

from __future__ import annotations

import logging
from collections import Counter

from ..keys import Key
from ..wg.model import Endpoint
from . import wire
from .limits import Limits
from .table import Table

log = logging.getLogger(__name__)


class LegacyRendezvous:
    def __init__(self, limits: Limits | None = None) -> None:
        limits = limits or Limits()
        self.peers: Table[Key, Endpoint] = Table(limits.peers_max, limits.peer_ttl_s)
        self.counts: Counter[str] = Counter()

    def handle(self, data: bytes, source: Endpoint, now: float) -> bytes:
        """The reply to one datagram; raises `MalformedPacket` for one to drop."""
        mine, theirs = wire.parse_legacy_request(data)
        if not mine.is_zero():
            if self.peers.get(mine, now) != source:
                log.info("natpunch legacy: %s at %s", mine, source,
                         extra={"event": "registered", "peer": str(mine),
                                "endpoint": str(source)})
            self.peers.put(mine, source, now)
        found = None if theirs.is_zero() else self.peers.get(theirs, now)
        reply = wire.legacy_reply(found)  # empty for an IPv6 endpoint too: it has no room
        self.counts["found" if reply else "not_found"] += 1
        return reply
