"""The NAT probe's datagrams (registry/natprobe.py answers, node/natprobe.py asks): a node
sends a request from its WireGuard port to the registry's probe port; the registry answers
with the source `ip:port` it saw, and, when asked, also from a second port and a second
address of its own, so that the node learns how its NAT filters (docs/api.md, "NAT probe").

Request, version 1 (64 bytes, plus 64 zero bytes per flag set):

    0      4      5      6      7      8                      24                     64
    | WGNP | ver  | type | flags| later| transaction id (16)  | zero (40)            |
    ver 1, type 1; flags: 1 = answer from the second port too, 2 = from the second address,
    4 = answer again from the probe port `later` seconds after (1-60; 0 without flag 4)

The later answer tells a node how long its NAT keeps an idle UDP mapping (node/natidle.py):
it comes through only if the mapping the request made still stands.

Reply (64 bytes):

    0      4      5      6      7      8                      24     26              42
    | WGNP | ver  | type | via  | fam  | transaction id (16)  | port | address (16)  |
    42           44     45     46                  62
    | alt port   | afam | 0    | alt address (16)  | 0 (2) |
    type 2; via: 0 the probe port, 1 the second port, 2 the second address, 3 the probe
    port, `later` seconds after the request; fam 4 or 6
    (IPv4 in the first four address bytes, the rest zero); alt port 0 and afam 0: none.

So the bytes a request makes the registry send never exceed the request's own (no
amplification); the registry also limits replies per source (registry/natprobe.py).
Parsing is strict: exact lengths, known version and type, zero padding, no unknown flag.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import IntEnum, IntFlag

from ..errors import MalformedPacket
from ..ports import NATPROBE_PORT
from ..wg.model import Endpoint, IPAddress

PORT = NATPROBE_PORT  # the registry's default probe port (ports.py)
MAGIC = b"WGNP"
VERSION = 1
SIZE = 64  # a reply, and a request without alternates
MAX_LATER_S = 60  # the longest a later answer may be asked for: above NATs' usual 30 s
TXID_SIZE = 16
_HEAD = struct.Struct("!4sBBBB16s")  # magic, version, type, flags/via, zero/family, txid
_REPLY_TAIL = struct.Struct("!H16sHBx16s2x")


class Type(IntEnum):
    REQUEST = 1
    REPLY = 2


class Ask(IntFlag):
    NONE = 0
    ALT_PORT = 1
    ALT_ADDRESS = 2
    LATER = 4


class Via(IntEnum):
    PROBE_PORT = 0
    ALT_PORT = 1
    ALT_ADDRESS = 2
    LATER = 3


@dataclass(frozen=True, slots=True)
class Request:
    txid: bytes
    ask: Ask = Ask.NONE
    later_s: int = 0  # with Ask.LATER: 1-MAX_LATER_S

    def __post_init__(self) -> None:
        if bool(self.ask & Ask.LATER) != (1 <= self.later_s <= MAX_LATER_S):
            raise MalformedPacket(f"natprobe: later {self.later_s} s with flags {int(self.ask)}"
                                  f" (flag 4 takes 1-{MAX_LATER_S} s, no flag 4 takes 0)")

    def encode(self) -> bytes:
        head = _HEAD.pack(MAGIC, VERSION, Type.REQUEST, self.ask, self.later_s, self.txid)
        return head + bytes(request_size(self.ask) - len(head))


@dataclass(frozen=True, slots=True)
class Reply:
    txid: bytes
    via: Via
    observed: Endpoint
    alt_port: int | None
    alt_address: IPAddress | None

    def encode(self) -> bytes:
        family, address = _address_bytes(self.observed.ip)
        alt_family, alt = (0, bytes(16)) if self.alt_address is None \
            else _address_bytes(self.alt_address)
        return (_HEAD.pack(MAGIC, VERSION, Type.REPLY, self.via, family, self.txid)
                + _REPLY_TAIL.pack(self.observed.port, address, self.alt_port or 0,
                                   alt_family, alt))


def request_size(ask: Ask) -> int:
    return SIZE * (1 + bin(int(ask)).count("1"))


def _address_bytes(ip: IPAddress) -> tuple[int, bytes]:
    if isinstance(ip, ipaddress.IPv4Address):
        return 4, ip.packed + bytes(12)
    return 6, ip.packed


def _address(family: int, raw: bytes, what: str) -> IPAddress:
    if family == 4:
        if any(raw[4:]):
            raise MalformedPacket(f"natprobe: {what}: IPv4 with nonzero padding")
        return ipaddress.IPv4Address(raw[:4])
    if family == 6:
        return ipaddress.IPv6Address(raw)
    raise MalformedPacket(f"natprobe: {what}: unknown address family {family}")


def _head(data: bytes, kind: Type) -> tuple[int, int, bytes]:
    if len(data) < SIZE:
        raise MalformedPacket(f"natprobe: {len(data)} bytes, at least {SIZE}")
    magic, version, type_, flags, fourth, txid = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise MalformedPacket("natprobe: not a probe datagram (magic)")
    if version != VERSION:
        raise MalformedPacket(f"natprobe: version {version}, only {VERSION} is known")
    if type_ != kind:
        raise MalformedPacket(f"natprobe: type {type_}, expected {int(kind)}")
    return flags, fourth, txid


def parse_request(data: bytes) -> Request:
    flags, later, txid = _head(data, Type.REQUEST)
    if flags & ~int(Ask.ALT_PORT | Ask.ALT_ADDRESS | Ask.LATER):
        raise MalformedPacket(f"natprobe: unknown flags {flags:#x}")
    ask = Ask(flags)
    if len(data) != request_size(ask):
        raise MalformedPacket(f"natprobe: a request with flags {flags} is "
                              f"{request_size(ask)} bytes, not {len(data)}")
    if any(data[_HEAD.size:]):
        raise MalformedPacket("natprobe: nonzero padding")
    return Request(txid, ask, later)


def parse_reply(data: bytes) -> Reply:
    via, family, txid = _head(data, Type.REPLY)
    if len(data) != SIZE:
        raise MalformedPacket(f"natprobe: a reply is {SIZE} bytes, not {len(data)}")
    try:
        via_ = Via(via)
    except ValueError:
        raise MalformedPacket(f"natprobe: unknown via {via}") from None
    port, address, alt_port, alt_family, alt = _REPLY_TAIL.unpack_from(data, _HEAD.size)
    if data[45] or any(data[62:]):  # the reserved bytes
        raise MalformedPacket("natprobe: nonzero padding")
    if port == 0:
        raise MalformedPacket("natprobe: observed port 0")
    alt_address = None
    if alt_family:
        alt_address = _address(alt_family, alt, "second address")
    elif any(alt):
        raise MalformedPacket("natprobe: a second address without a family")
    return Reply(txid, via_, Endpoint(_address(family, address, "observed address"), port),
                 alt_port or None, alt_address)
