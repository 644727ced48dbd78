"""The relay between two real wireguard-go devices (wgpair.py), in a third namespace that
routes between them: pings through the tunnel over a slot, in userspace and on the kernel
fast path; the relay host never sees the plaintext; nothing is left in nftables or conntrack
after a slot ends, nor after `kill -9` of the relay and a restart."""

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import wgpunch
from labconntrack import flows_to_ports
from wgpair import Side, unique_prefix, wg_pair
from wgpunch.lab.netns import Namespace, read_line, stop_process, wait_for
from wgpunch.wg.model import Endpoint

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(__import__("shutil").which("wireguard-go") is None,
                       reason="wireguard-go not installed"),
]

SRC = str(Path(wgpunch.__file__).resolve().parents[1])
PORTS = "31000-31003"
TABLE = "wgpunch_relay"
A_IP, B_IP = "10.5.1.2", "10.5.2.2"  # the nodes' addresses toward the relay
RELAY_A, RELAY_B = "10.5.1.1", "10.5.2.1"  # the relay's, on each side

# The relay core in the relay's namespace, driven over stdin: one slot for the pair, then
# one JSON line per command ("state", "end", "sweep").
DRIVER = r"""
import asyncio, json, sys
from wgpunch.keys import generate_keypair
from wgpunch.registry.relay import Relay
from wgpunch.registry.relaykernel import KernelPath
from wgpunch.registry.relayslots import RelayLimits, port_range

async def main(ports, a_ip, b_ip, kernel, rate):
    a, b = generate_keypair()[1], generate_keypair()[1]
    ports = port_range(ports)
    limits = RelayLimits(packets_per_s=float(rate), packets_burst=min(int(rate), 20000))
    relay = Relay({a: a_ip, b: b_ip}.get, ports=ports, limits=limits,
                  kernel=KernelPath("wgpunch_relay", ports, limits=limits)
                  if kernel == "kernel" else None)
    await relay.start()
    mine, theirs = relay.allocate(a, b)
    print(json.dumps({"a_port": mine.port, "b_port": theirs.port}), flush=True)
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        if line == "end":
            for slot in relay.table:
                relay.end(slot, "test")
        slots = list(relay.table)
        if line == "metrics" and relay.kernel is not None:
            await relay.kernel_activity()
        print(json.dumps({"counts": relay.counts, "kernel": [s.kernel for s in slots],
                          "slots": len(slots), "packets": relay.metrics_counts().packets,
                          "dropped": relay.metrics_counts().dropped}),
              flush=True)
    await relay.close()

asyncio.run(main(*sys.argv[1:]))
"""


class Driver:
    def __init__(self, ns: Namespace, mode: str, rate: int = 100_000) -> None:
        self.proc = ns.popen([sys.executable, "-c", DRIVER, PORTS, A_IP, B_IP, mode, str(rate)],
                             env={"PYTHONPATH": SRC}, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        self.ports = json.loads(read_line(self.proc, timeout=10, what="the relay"))

    def ask(self, command: str = "state") -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(read_line(self.proc, timeout=10, what="the relay"))

    def stop(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()  # the driver closes the relay and exits
        try:
            return self.proc.wait(timeout=10)
        finally:
            stop_process(self.proc, sig=9, timeout=5)


@pytest.fixture
def triangle(tmp_path) -> Iterator[tuple[Side, Side, Namespace]]:
    """a and b (wireguard-go), and the relay's namespace r with a link to each."""
    prefix = unique_prefix("wr")
    r = Namespace(f"{prefix}-r")
    with wg_pair(tmp_path, prefix) as (a, b):
        try:
            r.add()
            for side, here, there, mine in ((a, "ra", "ar", A_IP), (b, "rb", "br", B_IP)):
                relay_ip = RELAY_A if side is a else RELAY_B
                r.run(["ip", "link", "add", f"{prefix}{here}", "type", "veth", "peer", "name",
                       f"{prefix}{there}", "netns", side.ns.name])
                r.run(["ip", "addr", "add", f"{relay_ip}/24", "dev", f"{prefix}{here}"])
                r.run(["ip", "link", "set", f"{prefix}{here}", "up"])
                side.ns.run(["ip", "addr", "add", f"{mine}/24", "dev", f"{prefix}{there}"])
                side.ns.run(["ip", "link", "set", f"{prefix}{there}", "up"])
            r.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
            yield a, b, r
        finally:
            r.delete()


def connect(a: Side, b: Side, driver: Driver) -> None:
    """Both devices to their relay ports with handshake-now, as the agent does: a's
    initiation binds its side (and is dropped: b is not bound yet), b's binds b's and goes
    through."""
    async def both() -> None:
        await a.device.handshake_now(
            b.public, Endpoint.parse(f"{RELAY_A}:{driver.ports['a_port']}"))
        wait_for(lambda: driver.ask()["counts"].get("bound"), timeout=5, what="a bound")
        await b.device.handshake_now(
            a.public, Endpoint.parse(f"{RELAY_B}:{driver.ports['b_port']}"))
    asyncio.run(both())
    b.ns.run(["ping", "-c", "3", "-i", "0.2", "-W", "2", a.tunnel_ip])


def ping(a: Side, b: Side, count: int = 20, pattern: str = "00") -> None:
    """`count` pings through the tunnel; one may be lost to a busy machine."""
    out = a.ns.run(["ping", "-c", str(count), "-i", "0.02", "-W", "2", "-p", pattern,
                    b.tunnel_ip], check=False).stdout
    assert int(re.search(r"(\d+) received", out).group(1)) >= count - 1, out


def nft_rules(r: Namespace) -> list[str]:
    out = r.run(["nft", "list", "table", "ip", TABLE], check=False).stdout
    return [line.strip() for line in out.splitlines() if "slot" in line]


def conntrack_on_ports(r: Namespace) -> list[str]:
    return flows_to_ports(r, range(31000, 31004))


@pytest.mark.parametrize("mode", ["userspace", "kernel"])
def test_a_pair_pings_through_a_slot(triangle, mode):
    a, b, r = triangle
    driver = Driver(r, mode)
    try:
        connect(a, b, driver)
        if mode == "kernel":
            wait_for(lambda: driver.ask()["kernel"] == [True], timeout=5,
                     what="the kernel to take the slot")
            assert len(nft_rules(r)) == 6  # per side: dnat, snat, rate limit
        before = driver.ask()["counts"].get("forward", 0)
        ping(a, b)
        moved = driver.ask()["counts"].get("forward", 0) - before
        if mode == "kernel":
            assert moved == 0, "datagrams still went through the relay process"
            # Every forwarded datagram is counted per side (what tells the relay that a
            # side is active): 20 pings one way, 20 replies the other.
            counters = r.run(["nft", "list", "chain", "ip", TABLE, "forwarded"]).stdout
            sides = [int(n) for n in re.findall(r"packets (\d+) .*comment \"side", counters)]
            assert len(sides) == 2 and min(sides) >= 19, counters
            assert driver.ask("metrics")["packets"]["kernel"] >= 38  # what the metrics show
        else:
            assert moved >= 38  # 20 pings and 20 replies, one of each may be lost
        assert driver.ask("end")["slots"] == 0
        # The kernel's table follows in the relay's own task (relay.py _kernel_sync).
        wait_for(lambda: nft_rules(r) == [] and conntrack_on_ports(r) == [], timeout=5,
                 what="the ended slot's rules and conntrack entries to go")
        out = a.ns.run(["ping", "-c", "2", "-i", "0.2", "-W", "1", b.tunnel_ip],
                       check=False).stdout
        assert " 0 received" in out, "the slot ended, but datagrams still pass"
    finally:
        assert driver.stop() == 0


@pytest.mark.parametrize("mode", ["userspace", "kernel"])
def test_a_side_over_the_slots_packet_rate_loses_the_excess(triangle, mode):
    """At most 20 datagrams a second per side (burst 20): of 100 pings at 200 a second,
    about 40 get through, on either path."""
    a, b, r = triangle
    driver = Driver(r, mode, rate=20)
    try:
        connect(a, b, driver)
        if mode == "kernel":
            wait_for(lambda: driver.ask()["kernel"] == [True], timeout=5,
                     what="the kernel to take the slot")
        out = a.ns.run(["ping", "-c", "100", "-i", "0.005", "-W", "1", b.tunnel_ip],
                       check=False).stdout
        received = int(re.search(r"(\d+) received", out).group(1))
        assert 10 <= received <= 70, out
        # The excess is counted as dropped over the rate on either path (the metrics read
        # the kernel's counters first).
        assert driver.ask("metrics")["dropped"].get("rate", 0) >= 100 - received - 5
    finally:
        assert driver.stop() == 0


def test_the_relay_sees_ciphertext_only(triangle, tmp_path):
    """The ping's pattern is in a capture of a's tunnel interface (so a capture shows it
    when it is there), and never in one of every interface of the relay's namespace."""
    a, b, r = triangle
    driver = Driver(r, "userspace")
    pattern = bytes.fromhex("deadbeefcafef00d")
    captures = {"relay": (r, "any", tmp_path / "relay.pcap"),
                "tunnel": (a.ns, a.ifname, tmp_path / "tunnel.pcap")}
    running = []
    try:
        for ns, interface, path in captures.values():
            tcpdump = ns.popen(["tcpdump", "-n", "--immediate-mode", "-i", interface, "-U", "-w",
                                str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            running.append(tcpdump)
            while "listening on" not in read_line(tcpdump, timeout=20, what="tcpdump"):
                pass
        connect(a, b, driver)
        # What the relay carries is the point here, not that every ping arrives (under load
        # a few may not): half of them is plenty of plaintext to look for.
        out = a.ns.run(["ping", "-c", "10", "-i", "0.02", "-W", "2", "-p", pattern.hex(),
                        b.tunnel_ip], check=False).stdout
        assert int(re.search(r"(\d+) received", out).group(1)) >= 5, out
    finally:
        for tcpdump in running:
            stop_process(tcpdump, timeout=5)
        driver.stop()
    relay, tunnel = (path.read_bytes() for _ns, _if, path in captures.values())
    assert pattern in tunnel
    assert len(relay) > 5 * 2 * 100, "the relay's capture missed the pings"
    assert pattern not in relay


def test_nothing_is_left_after_kill_9_and_a_restart(triangle):
    a, b, r = triangle
    driver = Driver(r, "kernel")
    connect(a, b, driver)
    wait_for(lambda: driver.ask()["kernel"] == [True], timeout=5,
             what="the kernel to take the slot")
    ping(a, b, count=5)
    driver.proc.kill()
    driver.proc.wait(timeout=5)
    assert len(nft_rules(r)) == 6 and conntrack_on_ports(r)  # what a crash leaves
    restarted = Driver(r, "kernel")
    try:
        state = restarted.ask()
        assert state["kernel"] == [False] and nft_rules(r) == []
        assert conntrack_on_ports(r) == [], conntrack_on_ports(r)
    finally:
        assert restarted.stop() == 0
    assert r.run(["nft", "list", "table", "ip", TABLE], check=False).returncode != 0


def test_wgpunch_relay_runs_alone_and_leaves_nothing(tmp_path):
    """`wgpunch relay` in a namespace of its own: kernel path where forwarding is on,
    userspace (with a warning) where it is off; its table goes when it stops."""
    ns = Namespace(f"{unique_prefix('wr')}-x")
    ns.add()
    try:
        for forwarding, path in (("1", "kernel path"), ("0", "userspace path")):
            ns.run(["sysctl", "-qw", f"net.ipv4.ip_forward={forwarding}"])
            log = tmp_path / f"relay-{forwarding}.log"
            with log.open("w") as out:
                proc = ns.popen([sys.executable, "-m", "wgpunch.cli", "relay", "--ports",
                                 PORTS], env={"PYTHONPATH": SRC}, stdout=out, stderr=out)
            try:
                wait_for(lambda log=log, proc=proc: "relay: ports" in log.read_text()
                         or proc.poll() is not None,
                         timeout=10, what="the relay to start")
                assert f"relay: ports 31000-31003, {path}" in log.read_text(), log.read_text()
                listed = ns.run(["nft", "list", "table", "ip", TABLE], check=False)
                assert (listed.returncode == 0) == (forwarding == "1")
            finally:
                assert stop_process(proc) == 0, log.read_text()
            assert ns.run(["nft", "list", "table", "ip", TABLE], check=False).returncode != 0
        assert "forwarding in userspace: IPv4 forwarding is off" in log.read_text()
    finally:
        ns.delete()
