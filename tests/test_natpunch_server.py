"""The natpunch rendezvous server (issue 7): NoiseRendezvous, LegacyRendezvous, serve.py, the
`wgpunch rendezvous` command, checked against shared/reference/natpunch.md.

`Spec` below is a natpunch-go client written from the reference's table (type byte, index,
nonce, AEAD with empty AD, 8-byte UnixNano stamp) on top of noise.HandshakeIK only, so the
server is checked against the protocol and not only against our own client.py. Expected
addresses are built by hand (`inet_pton` + big-endian port).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import itertools
import logging
import os
import random
import re
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

import wgpunch
from fuzzing import fuzz_settings
from ports import free_port, free_ports
from wgpunch.cli import build_parser
from wgpunch.errors import MalformedPacket, NatpunchError, NoiseError, WgpunchError
from wgpunch.keys import Key, generate_keypair
from wgpunch.natpunch import keyfile, serve
from wgpunch.natpunch.client import LegacyClient, NoiseClient, Retries
from wgpunch.natpunch.legacy import LegacyRendezvous
from wgpunch.natpunch.limits import Limits
from wgpunch.natpunch.noise import CipherState, HandshakeIK
from wgpunch.natpunch.server import SESSIONS_PER_KEY, NoiseRendezvous
from wgpunch.natpunch.table import Table
from wgpunch.wg.model import Endpoint

SRC = str(Path(wgpunch.__file__).resolve().parents[1])
PROLOGUE = b"natpunch-go is the best :)"  # natpunch.md B: 26 ASCII bytes
DROPPED = (MalformedPacket, NoiseError)
# Handshake stamps (UnixNano) that only ever grow, in the past so real clients come later.
STAMPS = itertools.count(1_600_000_000_000_000_000, 1_000)
# No rate limit in the way: for tests that send many handshakes from one address.
UNLIMITED = Limits(handshakes_per_source_s=1e9, handshake_burst=1e9, handshakes_per_s=1e9)

A_AT = Endpoint(ipaddress.ip_address("198.51.100.3"), 40003)
B_AT = Endpoint(ipaddress.ip_address("198.51.100.2"), 40004)
ELSEWHERE = Endpoint(ipaddress.ip_address("203.0.113.66"), 6666)


def ep(ip: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(ip), port)


def address_body(ip: str, port: int) -> bytes:
    """natpunch.md: ipv4[4] ‖ port[2], big-endian; wgpunch's IPv6 form ipv6[16] ‖ port[2]."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return socket.inet_pton(family, ip) + port.to_bytes(2, "big")


def body_of(endpoint: Endpoint) -> bytes:
    return address_body(str(endpoint.ip), endpoint.port)


def x25519_public(raw_private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(raw_private).public_key().public_bytes(
        Encoding.Raw, PublicFormat.Raw)


# -- a natpunch-go client from the reference ------------------------------------------------

class Spec:
    """natpunch-go's client messages, built from natpunch.md B's table."""

    def __init__(self, private: Key, server_public: Key) -> None:
        self.private = private
        self.public = Key(x25519_public(private.raw))
        self.server_public = server_public
        self.noise: HandshakeIK | None = None
        self.proposed = 0  # the index we put into message 1
        self.index = 0  # the index the server gave us in message 2
        self.send: CipherState | None = None
        self.receive: CipherState | None = None
        self.nonce = 0

    @classmethod
    def new(cls, server_public: Key) -> Spec:
        return cls(generate_keypair()[0], server_public)

    def init(self, stamp: int | None = None, *, index: int | None = None,
             payload: bytes | None = None) -> bytes:
        """Message 1: 0x01 ‖ index[4] ‖ e ‖ enc(s) ‖ enc(UnixNano[8])."""
        self.noise = HandshakeIK.initiator(self.private.raw, self.server_public.raw, PROLOGUE)
        self.proposed = secrets.randbits(32) if index is None else index
        if payload is None:
            payload = (next(STAMPS) if stamp is None else stamp).to_bytes(8, "big")
        return b"\x01" + self.proposed.to_bytes(4, "big") + self.noise.write_message(payload)

    def finish(self, data: bytes) -> int:
        """Message 2: 0x02 ‖ index[4] ‖ e ‖ enc(empty)."""
        assert self.noise is not None
        assert len(data) == 53, data.hex()
        assert data[0] == 0x02
        assert self.noise.read_message(data[5:]) == b""
        self.index = int.from_bytes(data[1:5], "big")
        self.send, self.receive = self.noise.split()  # k1 client->server, k2 server->client
        self.nonce = 0
        return self.index

    def request(self, target: Key, *, mine: Key | None = None, nonce: int | None = None,
                index: int | None = None) -> bytes:
        """0x03 ‖ index[4] ‖ nonce[8] ‖ AEAD(k1, nonce, "", my_key ‖ target_key)."""
        assert self.send is not None
        if nonce is None:
            nonce, self.nonce = self.nonce, self.nonce + 1
        sealed = self.send.encrypt(nonce, b"", (mine or self.public).raw + target.raw)
        return (b"\x03" + (self.index if index is None else index).to_bytes(4, "big")
                + nonce.to_bytes(8, "big") + sealed)

    def reply(self, data: bytes) -> tuple[int, bytes]:
        """0x03 ‖ nonce[8] ‖ AEAD(k2, nonce, "", address or nothing): (nonce, address body)."""
        assert self.receive is not None
        assert data[0] == 0x03
        assert len(data) in (25, 31, 43), len(data)
        nonce = int.from_bytes(data[1:9], "big")
        return nonce, self.receive.decrypt(nonce, b"", data[9:])


class Rig:
    """Drive a handler directly, with a fake clock; a dropped datagram reads as None."""

    def __init__(self, server: Any, now: float = 1000.0) -> None:
        self.server = server
        self.now = now

    def send(self, data: bytes, source: Endpoint) -> bytes | None:
        try:
            return self.server.handle(data, source, self.now)
        except DROPPED:
            return None

    def join(self, spec: Spec, source: Endpoint, stamp: int | None = None) -> int:
        reply = self.send(spec.init(stamp), source)
        assert reply is not None, "handshake not answered"
        return spec.finish(reply)

    def ask(self, spec: Spec, target: Key, source: Endpoint, **kwargs: Any) -> bytes | None:
        """The decrypted address body of the answer, or None for no answer."""
        reply = self.send(spec.request(target, **kwargs), source)
        return None if reply is None else spec.reply(reply)[1]


def noise_server(limits: Limits | None = None, **kwargs: Any) -> tuple[NoiseRendezvous, Key]:
    private, public = generate_keypair()
    return NoiseRendezvous(private, limits=limits, **kwargs), public


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Direct:
    """A client Transport whose network is a direct call into a handler."""

    def __init__(self, handler: Any, source: Endpoint, clock: Callable[[], float]) -> None:
        self.handler = handler
        self.source = source
        self.clock = clock
        self.replies: deque[bytes] = deque()
        self.log: list[tuple[bytes, bytes | None]] = []

    def send(self, payload: bytes) -> None:
        try:
            reply = self.handler.handle(payload, self.source, self.clock())
        except DROPPED:
            reply = None
        self.log.append((payload, reply))
        if reply is not None:
            self.replies.append(reply)

    async def recv(self, wait_s: float) -> bytes | None:
        return self.replies.popleft() if self.replies else None


class Udp:
    """A client Transport over a connected UDP socket on loopback."""

    def __init__(self, server: tuple[str, int], bind_host: str | None = None) -> None:
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind((bind_host or server[0], 0))
        self.sock.connect(server[:2])
        self.sock.setblocking(False)

    @property
    def endpoint(self) -> Endpoint:
        host, port = self.sock.getsockname()[:2]
        return ep(host, port)

    def send(self, payload: bytes) -> None:
        with contextlib.suppress(ConnectionRefusedError):  # an ICMP error from an earlier send
            self.sock.send(payload)

    async def recv(self, wait_s: float) -> bytes | None:
        try:
            return self.sock.recv(65536)
        except BlockingIOError:
            pass
        except ConnectionRefusedError:
            return None
        if wait_s <= 0:
            return None
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.sock_recv(self.sock, 65536), wait_s)
        except (TimeoutError, ConnectionRefusedError):
            return None

    def close(self) -> None:
        self.sock.close()


async def listen_free(handler: Any, host: str = "127.0.0.1") -> asyncio.DatagramTransport:
    """serve.listen on a free port (an Endpoint cannot say port 0)."""
    for _ in range(20):
        try:
            return await serve.listen(handler, ep(host, free_port(host)), "test")
        except WgpunchError:  # taken in between: try another
            continue
    raise AssertionError("no free UDP port")


def bound(transport: asyncio.DatagramTransport) -> tuple[str, int]:
    return transport.get_extra_info("sockname")[:2]


class Counting:
    """A handler proxy that counts the datagrams reaching the handler, per source."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seen: Counter[Endpoint] = Counter()

    @property
    def counts(self) -> Counter[str]:
        return self.inner.counts

    def handle(self, data: bytes, source: Endpoint, now: float) -> bytes | None:
        self.seen[source] += 1
        return self.inner.handle(data, source, now)


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")


# == 1. byte layouts of a real exchange =======================================================

def test_exchange_sizes_and_fields_follow_the_reference() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)

    init = b.init(0x17979CFE3D85CD15, index=0xE48D60F5)
    assert len(init) == 109
    assert init[:5] == bytes.fromhex("01e48d60f5")
    resp = server.handle(init, B_AT, rig.now)
    assert resp is not None
    assert len(resp) == 53
    assert resp[0] == 0x02
    index = b.finish(resp)
    assert int.from_bytes(resp[1:5], "big") == index

    request = b.request(a.public)
    assert len(request) == 93
    assert request[:13] == b"\x03" + index.to_bytes(4, "big") + bytes(8)  # nonce 0
    found = server.handle(request, B_AT, rig.now)
    assert found is not None
    assert len(found) == 31
    assert found[:9] == b"\x03" + bytes(8)  # the server's first reply nonce: 0
    assert b.reply(found) == (0, bytes.fromhex("c63364039c43"))  # 198.51.100.3:40003

    nobody = Key(secrets.token_bytes(32))
    not_found = server.handle(b.request(nobody), B_AT, rig.now)
    assert not_found is not None
    assert len(not_found) == 25
    assert not_found[:9] == b"\x03" + (1).to_bytes(8, "big")
    assert b.reply(not_found) == (1, b"")


def test_reply_nonces_count_per_session_from_zero() -> None:
    server, server_public = noise_server(UNLIMITED)
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    nonces = []
    for _ in range(3):
        reply = rig.send(b.request(a.public), B_AT)
        assert reply is not None
        nonces.append(b.reply(reply)[0])
    assert nonces == [0, 1, 2]
    rig.join(b, B_AT)  # a new handshake: new keys, counters restart
    reply = rig.send(b.request(a.public), B_AT)
    assert reply is not None
    assert b.reply(reply) == (0, body_of(A_AT))


def test_ipv6_endpoint_is_an_18_byte_body() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    a_at = ep("2001:db8::3", 40003)
    rig.join(a, a_at)
    rig.join(b, B_AT)
    reply = rig.send(b.request(a.public), B_AT)
    assert reply is not None
    assert len(reply) == 1 + 8 + 18 + 16
    expected = bytes.fromhex("20010db8" + "00" * 10 + "0003") + (40003).to_bytes(2, "big")
    assert b.reply(reply)[1] == expected
    # ...and an IPv6 client is told an IPv4 endpoint in 6 bytes.
    assert rig.ask(a, b.public, a_at) == bytes.fromhex("c63364029c44")


# == 2. round trips with a Python client ======================================================

async def test_noise_client_round_trip_in_memory() -> None:
    server, server_public = noise_server()
    clock = Clock(1000.0)
    a_private, a_public = generate_keypair()
    b_private, b_public = generate_keypair()
    a_net, b_net = Direct(server, A_AT, clock), Direct(server, B_AT, clock)
    a = NoiseClient(a_net, a_private, server_public, clock=clock)
    b = NoiseClient(b_net, b_private, server_public, clock=clock)

    assert await b.lookup(b_public, a_public) is None  # A unknown yet
    await a.register(a_public)
    assert await b.lookup(b_public, a_public) == A_AT
    assert await a.lookup(a_public, b_public) == B_AT
    assert await a.lookup(a_public, Key(secrets.token_bytes(32))) is None
    sizes = Counter((len(sent), None if got is None else len(got)) for sent, got in a_net.log)
    assert sizes == {(109, 53): 1, (93, 31): 1, (93, 25): 1}
    assert server.counts["errors"] == 0


async def test_noise_client_rehandshakes_after_the_session_expired() -> None:
    server, server_public = noise_server(Limits(session_ttl_s=30.0, peer_ttl_s=1000.0))
    clock = Clock(1000.0)
    a_private, a_public = generate_keypair()
    b_private, b_public = generate_keypair()
    a = NoiseClient(Direct(server, A_AT, clock), a_private, server_public, clock=clock)
    b = NoiseClient(Direct(server, B_AT, clock), b_private, server_public, clock=clock)
    await a.register(a_public)
    assert await b.lookup(b_public, a_public) == A_AT
    clock.now += 60.0  # the server forgot b's session; b's first request goes unanswered
    assert await b.lookup(b_public, a_public) == A_AT
    assert server.counts["unknown_session"] == 1


async def test_legacy_client_round_trip_in_memory() -> None:
    server = LegacyRendezvous(Limits())
    clock = Clock(0.0)
    a_public, b_public = generate_keypair()[1], generate_keypair()[1]
    a_net = Direct(server, A_AT, clock)
    a, b = LegacyClient(a_net), LegacyClient(Direct(server, B_AT, clock))
    assert await a.lookup(a_public, b_public) is None
    assert await b.lookup(b_public, a_public) == A_AT
    assert await a.lookup(a_public, b_public) == B_AT
    await a.register(a_public)
    assert a_net.log[0] == (a_public.raw + b_public.raw, b"")
    assert a_net.log[1] == (a_public.raw + b_public.raw, bytes.fromhex("c63364029c44"))
    assert a_net.log[2] == (a_public.raw + bytes(32), b"")


def test_spec_client_lookup_and_not_found() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(b, B_AT)
    assert rig.ask(b, a.public, B_AT) == b""  # A not registered: not found
    rig.join(a, A_AT)  # registration happens at the handshake
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)
    assert rig.ask(a, b.public, A_AT) == body_of(B_AT)
    assert rig.ask(b, Key(bytes(32)), B_AT) == b""  # the all-zero key is never found


def test_the_client_proposed_index_names_no_session() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    # The index b proposed, and the one the reference would have assigned (proposed + 1),
    # name no session (unless the server happened to pick one of them).
    for wrong in {b.proposed, (b.proposed + 1) & 0xFFFFFFFF} - {a.index, b.index}:
        assert rig.send(b.request(a.public, index=wrong), B_AT) is None
    assert server.counts["unknown_session"] >= 1
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)  # the assigned one does
    assert b.index in server.sessions


def test_clients_proposing_the_same_index_get_separate_sessions() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    specs = [Spec.new(server_public) for _ in range(4)]
    places = [ep("192.0.2.1", 1000 + n) for n in range(4)]
    for spec, at in zip(specs, places, strict=True):
        resp = rig.send(spec.init(index=7), at)  # the index names nothing on the server
        assert resp is not None
        spec.finish(resp)
    assert len({spec.index for spec in specs}) == 4
    for n, spec in enumerate(specs):
        other = (n + 1) % 4
        assert rig.ask(spec, specs[other].public, places[n]) == body_of(places[other])


def test_only_the_noise_static_key_can_register() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b, c = Spec.new(server_public), Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    # B asks in C's name, then in A's name from elsewhere: dropped, nothing registered.
    assert rig.send(b.request(a.public, mine=c.public), ELSEWHERE) is None
    assert rig.send(b.request(c.public, mine=a.public), ELSEWHERE) is None
    assert c.public not in server.peers
    assert rig.ask(a, c.public, A_AT) == b""
    assert rig.ask(a, b.public, A_AT) == body_of(B_AT)
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)


def test_a_request_re_registers_the_sender() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    moved = ep("198.51.100.3", 40009)  # A's NAT gave it another port
    assert rig.ask(a, b.public, moved) == body_of(B_AT)
    assert rig.ask(b, a.public, B_AT) == body_of(moved)


# == 3. replay ================================================================================

def test_replayed_handshake_is_refused() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    init = a.init()
    assert rig.send(init, A_AT) is not None
    assert rig.send(init, A_AT) is None
    assert rig.send(init, ELSEWHERE) is None  # and cannot move A
    assert server.counts["replayed"] == 2
    rig.join(b, B_AT)
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)


def test_handshake_timestamps_must_grow_per_key() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, other = Spec.new(server_public), Spec.new(server_public)
    stamp = 1_700_000_000_000_000_000
    rig.join(a, A_AT, stamp)
    assert rig.send(a.init(stamp - 1), ELSEWHERE) is None  # older
    assert rig.send(a.init(stamp), ELSEWHERE) is None  # equal
    assert rig.send(other.init(stamp - 10), B_AT) is not None  # per key, not global
    assert rig.send(a.init(stamp + 1), A_AT) is not None  # newer
    assert server.counts["replayed"] == 2


def test_replayed_handshake_is_refused_after_a_request_brought_its_key_back() -> None:
    # A is pushed out of a full table while its session lives on; its next request puts it
    # back. Its last handshake stamp must come back with it: the key is in the table again,
    # so an old handshake of A's must not re-register A at the replayer's address.
    limits = Limits(peers_max=2, handshakes_per_source_s=1e9, handshake_burst=1e9)
    server, server_public = noise_server(limits)
    rig = Rig(server, now=0.0)
    a, b, c = (Spec.new(server_public) for _ in range(3))
    captured = a.init()
    resp = rig.send(captured, A_AT)
    assert resp is not None
    a.finish(resp)
    rig.now = 1.0
    rig.join(b, B_AT)
    rig.join(c, ep("192.0.2.1", 1))
    assert a.public not in server.peers
    rig.now = 2.0
    # A is back, from its session (and B, now the least recently heard, is out).
    assert rig.ask(a, c.public, A_AT) == body_of(ep("192.0.2.1", 1))
    assert a.public in server.peers
    assert rig.send(captured, ELSEWHERE) is None
    assert rig.ask(c, a.public, ep("192.0.2.1", 1)) == body_of(A_AT)



def test_replayed_handshake_is_refused_after_the_key_expired() -> None:
    """Issue 17 item 6 (`--peer-ttl 3`): A's entry expires, then A's captured handshake is
    replayed from elsewhere. Refused; lookups never give the replayer's address, and give A's
    own once A is back."""
    server, server_public = noise_server(Limits(peer_ttl_s=3.0, session_ttl_s=3.0))
    rig = Rig(server, now=0.0)
    a, b = Spec.new(server_public), Spec.new(server_public)
    captured = a.init()
    reply = rig.send(captured, A_AT)
    assert reply is not None
    a.finish(reply)
    rig.now = 10.0  # long after A's entry and session expired
    rig.join(b, B_AT)
    assert rig.ask(b, a.public, B_AT) == b""
    assert rig.send(captured, ELSEWHERE) is None
    assert server.counts["replayed"] == 1
    assert rig.ask(b, a.public, B_AT) == b""  # not found, rather than ELSEWHERE
    rig.join(a, A_AT)  # the real A, with a new handshake
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)
    rig.now = 20.0
    rig.join(b, B_AT)
    assert rig.send(captured, ELSEWHERE) is None
    assert server.counts["replayed"] == 2


def test_handshake_stamps_outlive_the_peer_table_and_are_bounded() -> None:
    """The stamps table keeps at least `peers_max` keys (here 2 < 3), the least recently
    heard going first: once three other keys handshook after A, A's old handshake is new to
    the server again (docstring of server.py: the bound's cost)."""
    limits = Limits(peers_max=3, stamps_max=2, peer_ttl_s=3.0, session_ttl_s=3.0,
                    handshakes_per_source_s=1e9, handshake_burst=1e9)
    server, server_public = noise_server(limits)
    rig = Rig(server, now=0.0)
    a = Spec.new(server_public)
    captured = a.init()
    assert rig.send(captured, A_AT) is not None
    others = [Spec.new(server_public) for _ in range(3)]
    for number, spec in enumerate(others[:2], 1):
        rig.now = 10.0 * number
        rig.join(spec, ep("192.0.2.1", number))
    assert rig.send(captured, ELSEWHERE) is None  # A is still among the last 3 heard
    assert len(server.stamps) == 3
    rig.now = 30.0
    rig.join(others[2], ep("192.0.2.1", 3))
    assert a.public not in server.stamps and len(server.stamps) == 3
    assert rig.send(captured, ELSEWHERE) is not None

def test_replayed_request_is_refused() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    request = b.request(a.public)
    assert rig.send(request, B_AT) is not None
    assert rig.send(request, B_AT) is None
    assert rig.send(request, ELSEWHERE) is None
    assert rig.ask(a, b.public, A_AT) == body_of(B_AT)  # the replay did not move B


def test_request_nonce_window() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    assert rig.ask(b, a.public, B_AT, nonce=5000) == body_of(A_AT)
    # The reference's window is 960 (RFC 6479 on 64-bit): far below the top is refused...
    assert rig.ask(b, a.public, B_AT, nonce=0) is None
    assert rig.ask(b, a.public, B_AT, nonce=5000 - 2000) is None
    # ...inside the window an unseen nonce passes, once; and so does a higher one.
    assert rig.ask(b, a.public, B_AT, nonce=5000 - 900) == body_of(A_AT)
    assert rig.ask(b, a.public, B_AT, nonce=5000 - 900) is None
    assert rig.ask(b, a.public, B_AT, nonce=5001) == body_of(A_AT)
    # The nonce Noise reserves (2**64-1), in the clear field of an otherwise valid request.
    reserved = b.request(a.public, nonce=5002)
    assert rig.send(reserved[:5] + (2**64 - 1).to_bytes(8, "big") + reserved[13:], B_AT) is None
    assert server.counts["replayed"] >= 3


def test_forged_request_does_not_move_the_window() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    forged = bytearray(b.request(a.public, nonce=10**9))
    forged[-1] ^= 1
    assert rig.send(bytes(forged), B_AT) is None
    assert rig.ask(b, a.public, B_AT, nonce=1) == body_of(A_AT)


# == 4. the reference's crashes ===============================================================

CRASH_CASES = [
    "empty datagram",
    "lone 0x01",
    "0x03 with fewer than 4 bytes",
    "0x03 with the client's proposed index",
    "handshake with a payload under 8 bytes",
    "data with a valid index and under 8 bytes",
    "0x01 with a 4-byte body",
    "handshake response type",
]


def crash_datagrams(case: str, joined: Spec) -> list[bytes]:
    """natpunch.md B, "Crashes": each kills natpunch-go's server."""
    index = joined.index.to_bytes(4, "big")
    proposed = joined.proposed.to_bytes(4, "big")
    if case == "empty datagram":
        return [b""]
    if case == "lone 0x01":
        return [b"\x01"]
    if case == "0x03 with fewer than 4 bytes":
        return [b"\x03", b"\x03\x00", b"\x03\x00\x00", b"\x03\x00\x00\x00"]
    if case == "0x03 with the client's proposed index":
        # A fresh handshake whose proposed index we then use (the reference leaves a nil
        # entry there).
        return [b"\x03" + proposed, b"\x03" + proposed + b"x", b"\x03" + proposed + bytes(88),
                joined.request(joined.public, index=joined.proposed),
                b"\x03" + proposed + bytes(500)]
    if case == "handshake with a payload under 8 bytes":
        out = []
        for size in range(8):
            noise = HandshakeIK.initiator(joined.private.raw, joined.server_public.raw,
                                          PROLOGUE)
            out.append(b"\x01" + proposed + noise.write_message(bytes(size)))
        return out
    if case == "data with a valid index and under 8 bytes":
        return [b"\x03" + index + bytes(size) for size in range(8)]
    if case == "0x01 with a 4-byte body":
        return [b"\x01" + bytes(4)]
    if case == "handshake response type":
        return [b"\x02" + bytes(52), b"\x02"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", CRASH_CASES)
def test_reference_crashes_are_dropped(case: str) -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    for data in crash_datagrams(case, b):
        try:
            reply = server.handle(data, ELSEWHERE, rig.now)
        except DROPPED:
            continue
        assert reply is None, (data.hex(), reply)
    # The server still answers, and nothing moved.
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)
    assert rig.ask(a, b.public, A_AT) == body_of(B_AT)
    late = Spec.new(server_public)
    rig.join(late, ep("192.0.2.1", 1))
    assert rig.ask(late, a.public, ep("192.0.2.1", 1)) == body_of(A_AT)


async def registered_pair(nets: list[Udp], server_public: Key
                          ) -> tuple[tuple[NoiseClient, Key], tuple[NoiseClient, Key]]:
    """Noise clients a (on nets[0], registered) and b (on nets[1]), with their keys."""
    (a_private, a_public), (b_private, b_public) = generate_keypair(), generate_keypair()
    a = NoiseClient(nets[0], a_private, server_public)
    await a.register(a_public)
    return (a, a_public), (NoiseClient(nets[1], b_private, server_public), b_public)


async def test_reference_crashes_over_udp_cost_nothing() -> None:
    server, server_public = noise_server()
    handler = Counting(server)
    transport = await listen_free(handler)
    address = bound(transport)
    nets = [Udp(address) for _ in range(3)]
    try:
        (_, a_public), (b, b_public) = await registered_pair(nets, server_public)
        assert await b.lookup(b_public, a_public) == nets[0].endpoint
        # A hand-rolled session for the data cases, from the attacker's socket.
        spec = Spec.new(server_public)
        nets[2].send(spec.init())
        reply = await nets[2].recv(2.0)
        assert reply is not None
        spec.finish(reply)
        sent = 0
        for case in CRASH_CASES:
            for data in crash_datagrams(case, spec):
                nets[2].send(data)
                sent += 1
            assert await b.lookup(b_public, a_public) is not None, case
        assert handler.seen[nets[2].endpoint] == sent + 1
        assert server.counts["errors"] == 0
        assert server.counts["malformed"] + server.counts["unknown_session"] == sent
    finally:
        transport.close()
        for net in nets:
            net.close()


# == 5. expiry and bounds =====================================================================

def test_peers_expire_after_their_ttl() -> None:
    server, server_public = noise_server(Limits(peer_ttl_s=10.0, session_ttl_s=1000.0))
    rig = Rig(server, now=0.0)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.now = 5.0
    rig.join(b, B_AT)
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)
    rig.now = 9.9
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)
    rig.now = 10.5
    assert rig.ask(b, a.public, B_AT) == b""
    assert a.public not in server.peers
    rig.now = 11.0
    rig.join(a, A_AT)  # back again
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)


def test_a_request_keeps_the_sender_fresh() -> None:
    server, server_public = noise_server(Limits(peer_ttl_s=10.0, session_ttl_s=1000.0))
    rig = Rig(server, now=0.0)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    rig.now = 8.0
    assert rig.ask(a, b.public, A_AT) == body_of(B_AT)
    rig.now = 15.0  # B expired at 10, A was refreshed at 8
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)
    assert rig.ask(a, b.public, A_AT) == body_of(B_AT)  # B's request at 15 registered it again
    rig.now = 25.5  # both last heard at 15
    c = Spec.new(server_public)
    rig.join(c, ELSEWHERE)
    assert rig.ask(c, a.public, ELSEWHERE) == b""
    assert rig.ask(c, b.public, ELSEWHERE) == b""


def test_sessions_expire() -> None:
    server, server_public = noise_server(Limits(peer_ttl_s=1000.0, session_ttl_s=5.0))
    rig = Rig(server, now=0.0)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    rig.now = 4.0
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)
    rig.now = 5.5
    assert rig.ask(b, a.public, B_AT) is None
    rig.join(b, B_AT)
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)


def test_peer_table_is_bounded_and_drops_the_least_recently_updated() -> None:
    limits = Limits(peers_max=4, handshakes_per_source_s=1e9, handshake_burst=1e9)
    server, server_public = noise_server(limits)
    rig = Rig(server, now=0.0)
    specs = [Spec.new(server_public) for _ in range(10)]
    for number, spec in enumerate(specs):
        rig.now = float(number)
        rig.join(spec, ep("192.0.2.1", 1000 + number))
        assert len(server.peers) <= 4
        assert len(server.sessions) <= SESSIONS_PER_KEY * 4
    last = specs[-1]
    found = [rig.ask(last, spec.public, ep("192.0.2.1", 1009)) != b"" for spec in specs]
    assert found == [False] * 6 + [True] * 4
    assert server.peers.evicted == 6


def test_refreshed_peer_outlives_older_ones_when_full() -> None:
    limits = Limits(peers_max=3, handshakes_per_source_s=1e9, handshake_burst=1e9)
    server, server_public = noise_server(limits)
    rig = Rig(server, now=0.0)
    k0, k1, k2, k3 = (Spec.new(server_public) for _ in range(4))
    for number, spec in enumerate((k0, k1, k2)):
        rig.now = float(number)
        rig.join(spec, ep("192.0.2.1", 1000 + number))
    rig.now = 3.0
    assert rig.ask(k0, k2.public, ep("192.0.2.1", 1000)) != b""  # k0 heard again
    rig.now = 4.0
    rig.join(k3, ep("192.0.2.1", 1003))  # full: k1, heard least recently, goes
    assert k1.public not in server.peers
    assert rig.ask(k3, k0.public, ep("192.0.2.1", 1003)) == body_of(ep("192.0.2.1", 1000))
    assert rig.ask(k3, k1.public, ep("192.0.2.1", 1003)) == b""
    assert rig.ask(k3, k2.public, ep("192.0.2.1", 1003)) == body_of(ep("192.0.2.1", 1002))


def test_sessions_per_key_are_bounded() -> None:
    server, server_public = noise_server(UNLIMITED)
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    sessions = [Spec(b.private, server_public) for _ in range(SESSIONS_PER_KEY + 2)]
    for spec in sessions:
        rig.join(spec, B_AT)
    answered = [rig.ask(spec, a.public, B_AT) is not None for spec in sessions]
    assert answered == [False] * 2 + [True] * SESSIONS_PER_KEY
    mine = [i for i in server.sessions if server.sessions.get(i, rig.now).key == b.public]
    assert len(mine) == SESSIONS_PER_KEY


def test_handshakes_are_rate_limited_per_source() -> None:
    limits = Limits(handshakes_per_source_s=5.0, handshake_burst=20.0)
    server, server_public = noise_server(limits)
    rig = Rig(server, now=100.0)

    def burst(count: int, ip: str = "192.0.2.7") -> list[bool]:
        return [rig.send(Spec.new(server_public).init(), ep(ip, 1000 + n)) is not None
                for n in range(count)]

    assert burst(25) == [True] * 20 + [False] * 5  # per address, whatever the port
    assert burst(1, "192.0.2.8") == [True]  # another address is not held up
    rig.now += 1.0
    assert burst(7) == [True] * 5 + [False] * 2  # refilled at 5/s
    rig.now += 100.0
    assert burst(21) == [True] * 20 + [False]  # full again, not beyond the burst
    assert server.counts["rate_limited"] == 8


def test_an_ipv6_source_is_its_64_and_a_mapped_ipv4_its_address() -> None:
    limits = Limits(handshakes_per_source_s=5.0, handshake_burst=3.0)
    server, server_public = noise_server(limits)
    rig = Rig(server, now=100.0)

    def one(ip: str) -> bool:
        return rig.send(Spec.new(server_public).init(), ep(ip, 1000)) is not None

    # Three addresses of one /64 share its bucket; the next /64 has its own.
    assert [one(f"2001:db8:0:1::{n}") for n in (1, 2, 3, 4)] == [True, True, True, False]
    assert one("2001:db8:0:1:ffff:ffff:ffff:ffff") is False
    assert one("2001:db8:0:2::1") is True
    # An IPv4 sender seen through a dual-stack socket counts as that IPv4 address.
    assert [one("192.0.2.9") for _ in range(3)] == [True] * 3
    assert one("::ffff:192.0.2.9") is False
    assert one("::ffff:192.0.2.10") is True


def test_handshakes_are_rate_limited_overall() -> None:
    limits = Limits(handshakes_per_s=10.0)
    server, server_public = noise_server(limits)
    rig = Rig(server, now=100.0)
    answered = [rig.send(Spec.new(server_public).init(), ep(f"192.0.2.{n}", 1)) is not None
                for n in range(1, 13)]
    assert answered == [True] * 10 + [False] * 2


def test_requests_are_not_rate_limited() -> None:
    limits = Limits(handshakes_per_source_s=1.0, handshake_burst=2.0)
    server, server_public = noise_server(limits)
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, A_AT)
    assert all(rig.ask(b, a.public, A_AT) == body_of(A_AT) for _ in range(100))


# == 6. allow-list ============================================================================

def test_allow_list_refuses_and_hides_other_keys() -> None:
    private, server_public = generate_keypair()
    a, b, c = (Spec.new(server_public) for _ in range(3))
    server = NoiseRendezvous(private, allowed=frozenset({a.public, b.public}))
    rig = Rig(server)
    assert rig.send(c.init(), ELSEWHERE) is None
    assert server.counts["refused"] == 1
    assert c.public not in server.peers
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)
    assert rig.ask(b, c.public, B_AT) == b""


def test_allow_list_applies_to_lookups_too() -> None:
    server, server_public = noise_server()
    rig = Rig(server)
    a, b, c = (Spec.new(server_public) for _ in range(3))
    for spec, at in ((a, A_AT), (b, B_AT), (c, ELSEWHERE)):
        rig.join(spec, at)
    assert rig.ask(b, c.public, B_AT) == body_of(ELSEWHERE)
    server.allowed = frozenset({a.public, b.public})  # c is still in the table
    assert rig.ask(b, c.public, B_AT) == b""
    assert rig.ask(b, a.public, B_AT) == body_of(A_AT)


# == table.py =================================================================================

def test_table_expires_in_update_order() -> None:
    table: Table[str, int] = Table(10, ttl_s=10.0)
    table.put("a", 1, 0.0)
    table.put("b", 2, 1.0)
    table.put("c", 3, 2.0)
    assert table.get("a", 9.99) == 1
    assert table.get("a", 10.0) is None
    assert list(table) == ["b", "c"]
    assert table.get("b", 10.5) == 2  # reading does not refresh
    assert table.get("b", 11.0) is None
    assert table.get("c", 11.0) == 3
    assert table.evicted == 0  # expiry is not eviction


def test_table_put_refreshes() -> None:
    table: Table[str, int] = Table(10, ttl_s=10.0)
    table.put("a", 1, 0.0)
    table.put("b", 2, 1.0)
    table.put("a", 10, 5.0)
    assert list(table) == ["b", "a"]
    assert table.get("a", 14.0) == 10
    assert table.get("b", 14.0) is None


def test_table_evicts_the_least_recently_updated() -> None:
    table: Table[str, int] = Table(2, ttl_s=100.0)
    table.put("a", 1, 0.0)
    table.put("b", 2, 1.0)
    table.put("a", 1, 2.0)
    table.put("c", 3, 3.0)
    assert list(table) == ["a", "c"]
    assert table.evicted == 1
    for n in range(1000):
        table.put(f"k{n}", n, 4.0 + n / 1000)
        assert len(table) <= 2
    assert table.evicted == 1001
    assert list(table) == ["k998", "k999"]


def test_table_full_of_stale_entries_evicts_nothing_fresh() -> None:
    table: Table[str, int] = Table(2, ttl_s=1.0)
    table.put("a", 1, 0.0)
    table.put("b", 2, 0.5)
    table.put("c", 3, 5.0)
    assert list(table) == ["c"]
    assert table.evicted == 0


def test_table_pop_and_contains() -> None:
    table: Table[str, int] = Table(3, ttl_s=1.0)
    table.put("a", 1, 0.0)
    assert "a" in table
    assert table.pop("a") == 1
    assert table.pop("a") is None
    assert "a" not in table
    assert len(table) == 0


@pytest.mark.parametrize(("capacity", "ttl"), [(0, 1.0), (1, 0.0), (5, -1.0)])
def test_table_refuses_bad_sizes(capacity: int, ttl: float) -> None:
    with pytest.raises(ValueError):
        Table(capacity, ttl)


# == serve.py over real UDP ===================================================================

@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
async def test_udp_round_trip(host: str) -> None:
    server, server_public = noise_server()
    transport = await listen_free(server, host)
    address = bound(transport)
    nets = [Udp(address) for _ in range(3)]
    try:
        (a, a_public), (b, b_public) = await registered_pair(nets, server_public)
        assert await b.lookup(b_public, a_public) == nets[0].endpoint
        assert await a.lookup(a_public, b_public) == nets[1].endpoint
        assert await a.lookup(a_public, Key(secrets.token_bytes(32))) is None
        # The hand-rolled client against the same socket.
        spec = Spec.new(server_public)
        nets[2].send(spec.init())
        reply = await nets[2].recv(2.0)
        assert reply is not None
        spec.finish(reply)
        nets[2].send(spec.request(a_public))
        reply = await nets[2].recv(2.0)
        assert reply is not None
        assert spec.reply(reply) == (0, address_body(host, nets[0].endpoint.port))
        assert len(reply) == (31 if host == "127.0.0.1" else 43)
        assert server.counts["errors"] == server.counts["malformed"] == 0
    finally:
        transport.close()
        for net in nets:
            net.close()


async def test_legacy_over_udp() -> None:
    server = LegacyRendezvous(Limits())
    transport = await listen_free(server)
    address = bound(transport)
    nets = [Udp(address) for _ in range(3)]
    try:
        a_public, b_public = generate_keypair()[1], generate_keypair()[1]
        a, b = LegacyClient(nets[0]), LegacyClient(nets[1])
        await a.register(a_public)
        assert await b.lookup(b_public, a_public) == nets[0].endpoint
        raw = nets[2]
        raw.send(bytes(range(64)))  # unknown target: an empty datagram comes back
        assert await raw.recv(2.0) == b""
        raw.send(bytes(range(64, 96)) + a_public.raw + b"trailing bytes are cut")
        assert await raw.recv(2.0) == address_body("127.0.0.1", nets[0].endpoint.port)
        raw.send(bytes(63))  # short: no answer at all; the next request is answered
        raw.send(bytes(range(64, 96)) + b_public.raw)
        assert await raw.recv(2.0) == address_body("127.0.0.1", nets[1].endpoint.port)
        assert server.counts["malformed"] == 1
        assert server.counts["errors"] == 0
    finally:
        transport.close()
        for net in nets:
            net.close()


async def test_serve_contains_handler_bugs() -> None:
    class Exploding:
        def __init__(self) -> None:
            self.counts: Counter[str] = Counter()

        def handle(self, data: bytes, source: Endpoint, now: float) -> bytes | None:
            if data == b"boom":
                raise RuntimeError("a bug")
            if data == b"bad":
                raise MalformedPacket("bad")
            return b"ok:" + data

    handler = Exploding()
    transport = await listen_free(handler)
    net = Udp(bound(transport))
    try:
        for data in (b"boom", b"bad", b"boom", b"ping"):
            net.send(data)
        assert await net.recv(2.0) == b"ok:ping"
        assert handler.counts == {"errors": 2, "malformed": 1}
    finally:
        transport.close()
        net.close()


def test_source_endpoint() -> None:
    assert serve.source_endpoint(("127.0.0.1", 5)) == ep("127.0.0.1", 5)
    assert serve.source_endpoint(("::ffff:192.0.2.1", 5, 0, 0)) == ep("192.0.2.1", 5)
    assert serve.source_endpoint(("fe80::1%lo", 5, 0, 1)) == ep("fe80::1", 5)


async def test_listen_refuses_a_taken_port() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        with pytest.raises(WgpunchError, match="cannot listen"):
            await serve.listen(LegacyRendezvous(), ep("127.0.0.1", taken.getsockname()[1]),
                               "test")


# == 8. fuzz ==================================================================================

def mutate(rng: random.Random, seed: bytes, indexes: Sequence[int]) -> bytes:
    """1-3 of: bit flips, truncation, extension, type-byte swap, index and nonce changes,
    a spliced run of random bytes, or nothing (a replay)."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        if op == 0 and data:
            for _ in range(rng.randint(1, 8)):
                bit = rng.randrange(len(data) * 8)
                data[bit // 8] ^= 1 << (bit % 8)
        elif op == 1:
            del data[rng.randrange(len(data) + 1):]
        elif op == 2:
            data += rng.randbytes(rng.randint(1, 40))
        elif op == 3 and data:
            data[0] = rng.choice((0, 1, 2, 3, 4, 0x7F, 0xFF))
        elif op == 4 and len(data) >= 5:
            data[1:5] = rng.choice([*indexes, rng.getrandbits(32)]).to_bytes(4, "big")
        elif op == 5 and len(data) >= 13:
            nonce = rng.choice((0, 1, 959, 960, 1024, 2**63, 2**64 - 2, 2**64 - 1,
                                rng.getrandbits(64)))
            data[5:13] = nonce.to_bytes(8, "big")
        elif op == 6 and data:
            start = rng.randrange(len(data))
            data[start:start + rng.randint(1, 16)] = rng.randbytes(rng.randint(0, 16))
    return bytes(data)


# Random bodies behind a right type byte at a right length: these reach the Noise code (a
# handshake's DH and AEAD, a request's session lookup) instead of the length checks.
TYPED = ((1, 109), (2, 53), (3, 93), (3, 25), (3, 31), (3, 43))


def typed_random(rng: random.Random) -> bytes:
    kind, length = rng.choice(TYPED)
    body = rng.randbytes(length - 1)
    if kind == 1 and rng.random() < 0.2:  # a low-order ephemeral key: X25519 gives zeros
        body = body[:4] + rng.choice((bytes(32), (1).to_bytes(32, "little"))) + body[36:]
    return bytes([kind]) + body


def fuzz_seeds(rig: Rig, server_public: Key, source: Endpoint, target: Key) -> list[bytes]:
    """Valid messages of every type, from an identity of the fuzzer's own."""
    spec = Spec.new(server_public)
    resp = rig.send(spec.init(), source)
    assert resp is not None
    spec.finish(resp)
    found, nothing = (rig.send(spec.request(key), source) for key in (target, Key(bytes(32))))
    assert found is not None
    assert nothing is not None
    seeds = [resp, found, nothing]
    seeds += [spec.request(target, nonce=n) for n in (5, 6, 7, 900, 10_000)]
    seeds += [spec.request(Key(bytes(32)), nonce=n) for n in (8, 9)]
    seeds += [Spec(spec.private, server_public).init() for _ in range(3)]  # fresh handshakes
    seeds += [spec.public.raw + target.raw, spec.public.raw + bytes(32), bytes(64)]  # legacy
    seeds += [b"", b"\x01", b"\x02", b"\x03", b"\x03" + spec.index.to_bytes(4, "big")]
    return seeds


def test_fuzz_handlers_directly() -> None:
    server, server_public = noise_server(UNLIMITED)
    legacy = LegacyRendezvous(Limits())
    rig = Rig(server)
    a, b = Spec.new(server_public), Spec.new(server_public)
    rig.join(a, A_AT)
    rig.join(b, B_AT)
    legacy.handle(a.public.raw + bytes(32), A_AT, rig.now)
    seeds = fuzz_seeds(rig, server_public, ELSEWHERE, a.public)
    indexes = [a.index, b.index, a.proposed, b.proposed, 0, 0xFFFFFFFF]
    sources = [ELSEWHERE, ep("2001:db8::9", 9), ep("192.0.2.200", 65535)]
    rngs = st.randoms(use_true_random=False)
    datagrams = st.one_of(
        st.binary(max_size=160),
        rngs.map(typed_random),
        st.tuples(st.sampled_from(seeds), rngs).map(lambda p: mutate(p[1], p[0], indexes)),
    )

    @fuzz_settings(4)
    @given(datagrams, st.sampled_from(sources))
    def fuzz(data: bytes, source: Endpoint) -> None:
        for handler in (server, legacy):
            try:
                reply = handler.handle(data, source, rig.now)
            except DROPPED:
                continue
            assert reply is None or isinstance(reply, bytes)
        assert rig.ask(b, a.public, B_AT) == body_of(A_AT)

    fuzz()
    assert legacy.handle(b.public.raw + a.public.raw, B_AT, rig.now) == body_of(A_AT)


async def test_fuzz_live_server_keeps_answering() -> None:
    rng = random.Random(20240507)
    server, server_public = noise_server(UNLIMITED)
    legacy = LegacyRendezvous(Limits())
    noise_handler, legacy_handler = Counting(server), Counting(legacy)
    transports = [await listen_free(noise_handler), await listen_free(legacy_handler)]
    noise_at, legacy_at = (bound(t) for t in transports)
    # The valid clients speak from another loopback address than the fuzzer.
    nets = [Udp(noise_at, "127.0.0.2"), Udp(noise_at, "127.0.0.2"),
            Udp(legacy_at, "127.0.0.2"), Udp(legacy_at, "127.0.0.2"), Udp(noise_at)]
    fuzzer = nets[4]
    try:
        (_, a_public), (b, b_public) = await registered_pair(nets, server_public)
        la, lb = LegacyClient(nets[2]), LegacyClient(nets[3])
        await la.register(a_public)

        # Seeds: every message type, from the fuzzer's own socket and identity.
        spec = Spec.new(server_public)
        fuzzer.send(spec.init())
        resp = await fuzzer.recv(2.0)
        assert resp is not None
        spec.finish(resp)
        replies = []
        for target in (a_public, Key(bytes(32))):
            fuzzer.send(spec.request(target))
            reply = await fuzzer.recv(2.0)
            assert reply is not None
            replies.append(reply)
        seeds = [resp, *replies, *(spec.request(a_public, nonce=n) for n in (3, 4, 5, 900)),
                 *(Spec(spec.private, server_public).init() for _ in range(3)),
                 spec.public.raw + a_public.raw, bytes(32) + a_public.raw, bytes(64),
                 b"", b"\x01", b"\x03", b"\x03" + spec.index.to_bytes(4, "big")]
        indexes = [spec.index, spec.proposed, 0, 0xFFFFFFFF]
        handled_before = noise_handler.seen[fuzzer.endpoint]
        sent = Counter[str]()
        for _round in range(60):
            for _ in range(50):
                draw = rng.random()
                if draw < 0.15:
                    data = rng.randbytes(rng.choice((0, 1, 4, 5, 13, 25, 53, 64, 93, 109, 300)))
                elif draw < 0.35:
                    data = typed_random(rng)
                else:
                    data = mutate(rng, rng.choice(seeds), indexes)
                which = "legacy" if rng.random() < 0.25 else "noise"
                fuzzer.sock.sendto(data, legacy_at if which == "legacy" else noise_at)
                sent[which] += 1
            while await fuzzer.recv(0) is not None:  # keep the fuzzer's queue short
                pass
            # Replies to the valid clients prove every earlier datagram was handled.
            assert await b.lookup(b_public, a_public) == nets[0].endpoint
            assert await lb.lookup(b_public, a_public) == nets[2].endpoint
        assert noise_handler.seen[fuzzer.endpoint] - handled_before == sent["noise"]
        assert legacy_handler.seen[fuzzer.endpoint] == sent["legacy"]
        assert sent["noise"] + sent["legacy"] == 3000
        assert server.counts["errors"] == 0
        assert legacy.counts["errors"] == 0
        assert server.counts["malformed"] > 1000
    finally:
        for transport in transports:
            transport.close()
        for net in nets:
            net.close()


# == 7. key file and the `wgpunch rendezvous` process ==========================================

def cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wgpunch.cli", "rendezvous", *args],
                          capture_output=True, text=True, timeout=timeout, check=False,
                          env={**os.environ, "PYTHONPATH": SRC})


def test_print_key_creates_a_wg_genkey_file_and_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "rendezvous.key"
    first = cli("--print-key", "--key", str(path))
    assert first.returncode == 0, first.stderr
    text = path.read_text()
    assert re.fullmatch(r"[A-Za-z0-9+/]{43}=\n", text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = base64.b64decode(text)
    assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40  # clamped, as wg genkey
    assert first.stdout == base64.b64encode(x25519_public(raw)).decode() + "\n"
    second = cli("--print-key", "--key", str(path))
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert path.read_text() == text


def test_key_file_readable_by_others_is_used_with_a_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    private, _ = generate_keypair()
    path = tmp_path / "key"
    path.write_text(private.base64() + "\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert keyfile.load_or_create(path) == private
    assert "chmod 600" in caplog.text
    assert private.base64() not in caplog.text


def test_legacy_is_off_unless_asked_for() -> None:
    assert build_parser().parse_args(["rendezvous"]).legacy is None
    assert build_parser().parse_args(["rendezvous", "--legacy"]).legacy == "0.0.0.0:49918"


def text_of(path: Path) -> str:
    return path.read_text()


async def poll_register(client: NoiseClient, key: Key, proc: asyncio.subprocess.Process,
                        log: Path) -> None:
    deadline = time.monotonic() + 20.0
    while True:
        assert proc.returncode is None, text_of(log)
        try:
            await client.register(key)
            return
        except NatpunchError:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.05)  # poll interval while the process starts


async def test_rendezvous_process(tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    printed = cli("--print-key", "--key", str(key))
    assert printed.returncode == 0, printed.stderr
    server_public = Key.from_base64(printed.stdout.strip())
    a_private, a_public = generate_keypair()
    b_private, b_public = generate_keypair()
    d_private, d_public = generate_keypair()
    c_private, c_public = generate_keypair()
    allow = tmp_path / "allow"
    allow.write_text(f"# nodes\n{a_public}\n{b_public.hex()}  # b\n\n{d_public}\n")
    port, legacy_port = free_ports(2)
    argv = ["--listen", f"127.0.0.1:{port}", "--key", str(key), "--allow", str(allow),
            "--legacy", f"127.0.0.1:{legacy_port}"]
    v6 = has_ipv6_loopback()
    port6 = free_port("::1") if v6 else 0
    if v6:
        argv += ["--listen", f"[::1]:{port6}"]
    log = tmp_path / "stderr"
    nets: list[Udp] = []
    with log.open("w") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wgpunch.cli", "rendezvous", *argv,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "PYTHONPATH": SRC})
    try:
        nets = [Udp(("127.0.0.1", port)) for _ in range(4)] + [Udp(("127.0.0.1", legacy_port))
                                                               for _ in range(2)]
        quick = Retries(timeout_s=0.3, attempts=2)
        a = NoiseClient(nets[0], a_private, server_public, retries=Retries(0.3, 1))
        await poll_register(a, a_public, proc, log)
        a.retries = Retries()
        b = NoiseClient(nets[1], b_private, server_public)
        assert await b.lookup(b_public, a_public) == nets[0].endpoint
        # The key in the file is the server's: another server key gets no answer.
        wrong = NoiseClient(nets[2], b_private, generate_keypair()[1], retries=quick)
        with pytest.raises(NatpunchError):
            await wrong.register(b_public)
        # Not on the allow-list: no answer.
        stranger = NoiseClient(nets[3], c_private, server_public, retries=quick)
        with pytest.raises(NatpunchError):
            await stranger.register(c_public)
        assert await b.lookup(b_public, c_public) is None
        if v6:
            nets.append(Udp(("::1", port6)))
            d = NoiseClient(nets[-1], d_private, server_public)
            assert await d.lookup(d_public, a_public) == nets[0].endpoint
            assert await a.lookup(a_public, d_public) == nets[-1].endpoint  # 18-byte body
        la, lb = LegacyClient(nets[4]), LegacyClient(nets[5])
        await la.register(a_public)
        assert await lb.lookup(b_public, a_public) == nets[4].endpoint
    finally:
        for net in nets:
            net.close()
        if proc.returncode is None:
            proc.terminate()
        try:
            code = await asyncio.wait_for(proc.wait(), 10.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    text = text_of(log)
    assert code == 0, text
    assert "Traceback" not in text
    assert str(server_public) in text  # the start-up line names the public key
    assert "rendezvous: stopped" in text



async def test_rendezvous_process_refuses_a_handshake_replayed_after_expiry(
        tmp_path: Path) -> None:
    """Issue 17 item 6, against `wgpunch rendezvous --peer-ttl 1`: A registers, its entry
    expires, a replayer sends A's captured handshake from another socket. No answer, and B's
    lookups of A say "not found", never the replayer's address."""
    key = tmp_path / "server.key"
    printed = cli("--print-key", "--key", str(key))
    assert printed.returncode == 0, printed.stderr
    server_public = Key.from_base64(printed.stdout.strip())
    b_private, b_public = generate_keypair()
    port = free_port()
    log = tmp_path / "stderr"
    nets: list[Udp] = []
    with log.open("w") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wgpunch.cli", "rendezvous", "--listen", f"127.0.0.1:{port}",
            "--key", str(key), "--peer-ttl", "1", stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=stderr, env={**os.environ, "PYTHONPATH": SRC})
    try:
        nets = [Udp(("127.0.0.1", port)) for _ in range(3)]
        a_net, b_net, replayer = nets
        b = NoiseClient(b_net, b_private, server_public, retries=Retries(0.3, 1))
        await poll_register(b, b_public, proc, log)
        a = Spec.new(server_public)
        captured = a.init()
        a_net.send(captured)
        reply = await a_net.recv(2.0)
        assert reply is not None
        a.finish(reply)
        assert await b.lookup(b_public, a.public) == a_net.endpoint
        deadline = time.monotonic() + 10.0
        while await b.lookup(b_public, a.public) is not None:  # A expires after 1 s
            assert time.monotonic() < deadline, "A's entry did not expire"
            await asyncio.sleep(0.1)  # poll interval, bounded by the deadline above
        replayer.send(captured)
        assert await replayer.recv(1.0) is None
        assert await b.lookup(b_public, a.public) is None
    finally:
        for net in nets:
            net.close()
        if proc.returncode is None:
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 10.0)
    assert "Traceback" not in text_of(log)

# == 9. CLI errors ============================================================================

def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text(generate_keypair()[0].base64() + "\n")
    key.chmod(0o600)
    for name, text in (("garbage.key", "not a key\n"), ("empty.key", "")):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o600)  # else a warning line comes first
    (tmp_path / "dir.key").mkdir()
    (tmp_path / "allow").write_text(f"{generate_keypair()[1]}\nnot-a-key\n")
    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    busy = taken.getsockname()[1]
    good = ["--key", str(key), "--listen", "127.0.0.1:1"]  # never reached: fails before
    cases = {
        "bad --listen": (["--key", str(key), "--listen", "nonsense"], "--listen"),
        "--listen port out of range": (["--key", str(key), "--listen", "127.0.0.1:70000"],
                                       "--listen"),
        "--listen empty port": (["--key", str(key), "--listen", "127.0.0.1:"], "--listen"),
        "--listen port in use": (["--key", str(key), "--listen", f"127.0.0.1:{busy}"],
                                 "cannot listen"),
        "bad --legacy": (["--key", str(key), "--listen", f"127.0.0.1:{free_port('127.0.0.1')}",
                          "--legacy", "x:y"], "--legacy"),
        "malformed key file": (["--key", str(tmp_path / "garbage.key"), "--print-key"],
                               "key file"),
        "empty key file": (["--key", str(tmp_path / "empty.key"), "--print-key"], "key file"),
        "key file is a directory": (["--key", str(tmp_path / "dir.key"), "--print-key"],
                                    "key file"),
        "unreadable key file": (["--key", str(tmp_path / "dir.key"), "--listen", "127.0.0.1:9"],
                                "key file"),
        "bad --allow line": ([*good, "--allow", str(tmp_path / "allow")], "line 2"),
        "missing --allow file": ([*good, "--allow", str(tmp_path / "nope")], "cannot read"),
        "--max-peers 0": ([*good, "--max-peers", "0"], "--max-peers"),
        "--peer-ttl 0": ([*good, "--peer-ttl", "0"], "--peer-ttl"),
    }
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "wgpunch.cli", "rendezvous", *argv],
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": SRC})
        for name, (argv, _) in cases.items()
    }
    failures = {}
    try:
        for name, proc in procs.items():
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                failures[name] = "still running after 30 s"
                continue
            lines = err.splitlines()
            want = cases[name][1]
            if (proc.returncode != 1 or len(lines) != 1 or not lines[0].startswith("wgpunch: ")
                    or want not in lines[0] or "Traceback" in err):
                failures[name] = (proc.returncode, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        taken.close()
    assert failures == {}
    # The bad key file names no secret: the text of the file is not echoed.
    assert "not a key" not in cli("--key", str(tmp_path / "garbage.key"), "--print-key").stderr
