"""The registry with many nodes following it: CPU, memory and change → every-stream latency.

    python3 bench/registry_scale.py [--nodes 1000] [--churn 10] [--seconds 60]
                                    [--idle-seconds 10] [--snapshots 10] [--poll-interval 0.2]
                                    [--profile FILE] [--out FILE]

Set-up, inside one throwaway network namespace: a wireguard-go device with `--nodes` peers
(real keys, an endpoint in 198.18.0.0/15 and one /32 tunnel address each, configured through
the device layer in batches), and the real `wgpunch registry` on it, listening on the device's
tunnel address with its shipped timings (0.2 s polls unless `--poll-interval`, a quarter of
that for 5 s after a change; 2 s heartbeats). The peers' /32s are added to the namespace's
own loopback interface, so a connection bound to one of them comes
from that peer's tunnel address: the API identifies it as that peer, as it would a node's
connection through the tunnel (the packets take the loopback path, not WireGuard's).

A client process in the namespace plays the nodes, with hand-written HTTP/1.1 (chunked
NDJSON) on asyncio so that it stays cheaper than the registry it measures:
1. `reports`: every node sends `PUT /v1/self` once (as an agent does at its start);
2. `snapshots`: `--snapshots` nodes open their watch stream without `since` (a full snapshot
   each, as a node starting cold does), to measure what a snapshot costs;
3. `connect`: every other node opens its watch stream from the current revision (a node that
   follows already: no snapshot);
4. `idle`: `--idle-seconds` with every stream open and nothing changing (heartbeats, polls);
5. `churn`: `--seconds` of changes at `--churn` % of the nodes per minute, evenly spaced,
   alternating (a) a node's endpoint changing on the device (`wg set IF peer K endpoint E`,
   timed from `wg` exiting: the observer's poll is part of what is measured) and (b) a
   node's report changing (`PUT /v1/self` with a new version, timed from the request's first
   byte). Every stream's lines are parsed; each change's event is matched on every stream by
   its peer and its new endpoint or version. After the last change the client waits up to 5 s
   for late deliveries.

Per phase: the registry's CPU (from /proc, user + system, as a share of one core), its
wireguard-go's, the client's; the registry's RSS at the end and its peak (VmHWM). Per change:
the latency to each stream (p50/p95/p99 over all (change, stream) pairs) and to *every*
stream (the slowest stream of each change; p50/p95/max over changes); deliveries missing.
The machine has other users: "busy" gives the cores busy on the whole machine during churn.

Prints a table and writes JSON (default bench/results/registry_scale.json). Needs root and
wireguard-go. Everything it makes is torn down at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import (
    busy_cores,
    commit,
    cpu_s,
    exit_on_sigterm,
    fill_device,
    machine_cpu,
    percentile,
    prefix,
    print_table,
    run_wgpunch,
    start_device,
    status_kib,
)
from wgpunch.errors import LabError
from wgpunch.keys import Key, generate_keypair
from wgpunch.lab.netns import Namespace, WireguardGo, read_line, require_root, stop_process
from wgpunch.protocol import API_PORT
from wgpunch.wg.model import Endpoint, PeerConfig

TUNNEL_IP = "10.96.255.254"  # the registry's; the nodes' /32s count up from 10.96.0.1
FIRST_NODE = ipaddress.IPv4Address("10.96.0.1")
FIRST_ENDPOINT = ipaddress.IPv4Address("198.18.0.1")  # RFC 2544: benchmarking; never reached
LISTEN_PORT = 51820
LATE_S = 5.0  # after the last change, how long the client waits for late deliveries
CONNECT_CONCURRENCY = 200  # connections being opened at once by the client


@dataclass
class Host:
    ns: Namespace
    ifname: str
    daemon: WireguardGo
    keys: list[Key]  # the nodes' public keys, node i at FIRST_NODE + i


def node_ip(index: int) -> str:
    return str(FIRST_NODE + index)


@contextmanager
def registry_host(nodes: int, tmp: Path) -> Iterator[Host]:
    """The namespace, its device filled with `nodes` peers, and the nodes' /32s on its lo."""
    name = prefix("rs")
    ns, ifname = Namespace(f"{name}-reg"), f"{name}wg"
    wireguard_go: WireguardGo | None = None
    try:
        ns.add()
        wireguard_go, _ = start_device(ns, ifname, f"{TUNNEL_IP}/16", LISTEN_PORT,
                                       tmp / "wireguard-go.log")
        ns.ip_batch([f"addr add {node_ip(i)}/32 dev lo" for i in range(nodes)])
        configs = [PeerConfig(
            generate_keypair()[1],
            endpoint=Endpoint(FIRST_ENDPOINT + i, 1024 + i % 60000),
            allowed_ips=(ipaddress.IPv4Network(f"{node_ip(i)}/32"),)) for i in range(nodes)]
        fill_device(ifname, configs)
        yield Host(ns, ifname, wireguard_go, [c.public_key for c in configs])
    finally:
        if wireguard_go is not None:
            wireguard_go.stop()
        ns.delete()  # the addresses go with it


def registry(host: Host, log: Path, profile: str | None, poll_s: float
             ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return run_wgpunch(host.ns, ["registry", "--interface", host.ifname, "--listen",
                                 f"{TUNNEL_IP}:{API_PORT}", "--poll-interval", str(poll_s)],
                       log, ready='"serving"', profile=profile, timeout=120)


# -- the client: the simulated nodes, inside the namespace -------------------------------------


class Meter:
    """CPU of the registry, its wireguard-go and this client over one phase, and the
    registry's memory at its end."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = {**pids, "client": os.getpid()}
        self.wall = time.perf_counter()
        self.cpu = {name: cpu_s(pid) for name, pid in self.pids.items()}
        self.machine = machine_cpu()

    def result(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        used = {name: cpu_s(pid) - self.cpu[name] for name, pid in self.pids.items()}
        return {
            "wall_s": wall,
            "cpu_s": used,
            "cores": {name: value / wall for name, value in used.items()},
            "machine_busy_cores": busy_cores(self.machine),
            "registry_kib": status_kib(self.pids["registry"]),
        }


class Watch(asyncio.Protocol):
    """One node's watch stream: HTTP/1.1 response head, then chunked NDJSON lines."""

    def __init__(self, client: Client, index: int) -> None:
        self.client = client
        self.index = index
        self.buffer = b""
        self.head_done = False
        self.chunk_left = -1  # bytes of the current chunk still to come; -1: a size line next
        self.line = b""
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.first_line = asyncio.Event()
        self.lines = 0
        self.lost = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"stream {self.index}: closed early"))
        self.client.lost_streams += not self.client.stopping

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.head_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            status = head.split(b"\r\n", 1)[0]
            if b" 200 " not in status:
                self.opened.set_exception(RuntimeError(f"stream {self.index}: {status!r}"))
                return
            self.head_done = True
            self.opened.set_result(None)
        buffer, position = self.buffer, 0
        while True:
            if self.chunk_left < 0:
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    break
                self.chunk_left = int(buffer[position:end].split(b";")[0], 16)
                position = end + 2
            take = buffer[position:position + self.chunk_left]
            position += len(take)
            self.chunk_left -= len(take)
            self.line += take
            if self.chunk_left:
                break
            if len(buffer) - position < 2:  # the chunk's trailing CRLF
                self.chunk_left = 0
                break
            position += 2
            self.chunk_left = -1
            if self.line.endswith(b"\n"):
                for line in self.line.split(b"\n")[:-1]:
                    self.client.received(self, line)
                self.line = b""
        self.buffer = buffer[position:]


@dataclass
class Change:
    index: int
    node: int
    kind: str  # "endpoint" (wg set on the device) or "report" (PUT /v1/self)
    marker: str  # the new endpoint or version, as the event line shows it
    started: float = 0.0  # when the change was made (time.monotonic)
    delivered: list[float] | None = None

    @property
    def needle(self) -> bytes:
        """What the change's event line holds, as the registry encodes it."""
        field = "endpoint" if self.kind == "endpoint" else "version"
        return f'"{field}":"{self.marker}"'.encode()


class Client:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.keys: list[str] = spec["keys"]
        self.nodes = len(self.keys)
        self.streams: list[Watch] = []
        self.pending: dict[str, Change] = {}  # by peer key (base64): its change under way
        self.lost_streams = 0
        self.stopping = False
        self.unmatched = 0
        self.heartbeats = 0
        self.snapshot_lines = 0
        self.retries = 0
        self.awaited = -1  # changes not yet delivered to every stream, once all are made
        self.all_delivered = asyncio.Event()

    def received(self, watch: Watch, line: bytes) -> None:
        watch.lines += 1
        watch.first_line.set()
        if line.startswith(b'{"type":"heartbeat"'):
            self.heartbeats += 1
            return
        if line.startswith(b'{"type":"snapshot"'):
            self.snapshot_lines += 1
            return
        now = time.monotonic()
        # Matched on the line's bytes (the registry writes compact JSON): parsing 1,000 lines
        # per change would make this client, not the registry, the slowest part.
        at = line.find(b'"public_key":"') + len(b'"public_key":"')
        change = self.pending.get(line[at:at + 44].decode())
        if change is None or change.delivered is None or change.needle not in line:
            self.unmatched += 1
            return
        change.delivered.append(now - change.started)
        if len(change.delivered) == len(self.streams):
            self.awaited -= 1
            if not self.awaited:
                self.all_delivered.set()

    async def request(self, node: int, method: str, path: str, body: bytes = b"") -> bytes:
        """One request from node `node`'s address; the response body. A failure is retried
        after a second, as an agent retries (at most 10 times), and counted."""
        for _attempt in range(10):
            try:
                return await self.request_once(node, method, path, body)
            except (OSError, RuntimeError):
                self.retries += 1
                await asyncio.sleep(1.0)
        return await self.request_once(node, method, path, body)

    async def request_once(self, node: int, method: str, path: str, body: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(
            TUNNEL_IP, API_PORT, local_addr=(node_ip(node), 0))
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: {TUNNEL_IP}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            answer = await reader.read()
        finally:
            writer.close()
        head, _, content = answer.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 2"):
            raise RuntimeError(f"{method} {path} from node {node}: {head[:100]!r} {content!r}")
        return content

    def report_body(self, node: int, version: str) -> bytes:
        return json.dumps({"listen_port": LISTEN_PORT,
                           "local_addresses": [f"192.168.{node // 250 % 250}.{node % 250 + 1}"],
                           "version": version}).encode()

    async def gather_limited(self, jobs: list[Any]) -> None:
        limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(job: Any) -> None:
            async with limit:
                await job

        await asyncio.gather(*(one(job) for job in jobs))

    async def open_stream(self, node: int, query: str) -> Watch:
        loop = asyncio.get_running_loop()
        _transport, watch = await loop.create_connection(
            lambda: Watch(self, node), TUNNEL_IP, API_PORT, local_addr=(node_ip(node), 0))
        assert isinstance(watch, Watch)
        _transport.write(f"GET /v1/watch{query} HTTP/1.1\r\nHost: {TUNNEL_IP}\r\n\r\n".encode())
        await watch.opened
        self.streams.append(watch)
        return watch

    async def phase(self, name: str, results: dict[str, Any], work: Any) -> None:
        meter = Meter(self.spec["pids"])
        await work
        results[name] = meter.result()
        print(f"phase {name}: {results[name]['wall_s']:.1f} s", file=sys.stderr, flush=True)

    async def run(self) -> dict[str, Any]:
        spec, results = self.spec, {}
        await self.phase("reports", results, self.gather_limited(
            [self.request(i, "PUT", "/v1/self", self.report_body(i, "bench-0"))
             for i in range(self.nodes)]))
        health = json.loads(await self.request(0, "GET", "/healthz"))
        cold = min(spec["snapshots"], self.nodes)

        async def snapshots() -> None:
            watches = [await self.open_stream(i, "") for i in range(cold)]
            async with asyncio.timeout(120):  # a snapshot line is big: wait until each is in
                for watch in watches:
                    await watch.first_line.wait()

        await self.phase("snapshots", results, snapshots())
        query = f"?since={health['revision']}&epoch={health['epoch']}"
        await self.phase("connect", results, self.gather_limited(
            [self.open_stream(i, query) for i in range(cold, self.nodes)]))
        await self.phase("idle", results, asyncio.sleep(spec["idle_seconds"]))
        changes: list[Change] = []
        await self.phase("churn", results, self.churn(changes))
        results["changes"] = self.latencies(changes)
        results["streams"] = {"open": sum(not w.lost for w in self.streams),
                              "lost": self.lost_streams, "heartbeats": self.heartbeats,
                              "unmatched_lines": self.unmatched,
                              "snapshot_lines": self.snapshot_lines,
                              "request_retries": self.retries}
        self.stopping = True
        return results

    async def churn(self, changes: list[Change]) -> None:
        per_s = self.spec["churn_pct"] / 100 * self.nodes / 60
        count = max(1, round(per_s * self.spec["seconds"]))
        order = random.Random(1).sample(range(self.nodes), min(count, self.nodes))
        started = time.monotonic()
        tasks = []
        for i in range(count):
            await asyncio.sleep(max(0.0, started + i / per_s - time.monotonic()))
            node = order[i % len(order)]
            kind = "endpoint" if i % 2 == 0 else "report"
            marker = (f"{FIRST_ENDPOINT + node}:{20000 + i % 40000}" if kind == "endpoint"
                      else f"bench-{i + 1}")
            change = Change(i, node, kind, marker)
            changes.append(change)
            tasks.append(asyncio.create_task(self.make(change)))
        await asyncio.gather(*tasks)
        self.awaited = sum(len(c.delivered or ()) < len(self.streams) for c in changes)
        if self.awaited:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LATE_S):
                    await self.all_delivered.wait()

    async def make(self, change: Change) -> None:
        key = self.keys[change.node]
        if change.kind == "endpoint":
            wg = await asyncio.create_subprocess_exec(
                "wg", "set", self.spec["ifname"], "peer", key, "endpoint", change.marker)
            if await wg.wait():
                raise RuntimeError(f"wg set failed for change {change.index}")
            change.started, change.delivered = time.monotonic(), []
            self.pending[key] = change
        else:
            change.started, change.delivered = time.monotonic(), []
            self.pending[key] = change
            await self.request(change.node, "PUT", "/v1/self",
                               self.report_body(change.node, change.marker))

    def latencies(self, changes: list[Change]) -> dict[str, Any]:
        streams = len(self.streams)
        each: list[float] = []
        every: list[float] = []
        missing = 0
        by_kind: dict[str, list[float]] = {"endpoint": [], "report": []}
        for change in changes:
            got = change.delivered or []
            each += got
            missing += streams - len(got)
            if len(got) == streams:
                every.append(max(got))
                by_kind[change.kind].append(max(got))
        ms = [v * 1e3 for v in each]
        every_ms = [v * 1e3 for v in every]
        return {
            "count": len(changes), "streams": streams, "missing_deliveries": missing,
            "complete": len(every),
            "each_ms": {p: percentile(ms, q) for p, q in (("p50", 50), ("p95", 95),
                                                          ("p99", 99))},
            "every_ms": {"p50": percentile(every_ms, 50), "p95": percentile(every_ms, 95),
                         "max": max(every_ms, default=float("nan"))},
            "every_ms_by_kind": {kind: {"p50": percentile([v * 1e3 for v in values], 50),
                                        "p95": percentile([v * 1e3 for v in values], 95)}
                                 for kind, values in by_kind.items()},
        }


def client_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, len(spec["keys"]) + 2 * CONNECT_CONCURRENCY + 64)  # a stream per node
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    client = Client(spec)
    results = asyncio.run(client.run())
    print(json.dumps(results), flush=True)
    return 0


# -- the driver -----------------------------------------------------------------------------------


def run_size(nodes: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    started = time.perf_counter()
    with ExitStack() as stack:
        host = stack.enter_context(registry_host(nodes, tmp))
        setup_s = time.perf_counter() - started
        log = tmp / f"registry-{nodes}.log"
        proc = stack.enter_context(registry(
            host, log, args.profile and f"{args.profile}.{nodes}", args.poll_interval))
        assert host.daemon.proc is not None
        spec = {"keys": [k.base64() for k in host.keys], "ifname": host.ifname,
                "pids": {"registry": proc.pid, "wireguard_go": host.daemon.proc.pid},
                "snapshots": args.snapshots, "idle_seconds": args.idle_seconds,
                "seconds": args.seconds, "churn_pct": args.churn}
        spec_path = tmp / f"client-{nodes}.json"
        spec_path.write_text(json.dumps(spec))
        with (tmp / f"client-{nodes}.log").open("w") as errors:
            client = host.ns.popen([sys.executable, str(Path(__file__).resolve()), "_client",
                                    str(spec_path)], stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=errors,
                                   start_new_session=True)
        try:
            line = read_line(client, timeout=args.seconds + args.idle_seconds + 3600,
                             what="the bench client")
        except LabError as exc:
            line = str(exc)
        finally:
            stop_process(client)
            assert client.stdout is not None
            client.stdout.close()
        if not line.startswith("{"):
            raise RuntimeError(f"client: {line!r} "
                               f"{(tmp / f'client-{nodes}.log').read_text()[-1500:]}")
        result: dict[str, Any] = json.loads(line)
        result.update(nodes=nodes, setup_s=setup_s, load1=os.getloadavg()[0],
                      registry_errors=sum('"level": "error"' in entry
                                          for entry in log.read_text().splitlines()))
        return result


def per_change_ms(result: dict[str, Any]) -> float:
    """The registry's CPU per change beyond what it uses idle, in milliseconds."""
    churn, idle = result["churn"], result["idle"]
    extra = churn["cpu_s"]["registry"] - idle["cores"]["registry"] * churn["wall_s"]
    return extra / max(1, result["changes"]["count"]) * 1e3


def print_rows(rows: list[dict[str, Any]]) -> None:
    print("CPU: share of one core (registry / its wireguard-go / the bench client); busy: cores "
          "busy on the whole machine during churn, anyone's")
    header = ("nodes", "churn %/min", "changes", "idle CPU", "churn CPU reg/wg/client",
              "CPU/change ms", "snapshot ms", "connect ms/stream", "each p95 ms",
              "every p50 ms", "every p95 ms", "every max ms", "missing", "RSS MiB",
              "peak MiB", "busy")
    table = []
    for r in rows:
        ch, churn = r["changes"], r["churn"]
        snap = r["snapshots"]
        cold = r["snapshot_count"]
        table.append((
            str(r["nodes"]), f"{r['churn_pct']:g}", str(ch["count"]),
            f"{r['idle']['cores']['registry']:.3f}",
            "/".join(f"{churn['cores'][k]:.3f}" for k in ("registry", "wireguard_go",
                                                          "client")),
            f"{per_change_ms(r):.2f}",
            f"{snap['cpu_s']['registry'] / cold * 1e3:.1f}" if cold else "-",
            f"{r['connect']['cpu_s']['registry'] / max(1, r['nodes'] - cold) * 1e3:.2f}",
            f"{ch['each_ms']['p95']:.1f}", f"{ch['every_ms']['p50']:.1f}",
            f"{ch['every_ms']['p95']:.1f}", f"{ch['every_ms']['max']:.1f}",
            str(ch["missing_deliveries"]),
            f"{churn['registry_kib']['VmRSS'] / 1024:.0f}",
            f"{churn['registry_kib']['VmHWM'] / 1024:.0f}",
            f"{churn['machine_busy_cores']:.2f}"))
    print_table(header, table)


def main() -> int:
    if sys.argv[1:2] == ["_client"]:  # the simulated nodes, started by `run_size`
        return client_main(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="1000",
                        help="simulated nodes, comma-separated sizes (default 1000)")
    parser.add_argument("--churn", type=float, default=10.0,
                        help="changes per minute, as a percentage of the nodes (default 10)")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="length of the churn phase (default 60)")
    parser.add_argument("--idle-seconds", type=float, default=10.0,
                        help="length of the idle phase (default 10)")
    parser.add_argument("--snapshots", type=int, default=10,
                        help="nodes that start with a full snapshot (default 10)")
    parser.add_argument("--poll-interval", type=float, default=0.2,
                        help="the registry's device poll interval while nothing changes "
                             "(default 0.2, as shipped; a quarter of it for 5 s after a "
                             "change): part of every endpoint change's latency")
    parser.add_argument("--profile", metavar="FILE",
                        help="run the registry under cProfile, stats to FILE.NODES")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"
                                             / "registry_scale.json"))
    args = parser.parse_args()
    require_root()
    exit_on_sigterm()
    report: dict[str, Any] = {"commit": commit(), "python": platform.python_version(),
                              "cpus": os.cpu_count(), "churn_pct": args.churn,
                              "seconds": args.seconds, "poll_interval_s": args.poll_interval,
                              "rows": []}
    with tempfile.TemporaryDirectory() as tmp_name:
        for nodes in (int(n) for n in args.nodes.split(",")):
            row = run_size(nodes, args, Path(tmp_name))
            row.update(churn_pct=args.churn, snapshot_count=min(args.snapshots, nodes))
            report["rows"].append(row)
            print(f"{nodes} nodes: done", file=sys.stderr, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"registry with N nodes following (commit {report['commit']}); churn "
          f"{args.churn:g} % of the nodes per minute for {args.seconds:g} s; device polled "
          f"every {args.poll_interval:g} s")
    print_rows(report["rows"])
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
