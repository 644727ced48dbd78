"""The observer's failure handling: a failed read is logged (throttled), retried on a freshly
opened device, and never changes the table; and how reads are applied (the first of a device
in full, later ones as changes). The device here is a scripted `Device` that
fails on demand, which the real wireguard-go will not do; reading a real device is in
test_registry_lab.py."""

import asyncio
import contextlib
import ipaddress
import json
import logging

from wgpunch.errors import DeviceError, DeviceNotFound
from wgpunch.keys import Key
from wgpunch.protocol import item_from_json
from wgpunch.registry.observer import APPLY_SLICE, Observer
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings
from wgpunch.wg.device import Device
from wgpunch.wg.model import DeviceState, Endpoint, PeerState

K1, K2, K3 = (Key(bytes([n]) * 32) for n in (1, 2, 3))


def peer_state(key: Key, endpoint: str) -> PeerState:
    return PeerState(key, Endpoint.parse(endpoint), (ipaddress.ip_network("10.0.0.1/32"),),
                     None, 0, 0, 25, False)


def snapshot(*peers: PeerState) -> DeviceState:
    return DeviceState("wgtest", None, 51820, 0, peers)


def device_state(endpoint: str) -> DeviceState:
    return snapshot(peer_state(K1, endpoint))


class ScriptedDevice(Device):
    backend = "script"

    def __init__(self, script: list) -> None:
        super().__init__("wgtest")
        self.script = script
        self.closed = False

    async def _read(self):
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item, {}

    async def _write(self, changes):
        raise NotImplementedError

    async def close(self) -> None:
        self.closed = True


async def test_failed_reads_are_throttled_retried_and_keep_the_table(caplog):
    script = [device_state("192.0.2.1:1"), DeviceNotFound("uapi: wgtest: gone"),
              DeviceError("uapi: wgtest: timeout"), DeviceNotFound("uapi: wgtest: gone"),
              RuntimeError("a parser bug"), device_state("192.0.2.1:2")]
    opened: list[ScriptedDevice] = []

    def opener() -> ScriptedDevice:
        opened.append(ScriptedDevice(script))
        return opened[-1]

    now = [0.0]
    state = RegistryState()
    observer = Observer(opener, state, Timings(device_error_log_s=30.0), clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="wgpunch.registry"):
        assert await observer.poll_once()
        for t in (1.0, 2.0, 3.0):  # three failures inside one throttle period
            now[0] = t
            assert not await observer.poll_once()
            assert str(state.peers[K1].endpoint) == "192.0.2.1:1"  # the last table stays
        now[0] = 40.0
        assert not await observer.poll_once()
        assert observer.failures == 4
        assert await observer.poll_once()
    assert str(state.peers[K1].endpoint) == "192.0.2.1:2" and state.revision == 2
    assert len(opened) == 5 and all(d.closed for d in opened[:4])  # a fresh device each retry
    records = [r for r in caplog.records if r.name.endswith("observer")]
    assert [r.getMessage() for r in records] == [
        "cannot read the device, serving the last table: uapi: wgtest: gone",
        "unexpected error reading the device, serving the last table "
        "(2 more failures not logged)",
        "device wgtest readable again after 4 failed reads (0 not logged)",
    ]
    assert records[1].exc_info is not None  # a bug shows its traceback, once


ONE, TWO = peer_state(K1, "192.0.2.1:1"), peer_state(K2, "192.0.2.2:2")
MOVED, THREE = peer_state(K1, "192.0.2.1:9"), peer_state(K3, "192.0.2.3:3")


async def test_changes_of_a_backend_without_its_own_compare_snapshots():
    """`Device.changes` as netlink (and this script) get it; uapi's own is in
    test_wg_uapi.py."""
    device = ScriptedDevice([snapshot(ONE, TWO), snapshot(TWO, ONE), snapshot(MOVED, THREE)])
    first = await device.changes()
    assert first.complete and (first.changed, first.removed) == ((ONE, TWO), ())
    second = await device.changes()
    assert not second.complete and (second.changed, second.removed) == ((), ())
    third = await device.changes()
    assert (third.changed, third.removed) == ((MOVED, THREE), (K2,))


async def test_a_reopened_device_is_read_in_full_and_replaces_the_table():
    """Between reads of one device only changes are applied; the first read of a device
    opened afresh (here after a failure) is the whole table: what it lacks is gone."""
    script = [snapshot(ONE, TWO), snapshot(MOVED, TWO), DeviceNotFound("uapi: wgtest: gone"),
              snapshot(THREE)]
    state = RegistryState()
    observer = Observer(lambda: ScriptedDevice(script), state, Timings())
    assert await observer.poll_once() and await observer.poll_once()
    assert set(state.peers) == {K1, K2} and str(state.peers[K1].endpoint) == "192.0.2.1:9"
    assert not await observer.poll_once()
    assert await observer.poll_once()
    assert set(state.peers) == {K3} and state.revision == 6  # K1, K2, K1 moved, K3, -K1, -K2


async def test_many_changes_of_one_read_are_all_applied_in_slices():
    """A read with more changed peers than one slice (and a peer gone): after the poll the
    table holds every change, each published once, in consecutive revisions."""
    keys = [Key(i.to_bytes(32, "big")) for i in range(1, 2 * APPLY_SLICE + 7)]
    before = snapshot(*(peer_state(k, "192.0.2.1:1") for k in keys))
    after = snapshot(*(peer_state(k, "192.0.2.1:2") for k in keys[1:]))
    script = [before, after]
    state = RegistryState(stream_queue_max=4 * len(keys))
    observer = Observer(lambda: ScriptedDevice(script), state, Timings())
    assert await observer.poll_once()
    stream, _ = state.open_stream(keys[0], state.revision, state.epoch, now=0.0)
    assert await observer.poll_once()
    assert set(state.peers) == set(keys[1:])
    assert {str(record.endpoint) for record in state.peers.values()} == {"192.0.2.1:2"}
    events = [item_from_json(json.loads(stream.queue.get_nowait()))
              for _ in range(stream.queue.qsize())]
    assert [event.revision for event in events] == list(
        range(len(keys) + 1, 2 * len(keys) + 1))  # one removal and len(keys) - 1 moves


async def test_the_pace_is_quick_after_a_change_or_a_nudge_and_slow_when_quiet():
    """`interval()`, row by row: what makes the quick pace, and when it ends."""
    now = [0.0]
    script = [snapshot(ONE), snapshot(ONE), snapshot(MOVED), snapshot(MOVED)]
    observer = Observer(lambda: ScriptedDevice(script), RegistryState(),
                        Timings(poll_interval_s=1.0, poll_fast_for_s=5.0, poll_fast_factor=0.25),
                        clock=lambda: now[0])
    assert await observer.poll_once() and observer.interval() == 1.0  # the first, whole read
    assert await observer.poll_once() and observer.interval() == 1.0  # nothing changed
    now[0] = 10.0
    assert await observer.poll_once() and observer.interval() == 0.25  # K1's endpoint moved
    now[0] = 14.9
    assert observer.interval() == 0.25
    now[0] = 15.0
    assert observer.interval() == 1.0  # poll_fast_for_s after the change
    assert await observer.poll_once() and observer.interval() == 1.0  # counters alone: quiet
    observer.nudge()
    assert observer.interval() == 0.25
    # A read too slow for the quick pace: the pace keeps reads to a quarter of the time.
    assert observer.interval(took=0.1) == 0.4 and observer.interval(took=0.5) == 1.0
    now[0] = 20.0
    assert observer.interval() == 1.0


class SameDevice(ScriptedDevice):
    """Reads the same table forever, counting the reads."""

    async def _read(self):
        self.script.append(None)
        return snapshot(ONE), {}


async def test_a_nudge_brings_the_next_read_forward():
    """The real loop on the real clock: with 30 s between reads, a nudge gets the next one
    at the quick pace (0.3 s here), and the reads after it stay quick for a while."""
    reads: list[None] = []
    observer = Observer(lambda: SameDevice(reads), RegistryState(),
                        Timings(poll_interval_s=30.0, poll_fast_factor=0.01,
                                poll_fast_for_s=60.0))
    task = asyncio.create_task(observer.run())
    try:
        await until(lambda: len(reads) == 1, "the first read")
        await asyncio.sleep(0.5)  # waited past the quick pace: nothing read yet
        assert len(reads) == 1
        observer.nudge()
        await until(lambda: len(reads) >= 3, "the nudged read and a quick one after it")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(check, what: str, within_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # poll interval, bounded by the deadline
