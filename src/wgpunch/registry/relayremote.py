"""A relay on another host, as the registry sees it: the client of its control API
(relaycontrol.py, signed with relayauth.py) and what its last answer said: whether it
answers, the slots it holds, its free ports. Which relay a pair gets is relaypool.py's
business.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from ..errors import MalformedMessage, RelayError
from ..keys import Key
from ..protocol import dumps, pair_of
from ..wg.model import Endpoint, IPAddress
from .relayauth import HEADER, answer_matches, sign_request
from .relaycontrol import pause_request_json, ports_from, slot_request_json, slots_from

# Our choice: a relay host answers within milliseconds; a node's slot request waits at most
# this long for one that does not before the next relay is asked.
CONTROL_TIMEOUT_S = 2.0
MAX_ANSWER_BYTES = 1 << 20  # ~10,000 slots listed


class RemoteRelay:
    """`control`: the relay's control API; slots are on the same IP (`address`), which is
    what nodes are told to send to."""

    def __init__(self, control: Endpoint, secret: bytes,
                 clock: Callable[[], float] = time.time) -> None:
        self.control = control
        self.secret = secret
        self.clock = clock
        self.healthy = True  # its last answer came, signed; until the first, assumed
        self.error: str | None = None  # why it is not healthy
        # The slots it holds, by pair (protocol.pair_of order, the ports in that order).
        self.slots: dict[tuple[Key, Key], tuple[int, int]] = {}
        self.paused: set[tuple[Key, Key]] = set()  # of them, pairs that went direct
        self.free_ports: int | None = None

    @property
    def address(self) -> IPAddress:
        return self.control.ip

    def __str__(self) -> str:
        return f"relay {self.control}"

    def port_of(self, node: Key, pair: tuple[Key, Key]) -> int | None:
        """The port `node`'s device sends to in the pair's slot here, if it holds one."""
        ports = self.slots.get(pair)
        return None if ports is None else ports[pair.index(node)]

    async def allocate(self, session: aiohttp.ClientSession | None, node: Key, node_ip: str,
                       peer: Key, peer_ip: str) -> tuple[int, int, bool]:
        """The pair's slot here: `node`'s port, `peer`'s port, and whether it was made now
        (relaycontrol.py: `node`'s side may move when it existed)."""
        assert session is not None  # RelayPool.start made it, as it has remote relays
        body = dumps(slot_request_json(node, node_ip, peer, peer_ip)).encode()
        status, answer = await self._call(session, "POST", "/v1/slots", body)
        mine, theirs = ports_from(answer)
        pair = pair_of(node, peer)
        self.slots[pair] = (mine, theirs) if pair[0] == node else (theirs, mine)
        self.paused.discard(pair)
        return mine, theirs, status == 201

    async def pause(self, session: aiohttp.ClientSession | None, node: Key, peer: Key) -> bool:
        """Stop the pair's slot here (it went direct): whether the switch goes ahead, as
        Relay.pause says."""
        assert session is not None
        body = dumps(pause_request_json(node, peer)).encode()
        _status, answer = await self._call(session, "POST", "/v1/slots/pause", body)
        self.paused.add(pair_of(node, peer))  # no longer replayed to streams
        return isinstance(answer, dict) and answer.get("paused") is True

    async def refresh(self, session: aiohttp.ClientSession) -> None:
        """Read its slots and free ports; healthy or not by whether it answered."""
        try:
            _status, answer = await self._call(session, "GET", "/v1/slots", b"")
            listed, self.free_ports = slots_from(answer)
        except RelayError:
            return
        except MalformedMessage as error:
            self._failed(str(error))
            return
        self.slots = {pair_of(*nodes): ports if pair_of(*nodes) == nodes else ports[::-1]
                      for nodes, ports in listed.items()}
        self.paused &= set(self.slots)

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str,
                    body: bytes) -> tuple[int, Any]:
        header, nonce = sign_request(self.secret, method, path, body, self.clock())
        url = f"http://{self.control}{path}"
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT_S):
                async with session.request(
                        method, url, data=body or None, allow_redirects=False,
                        headers={HEADER: header, "Content-Type": "application/json"}) as resp:
                    answer = await resp.content.read(MAX_ANSWER_BYTES)
                    status, signature = resp.status, resp.headers.get(HEADER)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise self._failed(f"no answer ({error or type(error).__name__})") from None
        if not answer_matches(self.secret, signature, nonce, status, answer):
            raise self._failed(f"HTTP {status} without our signature (another secret?)")
        try:
            parsed = json.loads(answer)
        except ValueError:
            raise self._failed("an answer that is not JSON") from None
        self.healthy, self.error = True, None  # it answers, signed: whatever it says
        if status not in (200, 201):
            why = parsed.get("error") if isinstance(parsed, dict) else None
            raise RelayError(f"{self}: refused: {str(why)[:200]}")
        return status, parsed

    def _failed(self, why: str) -> RelayError:
        self.healthy, self.error = False, why
        return RelayError(f"{self}: {why}")
