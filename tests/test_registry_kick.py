"""registry/kick.py: a node whose observed endpoint moves gets kicks on each of its streams,
`kicks` in all while the stream stays open, and nothing else does (real UDP on loopback)."""

import asyncio
import contextlib
import ipaddress
import socket

import pytest

from wgpunch.keys import Key
from wgpunch.protocol.kickwire import Kick, parse_kick
from wgpunch.registry.kick import Kicker
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings
from wgpunch.wg.model import Endpoint, PeerState

K1, K2 = (Key(bytes([n]) * 32) for n in (1, 2))
T = Timings(kick_again_s=0.05, kicks=3)


def peer(key: Key, endpoint: str | None, allowed: str = "10.0.0.1/32") -> PeerState:
    return PeerState(public_key=key, endpoint=None if endpoint is None else
                     Endpoint.parse(endpoint),
                     allowed_ips=(ipaddress.ip_network(allowed),), latest_handshake=None,
                     rx_bytes=0, tx_bytes=0, persistent_keepalive=25, has_preshared_key=False)


@pytest.fixture
def node_socket():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        yield sock


@pytest.fixture
def kicked(node_socket):
    state = RegistryState(epoch="e1")
    kicker = Kicker(state, T, port=node_socket.getsockname()[1])
    state.on_moved = kicker.moved
    yield state, kicker
    kicker.close()


async def kicks_within(sock: socket.socket, seconds: float) -> list[Kick]:
    """Every kick that arrives within `seconds` (the deadline, not a synchronisation)."""
    loop = asyncio.get_running_loop()
    found = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while True:
                found.append(parse_kick(await loop.sock_recv(sock, 100)))
    return found


async def test_a_node_that_moves_is_kicked_on_its_stream_while_it_stays_open(
        kicked, node_socket):
    state, _kicker = kicked
    state.observe([peer(K1, "198.51.100.2:20000"), peer(K2, "198.51.100.6:20000")])
    stream, _ = state.open_stream(K1, None, None, now=0.0, address="127.0.0.1")
    state.observe([peer(K1, "198.51.100.2:20001"), peer(K2, "198.51.100.6:20000")])
    assert await kicks_within(node_socket, 10 * T.kick_again_s) == [Kick("e1", state.revision)] * 3
    state.observe([peer(K1, "198.51.100.2:20002"), peer(K2, "198.51.100.6:20000")])
    state.close_stream(stream)  # the node watches anew: the repeats stop
    assert await kicks_within(node_socket, 10 * T.kick_again_s) == [Kick("e1", state.revision)]


@pytest.mark.parametrize("intent, before, after", [
    ("another node moves", [("K2", "198.51.100.6:1")], [("K2", "198.51.100.6:2")]),
    ("the node appears", [], [("K1", "198.51.100.2:1")]),
    ("the node gets its first endpoint", [("K1", None)], [("K1", "198.51.100.2:1")]),
    ("the node loses its endpoint", [("K1", "198.51.100.2:1")], [("K1", None)]),
    ("only its allowed IPs change", [("K1", "198.51.100.2:1")],
     [("K1", "198.51.100.2:1", "10.0.0.9/32")]),
])
async def test_no_kick(kicked, node_socket, intent, before, after):
    state, kicker = kicked
    keys = {"K1": K1, "K2": K2}
    state.observe([peer(keys[k], *rest) for k, *rest in before])
    state.open_stream(K1, None, None, now=0.0, address="127.0.0.1")
    state.observe([peer(keys[k], *rest) for k, *rest in after])
    assert await kicks_within(node_socket, 2 * T.kick_again_s) == [], intent
    assert kicker.sent == 0


async def test_a_stream_without_an_address_is_not_kicked(kicked, node_socket):
    state, kicker = kicked
    state.observe([peer(K1, "198.51.100.2:1")])
    state.open_stream(K1, None, None, now=0.0)
    state.observe([peer(K1, "198.51.100.2:2")])
    assert await kicks_within(node_socket, 2 * T.kick_again_s) == []
    assert kicker.sent == 0
