"""Who sends first when a peer can be reached through a port mapping (DESIGN.md §3, "mapped").

A mapping M on the NAT of side S forwards whatever arrives at M to S's WireGuard port, from
anyone. So the other side P initiates toward M: its own NAT then lets S's answer in (it comes
from M, where P sent), whatever P's NAT's kind, and S answers through the mapping's
conntrack entry, from M. S sends nothing toward P first, not even a low-TTL opener: it
cannot help (P's initiation is what opens P's NAT for M) and it does harm: S's outbound flow
to P's public endpoint (S:wg -> P) is exactly the reply direction that P's later flow to M
needs after DNAT. Linux resolves that clash by giving P's flow another source port
(measured in the lab, kernel 6.18, symmetric NAT with miniupnpd: tests/test_portmap_lab.py),
so S sees P at a port P never used, and a NAT that cannot remap would drop P's packets.

Each side decides from its own mapping, as it knows it, and the peer's, as the registry's
record of the peer says; so they agree once the registry has passed the mapping on (a few
ms after it was made; until then the mapped side sends nothing and the other does not know
to initiate, which the next punch round after Timings.first_retry_s mends, instead of an
early packet from the mapped side blocking the mapping). When both or neither have a
mapping, the protocol's rule (protocol/roles.py, carried in punch events) decides as before.

A mapping the gateway granted may still lead nowhere (an upstream firewall, a gateway that
lies). So the mapped side holds back only for its first HOLD_BACK_ATTEMPTS punch rounds
without a session; after that it punches as it would without a mapping, and the other side
fails over from the mapping to the observed endpoint (decide.failover).

The registry's own initiator rule does not know mappings yet; nodes override it here. It
could call `initiates_by_mapping` too (it needs only the two records).
"""

from __future__ import annotations

from ...protocol import PeerRecord, has_mapping

# Our choice: a working mapping connects in the first round (lab: 0.1 s); three rounds of the
# agent's backoff (Timings.first_retry_s doubling: 0.5 + 1 + 2 s) give the other side's
# retries and its failover time before we send ourselves.
HOLD_BACK_ATTEMPTS = 3


def initiates_by_mapping(we_mapped: bool, peer: PeerRecord) -> bool | None:
    """True: we initiate (the peer has a mapping, we have none); False: we wait for the peer
    and send nothing toward it (we have one, it has none); None: mappings decide nothing."""
    theirs = has_mapping(peer)
    if we_mapped == theirs:
        return None
    return theirs


def holds_back(we_mapped: bool, peer: PeerRecord, attempts: int) -> bool:
    """Whether we must send nothing toward `peer` (no opener, no initiation) and wait for its
    initiation to our mapping, `attempts` punch rounds into a try without a session (module
    doc)."""
    return attempts < HOLD_BACK_ATTEMPTS and initiates_by_mapping(we_mapped, peer) is False
