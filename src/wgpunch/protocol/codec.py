"""The JSON forms of docs/api.md both ways: records and events to dicts (and NDJSON lines), for
the registry; the same dicts back to records and events, for the node. Pure functions. A dict
that is not what the registry sends is one `MalformedMessage`."""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Iterable
from typing import Any

from ..errors import MalformedMessage, WgpunchError
from ..keys import Key
from ..wg.model import Endpoint
from .natinfo import nat_from_json
from .records import (
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
from .report import Reported, ipv6_endpoints, mapped_endpoint


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
        punch = {"type": "punch", "revision": item.revision, "peer": item.peer.base64(),
                 "endpoint": str(item.endpoint), "initiator": item.initiator}
        # Only when true: a node older than the field takes the line as one more punch.
        return punch | {"opened": True} if item.opened else punch
    if isinstance(item, RelayEvent):
        return relay_json(item)
    if isinstance(item, DirectEvent):
        return {"type": "direct", "revision": item.revision, "peer": item.peer.base64(),
                "endpoint": str(item.endpoint)}
    if isinstance(item, Snapshot):
        return {"type": "snapshot", "epoch": item.epoch, "revision": item.revision,
                "peers": peers_json(item.peers)}
    raise TypeError(f"protocol: no JSON form for {type(item).__name__}")


def relay_json(item: RelayEvent) -> dict[str, Any]:
    """A relay event; without its `type`, the answer to `POST /v1/relay/{peer}`."""
    return {"type": "relay", "revision": item.revision, "peer": item.peer.base64(),
            "port": item.port, "address": None if item.address is None else str(item.address)}


def relay_from_json(obj: Any) -> RelayEvent:
    try:
        port = _field(obj, "port", int)
        if not 1 <= port <= 65535:
            raise MalformedMessage(f"port: {port} is not in 1-65535")
        address = _field(obj, "address", str, none=True)
        return RelayEvent(_revision(obj, "revision"), Key.from_base64(_field(obj, "peer", str)),
                          port, None if address is None else ipaddress.ip_address(address))
    except (ValueError, KeyError, TypeError, WgpunchError) as error:
        raise MalformedMessage(f"malformed relay {str(obj)[:100]}: {error}") from None


def heartbeat_json(revision: int) -> dict[str, Any]:
    return {"type": "heartbeat", "revision": revision}


def peer_from_json(obj: Any) -> PeerRecord:
    reported = _field(obj, "reported", dict, none=True)
    return PeerRecord(
        public_key=Key.from_base64(_field(obj, "public_key", str)),
        allowed_ips=tuple(ipaddress.ip_network(_item(net, "allowed_ips", str))
                          for net in _field(obj, "allowed_ips", list)),
        endpoint=_endpoint(obj, "endpoint", none=True),
        latest_handshake=_number(obj, "latest_handshake", none=True),
        reported=None if reported is None else Reported(
            _revision(reported, "listen_port"),
            tuple(ipaddress.ip_address(_item(a, "local_addresses", str))
                  for a in _field(reported, "local_addresses", list)),
            _field(reported, "version", str),
            mapped_endpoint(reported.get("mapped_endpoint")),
            # Absent from an older registry's records: not reported.
            nat=None if reported.get("nat") is None else nat_from_json(reported["nat"]),
            ipv6=ipv6_endpoints(reported.get("ipv6_endpoints")),  # absent: older registry
        ),
        revision=_revision(obj, "revision"),
    )


def snapshot_from_json(obj: Any) -> Snapshot:
    """The body of `GET /v1/peers` (a snapshot without its `type`)."""
    try:
        peers = tuple(peer_from_json(p) for p in _field(obj, "peers", list))
        return Snapshot(_field(obj, "epoch", str), _revision(obj, "revision"), peers)
    except (ValueError, KeyError, TypeError, WgpunchError) as error:
        raise MalformedMessage(f"malformed peer list: {error}") from None


def item_from_json(obj: Any) -> Event:
    """The inverse of `item_json` (and `heartbeat_json`)."""
    try:
        kind, revision = _field(obj, "type", str), _revision(obj, "revision")
        if kind == "snapshot":
            peers = tuple(peer_from_json(p) for p in _field(obj, "peers", list))
            return Snapshot(_field(obj, "epoch", str), revision, peers)
        if kind == "peer":
            return PeerEvent(revision, peer_from_json(_field(obj, "peer", dict)))
        if kind == "removed":
            return RemovedEvent(revision, Key.from_base64(_field(obj, "public_key", str)))
        if kind == "punch":
            endpoint = _endpoint(obj, "endpoint")
            assert endpoint is not None
            opened = "opened" in obj and _field(obj, "opened", bool)  # absent: an older registry
            return PunchEvent(revision, Key.from_base64(_field(obj, "peer", str)), endpoint,
                              _field(obj, "initiator", bool), opened)
        if kind == "relay":
            return relay_from_json(obj)
        if kind == "direct":
            endpoint = _endpoint(obj, "endpoint")
            assert endpoint is not None
            return DirectEvent(revision, Key.from_base64(_field(obj, "peer", str)), endpoint)
        if kind == "heartbeat":
            return Heartbeat(revision)
    except (ValueError, KeyError, TypeError, WgpunchError) as error:
        raise MalformedMessage(f"malformed {str(obj)[:100]}: {error}") from None
    raise MalformedMessage(f"unknown watch event type {kind[:40]!r}")


# Readers of one field each: the JSON type is checked before the value is used, so a value
# of another type is a MalformedMessage naming the field, never a Python error of its own
# (found by fuzzing: an endpoint of 5, a revision of 1e999, an initiator of "no").


def _field(obj: Any, key: str, kind: type | tuple[type, ...], *, none: bool = False) -> Any:
    if not isinstance(obj, dict):
        raise MalformedMessage(f"expected an object holding {key!r}")
    value = obj[key]
    if value is None and none:
        return None
    # bool is an int in Python, not in JSON.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise MalformedMessage(f"{key}: expected {names}, got {type(value).__name__}")
    return value


def _item(value: Any, key: str, kind: type) -> Any:
    if not isinstance(value, kind):
        raise MalformedMessage(f"{key}: expected {kind.__name__} items, got "
                               f"{type(value).__name__}")
    return value


def _revision(obj: Any, key: str) -> int:
    value: int = _field(obj, key, int)
    if value < 0:
        raise MalformedMessage(f"{key}: {value} is negative")
    return value


def _number(obj: Any, key: str, *, none: bool = False) -> float | None:
    value = _field(obj, key, (int, float), none=none)
    if value is None:
        return None
    if not math.isfinite(value):
        raise MalformedMessage(f"{key}: {value!r} is not a finite number")
    return float(value)


def _endpoint(obj: Any, key: str, *, none: bool = False) -> Endpoint | None:
    text = _field(obj, key, str, none=none)
    return None if text is None else Endpoint.parse(text)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def ndjson_line(obj: Any) -> bytes:
    return (dumps(obj) + "\n").encode()
