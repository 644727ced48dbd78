"""The records and events of the registry<->node protocol (docs/api.md), as both sides hold
them: the registry builds them from its device and its peers' reports, the node reads them
from the API (codec.py). Frozen: a record is a value, never updated in place."""

from __future__ import annotations

from dataclasses import dataclass

from ..keys import Key
from ..wg.model import Endpoint, IPAddress, IPNetwork
from .natinfo import NatBehaviour
from .report import Reported


@dataclass(frozen=True, slots=True)
class PeerRecord:
    public_key: Key
    allowed_ips: tuple[IPNetwork, ...]
    endpoint: Endpoint | None  # as the registry's interface observes it
    latest_handshake: float | None  # Unix seconds; None = never
    reported: Reported | None  # what the node said about itself; None = nothing yet
    revision: int  # the revision at which this record last changed

    @property
    def public(self) -> bool:
        """The node has no NAT of its own: the address we observe is one it reported as its
        own (roles.py `initiator` says why that matters)."""
        return (self.reported is not None and self.endpoint is not None
                and self.endpoint.ip in self.reported.local_addresses)

    @property
    def nat(self) -> NatBehaviour | None:
        """The node's NAT behaviour as it reported it; None: not reported."""
        return None if self.reported is None else self.reported.nat


@dataclass(frozen=True, slots=True)
class PeerEvent:
    revision: int
    peer: PeerRecord


@dataclass(frozen=True, slots=True)
class RemovedEvent:
    revision: int
    public_key: Key


@dataclass(frozen=True, slots=True)
class PunchEvent:
    """For one side of a punch: `peer` is the other side, `endpoint` its observed endpoint,
    `initiator` whether this side sends the first initiation (the registry decides it with
    roles.initiator; the node follows it). `opened`: sent again to the initiator alone when
    the other side says its NAT is open toward it (`POST /v1/punch/{peer}/opened`): the
    initiation may go now."""

    revision: int
    peer: Key
    endpoint: Endpoint
    initiator: bool
    opened: bool = False


@dataclass(frozen=True, slots=True)
class RelayEvent:
    """For one side of a relay slot: `peer` is the other side; this side's device sends to
    `address:port` for it. `address` None: the registry's own endpoint address, as this
    side's device has it (the relay runs beside the registry). Also the body of the answer
    to `POST /v1/relay/{peer}`."""

    revision: int
    peer: Key
    port: int
    address: IPAddress | None


@dataclass(frozen=True, slots=True)
class DirectEvent:
    """For one side of a relayed pair whose direct path answered a probe (`POST
    /v1/relay/{peer}/direct`): this side's device reaches `peer` at `endpoint` from now on;
    the relay has stopped forwarding the pair's slot, so WireGuard cannot roam back to it."""

    revision: int
    peer: Key
    endpoint: Endpoint


@dataclass(frozen=True, slots=True)
class Snapshot:
    epoch: str
    revision: int
    peers: tuple[PeerRecord, ...]


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The registry is alive; `revision` is its current one (not a change)."""

    revision: int


Change = PeerEvent | RemovedEvent  # what the registry's history holds
# What a watch stream carries.
StreamItem = Snapshot | PeerEvent | RemovedEvent | PunchEvent | RelayEvent | DirectEvent
Event = StreamItem | Heartbeat  # what the node reads from a watch stream
