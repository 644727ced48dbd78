"""The JSON forms of docs/api.md both ways: records and events to dicts (and NDJSON lines), for
the registry; the same dicts back to records and events, for the node. Pure functions. A dict
that is not what the registry sends is one `MalformedMessage`."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from typing import Any

from ..errors import MalformedMessage, WgpunchError
from ..keys import Key
from ..wg.device import Endpoint
from .records import (
    Event,
    Heartbeat,
    PeerEvent,
    PeerRecord,
    PunchEvent,
    RemovedEvent,
    Snapshot,
    StreamItem,
)
from .report import Reported


def peer_json(record: PeerRecord) -> dict[str, Any]:
    return {
        "public_key": record.public_key.base64(),
        "allowed_ips": [str(net) for net in record.allowed_ips],
        "endpoint": None if record.endpoint is None else str(record.endpoint),
        "latest_handshake": record.latest_handshake,
        "reported": None if record.reported is None else record.reported.to_json(),
        "revision": record.revision,
    }


def peers_json(records: Iterable[PeerRecord]) -> list[dict[str, Any]]:
    return [peer_json(record) for record in records]


def item_json(item: StreamItem) -> dict[str, Any]:
    """One line of a watch stream."""
    if isinstance(item, PeerEvent):
        return {"type": "peer", "revision": item.revision, "peer": peer_json(item.peer)}
    if isinstance(item, RemovedEvent):
        return {"type": "removed", "revision": item.revision,
                "public_key": item.public_key.base64()}
    if isinstance(item, PunchEvent):
        return {"type": "punch", "revision": item.revision, "peer": item.peer.base64(),
                "endpoint": str(item.endpoint), "initiator": item.initiator}
    if isinstance(item, Snapshot):
        return {"type": "snapshot", "epoch": item.epoch, "revision": item.revision,
                "peers": peers_json(item.peers)}
    raise TypeError(f"protocol: no JSON form for {type(item).__name__}")


def heartbeat_json(revision: int) -> dict[str, Any]:
    return {"type": "heartbeat", "revision": revision}


def peer_from_json(obj: Any) -> PeerRecord:
    reported = obj["reported"]
    return PeerRecord(
        public_key=Key.from_base64(obj["public_key"]),
        allowed_ips=tuple(ipaddress.ip_network(net) for net in obj["allowed_ips"]),
        endpoint=None if obj["endpoint"] is None else Endpoint.parse(obj["endpoint"]),
        latest_handshake=obj["latest_handshake"],
        reported=None if reported is None else Reported(
            reported["listen_port"],
            tuple(ipaddress.ip_address(a) for a in reported["local_addresses"]),
            reported["version"],
        ),
        revision=int(obj["revision"]),
    )


def snapshot_from_json(obj: Any) -> Snapshot:
    """The body of `GET /v1/peers` (a snapshot without its `type`)."""
    try:
        peers = tuple(peer_from_json(p) for p in obj["peers"])
        return Snapshot(str(obj["epoch"]), int(obj["revision"]), peers)
    except (ValueError, KeyError, TypeError, WgpunchError) as error:
        raise MalformedMessage(f"malformed peer list: {error}") from None


def item_from_json(obj: Any) -> Event:
    """The inverse of `item_json` (and `heartbeat_json`)."""
    try:
        kind, revision = obj["type"], int(obj["revision"])
        if kind == "snapshot":
            peers = tuple(peer_from_json(p) for p in obj["peers"])
            return Snapshot(str(obj["epoch"]), revision, peers)
        if kind == "peer":
            return PeerEvent(revision, peer_from_json(obj["peer"]))
        if kind == "removed":
            return RemovedEvent(revision, Key.from_base64(obj["public_key"]))
        if kind == "punch":
            return PunchEvent(revision, Key.from_base64(obj["peer"]),
                              Endpoint.parse(obj["endpoint"]), bool(obj["initiator"]))
        if kind == "heartbeat":
            return Heartbeat(revision)
    except (ValueError, KeyError, TypeError, WgpunchError) as error:
        raise MalformedMessage(f"malformed {str(obj)[:100]}: {error}") from None
    raise MalformedMessage(f"unknown watch event type {kind!r}")


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def ndjson_line(obj: Any) -> bytes:
    return (dumps(obj) + "\n").encode()
