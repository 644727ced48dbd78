"""PCP (RFC 6887) MAP messages for one UDP port, both ways. Pure, like natpmp.py.

Request (§7.1 header, 24 bytes, then the MAP payload §11.1, 36 bytes):
    | version 2 | R=0, opcode 1 (MAP) | reserved (16)                 |
    | requested lifetime, seconds (32)                                |
    | client IP address (128, IPv4 as ::ffff:a.b.c.d)                 |
    | mapping nonce (96)                                              |
    | protocol 17 | reserved (24) | internal port (16) | suggested external port (16) |
    | suggested external IP address (128; all zero: any)              |
Response (§7.2): | version 2 | R=1, opcode | reserved | result code | lifetime (32) |
epoch (32) | reserved (96) |, then the MAP payload with the assigned external port and
address, then options (§7.3: code, reserved, length (16), data padded to 4 bytes), which we
do not ask for and only check for length. Lifetime 0 deletes the mapping (§15).

Strict: version, response bit, opcode, our nonce, protocol and internal port must match; the
declared option lengths must fit. A NAT-PMP-only server answers with a NAT-PMP
"unsupported version" (RFC 6887 §9), reported as `PortMapError(code=UNSUPPORTED_VERSION)`.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from ...errors import MalformedPacket, PortMapError
from . import natpmp

VERSION = 2
OP_MAP = 1
RESPONSE_BIT = 0x80
PROTOCOL_UDP = 17
NONCE_BYTES = 12
_REQUEST = struct.Struct("!BBHI16s12sB3xHH16s")
_RESPONSE = struct.Struct("!BBBBII12x12sB3xHH16s")
_OPTION = struct.Struct("!BBH")


class Result(enum.IntEnum):
    """§7.4 result codes."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


@dataclass(frozen=True, slots=True)
class MapReply:
    lifetime_s: int
    epoch_s: int
    external_port: int
    external_ip: ipaddress.IPv4Address | ipaddress.IPv6Address


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
    if isinstance(address, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{address}").packed
    return address.packed


def _from_v6(raw: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    address = ipaddress.IPv6Address(raw)
    return address.ipv4_mapped or address


def map_request(client: ipaddress.IPv4Address | ipaddress.IPv6Address, nonce: bytes,
                internal_port: int, external_port: int, lifetime_s: int) -> bytes:
    """A MAP request for UDP `internal_port` from `client` (our address toward the server,
    which it checks, §8.1); lifetime 0 deletes the mapping `nonce` made."""
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"PCP: a nonce is {NONCE_BYTES} bytes, got {len(nonce)}")
    any_ip = bytes(16) if isinstance(client, ipaddress.IPv6Address) else _as_v6(
        ipaddress.IPv4Address(0))
    return _REQUEST.pack(VERSION, OP_MAP, 0, lifetime_s, _as_v6(client), nonce, PROTOCOL_UDP,
                         internal_port, external_port, any_ip)


def parse_map(data: bytes, nonce: bytes, internal_port: int) -> MapReply:
    if len(data) >= 4 and data[0] == natpmp.VERSION:
        code = struct.unpack_from("!H", data, 2)[0]
        raise PortMapError(f"PCP: gateway speaks NAT-PMP only ({natpmp.result_name(code)})",
                           code=Result.UNSUPP_VERSION)
    if len(data) < 4:
        raise MalformedPacket(f"PCP: {len(data)}-byte datagram, shorter than a header")
    version, op, _, result = struct.unpack_from("!BBBB", data)
    if version != VERSION:
        raise MalformedPacket(f"PCP: version {version}, expected {VERSION}")
    if op != RESPONSE_BIT | OP_MAP:
        raise MalformedPacket(f"PCP: opcode byte {op:#04x}, expected a MAP response")
    if result != Result.SUCCESS:
        try:
            name = Result(result).name
        except ValueError:
            name = f"unknown result {result}"
        raise PortMapError(f"PCP: gateway answered {name}", code=result)
    if len(data) < _RESPONSE.size or len(data) % 4 or len(data) > 1100:  # §7: at most 1100
        raise MalformedPacket(f"PCP: {len(data)}-byte MAP answer, expected {_RESPONSE.size} "
                              "or more, a multiple of 4, at most 1100")
    (_, _, _, _, lifetime, epoch, got_nonce, protocol, internal, external,
     raw_ip) = _RESPONSE.unpack_from(data)
    if got_nonce != nonce:
        raise MalformedPacket("PCP: answer for another mapping (nonce differs)")
    if protocol != PROTOCOL_UDP or internal != internal_port:
        raise MalformedPacket(f"PCP: answer for protocol {protocol} port {internal}, asked "
                              f"for {PROTOCOL_UDP} port {internal_port}")
    _check_options(data[_RESPONSE.size:])
    if lifetime and not external:
        raise MalformedPacket("PCP: a mapping of external port 0")
    return MapReply(lifetime, epoch, external, _from_v6(raw_ip))


def _check_options(data: bytes) -> None:
    at = 0
    while at < len(data):
        if len(data) - at < _OPTION.size:
            raise MalformedPacket(f"PCP: {len(data) - at} bytes of option header, need 4")
        _, _, length = _OPTION.unpack_from(data, at)
        at += _OPTION.size + (length + 3) // 4 * 4
        if at > len(data):
            raise MalformedPacket(f"PCP: an option of {length} bytes runs past the datagram")
