"""The two natpunch wire formats, byte for byte (shared/reference/natpunch.md).

Legacy, the wireguard-tools example: a 64-byte request `my_key ‖ their_key` (raw keys), and a
reply of `ipv4 ‖ port` (6 bytes) or nothing at all.

natpunch-go: a type byte, then
  1 handshake init   `index[4] ‖ Noise IK message 1` (its payload: an 8-byte UnixNano stamp)
  2 handshake resp   `index[4] ‖ Noise IK message 2` (empty payload)
  3 request          `index[4] ‖ nonce[8] ‖ AEAD(my_key ‖ their_key)`
  3 reply            `nonce[8] ‖ AEAD(address)`, the address as in the legacy reply.
Integers are big-endian. Every parser checks the length before it slices and raises
`MalformedPacket` for anything else, so a handler can drop what it cannot read in one place.

IPv6: the formats carry a 4-byte address. A natpunch-go reply has room for more, so an IPv6
endpoint goes out as `ipv6[16] ‖ port` (18 bytes); a reference client treats that as an
error and retries, wgpunch's client reads it. A legacy reply cannot say it: an IPv6 endpoint
is answered as unknown.
"""

from __future__ import annotations

import ipaddress
import struct

from ..errors import MalformedPacket
from ..keys import KEY_LEN, Key
from ..ports import LEGACY_PORT as LEGACY_PORT  # re-exported: the protocol's ports
from ..ports import RENDEZVOUS_PORT as RENDEZVOUS_PORT
from ..wg.model import Endpoint

PROLOGUE = b"natpunch-go is the best :)"

HANDSHAKE_INIT = 1
HANDSHAKE_RESP = 2
DATA = 3

TAG_LEN = 16  # ChaCha20-Poly1305
TIMESTAMP_LEN = 8
INDEX_LEN = 4
NONCE_LEN = 8
LOOKUP_LEN = 2 * KEY_LEN
LEGACY_REQUEST_LEN = LOOKUP_LEN
# Noise IK with X25519: message 1 is e, enc(s), enc(payload); message 2 is e, enc(payload).
NOISE_INIT_LEN = 32 + (32 + TAG_LEN) + (TIMESTAMP_LEN + TAG_LEN)
NOISE_RESP_LEN = 32 + TAG_LEN
HANDSHAKE_INIT_LEN = 1 + INDEX_LEN + NOISE_INIT_LEN  # 109
HANDSHAKE_RESP_LEN = 1 + INDEX_LEN + NOISE_RESP_LEN  # 53
REQUEST_LEN = 1 + INDEX_LEN + NONCE_LEN + LOOKUP_LEN + TAG_LEN  # 93
REPLY_MIN_LEN = 1 + NONCE_LEN + TAG_LEN  # 25, "not found"


# -- addresses -------------------------------------------------------------------------------

def encode_address(endpoint: Endpoint | None) -> bytes:
    if endpoint is None:
        return b""
    return endpoint.ip.packed + struct.pack("!H", endpoint.port)


def decode_address(body: bytes) -> Endpoint | None:
    """Empty: not found. 6 bytes IPv4, 18 bytes IPv6, then the port."""
    if not body:
        return None
    if len(body) not in (6, 18):
        raise MalformedPacket(f"an address is 6 or 18 bytes, got {len(body)}")
    (port,) = struct.unpack("!H", body[-2:])
    if port == 0:
        # The wireguard-tools server answers a lookup of the all-zero key with 0.0.0.0:0.
        raise MalformedPacket("an address with port 0")
    return Endpoint(ipaddress.ip_address(body[:-2]), port)


def lookup_body(mine: Key, theirs: Key) -> bytes:
    return mine.raw + theirs.raw


def parse_lookup(body: bytes) -> tuple[Key, Key]:
    if len(body) != LOOKUP_LEN:
        raise MalformedPacket(f"a lookup is {LOOKUP_LEN} bytes, got {len(body)}")
    return Key(body[:KEY_LEN]), Key(body[KEY_LEN:])


# -- legacy ----------------------------------------------------------------------------------

def legacy_request(mine: Key, theirs: Key) -> bytes:
    return lookup_body(mine, theirs)


def parse_legacy_request(data: bytes) -> tuple[Key, Key]:
    """The reference server reads into a 64-byte buffer: shorter is dropped, longer is cut."""
    if len(data) < LEGACY_REQUEST_LEN:
        raise MalformedPacket(f"a legacy request is {LEGACY_REQUEST_LEN} bytes, got {len(data)}")
    return parse_lookup(data[:LEGACY_REQUEST_LEN])


def legacy_reply(endpoint: Endpoint | None) -> bytes:
    if endpoint is None or endpoint.ip.version != 4:
        return b""
    return encode_address(endpoint)


def parse_legacy_reply(data: bytes) -> Endpoint | None:
    if len(data) not in (0, 6):
        raise MalformedPacket(f"a legacy reply is 0 or 6 bytes, got {len(data)}")
    return decode_address(data)


# -- natpunch-go -----------------------------------------------------------------------------

def timestamp(unix_ns: int) -> bytes:
    return struct.pack("!Q", unix_ns)


def parse_timestamp(payload: bytes) -> int:
    if len(payload) != TIMESTAMP_LEN:
        raise MalformedPacket(f"a handshake stamp is {TIMESTAMP_LEN} bytes, got {len(payload)}")
    return int.from_bytes(payload, "big")


def handshake_init(index: int, noise: bytes) -> bytes:
    return struct.pack("!BI", HANDSHAKE_INIT, index) + noise


def parse_handshake_init(data: bytes) -> tuple[int, bytes]:
    return _indexed(data, HANDSHAKE_INIT, HANDSHAKE_INIT_LEN)


def handshake_resp(index: int, noise: bytes) -> bytes:
    return struct.pack("!BI", HANDSHAKE_RESP, index) + noise


def parse_handshake_resp(data: bytes) -> tuple[int, bytes]:
    return _indexed(data, HANDSHAKE_RESP, HANDSHAKE_RESP_LEN)


def request(index: int, nonce: int, sealed: bytes) -> bytes:
    return struct.pack("!BIQ", DATA, index, nonce) + sealed


def parse_request(data: bytes) -> tuple[int, int, bytes]:
    if len(data) != REQUEST_LEN or data[0] != DATA:
        raise MalformedPacket(f"a request is {REQUEST_LEN} bytes of type {DATA}")
    index, nonce = struct.unpack_from("!IQ", data, 1)
    return index, nonce, data[1 + INDEX_LEN + NONCE_LEN:]


def reply(nonce: int, sealed: bytes) -> bytes:
    return struct.pack("!BQ", DATA, nonce) + sealed


def parse_reply(data: bytes) -> tuple[int, bytes]:
    if data[:1] != bytes([DATA]) or len(data) not in (
        REPLY_MIN_LEN, REPLY_MIN_LEN + 6, REPLY_MIN_LEN + 18
    ):
        raise MalformedPacket(f"a reply is type {DATA} and {REPLY_MIN_LEN}, +6 or +18 bytes")
    (nonce,) = struct.unpack_from("!Q", data, 1)
    return nonce, data[1 + NONCE_LEN:]


def _indexed(data: bytes, kind: int, length: int) -> tuple[int, bytes]:
    if len(data) != length or data[0] != kind:
        raise MalformedPacket(f"a type-{kind} message is {length} bytes, got {len(data)}")
    (index,) = struct.unpack_from("!I", data, 1)
    return index, data[1 + INDEX_LEN:]
