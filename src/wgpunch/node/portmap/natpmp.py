"""NAT-PMP (RFC 6886) messages: the external address request and UDP mapping, both ways.
Pure: bytes in, values out; a datagram that is not the answer asked for is `MalformedPacket`.

Request, external address (§3.2):  | version 0 | opcode 0 |
Request, map UDP (§3.3), 12 bytes:
    | version 0 | opcode 1 | reserved (16)          |
    | internal port (16)   | suggested external (16)|
    | requested lifetime, seconds (32)              |
Responses start `| version 0 | 128 + opcode | result code (16) | seconds since epoch (32) |`,
then the external IPv4 address (32) for opcode 0 (12 bytes in all), or internal port (16),
mapped external port (16) and lifetime (32) for a mapping (16 bytes in all). A mapping with
lifetime 0 and external port 0 is a deletion (§3.4).

Strict: the exact length, version, opcode and, for a mapping, our internal port; a result
other than 0 is `PortMapError` naming it (a server speaking only NAT-PMP answers a PCP
request with result 1, which is how pcp.py learns to fall back).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from ...errors import MalformedPacket, PortMapError

VERSION = 0
OP_ADDRESS = 0
OP_MAP_UDP = 1
RESPONSE = 128
_ADDRESS = struct.Struct("!BBHI4s")
_MAP_REQUEST = struct.Struct("!BBHHHI")
_MAP_RESPONSE = struct.Struct("!BBHIHHI")


class Result(enum.IntEnum):
    """§3.5 result codes."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2  # refused, or mapping switched off by the user
    NETWORK_FAILURE = 3  # e.g. the NAT has no external address yet
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


def result_name(code: int) -> str:
    try:
        return Result(code).name.lower().replace("_", " ")
    except ValueError:
        return f"unknown result {code}"


@dataclass(frozen=True, slots=True)
class ExternalAddress:
    epoch_s: int
    address: ipaddress.IPv4Address


@dataclass(frozen=True, slots=True)
class MapReply:
    epoch_s: int
    internal_port: int
    external_port: int
    lifetime_s: int


def address_request() -> bytes:
    return bytes((VERSION, OP_ADDRESS))


def map_request(internal_port: int, external_port: int, lifetime_s: int) -> bytes:
    """A UDP mapping request; lifetime 0 (and external port 0) deletes the mapping."""
    return _MAP_REQUEST.pack(VERSION, OP_MAP_UDP, 0, internal_port, external_port, lifetime_s)


def _header(data: bytes, opcode: int, size: int) -> None:
    if len(data) < 4:
        raise MalformedPacket(f"NAT-PMP: {len(data)}-byte datagram, shorter than a header")
    version, op, result = struct.unpack_from("!BBH", data)
    if version != VERSION:
        raise MalformedPacket(f"NAT-PMP: version {version}, expected {VERSION}")
    if op != RESPONSE + opcode:
        raise MalformedPacket(f"NAT-PMP: opcode {op}, expected {RESPONSE + opcode}")
    if result != Result.SUCCESS:
        # A refusal may come short (RFC 6886 §3.5: only the first 8 bytes are required).
        raise PortMapError(f"NAT-PMP: gateway answered {result_name(result)}", code=result)
    if len(data) != size:
        raise MalformedPacket(f"NAT-PMP: {len(data)}-byte answer, expected {size}")


def parse_address(data: bytes) -> ExternalAddress:
    _header(data, OP_ADDRESS, _ADDRESS.size)
    _, _, _, epoch, raw = _ADDRESS.unpack(data)
    return ExternalAddress(epoch, ipaddress.IPv4Address(raw))


def parse_map(data: bytes, internal_port: int) -> MapReply:
    _header(data, OP_MAP_UDP, _MAP_RESPONSE.size)
    _, _, _, epoch, internal, external, lifetime = _MAP_RESPONSE.unpack(data)
    if internal != internal_port:
        raise MalformedPacket(f"NAT-PMP: answer for internal port {internal}, "
                              f"asked for {internal_port}")
    return MapReply(epoch, internal, external, lifetime)
