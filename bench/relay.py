"""What one relay slot carries, in userspace and on the kernel path, and what it costs.

    python3 bench/relay.py [--seconds 3] [--out FILE]

Three network namespaces: a sender `s` (10.6.1.2), the relay `r` (10.6.1.1 and 10.6.2.1, IPv4
forwarding on) and a receiver `d` (10.6.2.2). The relay core (registry/relay.py) runs in `r`
with one slot for the pair; each side binds its port with a handshake-initiation-shaped
datagram, then the sender sends WireGuard-transport-shaped datagrams as fast as it can for
`--seconds`, from one Python process, and the receiver counts what arrives. Sizes: 1,408
bytes (a full WireGuard data packet for a 1,360-byte inner packet; a size the relay accepts
must be a multiple of 16) and 64 bytes (the smallest data packet with a payload). Per run:
datagrams per second and Mbit/s received, the share lost, and the relay process's CPU time
(user + system) per second of the run; on the kernel path the relay process is idle by
design, and the kernel's own work shows in no process.

Then, with iperf3 installed: TCP through two wireguard-go devices (in `s` and `d`), once with
their endpoints on the relay's slot (kernel path), once direct (routed through `r` by plain
IP forwarding: the same hops without the relay).

The sender and receiver are Python too and share the machine's cores with the relay, so the
figures are a floor, not the relay's limit. Prints a table and writes JSON (default
bench/results/relay.json). Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wgpunch.keys import generate_keypair
from wgpunch.lab.netns import Namespace, WireguardGo, read_line, require_root, wait_for

SRC = str(Path(__file__).resolve().parents[1] / "src")
PORTS = "31000-31001"
S_IP, D_IP = "10.6.1.2", "10.6.2.2"
R_S, R_D = "10.6.1.1", "10.6.2.1"
SIZES = (1408, 64)
CLOCK_TICK = os.sysconf("SC_CLK_TCK")

# The relay core with one slot; prints its ports, then answers "state" with its counts.
RELAY = r"""
import asyncio, json, sys
from wgpunch.keys import generate_keypair
from wgpunch.registry.relay import Relay
from wgpunch.registry.relaykernel import KernelPath
from wgpunch.registry.relayslots import port_range

async def main(ports, s_ip, d_ip, kernel):
    s, d = generate_keypair()[1], generate_keypair()[1]
    ports = port_range(ports)
    relay = Relay({s: s_ip, d: d_ip}.get, ports=ports,
                  kernel=KernelPath("wgpunch_relay", ports) if kernel == "kernel" else None)
    await relay.start()
    mine, theirs = relay.allocate(s, d)
    print(json.dumps({"s": mine.port, "d": theirs.port}), flush=True)
    loop = asyncio.get_running_loop()
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        slots = list(relay.table)
        print(json.dumps({"counts": relay.counts, "bound": [s.bound for s in slots],
                          "kernel": [s.kernel for s in slots]}), flush=True)
    await relay.close()

asyncio.run(main(*sys.argv[1:]))
"""

# Binds the receiver's side, says "ready", counts datagrams until `seconds` of the first one.
RECEIVE = r"""
import json, socket, sys, time
relay, seconds = (sys.argv[1], int(sys.argv[2])), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, 33, 8 << 20)
s.bind(("0.0.0.0", 7000))
s.sendto(bytes([1, 0, 0, 0]) + bytes(144), relay)
print("ready", flush=True)
packets = size = 0
s.settimeout(10)
s.recv(65535)
start = time.monotonic()
s.settimeout(0.5)
try:
    while time.monotonic() - start < seconds + 0.5:
        size += len(s.recv(65535))
        packets += 1
except socket.timeout:
    pass
print(json.dumps({"packets": packets, "bytes": size, "seconds": seconds}), flush=True)
"""

# Binds the sender's side when told, then sends `size`-byte datagrams for `seconds`.
SEND = r"""
import json, socket, sys, time
relay, size, seconds = (sys.argv[1], int(sys.argv[2])), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7000))
s.sendto(bytes([1, 0, 0, 0]) + bytes(144), relay)
sys.stdin.readline()
data = bytes([4, 0, 0, 0]) + bytes(size - 4)
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.sendto(data, relay)
            sent += 1
        except BlockingIOError:
            pass
print(json.dumps({"sent": sent}), flush=True)
"""


class Driver:
    def __init__(self, r: Namespace, path: str) -> None:
        self.proc = r.popen([sys.executable, "-c", RELAY, PORTS, S_IP, D_IP, path],
                            env={"PYTHONPATH": SRC}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
        self.ports = json.loads(read_line(self.proc, timeout=10, what="the relay"))

    def state(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("state\n")
        self.proc.stdin.flush()
        return json.loads(read_line(self.proc, timeout=10, what="the relay"))

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime, stime

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@contextmanager
def triangle() -> Iterator[tuple[Namespace, Namespace, Namespace]]:
    prefix = "br" + secrets.token_hex(2)
    s, r, d = (Namespace(f"{prefix}-{n}") for n in "srd")
    try:
        for ns in (s, r, d):
            ns.add()
        for side, mine, relay, name in ((s, S_IP, R_S, "s"), (d, D_IP, R_D, "d")):
            r.run(["ip", "link", "add", f"{prefix}r{name}", "type", "veth", "peer", "name",
                   f"{prefix}{name}r", "netns", side.name])
            r.run(["ip", "addr", "add", f"{relay}/24", "dev", f"{prefix}r{name}"])
            r.run(["ip", "link", "set", f"{prefix}r{name}", "up"])
            side.run(["ip", "addr", "add", f"{mine}/24", "dev", f"{prefix}{name}r"])
            side.run(["ip", "link", "set", f"{prefix}{name}r", "up"])
            side.run(["ip", "route", "add", "default", "via", relay])
        r.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        yield s, r, d
    finally:
        for ns in (s, r, d):
            ns.delete()


def udp_run(s: Namespace, r: Namespace, d: Namespace, path: str, size: int,
            seconds: float) -> dict[str, Any]:
    driver = Driver(r, path)
    env = {"PYTHONPATH": SRC}
    try:
        receiver = d.popen([sys.executable, "-c", RECEIVE, R_D, str(driver.ports["d"]),
                            str(seconds)], env=env, stdout=subprocess.PIPE, text=True)
        sender = s.popen([sys.executable, "-c", SEND, R_S, str(driver.ports["s"]), str(size),
                          str(seconds)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
        read_line(receiver, timeout=10, what="the receiver")
        wait_for(lambda: driver.state()["bound"] == [True], timeout=10, what="both sides bound")
        if path == "kernel":
            wait_for(lambda: driver.state()["kernel"] == [True], timeout=10,
                     what="the kernel path")
        cpu = driver.cpu_s()
        assert sender.stdin is not None
        sender.stdin.write("go\n")
        sender.stdin.flush()
        sent = json.loads(read_line(sender, timeout=seconds + 10, what="the sender"))["sent"]
        got = json.loads(read_line(receiver, timeout=seconds + 15, what="the receiver"))
        cpu = driver.cpu_s() - cpu
        counts = driver.state()["counts"]
    finally:
        driver.close()
    return {"path": path, "size": size, "sent": sent, "received": got["packets"],
            "pps": got["packets"] / seconds, "mbit_s": got["bytes"] * 8 / seconds / 1e6,
            "lost": 1 - got["packets"] / sent if sent else 0.0,
            "relay_cpu_s_per_s": cpu / seconds, "relay_counts": counts}


def iperf_runs(s: Namespace, r: Namespace, d: Namespace, seconds: float) -> list[dict]:
    """TCP through wireguard-go in s and d: over the relay's kernel path, and direct."""
    keys = {name: generate_keypair() for name in "sd"}
    devices = {name: WireguardGo(ns, f"{s.name[:6]}w{name}") for name, ns in
               (("s", s), ("d", d))}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for name, ns, tunnel in (("s", s, "10.77.0.1"), ("d", d, "10.77.0.2")):
                device = devices[name]
                device.start()
                key = Path(tmp) / name
                key.write_text(keys[name][0].base64())
                ns.run(["wg", "set", device.ifname, "private-key", str(key), "listen-port",
                        "51820"])
                ns.run(["ip", "addr", "add", f"{tunnel}/24", "dev", device.ifname])
                ns.run(["ip", "link", "set", device.ifname, "up"])
            for path in ("relay", "direct"):
                driver = Driver(r, "kernel") if path == "relay" else None
                try:
                    s_end = f"{R_S}:{driver.ports['s']}" if driver else f"{D_IP}:51820"
                    d_end = f"{R_D}:{driver.ports['d']}" if driver else f"{S_IP}:51820"
                    for ns, dev, peer, end, allowed in (
                            (s, devices["s"], "d", s_end, "10.77.0.2/32"),
                            (d, devices["d"], "s", d_end, "10.77.0.1/32")):
                        ns.run(["wg", "set", dev.ifname, "peer", keys[peer][1].base64(),
                                "endpoint", end, "allowed-ips", allowed,
                                "persistent-keepalive", "1"])
                    wait_for(lambda: s.run(["ping", "-c", "1", "-W", "1", "10.77.0.2"],
                                           check=False).returncode == 0,
                             timeout=15, what="the tunnel")
                    if driver:
                        wait_for(lambda d=driver: d.state()["kernel"] == [True], timeout=10,
                                 what="the kernel path")
                    server = d.popen(["iperf3", "-s", "-1", "-B", "10.77.0.2"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    wait_for(lambda: d.run(["ss", "-Hltn", "sport = :5201"]).stdout.strip(),
                             timeout=10, what="iperf3 to listen")
                    out = s.run(["iperf3", "-c", "10.77.0.2", "-t", str(int(seconds)), "-J"],
                                timeout=seconds + 30).stdout
                    server.wait(timeout=10)
                    bps = json.loads(out)["end"]["sum_received"]["bits_per_second"]
                    results.append({"path": path, "mbit_s": bps / 1e6})
                finally:
                    if driver:
                        driver.close()
                    for ns, dev, peer in ((s, devices["s"], "d"), (d, devices["d"], "s")):
                        ns.run(["wg", "set", dev.ifname, "peer", keys[peer][1].base64(),
                                "remove"])
        finally:
            for device in devices.values():
                device.stop()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "relay.json"))
    args = parser.parse_args()
    require_root()
    with triangle() as (s, r, d):
        udp = [udp_run(s, r, d, path, size, args.seconds)
               for path in ("userspace", "kernel") for size in SIZES]
        iperf = iperf_runs(s, r, d, args.seconds) if shutil.which("iperf3") else []
    print(f"{'path':<10} {'bytes':>6} {'sent/s':>10} {'recv/s':>10} {'Mbit/s':>8} "
          f"{'lost':>6} {'relay CPU':>9}")
    for row in udp:
        print(f"{row['path']:<10} {row['size']:>6} {row['sent'] / args.seconds:>10,.0f} "
              f"{row['pps']:>10,.0f} {row['mbit_s']:>8.0f} {row['lost']:>6.1%} "
              f"{row['relay_cpu_s_per_s']:>8.0%}")
    for row in iperf:
        print(f"iperf3 TCP through wireguard-go, {row['path']:<6}: {row['mbit_s']:.0f} Mbit/s")
    if not iperf:
        print("iperf3 not installed: no TCP runs through WireGuard")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"seconds": args.seconds, "cpus": os.cpu_count(), "udp": udp, "iperf3": iperf}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
