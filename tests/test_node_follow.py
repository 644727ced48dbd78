"""follow.py's watch stream ends at once when the tunnel to the registry answers again after
it was dead (RegistryView.relink), so that a new stream replaces one that TCP's
retransmission back-off would hold up."""

import asyncio
from collections.abc import AsyncIterator

import pytest

from wgpunch.errors import ApiError
from wgpunch.node.follow import until_set
from wgpunch.protocol import Event, Heartbeat


async def one_then_silence(closed: list[bool]) -> AsyncIterator[Event]:
    try:
        yield Heartbeat(7)
        await asyncio.Event().wait()  # a stream that went quiet
    finally:
        closed.append(True)


async def test_a_quiet_stream_gives_way_when_relink_is_set():
    closed: list[bool] = []
    relink = asyncio.Event()
    stream = until_set(one_then_silence(closed), relink)
    assert await anext(stream) == Heartbeat(7)
    later = asyncio.get_running_loop().call_later(0.05, relink.set)
    try:
        with pytest.raises(ApiError, match="works again"):
            async with asyncio.timeout(5):
                await anext(stream)
    finally:
        later.cancel()
    assert closed == [True]  # the underlying stream (and its connection) is closed


async def test_events_pass_and_the_end_is_the_end():
    async def two() -> AsyncIterator[Event]:
        yield Heartbeat(1)
        yield Heartbeat(2)

    assert [e async for e in until_set(two(), asyncio.Event())] == [Heartbeat(1), Heartbeat(2)]
