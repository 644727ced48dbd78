"""The poll loop of registries that can only be asked (DNS-SD, natpunch)."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from wgpunch.errors import ApiError, DeviceError
from wgpunch.node.source import polled
from wgpunch.protocol import Snapshot


async def test_fractional_intervals_are_honoured_start_to_start():
    loop = asyncio.get_running_loop()
    starts: list[float] = []

    async def snapshot() -> Snapshot:
        starts.append(loop.time())
        await asyncio.sleep(0.05)  # a poll that takes time: the pause is what is left
        return Snapshot("x", 0, ())

    stream = polled(0.3, snapshot)
    for _ in range(4):
        await anext(stream)
    await stream.aclose()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Never sooner than the interval (natpunch-go's client truncates -d 0.3 to no pause);
    # later only by what the machine adds, so no upper bound is asserted.
    assert all(gap >= 0.3 - 0.002 for gap in gaps), gaps


async def test_a_failing_device_is_an_api_error_the_agent_retries():
    async def snapshot() -> Snapshot:
        raise DeviceError("uapi: wg0: gone")

    with pytest.raises(ApiError, match="wg0: gone"):
        await anext(polled(1.0, snapshot))
