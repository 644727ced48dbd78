"""The kick: one datagram from the registry to a node, through the tunnel, saying that the
node's watch stream should have delivered a revision by now (registry/kick.py sends it,
node/kick.py takes it; docs/api.md, "Kick").

    0      4      5      6                     14
    | WGKK | ver  | elen | revision (8)        | epoch (elen bytes, ASCII) |
    ver 1; elen 1-64; the epoch and revision of the registry's change that moved the node

Sent to UDP port `PORT` of the address the node's watch stream comes from. Parsing is
strict: exact length, known version, printable epoch.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import MalformedPacket
from ..ports import KICK_PORT

PORT = KICK_PORT  # UDP, on the node's tunnel address (ports.py)
MAGIC = b"WGKK"
VERSION = 1
MAX_EPOCH = 64
_HEAD = struct.Struct("!4sBBQ")  # magic, version, epoch length, revision


@dataclass(frozen=True, slots=True)
class Kick:
    epoch: str
    revision: int


def encode_kick(kick: Kick) -> bytes:
    epoch = kick.epoch.encode("ascii")
    if not 0 < len(epoch) <= MAX_EPOCH or not 0 <= kick.revision < 1 << 64:
        raise ValueError(f"kick: epoch {kick.epoch!r} or revision {kick.revision} out of range")
    return _HEAD.pack(MAGIC, VERSION, len(epoch), kick.revision) + epoch


def parse_kick(data: bytes) -> Kick:
    if len(data) < _HEAD.size:
        raise MalformedPacket(f"kick: {len(data)} bytes, at least {_HEAD.size}")
    magic, version, size, revision = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise MalformedPacket("kick: not a kick datagram (magic)")
    if version != VERSION:
        raise MalformedPacket(f"kick: version {version}, only {VERSION} is known")
    if not 0 < size <= MAX_EPOCH or len(data) != _HEAD.size + size:
        raise MalformedPacket(f"kick: {len(data)} bytes with an epoch of {size}")
    epoch = data[_HEAD.size:]
    if not all(0x21 <= b < 0x7f for b in epoch):
        raise MalformedPacket("kick: the epoch is not printable ASCII")
    return Kick(epoch.decode("ascii"), revision)
