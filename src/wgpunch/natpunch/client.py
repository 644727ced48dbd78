"""The natpunch protocols, client side: ask a rendezvous server for a peer's endpoint.

Both protocols are strict request/reply with nothing in a reply that names its request, so
one request is in flight at a time, replies waiting from earlier requests are drained first,
and, in Noise mode, a request that timed out ends its session: a late reply to it then fails
to decrypt under the next session's keys instead of passing for the next answer. Every wait
has a deadline and every request is retried (the reference clients wait forever on one lost
datagram, and crash on a stale handshake reply).

The transport is anything that sends a datagram to the server and receives its replies:
`rawudp.RawUdp` from the WireGuard port on a node, a plain UDP socket in tests.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from ..errors import MalformedPacket, NatpunchError, NoiseError
from ..keys import Key
from ..wg.model import Endpoint
from . import wire
from .noise import CipherState, HandshakeIK, ReplayWindow

log = logging.getLogger(__name__)


class Transport(Protocol):
    def send(self, payload: bytes) -> None: ...
    async def recv(self, timeout: float) -> bytes | None: ...  # noqa: ASYNC109


@dataclass(frozen=True, slots=True)
class Retries:
    """Our choices: a reply takes one round trip; three tries ride out a lost datagram."""

    timeout_s: float = 1.0
    attempts: int = 3


@dataclass(slots=True)
class _Session:
    index: int
    send: CipherState
    receive: CipherState
    window: ReplayWindow
    started: float
    sent: int = 0


class NoiseClient:
    """natpunch-go's protocol; the static key is the node's WireGuard private key."""

    REKEY_S = 300.0  # natpunch-go's RekeyDuration; the server keeps sessions longer

    def __init__(self, transport: Transport, private: Key, server: Key, *,
                 retries: Retries | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.transport = transport
        self._private = private.raw
        self.server = server
        self.retries = retries or Retries()
        self._clock = clock
        self._session: _Session | None = None

    async def lookup(self, mine: Key, target: Key) -> Endpoint | None:
        """`target`'s endpoint as the server saw it, None if it does not know it. Registers
        us too (the server records where the request came from)."""
        for _attempt in range(self.retries.attempts):
            session = self._session
            if session is None or self._clock() - session.started > self.REKEY_S:
                session = self._session = await self._handshake()
                if session is None:
                    continue
            found, answered = await self._ask(session, mine, target)
            if answered:
                return found
            self._session = None  # see the module docstring: no late reply may count
        raise NatpunchError(f"natpunch: no answer from the server after "
                            f"{self.retries.attempts} tries")

    async def register(self, mine: Key) -> None:
        """A handshake alone registers us (as the key we handshake with: `mine` is that)."""
        for _attempt in range(self.retries.attempts):
            self._session = await self._handshake()
            if self._session is not None:
                return
        raise NatpunchError(f"natpunch: no handshake with the server after "
                            f"{self.retries.attempts} tries")

    async def _handshake(self) -> _Session | None:
        await _drain(self.transport)
        handshake = HandshakeIK.initiator(self._private, self.server.raw, wire.PROLOGUE)
        our_index = secrets.randbits(32)
        message = handshake.write_message(wire.timestamp(time.time_ns()))
        self.transport.send(wire.handshake_init(our_index, message))
        async for data in _replies(self.transport, self.retries.timeout_s):
            try:
                index, noise = wire.parse_handshake_resp(data)
                handshake.read_message(noise)
            except (MalformedPacket, NoiseError) as error:
                # A reply to an earlier attempt, or not from the server: keep waiting.
                log.debug("natpunch: skipped a reply while handshaking: %s", error)
                continue
            send, receive = handshake.split()
            return _Session(index, send, receive, ReplayWindow(), self._clock())
        log.debug("natpunch: handshake timed out")
        return None

    async def _ask(self, session: _Session, mine: Key, target: Key
                   ) -> tuple[Endpoint | None, bool]:
        await _drain(self.transport)
        nonce = session.sent
        session.sent += 1
        sealed = session.send.encrypt(nonce, b"", wire.lookup_body(mine, target))
        self.transport.send(wire.request(session.index, nonce, sealed))
        async for data in _replies(self.transport, self.retries.timeout_s):
            try:
                counter, body = wire.parse_reply(data)
                plain = session.receive.decrypt(counter, b"", body)
                if not session.window.accept(counter):
                    raise MalformedPacket(f"reply counter {counter} replayed")
                return wire.decode_address(plain), True
            except (MalformedPacket, NoiseError, ValueError) as error:
                log.debug("natpunch: skipped a reply: %s", error)
        return None, False


class LegacyClient:
    """The wireguard-tools example protocol: no session, no authentication."""

    def __init__(self, transport: Transport, *, retries: Retries | None = None) -> None:
        self.transport = transport
        self.retries = retries or Retries()

    async def lookup(self, mine: Key, target: Key) -> Endpoint | None:
        for _attempt in range(self.retries.attempts):
            await _drain(self.transport)
            self.transport.send(wire.legacy_request(mine, target))
            async for data in _replies(self.transport, self.retries.timeout_s):
                try:
                    return wire.parse_legacy_reply(data)
                except (MalformedPacket, ValueError) as error:
                    log.debug("natpunch legacy: skipped a reply: %s", error)
        raise NatpunchError(f"natpunch legacy: no answer from the server after "
                            f"{self.retries.attempts} tries")

    async def register(self, mine: Key) -> None:
        """A lookup of the all-zero key registers us and asks for nothing."""
        await self.lookup(mine, Key(bytes(32)))


async def _replies(transport: Transport, timeout_s: float) -> AsyncIterator[bytes]:
    """Datagrams from the server until `timeout_s` from now."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while (left := deadline - loop.time()) > 0:
        data = await transport.recv(left)
        if data is None:
            return
        yield data


async def _drain(transport: Transport) -> None:
    while await transport.recv(0) is not None:
        pass
