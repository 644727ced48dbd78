"""node/pace.py and the shared read under it (wg/device.py `state(fresh_s=...)`): a device
held in memory that counts its reads, and the real event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from polling import poll
from wgpunch.keys import Key, generate_keypair
from wgpunch.node.pace import next_pass
from wgpunch.wg.device import Device
from wgpunch.wg.model import DeviceState, PeerConfig


class Counted(Device):
    """Reads and writes counted; a write waits for `release` when it is given one."""

    backend = "memory"

    def __init__(self) -> None:
        super().__init__("wgp")
        self.reads = 0
        self.release: asyncio.Event | None = None
        self.listened: list[int] = []  # how many read listeners each read found

    async def _read(self) -> tuple[DeviceState, dict[Key, Key]]:
        self.reads += 1
        self.listened.append(len(self.read_listeners))
        return DeviceState(self.name, None, 51820, 0, ()), {}

    async def _write(self, changes: Sequence[PeerConfig]) -> None:
        if self.release is not None:
            await self.release.wait()


@pytest.mark.parametrize(("fresh_s", "reads", "intent"), [
    (60.0, 1, "a read that began within fresh_s is shared"),
    (0.0, 2, "without fresh_s every call reads"),
    (1e-9, 2, "a read older than fresh_s is not shared"),
])
async def test_a_read_is_shared_within_fresh_s(fresh_s: float, reads: int, intent: str) -> None:
    device = Counted()
    first = await device.state()
    again = await device.state(fresh_s=fresh_s)
    assert device.reads == reads, intent
    assert (again is first) is (reads == 1)


async def test_a_read_that_began_during_a_write_is_not_shared() -> None:
    device = Counted()
    device.release = asyncio.Event()
    writing = asyncio.create_task(device.configure([PeerConfig(generate_keypair()[1])]))
    await poll(lambda: device.reads == 1, within_s=5, what="the write's own read")
    await device.state()  # under way while the write is: it may show the device before it
    device.release.set()
    await writing
    await device.state(fresh_s=60)
    assert device.reads == 3


async def test_an_idle_wait_ends_with_another_loops_read_in_its_second_half() -> None:
    device, wake = Counted(), asyncio.Event()
    waiting = asyncio.create_task(next_pass(wake, device, 0.4, 0.4))
    await device.state()  # in the first half: no reason to pass yet
    assert not waiting.done() and not wake.is_set()
    await poll(lambda: device.read_listeners, within_s=5, what="the second half")
    await device.state()
    await asyncio.wait_for(waiting, 5)  # a bound for a hang, not a timing
    assert wake.is_set() and device.read_listeners == []


async def test_a_busy_wait_takes_no_read_for_a_reason() -> None:
    device, wake = Counted(), asyncio.Event()
    waiting = asyncio.create_task(next_pass(wake, device, 0.2, 1.0))
    while not waiting.done():
        await device.state()
        await asyncio.wait([waiting], timeout=0.01)  # a read every 10 ms until the wait ends
    assert device.reads > 1 and set(device.listened) == {0}, "nothing listened"
    assert not wake.is_set()


async def test_an_event_ends_the_wait_at_once() -> None:
    device, wake = Counted(), asyncio.Event()
    waiting = asyncio.create_task(next_pass(wake, device, 60.0, 60.0))
    await asyncio.sleep(0)
    wake.set()
    await asyncio.wait_for(waiting, 5)
    assert device.read_listeners == []
