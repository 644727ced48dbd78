"""A minimal STUN binding responder: `python3 -m wgpunch.lab.stun ADDRESS PORT`.

miniupnpd refuses port forwarding on a WAN address in a reserved range (the lab's public
addresses are TEST-NET ranges) unless STUN (`ext_perform_stun`) shows that nothing between
it and the internet maps or filters (miniupnpd upnpstun.c `perform_stun`: four binding
requests from four sockets, every one answered from the address it went to, each mapped
address equal to the router's own address and port). This responder runs in the lab's
registry namespace and answers every RFC 5389 binding request (method 0x001, class request)
from the one socket it came to, with XOR-MAPPED-ADDRESS (RFC 5389 §15.2) of the request's
source. It ignores CHANGE-REQUEST (RFC 5780), which miniupnpd sends but does not need
honoured, and drops anything that is not a binding request.

It prints `ready` once bound, then runs until killed (the lab's teardown kills every process
in its namespaces).

    0                   1                   2                   3
    0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |0 0|     STUN Message Type     |         Message Length        |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |                    Magic Cookie 0x2112A442                    |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
   |                   Transaction ID (96 bits)                    |
   +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import struct
import sys

HEADER = struct.Struct("!HHI12s")
MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
XOR_MAPPED_ADDRESS = 0x0020
FAMILY_IPV4 = 0x01


def answer(request: bytes, source: tuple[str, int]) -> bytes | None:
    """The binding success response to `request` from `source`; None for anything else."""
    if len(request) < HEADER.size:
        return None
    kind, length, cookie, transaction = HEADER.unpack_from(request)
    if (kind != BINDING_REQUEST or cookie != MAGIC_COOKIE or length % 4
            or HEADER.size + length != len(request)):
        return None
    address = int(ipaddress.IPv4Address(source[0]))
    value = struct.pack("!BBHI", 0, FAMILY_IPV4, source[1] ^ (MAGIC_COOKIE >> 16),
                        address ^ MAGIC_COOKIE)
    attribute = struct.pack("!HH", XOR_MAPPED_ADDRESS, len(value)) + value
    return HEADER.pack(BINDING_SUCCESS, len(attribute), MAGIC_COOKIE, transaction) + attribute


def serve(address: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, port))
    print("ready", flush=True)
    devnull = os.open(os.devnull, os.O_WRONLY)  # nothing reads our stdout after `ready`
    os.dup2(devnull, sys.stdout.fileno())
    while True:
        request, source = sock.recvfrom(2048)
        response = answer(request, source)
        if response is not None:
            sock.sendto(response, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m wgpunch.lab.stun", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("address")
    parser.add_argument("port", type=int)
    args = parser.parse_args(argv)
    try:
        serve(args.address, args.port)
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
