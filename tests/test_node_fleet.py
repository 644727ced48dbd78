"""The supervisor behind `wgpunch node` without `--interface` (node/fleet.py), on two real
wireguard-go devices (tests/wgpair.py): which interfaces qualify is read from the devices;
only the listing of interfaces is the test's (the devices live in other namespaces, where
this process's `list_devices` cannot see them), so that interfaces can appear and vanish."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wgpair import Side, unique_prefix, wg_pair
from wgpunch.errors import ConfigError
from wgpunch.keys import generate_keypair
from wgpunch.lab.netns import Namespace, WireguardGo, python_module, stop_process, wait_for
from wgpunch.lab.state import remove_agent_files
from wgpunch.node.fleet import Fleet
from wgpunch.wg.model import DeviceState
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



# -- the real command: one process, two interfaces, two registries ---------------------------------

def test_one_node_process_steers_two_interfaces_that_follow_different_registries(tmp_path):
    """`wgpunch node --registry K1 --registry K2` without --interface, in a namespace with
    two wireguard-go interfaces, each with one of the registries as a peer: one agent per
    interface, each following its own registry; an interface that vanishes is let go of;
    SIGTERM stops both (exit 0). The registries are nowhere: only the agents' own start is
    judged, from their log."""
    prefix = unique_prefix("fm")
    ns = Namespace(f"{prefix}-a")
    names = [f"{prefix}awg", f"{prefix}bwg"]
    registries = [generate_keypair()[1] for _ in names]
    daemons = [WireguardGo(ns, name) for name in names]
    log = tmp_path / "node.log"
    try:
        ns.add()
        for n, (name, daemon, registry) in enumerate(zip(names, daemons, registries,
                                                         strict=True)):
            daemon.start()
            keyfile = tmp_path / f"{name}.key"
            keyfile.write_text(generate_keypair()[0].base64())
            ns.run(["wg", "set", name, "private-key", str(keyfile), "peer", registry.base64(),
                    "allowed-ips", f"10.7{n}.0.254/32"])
            ns.run(["ip", "addr", "add", f"10.7{n}.0.1/24", "dev", name])
            ns.run(["ip", "link", "set", name, "up"])
        argv, env = python_module("wgpunch.cli", "--log-format", "json", "node",
                                  *(a for k in registries for a in ("--registry", k.base64())))
        with log.open("w") as out:
            proc = ns.popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        try:
            def started() -> dict[str, str]:
                assert proc.poll() is None, log.read_text()
                lines = [json.loads(line) for line in log.read_text().splitlines()
                         if line.startswith("{")]
                return {e["interface"]: e["msg"] for e in lines if e.get("event") == "started"}

            shown = wait_for(lambda: len(started()) == 2 and started(), timeout=20,
                             what="an agent on each interface")
            for name, registry in zip(names, registries, strict=True):
                assert f"registry {registry}" in shown[name], shown
            daemons[1].stop()
            wait_for(lambda: '"interface_gone"' in log.read_text(), timeout=10,
                     what="the vanished interface let go of")
            assert stop_process(proc) == 0
            assert "Traceback" not in log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        for daemon in daemons:
            daemon.stop()
        ns.delete()
        for name in names:
            remove_agent_files(name)  # the agents' locks, which outlive them by design
