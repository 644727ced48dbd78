"""The node's registry client (node/client.py over node/http.py) against the real registry
application on loopback (127.0.0.1 is peer A's tunnel address, as in test_registry_api.py):
requests, errors with their status, the watch stream (changes and punch events), silence, and
kept-alive connections that the registry closed meanwhile. test_node_http.py has the HTTP
client's own edge cases, against a throwaway server."""

import asyncio
import ipaddress
import socket

import pytest

from test_registry_api import QUIET, A, B, start, table
from wgpunch.errors import ApiError
from wgpunch.keys import Key
from wgpunch.node.client import RegistryClient
from wgpunch.protocol import PeerEvent, PunchEvent, Reported, Snapshot
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings

REPORT = Reported(51820, (ipaddress.ip_address("192.168.1.2"),), "0.1.0")
READ_S = 3.0


async def follow(client: RegistryClient, count: int, since=None, epoch=None) -> list:
    events = []
    async with asyncio.timeout(READ_S):
        async for event in client.watch(since, epoch):
            events.append(event)
            if len(events) == count:
                return events
    return events


@pytest.fixture
async def served():
    state = RegistryState(epoch="e1", punch_window_s=QUIET.punch_coalesce_s)
    state.observe(table())
    reg = await start(state)
    client = RegistryClient(f"http://127.0.0.1:{reg.port}", timeout_s=2.0)
    yield reg, client
    await client.close()
    await reg.close()


async def test_requests_read_and_change_the_registry(served):
    reg, client = served
    snapshot = await client.peers()
    assert (snapshot.epoch, snapshot.revision) == ("e1", 3)
    await client.report_self(REPORT)
    assert reg.state.peers[A].reported == REPORT
    await client.punch(B)  # both have endpoints: 202


@pytest.mark.parametrize(("intent", "target", "status"), [
    ("an unknown peer", Key(bytes([9]) * 32), 404),
    ("a node naming itself", A, 400),
])
async def test_a_refusal_is_an_api_error_with_its_status_and_reason(served, intent, target,
                                                                   status):
    _reg, client = served
    with pytest.raises(ApiError) as caught:
        await client.punch(target)
    assert caught.value.status == status, intent
    assert f"{status} punch: " in str(caught.value), intent


async def test_watch_starts_with_a_snapshot_then_follows_changes_and_punches(served):
    reg, client = served
    events = []
    async with asyncio.timeout(READ_S):
        async for event in client.watch(None, None):
            events.append(event)
            if len(events) == 1:
                reg.state.report(A, REPORT)
            elif len(events) == 2:
                await client.punch(B)
            else:
                break
    first, second, third = events
    assert isinstance(first, Snapshot) and first.revision == 3
    assert isinstance(second, PeerEvent) and second.peer.reported == REPORT
    assert isinstance(third, PunchEvent)
    assert (third.peer, str(third.endpoint)) == (B, "203.0.113.2:4000")


async def test_watch_resumes_from_a_revision(served):
    reg, client = served
    reg.state.report(A, REPORT)  # revision 4
    [event] = await follow(client, 1, since=3, epoch="e1")
    assert isinstance(event, PeerEvent) and event.revision == 4


async def test_a_silent_watch_stream_is_dead_after_the_heartbeat_timeout():
    state = RegistryState(epoch="e1")
    state.observe(table())
    reg = await start(state, Timings(heartbeat_s=30.0))
    client = RegistryClient(f"http://127.0.0.1:{reg.port}", heartbeat_timeout_s=0.2)
    try:
        with pytest.raises(ApiError, match=r"nothing for 0\.2 s"):
            await follow(client, 2, since=3, epoch="e1")  # nothing comes after the head
    finally:
        await client.close()
        await reg.close()


async def test_no_registry_is_an_api_error_without_status():
    with socket.socket() as sock:  # a port that nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = RegistryClient(f"http://127.0.0.1:{port}", timeout_s=1.0)
    try:
        with pytest.raises(ApiError) as caught:
            await client.peers()
        assert caught.value.status == 0 and str(caught.value).startswith("registry: GET ")
        with pytest.raises(ApiError, match=r"registry: GET \S+/v1/watch: "):
            await follow(client, 1)
    finally:
        await client.close()


async def test_a_kept_alive_connection_the_registry_closed_is_replaced():
    """The registry closes idle connections (Timings.idle_timeout_s); the next request goes
    on a new connection instead of failing."""
    state = RegistryState(epoch="e1")
    state.observe(table())
    reg = await start(state, Timings(idle_timeout_s=0.1, heartbeat_s=30.0))
    client = RegistryClient(f"http://127.0.0.1:{reg.port}", timeout_s=2.0)
    try:
        await client.peers()
        idle = client._http._idle[0]
        async with asyncio.timeout(READ_S):
            await idle.reader.read()  # the registry closed it: EOF
        assert (await client.peers()).revision == 3
        assert (await client.peers()).revision == 3  # and that new one is kept
        assert client._http._idle and client._http._idle[0] is not idle
    finally:
        await client.close()
        await reg.close()


async def test_the_bearer_token_goes_with_every_request_and_the_stream():
    state = RegistryState(epoch="e1")
    state.observe(table())
    reg = await start(state, token="s3cret")
    with_token = RegistryClient(f"http://127.0.0.1:{reg.port}", token="s3cret")
    without = RegistryClient(f"http://127.0.0.1:{reg.port}")
    try:
        assert (await with_token.peers()).revision == 3
        [snapshot] = await follow(with_token, 1)
        assert isinstance(snapshot, Snapshot)
        with pytest.raises(ApiError) as caught:
            await without.peers()
        assert caught.value.status == 401
    finally:
        await with_token.close()
        await without.close()
        await reg.close()
