"""The registry<->node contract: what both sides import (and nothing else of each other's).

docs/api.md is its text; this package is its code, as Tailscale's disco.go is shared by
magicsock and the relay server. No sockets, no clocks, no state:
- `report.py`  what a node says about itself (`PUT /v1/self`), validated on construction;
- `records.py` peer records, watch-stream events and snapshots;
- `codec.py`   their JSON forms, both ways;
- `natinfo.py` what a node knows of its own NAT (part of its report);
- `probewire.py` the NAT probe's datagrams (registry/natprobe.py, node/natprobe.py);
- `roles.py`   who initiates a punch (decided by the registry, carried in the punch event)
  and which pairs need a relay.
Errors are `MalformedMessage` and `RequestRefused` in errors.py.
"""

from __future__ import annotations

from ..ports import API_PORT
from .codec import (
    dumps,
    heartbeat_json,
    item_from_json,
    item_json,
    ndjson_line,
    peer_from_json,
    peer_json,
    peers_json,
    relay_from_json,
    relay_json,
    snapshot_from_json,
)
from .natinfo import NatBehaviour, nat_from_json
from .records import (
    Change,
    DirectEvent,
    Event,
    Heartbeat,
    PeerEvent,
    PeerRecord,
    PunchEvent,
    RelayEvent,
    RemovedEvent,
    Snapshot,
    StreamItem,
)
from .report import (
    FIELDS,
    MAX_BODY_BYTES,
    MAX_LOCAL_ADDRESSES,
    MAX_VERSION_CHARS,
    Reported,
    decode_object,
    reported_from_json,
)
from .roles import (
    has_mapping,
    initiates,
    initiator,
    initiator_changed,
    lower_key,
    needs_relay,
    pair_of,
    relay_reason,
)

__all__ = [
    "API_PORT",
    "FIELDS",
    "MAX_BODY_BYTES",
    "MAX_LOCAL_ADDRESSES",
    "MAX_VERSION_CHARS",
    "Change",
    "DirectEvent",
    "Event",
    "Heartbeat",
    "NatBehaviour",
    "PeerEvent",
    "PeerRecord",
    "PunchEvent",
    "RelayEvent",
    "RemovedEvent",
    "Reported",
    "Snapshot",
    "StreamItem",
    "decode_object",
    "dumps",
    "has_mapping",
    "heartbeat_json",
    "initiates",
    "initiator",
    "initiator_changed",
    "item_from_json",
    "item_json",
    "lower_key",
    "nat_from_json",
    "ndjson_line",
    "needs_relay",
    "pair_of",
    "peer_from_json",
    "peer_json",
    "peers_json",
    "relay_from_json",
    "relay_json",
    "relay_reason",
    "reported_from_json",
    "snapshot_from_json",
]
