"""The observer's failure handling: a failed read is logged (throttled), retried on a freshly
opened device, and never changes the table. The device here is a scripted `Device` that
fails on demand, which the real wireguard-go will not do; reading a real device is in
test_registry_lab.py."""

import ipaddress
import logging

from wgpunch.errors import DeviceError, DeviceNotFound
from wgpunch.keys import Key
from wgpunch.registry.observer import Observer
from wgpunch.registry.state import RegistryState
from wgpunch.registry.timings import Timings
from wgpunch.wg.device import Device, DeviceState, Endpoint, PeerState

K1 = Key(bytes([1]) * 32)


def device_state(endpoint: str) -> DeviceState:
    peer = PeerState(K1, Endpoint.parse(endpoint), (ipaddress.ip_network("10.0.0.1/32"),),
                     None, 0, 0, 25, False)
    return DeviceState("wgtest", None, 51820, 0, (peer,))


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
