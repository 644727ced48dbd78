"""DNS-SD throughput and latency of `wgpunch registry --dns` with 10,000 peers.

    python3 bench/dns.py [--peers 10000] [--queries 10000] [--concurrency 1,8,32]
                         [--poll-interval 0.2,60] [--out FILE]

Set-up, all inside one throwaway network namespace: a wireguard-go device with a key, a
listen port and a tunnel address, filled with `--peers` peers (real keys, an endpoint and a
/32 each) through the device layer (`Device.configure`, batches of 500); then the real
`wgpunch registry --dns PORT --zone bench.internal.` on that device, once per
`--poll-interval`. The registry's observer reads the device on the event loop that also
answers (`Device.changes`: wireguard-go writes every peer, the registry parses only those
that changed): at 0.2 s (as shipped) those reads run while the answers are measured; at 60 s
at most one does, so that row shows what answering itself costs. The peers do not change
during the run. Before it, this script times the two kinds of read in its own process: a
full one (`Device.state`, every peer parsed) and a poll of the unchanged device.

Measurement: a small asyncio client in the same namespace sends SRV queries for random peers
(uppercase labels, as wgsd-client sends them) over UDP, `--concurrency` queries in flight at
a time (one socket each), and times each from send to answer. Every answer is checked
(NOERROR, one SRV with the peer's port). Queries per second count the whole run.

Prints a table, with the registry's resident memory after each row, and writes JSON
(default bench/results/dns.json). Needs root and wireguard-go.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wgpunch.keys import generate_keypair
from wgpunch.lab.netns import Namespace, WireguardGo, python_module, require_root, wait_for
from wgpunch.wg.device import Endpoint, PeerConfig
from wgpunch.wg.uapi import UapiDevice

ZONE = "bench.internal."
DNS_PORT = 5353
TUNNEL_IP = "10.98.255.254"
LISTEN_PORT = 51820
BATCH = 500  # peers per configure transaction: one UAPI `set` each

# The client, run inside the namespace. argv[1]: a JSON file {host, port, zone, keys: [[b32,
# port], ...], queries, concurrency}. Prints JSON {latencies_ms, wall_s, errors}.
CLIENT = r"""
import asyncio, json, random, sys, time
import dns.message, dns.rcode, dns.rdatatype

args = json.load(open(sys.argv[1]))
keys, zone = args["keys"], args["zone"]

class Proto(asyncio.DatagramProtocol):
    def __init__(self):
        self.waiter = None
    def datagram_received(self, data, addr):
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((time.perf_counter(), data))

async def worker(count, rng, latencies, errors):
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        Proto, remote_addr=(args["host"], args["port"]))
    try:
        for _ in range(count):
            label, port = rng.choice(keys)
            q = dns.message.make_query(f"{label.upper()}._wireguard._udp.{zone}", "SRV")
            wire = q.to_wire()
            proto.waiter = loop.create_future()
            sent = time.perf_counter()
            transport.sendto(wire)
            try:
                got, data = await asyncio.wait_for(proto.waiter, 2.0)
            except TimeoutError:
                errors.append("timeout")
                continue
            latencies.append((got - sent) * 1e3)
            r = dns.message.from_wire(data)
            if (r.id != q.id or r.rcode() != dns.rcode.NOERROR or len(r.answer) != 1
                    or r.answer[0].rdtype != dns.rdatatype.SRV or r.answer[0][0].port != port):
                errors.append("wrong answer")
    finally:
        transport.close()

async def main():
    n, c = args["queries"], args["concurrency"]
    latencies, errors = [], []
    started = time.perf_counter()
    await asyncio.gather(*(worker(n // c + (i < n % c), random.Random(i), latencies, errors)
                           for i in range(c)))
    wall = time.perf_counter() - started
    print(json.dumps({"latencies_ms": latencies, "wall_s": wall, "errors": errors}))

asyncio.run(main())
"""


def prefix() -> str:
    return "bd" + secrets.token_hex(2)


def peer_configs(count: int) -> tuple[list[PeerConfig], list[tuple[str, int]]]:
    """`count` peers: key, endpoint in 198.18.0.0/15 (RFC 2544, benchmarking), a /32 each."""
    configs, labels = [], []
    for i in range(count):
        _, public = generate_keypair()
        port = 1024 + i % 60000
        endpoint = Endpoint(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.1")) + i),
                            port)
        tunnel = ipaddress.IPv4Network(
            f"{ipaddress.IPv4Address(int(ipaddress.IPv4Address('10.98.0.1')) + i)}/32")
        configs.append(PeerConfig(public, endpoint=endpoint, allowed_ips=(tunnel,)))
        labels.append((public.base32(), port))
    return configs, labels


@contextmanager
def registry_host(peers: int
                  ) -> Iterator[tuple[Namespace, str, list[tuple[str, int]], dict[str, float]]]:
    """The namespace with its filled device; yields (ns, ifname, peer labels, read times)."""
    name = prefix()
    ns, ifname = Namespace(f"{name}-reg"), f"{name}wg"
    daemon = WireguardGo(ns, ifname)
    try:
        ns.add()
        daemon.start()
        private, _ = generate_keypair()
        with tempfile.NamedTemporaryFile("w", suffix=".key") as keyfile:
            os.chmod(keyfile.name, 0o600)
            keyfile.write(private.base64())
            keyfile.flush()
            ns.run(["wg", "set", ifname, "private-key", keyfile.name, "listen-port",
                    str(LISTEN_PORT)])
        ns.run(["ip", "addr", "add", f"{TUNNEL_IP}/16", "dev", ifname])
        ns.run(["ip", "link", "set", ifname, "up"])
        configs, labels = peer_configs(peers)
        reads = asyncio.run(fill(ifname, configs))
        yield ns, ifname, labels, reads
    finally:
        daemon.stop()
        ns.delete()


async def fill(ifname: str, configs: list[PeerConfig]) -> dict[str, float]:
    """Configure the peers in batches; return how long reads of the whole device take: a
    full one, and a poll (`changes`) of the unchanged device, in wall and CPU time."""
    device = UapiDevice(ifname)
    try:
        for start in range(0, len(configs), BATCH):
            await device.configure(configs[start:start + BATCH])
        started = time.perf_counter()
        state = await device.state()
        full_s = time.perf_counter() - started
        assert len(state.peers) == len(configs), len(state.peers)
        assert len((await device.changes()).changed) == len(configs)  # the first: every peer
        started, cpu = time.perf_counter(), time.process_time()
        assert not (await device.changes()).changed
        return {"full_read_s": full_s, "poll_s": time.perf_counter() - started,
                "poll_cpu_s": time.process_time() - cpu}
    finally:
        await device.close()


@contextmanager
def registry(ns: Namespace, ifname: str, poll_s: float, log: Path
             ) -> Iterator[subprocess.Popen]:
    argv, env = python_module("wgpunch.cli", "--log-format", "json", "registry",
                              "--interface", ifname, "--dns", str(DNS_PORT), "--zone", ZONE,
                              "--poll-interval", str(poll_s))
    with log.open("w") as out:
        proc = ns.popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                        start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or "dns_serving" in log.read_text(),
                 timeout=30, what="the registry's DNS server")
        if proc.poll() is not None:
            raise RuntimeError(f"the registry exited: {log.read_text()[-500:]}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_client(ns: Namespace, labels: list[tuple[str, int]], queries: int,
               concurrency: int) -> dict[str, Any]:
    args = {"host": TUNNEL_IP, "port": DNS_PORT, "zone": ZONE, "keys": labels,
            "queries": queries, "concurrency": concurrency}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec:
        json.dump(args, spec)
        spec.flush()
        done = ns.run([sys.executable, "-c", CLIENT, spec.name], timeout=600)
    return json.loads(done.stdout)


def rss_mib(pid: int) -> float:
    """The resident memory of a process (`ip netns exec` execs the registry: same pid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(ns: Namespace, ifname: str, labels: list[tuple[str, int]], poll_s: float,
            queries: int, levels: list[int], tmp: Path) -> list[dict[str, Any]]:
    """One registry process polling every `poll_s`; one row per concurrency level."""
    rows = []
    with registry(ns, ifname, poll_s, tmp / f"registry-{poll_s}.log") as proc:
        # The table is loaded once the last peer configured is answered.
        wait_for(lambda: not run_client(ns, labels[-1:], 1, 1)["errors"], timeout=60,
                 what="the registry to load the table")
        run_client(ns, labels, 500, 4)  # warm-up
        for level in levels:
            got = run_client(ns, labels, queries, level)
            lat = got["latencies_ms"]
            rows.append({
                "poll_interval_s": poll_s, "concurrency": level, "answered": len(lat),
                "errors": len(got["errors"]), "qps": len(lat) / got["wall_s"],
                "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
                "max_ms": max(lat), "registry_rss_mib": rss_mib(proc.pid),
            })
            print(f"poll {poll_s} s, {level} in flight: done", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=10_000,
                        help="queries per row (default 10000)")
    parser.add_argument("--concurrency", default="1,8,32",
                        help="queries in flight, comma-separated levels (default 1,8,32)")
    parser.add_argument("--poll-interval", default="0.2,60",
                        help="the registry's device poll intervals to run, comma-separated "
                             "(default 0.2,60: as shipped, and the observer nearly idle)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dns.json"))
    args = parser.parse_args()
    require_root()
    levels = [int(c) for c in args.concurrency.split(",")]
    polls = [float(p) for p in args.poll_interval.split(",")]
    report: dict[str, Any] = {"peers": args.peers, "queries": args.queries, "zone": ZONE,
                              "python": platform.python_version(), "cpus": os.cpu_count()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, \
            registry_host(args.peers) as (ns, ifname, labels, reads):
        report["device_reads"] = reads
        for poll_s in polls:
            rows += measure(ns, ifname, labels, poll_s, args.queries, levels, Path(tmp))
    report["rows"] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"DNS-SD SRV queries over UDP, {args.peers} peers. Reading the device: in full "
          f"(every peer parsed) {reads['full_read_s'] * 1e3:.0f} ms; a poll of the unchanged "
          f"device (the registry's observer) {reads['poll_s'] * 1e3:.0f} ms, of which "
          f"{reads['poll_cpu_s'] * 1e3:.0f} ms CPU of this process")
    header = ("poll s", "in flight", "answered", "errors", "queries/s", "p50 ms", "p99 ms",
              "max ms", "RSS MiB")
    table = [header] + [(f"{r['poll_interval_s']:g}", str(r["concurrency"]), str(r["answered"]),
                         str(r["errors"]), f"{r['qps']:.0f}", f"{r['p50_ms']:.2f}",
                         f"{r['p99_ms']:.2f}", f"{r['max_ms']:.1f}",
                         f"{r['registry_rss_mib']:.0f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
