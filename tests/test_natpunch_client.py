"""The natpunch clients against the real server handlers, over a channel that can lose,
hold back and inject replies: every wait ends, a lost datagram is retried, and a late or
stale reply never passes for the answer to another question (the reference client blocks
forever on one lost datagram and crashes on a stale handshake reply)."""

from __future__ import annotations

import asyncio
import ipaddress
import time

import pytest

from wgpunch.errors import MalformedPacket, NatpunchError, NoiseError
from wgpunch.keys import Key, generate_keypair
from wgpunch.natpunch import wire
from wgpunch.natpunch.client import LegacyClient, NoiseClient, Retries
from wgpunch.natpunch.legacy import LegacyRendezvous
from wgpunch.natpunch.server import NoiseRendezvous
from wgpunch.wg.model import Endpoint

FAST = Retries(timeout_s=0.2, attempts=3)


def at(ip: str, port: int) -> Endpoint:
    return Endpoint(ipaddress.ip_address(ip), port)


class Channel:
    """A client's socket to a real handler. The test says what happens to the next replies:
    `lose` drops them, `hold` keeps them back (in `held`); `inject` queues datagrams just
    before the next reply, as if they had been on their way all along."""

    def __init__(self, handler: NoiseRendezvous | LegacyRendezvous, source: Endpoint) -> None:
        self.handler = handler
        self.source = source
        self.replies: asyncio.Queue[bytes] = asyncio.Queue()
        self.lose = self.hold = 0
        self.held: list[bytes] = []
        self.inject: list[bytes] = []
        self.sent: list[bytes] = []

    def send(self, payload: bytes) -> None:
        self.sent.append(payload)
        try:
            reply = self.handler.handle(payload, self.source, time.monotonic())
        except (MalformedPacket, NoiseError):  # dropped, as serve.py drops it
            reply = None
        for early in self.inject:
            self.replies.put_nowait(early)
        self.inject.clear()
        if reply is None:
            return
        if self.lose:
            self.lose -= 1
        elif self.hold:
            self.hold -= 1
            self.held.append(reply)
        else:
            self.replies.put_nowait(reply)

    async def recv(self, timeout: float) -> bytes | None:  # noqa: ASYNC109 - the Transport API
        try:
            return await asyncio.wait_for(self.replies.get(), timeout)
        except TimeoutError:
            return None

    def kinds(self) -> list[int]:
        return [datagram[0] for datagram in self.sent]


@pytest.fixture
def server() -> tuple[NoiseRendezvous, Key]:
    private, public = generate_keypair()
    return NoiseRendezvous(private), public


async def registered(server: tuple[NoiseRendezvous, Key], where: Endpoint) -> Key:
    handler, server_public = server
    private, public = generate_keypair()
    await NoiseClient(Channel(handler, where), private, server_public).register(public)
    return public


async def test_a_lost_handshake_reply_is_retried(server):
    handler, server_public = server
    a = await registered(server, at("192.0.2.1", 1111))
    private, public = generate_keypair()
    channel = Channel(handler, at("192.0.2.2", 2222))
    channel.lose = 1
    client = NoiseClient(channel, private, server_public, retries=FAST)
    assert await client.lookup(public, a) == at("192.0.2.1", 1111)
    assert channel.kinds() == [wire.HANDSHAKE_INIT, wire.HANDSHAKE_INIT, wire.DATA]


async def test_a_lost_answer_is_asked_again_in_a_new_session(server):
    handler, server_public = server
    a = await registered(server, at("192.0.2.1", 1111))
    private, public = generate_keypair()
    channel = Channel(handler, at("192.0.2.2", 2222))
    client = NoiseClient(channel, private, server_public, retries=FAST)
    await client.register(public)
    channel.lose = 1
    assert await client.lookup(public, a) == at("192.0.2.1", 1111)
    assert channel.kinds() == [wire.HANDSHAKE_INIT, wire.DATA, wire.HANDSHAKE_INIT, wire.DATA]


async def test_a_late_answer_never_passes_for_the_next_one(server):
    handler, server_public = server
    a = await registered(server, at("192.0.2.1", 1111))
    b = await registered(server, at("192.0.2.3", 3333))
    private, public = generate_keypair()
    channel = Channel(handler, at("192.0.2.2", 2222))
    client = NoiseClient(channel, private, server_public, retries=FAST)
    await client.register(public)
    channel.hold = 1  # the answer about a comes too late: after its timeout
    assert await client.lookup(public, a) == at("192.0.2.1", 1111)
    # ...so late that it arrives while the client waits for its answer about b. Under the
    # session it was sealed in it would read as a valid answer; the client dropped that
    # session when it timed out, so it does not decrypt and is skipped.
    channel.inject = list(channel.held)
    assert await client.lookup(public, b) == at("192.0.2.3", 3333)


async def test_a_stale_or_forged_handshake_reply_is_skipped(server):
    handler, server_public = server
    a = await registered(server, at("192.0.2.1", 1111))
    private, public = generate_keypair()
    channel = Channel(handler, at("192.0.2.2", 2222))
    stale = wire.handshake_resp(7, bytes(wire.NOISE_RESP_LEN))
    channel.inject = [stale, b"", b"\x02", b"\x03" * 40]
    client = NoiseClient(channel, private, server_public, retries=FAST)
    assert await client.lookup(public, a) == at("192.0.2.1", 1111)
    assert channel.kinds() == [wire.HANDSHAKE_INIT, wire.DATA]  # no retry was needed


async def test_a_silent_server_is_an_error_after_the_last_try(server):
    handler, server_public = server
    private, public = generate_keypair()
    channel = Channel(handler, at("192.0.2.2", 2222))
    channel.lose = 100
    client = NoiseClient(channel, private, server_public, retries=FAST)
    with pytest.raises(NatpunchError, match="3 tries"):
        await client.lookup(public, public)
    assert channel.kinds() == [wire.HANDSHAKE_INIT] * 3


async def test_a_wrong_server_key_is_an_error_not_a_hang(server):
    handler, _ = server
    private, public = generate_keypair()
    channel = Channel(handler, at("192.0.2.2", 2222))
    client = NoiseClient(channel, private, generate_keypair()[1], retries=FAST)
    with pytest.raises(NatpunchError):
        await client.register(public)


async def test_legacy_client_retries_a_lost_reply_and_registers():
    handler = LegacyRendezvous()
    a_public, b_public = generate_keypair()[1], generate_keypair()[1]
    await LegacyClient(Channel(handler, at("192.0.2.1", 1111))).register(a_public)
    channel = Channel(handler, at("192.0.2.2", 2222))
    channel.lose = 2
    assert await LegacyClient(channel, retries=FAST).lookup(b_public, a_public) == \
        at("192.0.2.1", 1111)
    assert len(channel.sent) == 3
    assert handler.peers.get(b_public, time.monotonic()) == at("192.0.2.2", 2222)
