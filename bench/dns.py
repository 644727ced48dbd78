"""DNS-SD throughput and latency of `wgpunch registry --dns` with 10,000 peers.

    python3 bench/dns.py [--peers 10000] [--queries 10000] [--concurrency 1,8,32]
                         [--poll-interval 0.2,60] [--churn 0,1000] [--out FILE]

Set-up, all inside one throwaway network namespace: a wireguard-go device with a key, a
listen port and a tunnel address, filled with `--peers` peers (real keys, an endpoint and a
/32 each) through the device layer (`Device.configure`, batches of 500); then the real
`wgpunch registry --dns PORT --zone bench.internal.` on that device, once per
`--poll-interval` and `--churn` level. The registry's observer reads the device on the event
loop that also answers (`Device.changes`: wireguard-go writes every peer, the registry parses
only those that changed): at 0.2 s (as shipped) those reads run while the answers are
measured; at 60 s at most one does, so that row shows what answering itself costs. Before
the rows, this script times the two kinds of read in its own process: a full one
(`Device.state`, every peer parsed) and a poll of the unchanged device.

Churn: with `--churn 0` the peers never change. In a real registry every node keeps a watch
stream open through its tunnel, with a heartbeat every 2 s, so its peer's rx/tx counters move
every ~2 s (and its handshake time every ~2 min): at 10,000 nodes ~1,000 changed peers per
0.2 s poll, `--churn 1000`. A helper process in a second namespace plays those nodes for
real (see "churn" below): it holds the peers' private keys, completes a WireGuard handshake
per peer with the registry's wireguard-go, and sends `--churn` peers' ICMP echoes through
their tunnels per 0.2 s, spread evenly; the registry's kernel answers each, so wireguard-go
counts both rx and tx for the peer, as for a heartbeat. Its CPU, and wireguard-go's, are
printed apart from the registry's.

Measurement: a small asyncio client in the same namespace sends SRV queries for random peers
(uppercase labels, as wgsd-client sends them) over UDP, `--concurrency` queries in flight at
a time (one socket each), and times each from send to answer. Every answer is checked
(NOERROR, one SRV with the peer's port). Queries per second count the whole run. Before the
rows of a registry run, the registry's CPU is sampled for a few seconds without queries: what
its polls alone cost ("poll CPU"). The machine has other users: each row gives the CPU of every
process of the bench, the cores busy on the machine and its load.

Prints a table, with the registry's resident memory after each row, and writes JSON
(default bench/results/dns.json). Needs root and wireguard-go.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import os
import platform
import resource
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import (
    busy_cores,
    cpu_s,
    fill,
    machine_cpu,
    percentile,
    prefix,
    print_table,
    run_wgpunch,
    start_device,
    status_kib,
)
from wgpunch.keys import Key, generate_keypair
from wgpunch.lab.netns import (
    Namespace,
    WireguardGo,
    read_line,
    require_root,
    stop_process,
    wait_for,
)
from wgpunch.wg.model import Endpoint, PeerConfig
from wgpunch.wg.uapi import UapiDevice

ZONE = "bench.internal."
DNS_PORT = 5353
TUNNEL_IP = "10.98.255.254"
LISTEN_PORT = 51820
# The link between the registry's namespace and the simulated nodes' (--churn): a /30 of
# TEST-NET-1; the nodes' namespace owns the peers' endpoints, 198.18.0.0/15.
LINK_REGISTRY, LINK_NODES = "192.0.2.1", "192.0.2.2"
ENDPOINTS = "198.18.0.0/15"
CHURN_TICK_S = 0.2  # --churn counts peers per this: the poll interval as shipped
IDLE_S = 4.0  # the registry's CPU is sampled this long without queries, per registry run

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


@dataclass
class SimNode:
    """What the churn helper needs of one peer: it plays that node."""

    private: Key
    tunnel_ip: str
    endpoint: Endpoint


@dataclass
class Host:
    """The registry's namespace with its filled wireguard-go device."""

    ns: Namespace
    ifname: str
    daemon: WireguardGo
    public: Key
    labels: list[tuple[str, int]]  # (base32 key, endpoint port) per peer, for the client
    nodes: list[SimNode]
    reads: dict[str, float]  # `fill`'s read times


def peer_configs(count: int) -> tuple[list[PeerConfig], list[SimNode]]:
    """`count` peers: key, endpoint in 198.18.0.0/15 (RFC 2544, benchmarking), a /32 each."""
    configs, nodes = [], []
    for i in range(count):
        private, public = generate_keypair()
        port = 1024 + i % 60000
        endpoint = Endpoint(ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.0.1")) + i),
                            port)
        tunnel = ipaddress.IPv4Network(
            f"{ipaddress.IPv4Address(int(ipaddress.IPv4Address('10.98.0.1')) + i)}/32")
        configs.append(PeerConfig(public, endpoint=endpoint, allowed_ips=(tunnel,)))
        nodes.append(SimNode(private, str(tunnel.network_address), endpoint))
    return configs, nodes


@contextmanager
def registry_host(peers: int, tmp: Path) -> Iterator[Host]:
    """The namespace with its filled device."""
    name = prefix("bd")
    ns, ifname = Namespace(f"{name}-reg"), f"{name}wg"
    wireguard_go: WireguardGo | None = None
    try:
        ns.add()
        wireguard_go, public = start_device(ns, ifname, f"{TUNNEL_IP}/16", LISTEN_PORT,
                                            tmp / "wireguard-go.log")
        configs, nodes = peer_configs(peers)
        reads = asyncio.run(fill_and_read(ifname, configs))
        labels = [(c.public_key.base32(), n.endpoint.port)
                  for c, n in zip(configs, nodes, strict=True)]
        yield Host(ns, ifname, wireguard_go, public, labels, nodes, reads)
    finally:
        if wireguard_go is not None:
            wireguard_go.stop()
        ns.delete()


@contextmanager
def nodes_namespace(host: Host) -> Iterator[Namespace]:
    """A second namespace that owns the peers' endpoints, linked to the registry's."""
    nodes = Namespace(f"{host.ns.name.removesuffix('-reg')}-nodes")
    outer, inner = f"{host.ifname}r", f"{host.ifname}n"
    try:
        nodes.add()
        host.ns.run(["ip", "link", "add", outer, "type", "veth", "peer", "name", inner,
                     "netns", nodes.name])
        host.ns.ip_batch([f"addr add {LINK_REGISTRY}/30 dev {outer}", f"link set {outer} up",
                          f"route add {ENDPOINTS} via {LINK_NODES}"])
        # A local route: every address of the block is the nodes' own (bind works on each).
        nodes.ip_batch([f"addr add {LINK_NODES}/30 dev {inner}", f"link set {inner} up",
                        f"route add local {ENDPOINTS} dev lo"])
        yield nodes
    finally:
        nodes.delete()  # the veth pair goes with it


@contextmanager
def churn(host: Host, nodes: Namespace, per_poll: int, interval_s: float, tmp: Path
          ) -> Iterator[subprocess.Popen]:
    """The churn helper, running and every simulated node with a session."""
    spec = {"server": [LINK_REGISTRY, LISTEN_PORT], "server_public": host.public.hex(),
            "target": TUNNEL_IP, "churn": per_poll, "interval_s": interval_s,
            "peers": [[n.private.hex(), n.tunnel_ip, str(n.endpoint.ip), n.endpoint.port]
                      for n in host.nodes]}
    spec_path, log = tmp / f"churn-{per_poll}.json", tmp / f"churn-{per_poll}.log"
    spec_path.write_text(json.dumps(spec))
    spec_path.chmod(0o600)  # private keys, if throwaway ones
    with log.open("w") as errors:
        proc = nodes.popen([sys.executable, str(Path(__file__).resolve()), "_churn",
                            str(spec_path)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=errors, start_new_session=True)
    try:
        line = read_line(proc, timeout=300, what="the churn helper")
        if line != "ready":
            raise RuntimeError(f"churn helper: {line!r} {log.read_text()[-500:]}")
        yield proc
    finally:
        stop_process(proc)
        assert proc.stdout is not None
        proc.stdout.close()
        print(f"churn {per_poll}: {log.read_text().strip()[-300:]}", file=sys.stderr)


async def fill_and_read(ifname: str, configs: list[PeerConfig]) -> dict[str, float]:
    """Configure the peers in batches; return how long reads of the whole device take: a
    full one, and a poll (`changes`) of the unchanged device, in wall and CPU time."""
    await fill(ifname, configs)
    device = UapiDevice(ifname)
    try:
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


def registry(ns: Namespace, ifname: str, poll_s: float, log: Path
             ) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    return run_wgpunch(ns, ["registry", "--interface", ifname, "--dns", str(DNS_PORT),
                            "--zone", ZONE, "--poll-interval", str(poll_s),
                            # The bench's client asks from the registry's own address.
                            "--dns-allow", f"{TUNNEL_IP}/32"],
                       log, ready="dns_serving")


def run_client(ns: Namespace, labels: list[tuple[str, int]], queries: int,
               concurrency: int) -> dict[str, Any]:
    args = {"host": TUNNEL_IP, "port": DNS_PORT, "zone": ZONE, "keys": labels,
            "queries": queries, "concurrency": concurrency}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as spec:
        json.dump(args, spec)
        spec.flush()
        done = ns.run([sys.executable, "-c", CLIENT, spec.name], timeout=600)
    return json.loads(done.stdout)


# -- churn: nodes that talk to the registry through their tunnels ---------------------------
#
# A real node holds a watch stream through its tunnel, with a heartbeat every 2 s, so the
# registry's device sees each peer's rx/tx counters move every ~2 s and its handshake renewed
# every ~2 min. The helper below plays such nodes for real: it holds every simulated peer's
# private key, does WireGuard's handshake (Noise_IKpsk2, whitepaper §5.4) with the registry's
# wireguard-go and sends each active peer's ICMP echo through its tunnel once per period; the
# registry's kernel answers it, so wireguard-go both receives (rx) and sends (tx) for that peer,
# as for a heartbeat. It runs in a second namespace that owns 198.18.0.0/15 (the peers'
# endpoints), one UDP socket per peer bound to that peer's endpoint, so no endpoint moves.

WG_CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
WG_IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
WG_LABEL_MAC1 = b"mac1----"
TAI64_BASE = (1 << 62) + 10
REKEY_S = 100.0  # a session is renewed after this; wireguard-go drops it at 180 s
HANDSHAKE_BATCH = 64  # in flight at once: wireguard-go calls itself under load at 128 queued
CHURN_PERIOD_S = 2.0  # how often a real node's heartbeat crosses its tunnel
CHURN_SLICES = 20  # sends per churn interval (0.2 s: one every 10 ms)


def _blake2s(*parts: bytes) -> bytes:
    h = hashlib.blake2s()
    for part in parts:
        h.update(part)
    return h.digest()


def _kdf(key: bytes, data: bytes, count: int) -> list[bytes]:
    """WireGuard's KDF_n: HKDF with HMAC-BLAKE2s."""
    prk = hmac.digest(key, data, hashlib.blake2s)
    out, last = [], b""
    for i in range(1, count + 1):
        last = hmac.digest(prk, last + bytes([i]), hashlib.blake2s)
        out.append(last)
    return out


def _nonce(counter: int) -> bytes:
    return bytes(4) + counter.to_bytes(8, "little")


def _checksum(data: bytes) -> int:
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo(source: str, target: str, ident: int) -> bytes:
    """An IPv4 ICMP echo request, padded to 48 bytes as WireGuard pads (multiple of 16)."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident & 0xFFFF, 1) + bytes(20)
    icmp = icmp[:2] + _checksum(icmp).to_bytes(2, "big") + icmp[4:]
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0, 64, 1, 0,
                         socket.inet_aton(source), socket.inet_aton(target))
    header = header[:10] + _checksum(header).to_bytes(2, "big") + header[12:]
    return header + icmp


class SimPeer:
    """One simulated node: its key, its socket, its session with the registry's device."""

    def __init__(self, index: int, private: bytes, server_public: bytes, sock: socket.socket,
                 packet: bytes) -> None:
        self.index = index
        self.private = X25519PrivateKey.from_private_bytes(private)
        self.public = self.private.public_key().public_bytes_raw()
        self.server_public = server_public
        self.sock = sock
        self.packet = packet
        self.pending: tuple[X25519PrivateKey, bytes, bytes] | None = None  # e, chaining, hash
        self.send: ChaCha20Poly1305 | None = None
        self.receiver = 0
        self.counter = 0
        self.since = 0.0  # when the session began
        self.initiated = -1e9  # when the last initiation was sent

    def initiation(self) -> bytes:
        s_r = self.server_public
        chaining = _blake2s(WG_CONSTRUCTION)
        hashed = _blake2s(_blake2s(chaining, WG_IDENTIFIER), s_r)
        ephemeral = X25519PrivateKey.generate()
        e_pub = ephemeral.public_key().public_bytes_raw()
        chaining = _kdf(chaining, e_pub, 1)[0]
        hashed = _blake2s(hashed, e_pub)
        chaining, key = _kdf(chaining, ephemeral.exchange(X25519PublicKey.from_public_bytes(s_r)),
                             2)
        static = ChaCha20Poly1305(key).encrypt(_nonce(0), self.public, hashed)
        hashed = _blake2s(hashed, static)
        chaining, key = _kdf(chaining,
                             self.private.exchange(X25519PublicKey.from_public_bytes(s_r)), 2)
        now = time.time_ns()
        stamp = struct.pack(">QI", TAI64_BASE + now // 10**9, now % 10**9)
        encrypted_stamp = ChaCha20Poly1305(key).encrypt(_nonce(0), stamp, hashed)
        hashed = _blake2s(hashed, encrypted_stamp)
        body = struct.pack("<II", 1, self.index) + e_pub + static + encrypted_stamp
        mac1 = hashlib.blake2s(body, digest_size=16,
                               key=_blake2s(WG_LABEL_MAC1, s_r)).digest()
        self.pending, self.initiated = (ephemeral, chaining, hashed), time.monotonic()
        return body + mac1 + bytes(16)

    def response(self, message: bytes, now: float) -> bool:
        """Complete the handshake with wireguard-go's response; False if it is not one."""
        if self.pending is None or len(message) != 92:
            return False
        ephemeral, chaining, hashed = self.pending
        sender, receiver = struct.unpack_from("<II", message, 4)
        if receiver != self.index:
            return False
        e_r = message[12:44]
        chaining = _kdf(chaining, e_r, 1)[0]
        hashed = _blake2s(hashed, e_r)
        e_r_key = X25519PublicKey.from_public_bytes(e_r)
        chaining = _kdf(chaining, ephemeral.exchange(e_r_key), 1)[0]
        chaining = _kdf(chaining, self.private.exchange(e_r_key), 1)[0]
        chaining, tau, key = _kdf(chaining, bytes(32), 3)  # no preshared key: zeros
        hashed = _blake2s(hashed, tau)
        ChaCha20Poly1305(key).decrypt(_nonce(0), message[44:60], hashed)  # authenticates
        send_key, _receive_key = _kdf(chaining, b"", 2)
        self.send, self.receiver, self.counter, self.since = \
            ChaCha20Poly1305(send_key), sender, 0, now
        self.pending = None
        return True

    def data(self) -> bytes:
        assert self.send is not None
        counter, self.counter = self.counter, self.counter + 1
        return struct.pack("<IIQ", 4, self.receiver, counter) + \
            self.send.encrypt(_nonce(counter), self.packet, b"")


def churn_helper(spec_path: str) -> int:
    """The helper process (`dns.py _churn SPEC`), inside the nodes' namespace. SPEC: JSON
    {server: [ip, port], server_public: hex, target: ip, churn, interval_s, peers: [[private
    hex, tunnel ip, endpoint ip, endpoint port], ...]}. Prints `ready` once every peer has a
    session, then sends; SIGTERM ends it, with its counts on stderr."""
    spec = json.loads(Path(spec_path).read_text())
    server = (spec["server"][0], spec["server"][1])
    server_public = bytes.fromhex(spec["server_public"])
    # Each active peer sends once per CHURN_PERIOD_S (or more often, for churn beyond that).
    active = spec["peers"][:min(len(spec["peers"]), spec["churn"] * round(
        CHURN_PERIOD_S / spec["interval_s"]))]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(active) + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
    poller = select.epoll()
    peers: dict[int, SimPeer] = {}
    for index, (private, tunnel_ip, ip, port) in enumerate(active, start=1):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ip, port))
        sock.setblocking(False)
        peer = SimPeer(index, bytes.fromhex(private), server_public, sock,
                       _echo(tunnel_ip, spec["target"], index))
        peers[sock.fileno()] = peer
        poller.register(sock.fileno(), select.EPOLLIN)
    counts = {"handshakes": 0, "sent": 0, "received": 0, "other": 0}
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))

    def drain(timeout: float) -> None:
        for fd, _ in poller.poll(timeout):
            peer = peers[fd]
            while True:
                try:
                    message = peer.sock.recv(2048)
                except BlockingIOError:
                    break
                kind = message[0] if message else 0
                if kind == 2 and peer.response(message, time.monotonic()):
                    counts["handshakes"] += 1
                elif kind == 4:
                    counts["received"] += 1
                else:
                    counts["other"] += 1  # a cookie reply (wireguard-go under load), or noise

    # Handshakes first, a batch at a time, each batch retried until every peer has a session.
    order = list(peers.values())
    for start in range(0, len(order), HANDSHAKE_BATCH):
        batch = order[start:start + HANDSHAKE_BATCH]
        for _attempt in range(20):
            missing = [peer for peer in batch if peer.send is None]
            if not missing:
                break
            for peer in missing:
                peer.sock.sendto(peer.initiation(), server)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and any(p.send is None for p in missing):
                drain(0.05)
        else:
            raise RuntimeError(f"churn: no handshake for {sum(p.send is None for p in batch)} "
                               f"peers of a batch")
    print("ready", flush=True)

    # Real heartbeats are spread over time, not sent in a burst per poll: CHURN_SLICES sends
    # per interval, each for its share of the peers.
    step_s, turn, tick, owed = spec["interval_s"] / CHURN_SLICES, 0, time.monotonic(), 0.0
    while not stop:
        now = time.monotonic()
        if now >= tick:
            owed += spec["churn"] / CHURN_SLICES
            count, owed = int(owed), owed - int(owed)
            for _ in range(count):
                peer, turn = order[turn], (turn + 1) % len(order)
                if now - peer.since > REKEY_S and now - peer.initiated > 5.0:
                    peer.sock.sendto(peer.initiation(), server)  # renewed; data next turn
                else:
                    peer.sock.sendto(peer.data(), server)
                    counts["sent"] += 1
            tick = max(tick + step_s, now)
        drain(max(0.0, tick - time.monotonic()))
    print(json.dumps(counts), file=sys.stderr, flush=True)
    return 0


class CpuMeter:
    """CPU used by the registry, its wireguard-go and the churn helper over one interval."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.started = time.perf_counter()
        self.cpu = {name: cpu_s(pid) for name, pid in pids.items()}

    def shares(self) -> dict[str, float]:
        """Each process's CPU since the start, as a share of one core."""
        wall = time.perf_counter() - self.started
        return {name: (cpu_s(pid) - self.cpu[name]) / wall for name, pid in self.pids.items()}


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children (the client: `ns.run` waits)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(host: Host, poll_s: float, churn_level: int, helper: subprocess.Popen | None,
            queries: int, levels: list[int], tmp: Path) -> list[dict[str, Any]]:
    """One registry process polling every `poll_s`; one row per concurrency level."""
    rows = []
    log = tmp / f"registry-{churn_level}-{poll_s}.log"
    with registry(host.ns, host.ifname, poll_s, log) as proc:
        labels = host.labels
        # The table is loaded once the last peer configured is answered.
        wait_for(lambda: not run_client(host.ns, labels[-1:], 1, 1)["errors"], timeout=60,
                 what="the registry to load the table")
        run_client(host.ns, labels, 500, 4)  # warm-up
        assert host.daemon.proc is not None
        pids = {"registry": proc.pid, "wireguard_go": host.daemon.proc.pid,
                "churn": helper.pid if helper else None}
        # The observer alone: the registry's CPU without queries is what its polls cost.
        meter = CpuMeter(pids)
        time.sleep(IDLE_S)
        idle = meter.shares()
        for level in levels:
            meter, machine = CpuMeter(pids), machine_cpu()
            client = children_cpu_s()
            got = run_client(host.ns, labels, queries, level)
            busy = meter.shares()
            busy["client"] = (children_cpu_s() - client) / (time.perf_counter() - meter.started)
            busy["machine"] = busy_cores(machine)
            lat = got["latencies_ms"]
            rows.append({
                "churn": churn_level, "poll_interval_s": poll_s, "concurrency": level,
                "answered": len(lat), "errors": len(got["errors"]),
                "qps": len(lat) / got["wall_s"], "p50_ms": percentile(lat, 50),
                "p99_ms": percentile(lat, 99), "max_ms": max(lat),
                "poll_cpu_ms": idle["registry"] * poll_s * 1e3,
                "idle_cpu": idle, "busy_cpu": busy,
                "registry_rss_mib": status_kib(proc.pid)["VmRSS"] / 1024,
                "load1": os.getloadavg()[0],
            })
            print(f"churn {churn_level}, poll {poll_s} s, {level} in flight: done",
                  file=sys.stderr)
    return rows


def main() -> int:
    if sys.argv[1:2] == ["_churn"]:  # the churn helper, started by `churn` above
        return churn_helper(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=10_000,
                        help="queries per row (default 10000)")
    parser.add_argument("--concurrency", default="1,8,32",
                        help="queries in flight, comma-separated levels (default 1,8,32)")
    parser.add_argument("--poll-interval", default="0.2,60",
                        help="the registry's device poll intervals to run, comma-separated "
                             "(default 0.2,60: as shipped, and the observer nearly idle)")
    parser.add_argument("--churn", default="0",
                        help="peers whose tunnels carry a packet each way per 0.2 s, as a "
                             "node's watch-stream heartbeat does (every 2 s each: 1000 for "
                             "10,000 nodes), comma-separated levels (default 0)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dns.json"))
    args = parser.parse_args()
    require_root()
    levels = [int(c) for c in args.concurrency.split(",")]
    polls = [float(p) for p in args.poll_interval.split(",")]
    churns = [int(c) for c in args.churn.split(",")]
    report: dict[str, Any] = {"peers": args.peers, "queries": args.queries, "zone": ZONE,
                              "python": platform.python_version(), "cpus": os.cpu_count()}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name, ExitStack() as stack:
        tmp = Path(tmp_name)
        host = stack.enter_context(registry_host(args.peers, tmp))
        nodes = stack.enter_context(nodes_namespace(host)) if any(churns) else None
        report["device_reads"] = reads = host.reads
        for level in churns:
            with ExitStack() as running:
                helper = (running.enter_context(churn(host, nodes, level, CHURN_TICK_S, tmp))
                          if level and nodes else None)
                for poll_s in polls:
                    rows += measure(host, poll_s, level, helper, args.queries, levels, tmp)
    report["rows"] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(f"DNS-SD SRV queries over UDP, {args.peers} peers. Reading the device: in full "
          f"(every peer parsed) {reads['full_read_s'] * 1e3:.0f} ms; a poll of the unchanged "
          f"device (the registry's observer) {reads['poll_s'] * 1e3:.0f} ms, of which "
          f"{reads['poll_cpu_s'] * 1e3:.0f} ms CPU of this process")
    print("poll CPU: the registry's CPU per poll without queries; CPU %: share of one core "
          "during the row (registry / its wireguard-go / churn helper / DNS client); busy: "
          "cores busy on the whole machine, anyone's; load: 1-min average")
    header = ("churn", "poll s", "in flight", "answered", "errors", "queries/s", "p50 ms",
              "p99 ms", "max ms", "poll CPU ms", "CPU % reg/wg/churn/client", "busy",
              "RSS MiB", "load")
    print_table(header, [(
        str(r["churn"]), f"{r['poll_interval_s']:g}", str(r["concurrency"]), str(r["answered"]),
        str(r["errors"]), f"{r['qps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
        f"{r['max_ms']:.1f}", f"{r['poll_cpu_ms']:.1f}",
        "/".join(f"{r['busy_cpu'][k] * 100:.0f}"
                 for k in ("registry", "wireguard_go", "churn", "client")),
        f"{r['busy_cpu']['machine']:.2f}", f"{r['registry_rss_mib']:.0f}",
        f"{r['load1']:.2f}") for r in rows])
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
