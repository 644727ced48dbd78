"""The supervisor behind `wgpunch node` without `--interface` (node/fleet.py), on two real
wireguard-go devices (tests/wgpair.py): which interfaces qualify is read from the devices;
only the listing of interfaces is the test's (the devices live in other namespaces, where
this process's `list_devices` cannot see them), so that interfaces can appear and vanish."""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wgpair import Side, unique_prefix, wg_pair
from wgpunch.errors import ConfigError
from wgpunch.keys import generate_keypair
from wgpunch.node.fleet import Fleet
from wgpunch.wg.device import DeviceState
from wgpunch.wg.uapi import UapiDevice

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="wireguard-go not installed"),
]

REGISTRY = generate_keypair()[1]


def has_registry(state: DeviceState) -> bool:
    return state.peer(REGISTRY) is not None


class Agents:
    """A `steer` that records which interfaces run an agent now; `fail` makes one end."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self.starts: list[str] = []
        self.fail: dict[str, Exception] = {}

    async def steer(self, name: str) -> None:
        self.starts.append(name)
        if name in self.fail:
            raise self.fail[name]
        self.running.add(name)
        try:
            await asyncio.Event().wait()  # until cancelled, as an agent runs
        finally:
            self.running.discard(name)


@pytest.fixture
def sides(tmp_path: Path) -> Iterator[tuple[Side, Side]]:
    with wg_pair(tmp_path, unique_prefix("fl")) as (a, b):
        a.wg_set("peer", REGISTRY.base64(), "allowed-ips", "10.77.0.254/32")
        yield a, b


async def until(check: Callable[[], bool], what: str, within_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)  # poll interval, bounded by the deadline


async def test_agents_follow_interfaces_that_qualify_appear_and_vanish(sides, caplog):
    a, b = sides
    present = [a.ifname, b.ifname]
    agents = Agents()

    async def devices() -> list[str]:
        return list(present)

    fleet = Fleet(agents.steer, has_registry, rescan_s=0.05, devices=devices,
                  opener=UapiDevice)
    task = asyncio.create_task(fleet.run())
    try:
        await until(lambda: agents.running == {a.ifname}, "an agent on a only")
        b.wg_set("peer", REGISTRY.base64(), "allowed-ips", "10.77.0.254/32")  # b qualifies
        await until(lambda: agents.running == {a.ifname, b.ifname}, "an agent on b too")
        present.remove(b.ifname)  # wg-quick down
        await until(lambda: agents.running == {a.ifname}, "b's agent stopped")
        a.wg_set("peer", REGISTRY.base64(), "remove")  # a no longer has the registry
        await until(lambda: not agents.running, "a's agent stopped")
        present.append(b.ifname)  # back, still with the registry's peer
        await until(lambda: agents.running == {b.ifname}, "b steered again")
        assert agents.starts == [a.ifname, b.ifname, b.ifname]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert not agents.running  # the supervisor stops every agent on its way out


async def test_an_agent_that_ends_is_logged_once_and_started_again(sides, caplog):
    a, _ = sides
    agents = Agents()
    agents.fail[a.ifname] = ConfigError(f"node: another agent already steers {a.ifname}")

    async def devices() -> list[str]:
        return [a.ifname, "nosuchwg0"]  # one gone between listing and reading

    fleet = Fleet(agents.steer, has_registry, rescan_s=0.02, devices=devices,
                  opener=UapiDevice)
    task = asyncio.create_task(fleet.run())
    try:
        await until(lambda: len(agents.starts) >= 4, "the agent to be started again")
        del agents.fail[a.ifname]  # the other agent went away
        await until(lambda: agents.running == {a.ifname}, "the agent to run")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    ended = [r for r in caplog.records if getattr(r, "event", None) == "agent_ended"]
    assert len(ended) == 1 and "another agent already steers" in ended[0].getMessage()
    assert ended[0].levelno == logging.WARNING
    assert set(agents.starts) == {a.ifname}

