"""Which datagrams a relay slot accepts: those shaped like WireGuard messages (whitepaper
§5.4), and nothing else. The relay never decrypts; the shape is all it can check, and all it
needs to keep the slots from being a free UDP proxy.

    byte 0     1-3        4 ...
    +------+-----------+--------------------------------------------+
    | type | 0   0   0 | rest of the message                        |
    +------+-----------+--------------------------------------------+

- 1 handshake initiation   148 bytes exactly
- 2 handshake response      92 bytes exactly
- 3 cookie reply            64 bytes exactly
- 4 transport data          16-byte header + ciphertext padded to 16 + 16-byte tag:
                            at least 32 bytes (a keepalive) and a multiple of 16
"""

from __future__ import annotations

import enum

# Whitepaper §5.4.2-§5.4.7; wireguard-go device/noise-protocol.go (MessageInitiationSize...).
EXACT_LENGTHS = {1: 148, 2: 92, 3: 64}
TRANSPORT_MIN = 32
TRANSPORT_ALIGN = 16
_RESERVED = b"\0\0\0"


class MessageType(enum.IntEnum):
    INITIATION = 1
    RESPONSE = 2
    COOKIE = 3
    TRANSPORT = 4


def message_type(data: bytes) -> MessageType | None:
    """The WireGuard message type `data` is shaped as, or None if it is no such message."""
    if len(data) < TRANSPORT_MIN or data[1:4] != _RESERVED:
        return None
    kind = data[0]
    if kind in EXACT_LENGTHS:
        return MessageType(kind) if len(data) == EXACT_LENGTHS[kind] else None
    if kind == MessageType.TRANSPORT and len(data) % TRANSPORT_ALIGN == 0:
        return MessageType.TRANSPORT
    return None
