"""Where a peer can be reached, and which of those places to use: pure, no sockets, no clock.

A peer's *candidates* are the endpoints worth trying (DESIGN.md §3), each of a kind:
- `lan`    one of the peer's LAN addresses and its listen port (same NAT, same subnet);
- `ipv6`   the peer's listen port on one of its global IPv6 addresses, as it reported them,
           when we have one too: no NAT on the way, at most stateful firewalls, which the
           non-initiator's opener gets the initiation through (node/punch.py);
- `public` the peer's endpoint as the registry's WireGuard interface observes it;
- `mapped` a port the peer's node opened on its NAT (UPnP-IGD, NAT-PMP, PCP);
- `relay`  a registry relay slot, which forwards ciphertext between the two.
`choose` ranks them in the spirit of Tailscale's `betterAddr` (wgengine/magicsock): a direct
path always beats a relay; between direct paths a clearly faster one wins, then a private
address over a public one; and the path in use is kept unless another is better by more
than a margin, so two similar paths never make the peer flap between them.

The *path* of a peer is what its live session runs over: the kind of the candidate its
current endpoint matches, `direct` for an endpoint WireGuard roamed to by itself, `none`
without a live session. `wgpunch status` shows it.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..protocol import PeerRecord
from ..protocol.report import globally_routed6
from ..wg.model import Endpoint, IPInterface


class PathKind(enum.StrEnum):
    DIRECT = "direct"  # live session on the peer's public, mapped or roamed-to address
    LAN = "lan"  # live session on one of the peer's LAN addresses
    RELAY = "relay"  # live session through a relay slot
    NONE = "none"  # no live session


class CandidateKind(enum.StrEnum):
    LAN = "lan"
    IPV6 = "ipv6"
    PUBLIC = "public"
    MAPPED = "mapped"
    RELAY = "relay"

    @property
    def path(self) -> PathKind:
        return {CandidateKind.LAN: PathKind.LAN,
                CandidateKind.RELAY: PathKind.RELAY}.get(self, PathKind.DIRECT)


# The order in which kinds are tried when nothing else tells them apart (DESIGN.md §3), but
# a mapping before the observed endpoint: the peer's NAT forwards its mapped port from
# anyone, while its observed endpoint takes us in only if that NAT maps independently of
# the destination (behind a symmetric NAT, the usual reason for a mapping, it never does).
# IPv6 before both: no NAT at all, so whatever kinds the two IPv4 NATs are, the pair goes
# direct; when it leads nowhere (a firewall that lets nothing in), failover moves on to IPv4.
TRY_ORDER = (CandidateKind.LAN, CandidateKind.IPV6, CandidateKind.MAPPED, CandidateKind.PUBLIC,
             CandidateKind.RELAY)

# Our choice, as Tailscale's betterAddr: a path must be this much faster (relative round
# trip) before we leave the one in use, so measurement noise never moves a peer.
SWITCH_MARGIN = 0.10


@dataclass(frozen=True, slots=True)
class Candidate:
    kind: CandidateKind
    endpoint: Endpoint
    rtt_s: float | None = None  # a measured round trip; None: not measured

    @property
    def direct(self) -> bool:
        return self.kind is not CandidateKind.RELAY

    @property
    def private(self) -> bool:
        """On the peer's own network. By kind, not by address: Python counts the
        documentation ranges (the lab's "public" addresses) as private."""
        return self.kind is CandidateKind.LAN


def better(a: Candidate, b: Candidate) -> bool:
    """Whether `a` is worth leaving `b` for. Not symmetric on purpose: two candidates that
    differ by less than the margin are each not better than the other, so the one in use
    stays."""
    if a.direct != b.direct:
        return a.direct
    if a.rtt_s is not None and b.rtt_s is not None:
        if a.rtt_s < b.rtt_s * (1 - SWITCH_MARGIN):
            return True
        if b.rtt_s < a.rtt_s * (1 - SWITCH_MARGIN):
            return False
    if a.private != b.private:
        return a.private
    return False


def choose(candidates: Iterable[Candidate], current: Endpoint | None = None
           ) -> Candidate | None:
    """The candidate to use: the one at `current` (the endpoint in use) unless another is
    `better`; without one at `current`, the best in TRY_ORDER. None when there are none."""
    ordered = sorted(candidates, key=lambda c: TRY_ORDER.index(c.kind))
    best = next((c for c in ordered if c.endpoint == current), None)
    for candidate in ordered:
        if best is None or better(candidate, best):
            best = candidate
    return best


def path_of(endpoint: Endpoint | None, candidates: Iterable[Candidate]) -> PathKind:
    """The path a *live* session on `endpoint` runs over."""
    for candidate in candidates:
        if candidate.endpoint == endpoint:
            return candidate.kind.path
    return PathKind.DIRECT  # WireGuard roamed to an address of the peer's own


def candidates_of(record: PeerRecord, mine: PeerRecord | None = None,
                  local: Sequence[IPInterface] = ()) -> tuple[Candidate, ...]:
    """The candidates the registry's record of a peer gives: its observed endpoint, the port
    it mapped on its NAT (when it reported one), its IPv6 endpoints (when we have a global
    IPv6 address of our own in `local`: without one we could send there from nowhere), and
    its LAN addresses (with its listen port) when it is behind our own NAT.

    Behind our NAT means: the registry sees both of us at one public address (`mine` is our
    own record), and the peer reported an address inside one of our on-link networks
    (`local`: our addresses with their prefixes). Both, because each alone misleads: two
    homes behind one carrier NAT share a public address, and most homes number their LAN
    192.168.1.0/24. A LAN candidate that still leads nowhere is given up after one attempt
    (decide.failover)."""
    found: list[Candidate] = []
    reported = record.reported
    if (reported is not None and mine is not None and mine.endpoint is not None
            and record.endpoint is not None and mine.endpoint.ip == record.endpoint.ip):
        own = {interface.ip for interface in local}
        for address in reported.local_addresses:
            if address not in own and any(address in i.network for i in local):
                found.append(Candidate(CandidateKind.LAN,
                                       Endpoint(address, reported.listen_port)))
    if reported is not None and any(
            isinstance(i.ip, ipaddress.IPv6Address) and globally_routed6(i.ip) for i in local):
        found += [Candidate(CandidateKind.IPV6, endpoint) for endpoint in reported.ipv6
                  if all(c.endpoint != endpoint for c in found)]
    mapped = reported.mapped if reported is not None else None
    if mapped is not None:
        found.append(Candidate(CandidateKind.MAPPED, mapped))
    if record.endpoint is not None and record.endpoint != mapped:
        found.append(Candidate(CandidateKind.PUBLIC, record.endpoint))
    return tuple(found)
