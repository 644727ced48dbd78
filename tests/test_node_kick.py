"""node/kick.py: a kick from the registry's tunnel address makes the agent watch anew when its
stream has not delivered the kick's revision by then, and nothing else does (real UDP on
loopback, the socket bound to `lo` as the agent's is to its WireGuard interface)."""

import asyncio
import contextlib
import ipaddress
import socket

import pytest

from wgpunch.node.kick import behind, follow_kicks, open_socket
from wgpunch.node.view import RegistryView
from wgpunch.protocol.kickwire import Kick, encode_kick

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
ELSEWHERE = (ipaddress.ip_network("10.99.0.254/32"),)
WAIT_S = 0.05


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def following(registry=LOOPBACK):
    view = RegistryView()
    view.epoch, view.revision = "e1", 5
    port = free_port()
    sock = open_socket("lo", port)
    assert sock is not None
    task = asyncio.create_task(follow_kicks(sock, view, registry, WAIT_S))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        def kick(data: bytes) -> None:
            sender.sendto(data, ("127.0.0.1", port))
        try:
            yield view, kick
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def relinked_within(view: RegistryView, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await view.relink.wait()
            return True
    return False


@pytest.mark.parametrize("intent, view_at, kick, expected", [
    ("the stream delivered it", ("e1", 7), Kick("e1", 7), False),
    ("the stream is ahead", ("e1", 9), Kick("e1", 7), False),
    ("the stream is behind", ("e1", 6), Kick("e1", 7), True),
    ("nothing delivered yet", ("e1", None), Kick("e1", 7), True),
    ("the registry restarted", ("e1", 9), Kick("e2", 1), True),
])
def test_behind(intent, view_at, kick, expected):
    view = RegistryView()
    view.epoch, view.revision = view_at
    assert behind(view, kick) is expected, intent


async def test_a_kick_the_stream_does_not_catch_up_with_makes_the_agent_watch_anew():
    async with following() as (view, kick):
        kick(encode_kick(Kick("e1", 6)))
        assert await relinked_within(view, 5.0)


async def test_a_kick_the_stream_catches_up_with_in_time_is_let_go():
    async with following() as (view, kick):
        kick(encode_kick(Kick("e1", 6)))
        view.revision = 6  # the stream delivers it within the wait
        assert not await relinked_within(view, 4 * WAIT_S)


@pytest.mark.parametrize("intent, data, registry", [
    ("not from the registry", encode_kick(Kick("e1", 6)), ELSEWHERE),
    ("malformed", b"WGKK\x01", LOOPBACK),
    ("already delivered", encode_kick(Kick("e1", 5)), LOOPBACK),
])
async def test_ignored(intent, data, registry):
    async with following(registry) as (view, kick):
        kick(data)
        assert not await relinked_within(view, 4 * WAIT_S), intent


def test_no_socket_without_its_interface():
    assert open_socket("no-such-if0", free_port()) is None
