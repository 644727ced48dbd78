"""The datagrams two agents exchange to learn whether a relayed pair has a direct path again
(node/upgrade.py): a probe from one node's WireGuard port to a direct candidate of the other,
and the answer from the other's WireGuard port back to where the probe came from.

Both are 64 bytes, IPv4 only (they go out on the raw socket of natpunch/rawudp.py):

    0      4      5      6      8                      24                          56
    | WGUP | ver  | type | 0 (2)| transaction id (16)  | sender's public key (32)   |
    56                 60     62
    | observed IPv4    | port | 0 (2) |
    ver 1; type 1 probe (observed all zero), 2 answer (where the probe came from, as the
    answering node saw it: the prober's NAT mapping toward it)

The first byte, "W", is no WireGuard message type (1-4), so the WireGuard device that owns
the port drops the datagram unread, while the agent's BPF filter (upgradelink.py) passes
exactly this length and magic. An answer is never larger than its probe (no amplification);
the transaction id, random per probe, is what an off-path sender cannot guess.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum

from ..errors import MalformedPacket
from ..keys import Key
from ..wg.model import Endpoint

MAGIC = b"WGUP"
VERSION = 1
SIZE = 64
TXID_SIZE = 16
_LAYOUT = struct.Struct("!4sBBH16s32s4sHH")


class Type(IntEnum):
    PROBE = 1
    ANSWER = 2


@dataclass(frozen=True, slots=True)
class Probe:
    txid: bytes
    sender: Key

    def encode(self) -> bytes:
        return _LAYOUT.pack(MAGIC, VERSION, Type.PROBE, 0, self.txid, self.sender.raw,
                            bytes(4), 0, 0)


@dataclass(frozen=True, slots=True)
class Answer:
    txid: bytes
    sender: Key
    observed: Endpoint  # where the probe came from, as the answering node saw it

    def encode(self) -> bytes:
        ip = self.observed.ip
        assert isinstance(ip, ipaddress.IPv4Address)
        return _LAYOUT.pack(MAGIC, VERSION, Type.ANSWER, 0, self.txid, self.sender.raw,
                            ip.packed, self.observed.port, 0)


def parse(data: bytes) -> Probe | Answer:
    """One datagram, strictly: exact length, magic, version, type, zero padding."""
    if len(data) != SIZE:
        raise MalformedPacket(f"upgrade probe: {len(data)} bytes, not {SIZE}")
    magic, version, kind, zero, txid, sender, ip, port, tail = _LAYOUT.unpack(data)
    if magic != MAGIC:
        raise MalformedPacket("upgrade probe: not a probe datagram (magic)")
    if version != VERSION:
        raise MalformedPacket(f"upgrade probe: version {version}, only {VERSION} is known")
    if zero or tail:
        raise MalformedPacket("upgrade probe: nonzero padding")
    if kind == Type.PROBE:
        if any(ip) or port:
            raise MalformedPacket("upgrade probe: a probe carries no observed address")
        return Probe(txid, Key(sender))
    if kind == Type.ANSWER:
        if port == 0:
            raise MalformedPacket("upgrade probe: an answer with port 0")
        return Answer(txid, Key(sender), Endpoint(ipaddress.IPv4Address(ip), port))
    raise MalformedPacket(f"upgrade probe: unknown type {kind}")
