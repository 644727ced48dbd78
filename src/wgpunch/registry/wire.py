"""The JSON forms of docs/api.md both ways, and the parsing of queries and paths.

Pure functions: records and events in, dicts (and NDJSON lines) out, for the registry; the
same dicts back to records and events (`item_from_json`), for the node's client; text in,
validated values or one `MalformedMessage` out.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import KeyFormatError, MalformedMessage, WgpunchError
from ..keys import Key
from ..wg.device import Endpoint
from .report import Reported
from .state import PeerEvent, PeerRecord, PunchEvent, RemovedEvent, Snapshot, StreamItem

_SINCE = re.compile(r"[0-9]{1,19}")  # a revision: an unsigned 64-bit integer, no sign
_EPOCH = re.compile(r"[0-9a-f]{1,64}")
WATCH_PARAMS = ("since", "epoch")


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
    raise TypeError(f"registry: no JSON form for {type(item).__name__}")


@dataclass(frozen=True, slots=True)
class Heartbeat:
    revision: int


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


def item_from_json(obj: Any) -> StreamItem | Heartbeat:
    """The inverse of `item_json` (and `heartbeat_json`); MalformedMessage for anything else."""
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


def only_params(pairs: Iterable[tuple[str, str]], allowed: Iterable[str]) -> dict[str, str]:
    """Query parameters as a dict: each at most once, none outside `allowed`."""
    allowed = tuple(allowed)
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            what = ", ".join(allowed) if allowed else "none"
            raise MalformedMessage(f"query: unknown parameter {name[:40]!r}; allowed: {what}")
        if name in params:
            raise MalformedMessage(f"query: parameter {name!r} given twice")
        params[name] = value
    return params


def watch_query(pairs: Iterable[tuple[str, str]]) -> tuple[int | None, str | None]:
    """`since` (a revision) and `epoch` (lowercase hex) of `GET /v1/watch`, both optional."""
    params = only_params(pairs, WATCH_PARAMS)
    since_text, epoch = params.get("since"), params.get("epoch")
    since = None
    if since_text is not None:
        if not _SINCE.fullmatch(since_text) or int(since_text) >= 1 << 63:
            raise MalformedMessage(
                f"query: since={since_text[:40]!r} is not a revision (0 or more)")
        since = int(since_text)
    if epoch is not None and not _EPOCH.fullmatch(epoch):
        raise MalformedMessage(f"query: epoch={epoch[:40]!r} is not lowercase hex")
    return since, epoch


def path_key(text: str) -> Key:
    """A peer named in a URL path: base64 (percent-encoded), hex or base32."""
    try:
        return Key.parse(text, what="peer key in path")
    except KeyFormatError as exc:
        raise MalformedMessage(str(exc)) from None
