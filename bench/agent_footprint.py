"""The node agent's footprint when idle: resident memory and CPU, with 3 and 100 peers.

    python3 bench/agent_footprint.py [--peers 3,100] [--seconds 30] [--runs 1]
                                     [--profile FILE] [--out FILE]

Per size, two throwaway network namespaces joined by a veth link: the registry's, with a
wireguard-go device and the real `wgpunch registry` on it, and the node's, with a wireguard-go
device whose peers are the registry (endpoint across the link, keepalive 25 s) and
`--peers` - 1 others; the registry's device has the node and the same others (no endpoint:
nobody the node could reach, so once it has followed the registry the agent has nothing to
do but watch). Then the real `wgpunch node --interface IF --registry KEY` starts in the
node's namespace; once it follows the registry's watch stream (its `registry_connected`
event) and has settled (2 s), its CPU (user + system, /proc) is measured over `--seconds`,
and its resident memory (VmRSS, and the peak VmHWM) at the end.

Prints a table and writes JSON (default bench/results/agent_footprint.json). Needs root and
wireguard-go. Everything it makes is torn down at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import (
    commit,
    cpu_s,
    exit_on_sigterm,
    prefix,
    print_table,
    run_wgpunch,
    start_device,
    status_kib,
)
from wgpunch.keys import Key, generate_keypair
from wgpunch.lab.netns import Namespace, require_root, wait_for
from wgpunch.lab.state import remove_agent_files

LINK = ("192.0.2.1", "192.0.2.2")  # the registry's and the node's end of the veth link
REGISTRY_IP, NODE_IP = "10.94.255.254", "10.94.0.1"
PORT = 51820
SETTLE_S = 2.0  # after the agent follows the registry, before measuring


class Device:
    """A wireguard-go device in a namespace, with a key, a listen port and an address."""

    def __init__(self, ns: Namespace, ifname: str, address: str, tmp: Path) -> None:
        self.ns, self.ifname = ns, ifname
        self.daemon, self.public = start_device(ns, ifname, f"{address}/16", PORT,
                                                tmp / f"{ifname}.log")

    def add_peers(self, peers: list[tuple[Key, str, list[str]]]) -> None:
        """Peers as (key, allowed IP, extra `wg set` words), in one `wg set`."""
        words = []
        for key, allowed, extra in peers:
            words += ["peer", key.base64(), "allowed-ips", allowed, *extra]
        self.ns.run(["wg", "set", self.ifname, *words])


@contextmanager
def lab(peers: int, tmp: Path) -> Iterator[tuple[Device, Device]]:
    """The registry's and the node's namespaces, devices and peers (`peers` on the node)."""
    name = prefix("af")
    reg_ns, node_ns = Namespace(f"{name}-reg"), Namespace(f"{name}-node")
    devices: list[Device] = []
    try:
        for ns in (reg_ns, node_ns):
            ns.add()
        reg_ns.run(["ip", "link", "add", f"{name}r", "type", "veth", "peer", "name",
                    f"{name}n", "netns", node_ns.name])
        for ns, veth, ip in ((reg_ns, f"{name}r", LINK[0]), (node_ns, f"{name}n", LINK[1])):
            ns.ip_batch([f"addr add {ip}/30 dev {veth}", f"link set {veth} up"])
        registry = Device(reg_ns, f"{name}reg", REGISTRY_IP, tmp)
        devices.append(registry)
        node = Device(node_ns, f"{name}node", NODE_IP, tmp)
        devices.append(node)
        others = [(generate_keypair()[1], f"10.94.1.{i}/32", []) for i in range(1, peers)]
        registry.add_peers([(node.public, f"{NODE_IP}/32", []), *others])
        node.add_peers([(registry.public, f"{REGISTRY_IP}/32",
                         ["endpoint", f"{LINK[0]}:{PORT}", "persistent-keepalive", "25"]),
                        *others])
        yield registry, node
    finally:
        for device in devices:
            device.daemon.stop()
        for ns in (reg_ns, node_ns):
            ns.delete()
        remove_agent_files(f"{name}node")


def logged(log: Path, event: str) -> bool:
    return f'"event": "{event}"' in log.read_text()


def measure(peers: int, seconds: float, tmp: Path, profile: str | None) -> dict[str, Any]:
    with ExitStack() as stack:
        registry, node = stack.enter_context(lab(peers, tmp))
        reg_log, node_log = tmp / f"registry-{peers}.log", tmp / f"node-{peers}.log"
        stack.enter_context(run_wgpunch(registry.ns, ["registry", "--interface",
                                                      registry.ifname],
                                        reg_log, ready='"event": "serving"'))
        started = time.perf_counter()
        proc = stack.enter_context(run_wgpunch(node.ns, ["node", "--interface", node.ifname,
                                                         "--registry", registry.public.base64()],
                                               node_log, profile=profile and f"{profile}.{peers}"))
        wait_for(lambda: proc.poll() is not None or logged(node_log, "registry_connected"),
                 timeout=30, what="the agent to follow the registry")
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited: {node_log.read_text()[-500:]}")
        following_s = time.perf_counter() - started
        time.sleep(SETTLE_S)
        before, wall = cpu_s(proc.pid), time.perf_counter()
        time.sleep(seconds)
        used = cpu_s(proc.pid) - before
        wall = time.perf_counter() - wall
        memory = status_kib(proc.pid, ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"))
        return {"peers": peers, "seconds": wall, "cpu_s": used, "cpu_pct": used / wall * 100,
                "rss_mib": memory["VmRSS"] / 1024, "peak_mib": memory["VmHWM"] / 1024,
                "anon_mib": memory["RssAnon"] / 1024, "file_mib": memory["RssFile"] / 1024,
                "threads": memory["Threads"],
                "following_s": following_s, "load1": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", default="3,100",
                        help="peers of the node's device, comma-separated sizes (default 3,100)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="the measuring window (default 30)")
    parser.add_argument("--runs", type=int, default=1, help="runs per size (default 1)")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the agent under cProfile, stats to FILE.PEERS (it measures "
                             "more CPU and memory so)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                             / "agent_footprint.json"))
    args = parser.parse_args()
    require_root()
    exit_on_sigterm()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        for peers in (int(p) for p in args.peers.split(",")):
            for _ in range(args.runs):
                rows.append(measure(peers, args.seconds, Path(tmp_name), args.profile))
    report = {"commit": commit(), "python": platform.python_version(),
              "cpus": os.cpu_count(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"idle node agent (commit {report['commit']}): CPU over {args.seconds:g} s once it "
          "follows the registry; RSS at the end")
    header = ("peers", "CPU %", "RSS MiB", "peak MiB", "anon / file MiB", "threads",
              "following after s", "load")
    print_table(header, [(str(r["peers"]), f"{r['cpu_pct']:.2f}", f"{r['rss_mib']:.1f}",
                         f"{r['peak_mib']:.1f}", f"{r['anon_mib']:.1f} / {r['file_mib']:.1f}",
                         str(r["threads"]), f"{r['following_s']:.2f}",
                         f"{r['load1']:.2f}") for r in rows])
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
