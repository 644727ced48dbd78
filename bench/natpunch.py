"""What the natpunch rendezvous server costs: handshakes, lookups and memory, on loopback.

    python3 bench/natpunch.py [--sizes 1000,10000,65536] [--duration 2.5] [--window 16]
                              [--out FILE]

The server is the real `wgpunch rendezvous` (`python3 -m wgpunch.cli rendezvous --listen
127.0.0.1:P --key TMP --legacy 127.0.0.1:P2 --max-peers N`, N the largest size but at least
the shipped 65,536) in a process of its own, logging as shipped (INFO, one line per
registration) to a file. The load generator is this process: plain non-blocking UDP sockets
and one epoll loop. Every address is in 127.0.0.0/8: all traffic stays on loopback.

Handshakes (natpunch-go's Noise IK). The server allows 5/s per source address (burst 20) and
2,000/s overall (burst 2,000), so each handshake comes from a source address of its own
(127.16.0.0 upwards) and what is measured is the server, not its per-source limiter; one row
shows what a single source gets (50/s offered from 127.0.0.2 for 4 s). The handshake messages
are computed before any clock runs (in a process pool: a client's half of a handshake costs
about what the server's does), so the load generator only sends and receives. Every reply is
checked for its length and type, and after the run 1 in 16 (and every session used below) is
read by Noise to the end. Rows: 1 in flight (an idle server's latency), then the fills of the
table to each size with `--window` in flight (throughput; latency then includes queueing; a
handshake the overall limit refuses gets no answer and counts as failed after 0.5 s).

Lookups (type 3 requests) for `--duration` seconds per row at each table size, on 1 and on 8
sessions (one request in flight and one source address each), asking for random registered
keys; every reply is decrypted and must carry the endpoint the key registered from. Legacy
(the wireguard-tools protocol; its own table, filled with the same keys by 64-byte
registrations, also timed) the same way.

"srv µs/op" is the server's CPU time (/proc/PID/task/*/schedstat, in ns) per answered
operation (refused ones included, in the single-source row); "srv busy" is that CPU time over
the row's wall time (100 %: the server was the bottleneck); "cli busy" the same for the load
generator. The two share 2 cores with whatever else runs: the load average is printed. RSS is
VmRSS from /proc/PID/status: empty, then after each noise fill and each legacy fill.

Prints a table and writes JSON (default bench/results/natpunch.json). Needs no root; about
1.5 minutes with the defaults (the fill to 65,536 alone takes 33 s at the 2,000/s limit).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import secrets
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wgpunch.errors import MalformedPacket, NoiseError
from wgpunch.keys import generate_keypair
from wgpunch.lab.netns import stop_process
from wgpunch.natpunch import wire
from wgpunch.natpunch.limits import Limits
from wgpunch.natpunch.noise import CipherState, HandshakeIK

SRC = Path(__file__).resolve().parents[1] / "src"  # again: ruff wants the imports first
SERVER_IP = "127.0.0.1"
SINGLE_SOURCE = "127.0.0.2"
FILL_BASE = int.from_bytes(socket.inet_aton("127.16.0.0"), "big")  # one address per handshake
SESSION_BASE = "127.2.0."  # the lookup sessions' sockets, one address each
LEGACY_BASE = "127.3.0."  # the legacy fill's sockets
SESSIONS = 8
UNLOADED = 200  # handshakes one at a time, for the latency of an idle server
SINGLE_RATE, SINGLE_S = 50.0, 4.0  # offered from one source: well above 5/s
VERIFY_EVERY = 16
CHUNK = 512  # handshakes per task in the pool
TIMEOUT_S = 2.0  # for a lookup: only a lost datagram or a stalled server takes this long
# A handshake the overall limit (2,000/s) refuses gets no answer: give up on it soon, so that
# its slot in the window does not sit idle (answered ones take milliseconds, queueing included).
HANDSHAKE_TIMEOUT_S = 0.5
ZERO = bytes(32)
SHIPPED = Limits()


# -- handshakes prepared ahead -----------------------------------------------------------------

class Prepared(NamedTuple):
    """A client's first handshake message, with what it takes to redo it: `ephemeral` and
    `stamp` fixed, the same message (and so the same handshake state) comes out again."""

    private: bytes
    public: bytes
    ephemeral: bytes
    stamp: int
    message: bytes


def _initiator(server_public: bytes, prepared: Prepared) -> tuple[HandshakeIK, bytes]:
    handshake = HandshakeIK.initiator(prepared.private, server_public, wire.PROLOGUE,
                                      ephemeral_private=prepared.ephemeral)
    return handshake, handshake.write_message(wire.timestamp(prepared.stamp))


def prepare(server_public: bytes, count: int) -> list[Prepared]:
    """`count` handshake inits from fresh keys (run in the pool)."""
    out = []
    for _ in range(count):
        private, public = generate_keypair()
        blank = Prepared(private.raw, public.raw, secrets.token_bytes(32), time.time_ns(), b"")
        _, noise = _initiator(server_public, blank)
        out.append(blank._replace(message=wire.handshake_init(secrets.randbits(32), noise)))
    return out


def finish(server_public: bytes, prepared: Prepared, reply: bytes
           ) -> tuple[int, CipherState, CipherState]:
    """The session a reply opens: (server's index, send, receive); raises if it is not one."""
    handshake, _ = _initiator(server_public, prepared)
    index, noise = wire.parse_handshake_resp(reply)
    if handshake.read_message(noise) != b"":
        raise NoiseError("a handshake reply with a payload")
    send, receive = handshake.split()
    return index, send, receive


def verify(server_public: bytes, pairs: list[tuple[Prepared, bytes]]) -> int:
    """How many replies complete their handshake (run in the pool)."""
    good = 0
    for prepared, reply in pairs:
        try:
            finish(server_public, prepared, reply)
        except (MalformedPacket, NoiseError):
            continue
        good += 1
    return good


# -- the server --------------------------------------------------------------------------------

@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    public: bytes
    noise: tuple[str, int]
    legacy: tuple[str, int]
    log: Path
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((SERVER_IP, 0))
        return int(probe.getsockname()[1])


@contextmanager
def rendezvous(tmp: Path, max_peers: int) -> Iterator[Server]:
    private, public = generate_keypair()
    key = tmp / "rendezvous.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(private.base64() + "\n")
    noise, legacy = (SERVER_IP, free_port()), (SERVER_IP, free_port())
    log = tmp / "rendezvous.log"
    argv = [sys.executable, "-m", "wgpunch.cli", "rendezvous",
            "--listen", f"{noise[0]}:{noise[1]}", "--key", str(key),
            "--legacy", f"{legacy[0]}:{legacy[1]}", "--max-peers", str(max_peers)]
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": f"{SRC}:{path}" if path else str(SRC)}
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, public.raw, noise, legacy, log)
    try:
        deadline = time.monotonic() + 30
        while "rendezvous on" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {log.read_text()[-500:]}")
            time.sleep(0.05)
        yield server
    finally:
        stop_process(proc)
        # Its last line sums up what it did ("rendezvous: stopped (found 3, handshakes 2)").
        stopped = re.findall(r"rendezvous: stopped \((.*)\)", log.read_text(errors="replace"))
        if stopped:
            for item in stopped[-1].split(", "):
                name, _, value = item.rpartition(" ")
                if value.isdigit():
                    server.counts[name] = int(value)


def server_cpu_s(pid: int) -> float:
    """CPU time of all the process's threads: schedstat counts nanoseconds, where stat counts
    10 ms ticks (too coarse for a row that lasts 0.1 s)."""
    try:
        return sum(int(task.joinpath("schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError):  # a kernel without CONFIG_SCHED_INFO
        # utime and stime are fields 14 and 15; the name in parentheses may hold spaces.
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Meter:
    """Wall time, and the CPU time of the server and of this process, over a `with` block."""

    pid: int
    wall_s: float = 0.0
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    def __enter__(self) -> Meter:
        self._start = (time.perf_counter(), server_cpu_s(self.pid), time.process_time())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, server, client = self._start
        self.wall_s = time.perf_counter() - wall
        self.server_cpu_s = server_cpu_s(self.pid) - server
        self.client_cpu_s = time.process_time() - client


# -- load: handshakes --------------------------------------------------------------------------

def endpoint_bytes(sock: socket.socket) -> bytes:
    """The socket's address as a reply carries it (ipv4 ‖ port)."""
    host, port = sock.getsockname()
    return socket.inet_aton(host) + port.to_bytes(2, "big")


@dataclass
class HandshakeRun:
    latencies_ms: list[float] = field(default_factory=list)
    replies: list[tuple[Prepared, bytes, bytes]] = field(default_factory=list)  # + endpoint
    sent_order: list[int] = field(default_factory=list)  # of each answered one, from 0
    lost: int = 0
    malformed: int = 0
    used: int = 0  # prepared handshakes consumed


def run_handshakes(server: tuple[str, int], jobs: Sequence[Prepared], source: Callable[[], str],
                   *, want: int | None, window: int, interval_s: float = 0.0) -> HandshakeRun:
    """Send `jobs`, each from a socket of its own bound to `source()`, `window` in flight, at
    most one per `interval_s`; stop once `want` are answered (None: when `jobs` run out). An
    unanswered one is lost after `HANDSHAKE_TIMEOUT_S`."""
    run = HandshakeRun()
    selector = selectors.DefaultSelector()
    in_flight: dict[socket.socket, tuple[Prepared, float, bytes, int]] = {}
    deadlines: deque[tuple[float, socket.socket]] = deque()  # one timeout for all: FIFO
    next_send = time.perf_counter()
    try:
        while True:
            now = time.perf_counter()
            while (len(in_flight) < window and run.used < len(jobs) and now >= next_send
                   and (want is None or len(run.replies) + len(in_flight) < want)):
                prepared = jobs[run.used]
                run.used += 1
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.setblocking(False)
                sock.bind((source(), 0))
                at = endpoint_bytes(sock)
                sent = time.perf_counter()
                sock.sendto(prepared.message, server)
                selector.register(sock, selectors.EVENT_READ)
                in_flight[sock] = (prepared, sent, at, run.used - 1)
                deadlines.append((sent + HANDSHAKE_TIMEOUT_S, sock))
                next_send = next_send + interval_s if interval_s else now
            more = run.used < len(jobs) and (want is None or len(run.replies) < want)
            if not in_flight and not more:
                return run
            wait = deadlines[0][0] - now if deadlines else HANDSHAKE_TIMEOUT_S
            if more and len(in_flight) < window and interval_s:
                wait = min(wait, next_send - now)
            for key, _ in selector.select(max(0.0, wait)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data = sock.recv(2048)
                got = time.perf_counter()
                prepared, sent, at, order = in_flight.pop(sock)
                selector.unregister(sock)
                sock.close()
                run.latencies_ms.append((got - sent) * 1e3)
                if len(data) == wire.HANDSHAKE_RESP_LEN and data[0] == wire.HANDSHAKE_RESP:
                    run.replies.append((prepared, data, at))
                    run.sent_order.append(order)
                else:
                    run.malformed += 1
            now = time.perf_counter()
            while deadlines and (deadlines[0][1] not in in_flight or deadlines[0][0] <= now):
                _, sock = deadlines.popleft()
                if in_flight.pop(sock, None) is not None:
                    run.lost += 1
                    selector.unregister(sock)
                    sock.close()
    finally:
        for sock in in_flight:
            sock.close()
        selector.close()


# -- load: request/reply on fixed sockets ------------------------------------------------------

class Channel(Protocol):
    sock: socket.socket

    def request(self) -> tuple[bytes, bytes] | None:
        """The next datagram and what its reply must say; None: this channel is done."""

    def check(self, reply: bytes, expected: bytes) -> bool: ...


@dataclass
class Exchange:
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    timeouts: int = 0


def run_exchange(server: tuple[str, int], channels: Sequence[Channel],
                 duration_s: float | None) -> Exchange:
    """One request in flight per channel until `duration_s` is over (None: until every
    channel is done); every reply is checked."""
    out = Exchange()
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, tuple[Channel, bytes, float]] = {}
    stop_at = time.perf_counter() + duration_s if duration_s is not None else float("inf")

    def send(channel: Channel) -> None:
        message = channel.request()
        if message is None:
            return
        sent = time.perf_counter()
        channel.sock.sendto(message[0], server)
        pending[channel.sock] = (channel, message[1], sent)

    try:
        for channel in channels:
            selector.register(channel.sock, selectors.EVENT_READ)
            send(channel)
        while pending:
            now = time.perf_counter()
            oldest = min(sent for _, _, sent in pending.values())
            for key, _ in selector.select(max(0.0, oldest + TIMEOUT_S - now)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data = sock.recv(2048)
                got = time.perf_counter()
                entry = pending.pop(sock, None)
                if entry is None:  # a late reply to a request that timed out
                    out.errors += 1
                    continue
                channel, expected, sent = entry
                out.latencies_ms.append((got - sent) * 1e3)
                try:
                    ok = channel.check(data, expected)
                except (MalformedPacket, NoiseError, ValueError):
                    ok = False
                out.errors += not ok
                if got < stop_at:
                    send(channel)
            now = time.perf_counter()
            for sock, (channel, _, sent) in list(pending.items()):
                if now - sent >= TIMEOUT_S:
                    out.timeouts += 1
                    del pending[sock]
                    if now < stop_at:
                        send(channel)
    finally:
        selector.close()
    return out


def bound_socket(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind((address, 0))
    return sock


@dataclass
class NoiseLookup:
    """One natpunch-go session asking for random registered keys."""

    sock: socket.socket
    mine: bytes
    index: int
    send_cipher: CipherState
    receive_cipher: CipherState
    targets: list[bytes]
    found_at: dict[bytes, bytes]
    rng: random.Random
    sent: int = 0

    def request(self) -> tuple[bytes, bytes]:
        target = self.rng.choice(self.targets)
        nonce = self.sent
        self.sent += 1
        sealed = self.send_cipher.encrypt(nonce, b"", self.mine + target)
        return wire.request(self.index, nonce, sealed), self.found_at[target]

    def check(self, reply: bytes, expected: bytes) -> bool:
        counter, body = wire.parse_reply(reply)
        return self.receive_cipher.decrypt(counter, b"", body) == expected


@dataclass
class LegacyLookup:
    sock: socket.socket
    mine: bytes
    targets: list[bytes]
    found_at: dict[bytes, bytes]
    rng: random.Random

    def request(self) -> tuple[bytes, bytes]:
        target = self.rng.choice(self.targets)
        return self.mine + target, self.found_at[target]

    def check(self, reply: bytes, expected: bytes) -> bool:
        return reply == expected


@dataclass
class LegacyRegister:
    """Registers keys from a shared iterator (asking for the all-zero key: empty reply)."""

    sock: socket.socket
    keys: Iterator[bytes]
    found_at: dict[bytes, bytes]

    def __post_init__(self) -> None:
        self.at = endpoint_bytes(self.sock)

    def request(self) -> tuple[bytes, bytes] | None:
        key = next(self.keys, None)
        if key is None:
            return None
        self.found_at[key] = self.at
        return key + ZERO, b""

    def check(self, reply: bytes, expected: bytes) -> bool:
        return reply == expected


# -- the run -----------------------------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def row(what: str, keys: int, in_flight: int, latencies: list[float], failed: int, meter: Meter,
        *, rate_s: float | None = None, **extra: Any) -> dict[str, Any]:
    answered = len(latencies)
    return {
        "what": what, "keys": keys, "in_flight": in_flight, "answered": answered,
        "failed": failed, "per_s": answered / (rate_s or meter.wall_s),
        "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")), "wall_s": meter.wall_s,
        "server_cpu_us_per_op": meter.server_cpu_s / answered * 1e6 if answered else None,
        "server_busy": meter.server_cpu_s / meter.wall_s,
        "client_busy": meter.client_cpu_s / meter.wall_s,
        **extra,
    }


@dataclass
class State:
    """What the load generator knows of the server's tables."""

    keys: list[bytes] = field(default_factory=list)  # noise registrations, in order
    noise_at: dict[bytes, bytes] = field(default_factory=dict)
    legacy_at: dict[bytes, bytes] = field(default_factory=dict)
    replies: list[tuple[Prepared, bytes]] = field(default_factory=list)
    sources: int = 0

    def next_source(self) -> str:
        self.sources += 1
        return socket.inet_ntoa((FILL_BASE + self.sources).to_bytes(4, "big"))

    def take(self, run: HandshakeRun) -> None:
        for prepared, reply, at in run.replies:
            self.keys.append(prepared.public)
            self.noise_at[prepared.public] = at
            self.replies.append((prepared, reply))


def bench(args: argparse.Namespace, pool: ProcessPoolExecutor, server: Server,
          report: dict[str, Any]) -> None:
    sizes, window, duration = args.sizes, args.window, args.duration
    state = State()
    handshakes: list[dict[str, Any]] = report["handshakes"]
    lookups: list[dict[str, Any]] = report["lookups"]
    memory: list[dict[str, Any]] = report["rss"]
    memory.append({"keys": 0, "noise_mib": rss_mib(server.pid), "legacy_mib": None})

    # Everything a client computes for its handshakes, before any clock runs.
    count = max(sizes) + UNLOADED + int(SINGLE_RATE * SINGLE_S) + max(sizes) // 50 + 64
    started = time.perf_counter()
    jobs: list[Prepared] = []
    for part in pool.map(partial(prepare, server.public),
                         [min(CHUNK, count - i) for i in range(0, count, CHUNK)]):
        jobs.extend(part)
    report["prepare_s"] = time.perf_counter() - started
    print(f"prepared {count} handshakes in {report['prepare_s']:.1f} s", file=sys.stderr)
    used = 0

    def handshake_row(what: str, run: HandshakeRun, meter: Meter, in_flight: int,
                      rate_s: float | None = None, **extra: Any) -> None:
        nonlocal used
        used += run.used
        state.take(run)
        handshakes.append(row(what, len(state.keys), in_flight, run.latencies_ms,
                              run.lost + run.malformed, meter, rate_s=rate_s,
                              lost=run.lost, malformed=run.malformed, **extra))
        print(f"handshakes, {what}: done", file=sys.stderr)

    with Meter(server.pid) as meter:
        run = run_handshakes(server.noise, jobs[used:used + UNLOADED], state.next_source,
                             want=None, window=1)
    handshake_row("1 in flight, own sources", run, meter, 1)
    with Meter(server.pid) as meter:
        run = run_handshakes(server.noise, jobs[used:used + int(SINGLE_RATE * SINGLE_S)],
                             lambda: SINGLE_SOURCE, want=None, window=10_000,
                             interval_s=1 / SINGLE_RATE)
    # Per second of sending (the run itself then waits out the timeouts of the refused), and
    # after the burst: answered among those sent in the second half of the window.
    half = int(SINGLE_RATE * SINGLE_S / 2)
    steady = sum(order >= half for order in run.sent_order) / (SINGLE_S / 2)
    handshake_row(f"single source, {SINGLE_RATE:g}/s offered", run, meter, 0, rate_s=SINGLE_S,
                  offered=run.used, steady_per_s=steady)

    # The lookup sessions: real handshakes whose state we keep (their keys count as table keys).
    run = run_handshakes(server.noise, jobs[used:used + SESSIONS], state.next_source,
                         want=SESSIONS, window=SESSIONS)
    used += run.used
    state.take(run)
    if len(run.replies) != SESSIONS:
        raise RuntimeError("the lookup sessions did not all get a handshake reply")
    sessions = [finish(server.public, prepared, reply) for prepared, reply, _ in run.replies]
    session_keys = [prepared.public for prepared, _, _ in run.replies]
    targets: list[bytes] = []
    legacy_socks = [bound_socket(f"{LEGACY_BASE}{i + 1}") for i in range(window)]
    lookup_socks = [bound_socket(f"{SESSION_BASE}{i + 1}") for i in range(SESSIONS)]
    # Made once: a session's nonces must keep growing from row to row (the server's replay
    # window refuses a nonce it has seen).
    noise = [NoiseLookup(lookup_socks[i], session_keys[i], *sessions[i], targets,
                         state.noise_at, random.Random(i)) for i in range(SESSIONS)]
    legacy = [LegacyLookup(lookup_socks[i], session_keys[i], targets, state.legacy_at,
                           random.Random(SESSIONS + i)) for i in range(SESSIONS)]
    try:
        for size in sizes:
            want = size - len(state.keys)
            if want > 0:
                with Meter(server.pid) as meter:
                    run = run_handshakes(server.noise, jobs[used:], state.next_source,
                                         want=want, window=window)
                handshake_row(f"fill to {size}", run, meter, window)
                if len(state.keys) < size:
                    raise RuntimeError(f"the fill to {size} ran out of prepared handshakes")
            noise_mib = rss_mib(server.pid)
            keys = iter(state.keys[len(state.legacy_at):])
            with Meter(server.pid) as meter:
                out = run_exchange(server.legacy, [LegacyRegister(s, keys, state.legacy_at)
                                                   for s in legacy_socks], None)
            lookups.append(row("legacy register", len(state.legacy_at), window,
                               out.latencies_ms, out.errors + out.timeouts, meter))
            memory.append({"keys": len(state.keys), "noise_mib": noise_mib,
                           "legacy_mib": rss_mib(server.pid)})
            session_set = set(session_keys)
            targets[:] = [k for k in state.keys if k not in session_set]
            for flight in (1, SESSIONS):
                for name, channels, address in (("noise", noise[:flight], server.noise),
                                                ("legacy", legacy[:flight], server.legacy)):
                    run_exchange(address, channels, 0.2)  # warm-up; re-registers `mine`
                    with Meter(server.pid) as meter:
                        out = run_exchange(address, channels, duration)
                    lookups.append(row(f"{name} lookup", len(state.keys), flight,
                                       out.latencies_ms, out.errors + out.timeouts, meter,
                                       timeouts=out.timeouts))
                    print(f"{size} keys, {name}, {flight} in flight: done", file=sys.stderr)
    finally:
        for sock in legacy_socks + lookup_socks:
            sock.close()

    # Every reply had the right length and type; read a sample to the end by Noise.
    sample = state.replies[::VERIFY_EVERY]
    chunks = [sample[i:i + CHUNK] for i in range(0, len(sample), CHUNK)]
    good = sum(pool.map(partial(verify, server.public), chunks))
    report["verified"] = {"read": len(sample), "complete": good, "sessions": SESSIONS}
    report["registered"] = len(state.keys)



# -- output ------------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model = next((line.partition(":")[2].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return {"cpus": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "kernel": platform.release()}


def print_table(header: Sequence[str], rows: list[Sequence[str]]) -> None:
    table = [list(header), *map(list, rows)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(c.rjust(w) if i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def cells(r: dict[str, Any]) -> list[str]:
    per_op = r["server_cpu_us_per_op"]
    return [r["what"], str(r["keys"]), str(r["in_flight"] or "open"), str(r["answered"]),
            str(r["failed"]), f"{r['per_s']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
            f"{r['max_ms']:.1f}", "-" if per_op is None else f"{per_op:.0f}",
            f"{r['server_busy']:.0%}", f"{r['client_busy']:.0%}"]


HEADER = ("", "keys", "in flight", "answered", "failed", "per s", "p50 ms", "p99 ms", "max ms",
          "srv µs/op", "srv busy", "cli busy")


def show(report: dict[str, Any], out: Path) -> None:
    m = report["machine"]
    print(f"natpunch rendezvous server (`wgpunch rendezvous`, its own process) over UDP on "
          f"loopback; {m['cpus']} cores ({m['cpu_model']}), Python {m['python']}")
    print(f"load average (1/5/15 min) at start {report['loadavg_start']}, "
          f"at end {report['loadavg_end']}; handshakes prepared in {report['prepare_s']:.1f} s "
          f"(not in the rows)")
    print(f"server limits: {SHIPPED.handshakes_per_source_s:g}/s per source (burst "
          f"{SHIPPED.handshake_burst:g}), {SHIPPED.handshakes_per_s:g}/s overall; "
          f"--max-peers {report['max_peers']}")
    print("\nHandshakes (Noise IK), each from a source address of its own unless noted")
    print_table(HEADER, [cells(r) for r in report["handshakes"]])
    single = next((r for r in report["handshakes"] if r["what"].startswith("single")), None)
    if single is not None:
        print(f"  single source: {single['answered']} of {single['offered']} answered in "
              f"{SINGLE_S:g} s; after the burst {single['steady_per_s']:.1f}/s")
    fills = [r for r in report["handshakes"] if r["what"].startswith("fill")]
    if fills:
        cpu = sum(r["server_cpu_us_per_op"] * r["answered"] for r in fills) / sum(
            r["answered"] for r in fills)
        print(f"  fills: {cpu:.0f} µs of server CPU per handshake, so at most "
              f"{1e6 / cpu:.0f}/s on one core (limit {SHIPPED.handshakes_per_s:g}/s); "
              f"{sum(r['lost'] for r in fills)} unanswered (the server counted "
              f"{report['server_counts'].get('rate_limited', 0)} rate-limited in all, the "
              f"single source's included)")
    print(f"\nLookups ({report['duration_s']:g} s per row; 1 or {SESSIONS} sessions/sockets, "
          f"one request in flight each) and legacy registrations")
    print_table(HEADER, [cells(r) for r in report["lookups"]])
    # The server's CPU per lookup is the figure other load on the machine disturbs least.
    for name in ("noise", "legacy"):
        rows = [r for r in report["lookups"]
                if r["what"] == f"{name} lookup" and r["in_flight"] == SESSIONS]
        if rows:
            per_op = ", ".join(f"{r['server_cpu_us_per_op']:.0f} at {r['keys']}" for r in rows)
            print(f"  {name}: server µs per lookup ({SESSIONS} in flight) {per_op} keys")
    print("\nServer RSS (VmRSS, MiB)")
    print_table(("keys", "after noise fill", "after legacy fill"),
                [[str(r["keys"]), f"{r['noise_mib']:.1f}",
                  "-" if r["legacy_mib"] is None else f"{r['legacy_mib']:.1f}"]
                 for r in report["rss"]])
    v = report.get("verified", {})
    print(f"\nhandshake replies read to the end by Noise: {v.get('complete')} of "
          f"{v.get('read')} sampled (1 in {VERIFY_EVERY}) + {v.get('sessions')} sessions; "
          f"{report.get('registered')} keys registered")
    counts = ", ".join(f"{k} {n}" for k, n in sorted(report["server_counts"].items()))
    print(f"server's own counts at exit: {counts or 'none logged'}")
    print(f"\nwritten to {out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000,65536",
                        help="table sizes (registered keys), comma-separated, ascending "
                             "(default 1000,10000,65536)")
    parser.add_argument("--duration", type=float, default=2.5,
                        help="seconds per lookup row (default 2.5)")
    parser.add_argument("--window", type=int, default=16,
                        help="handshakes in flight while filling (default 16)")
    parser.add_argument("--out",
                        default=str(Path(__file__).parent / "results" / "natpunch.json"))
    args = parser.parse_args()
    args.sizes = sorted(int(s) for s in args.sizes.split(","))
    floor = UNLOADED + int(SINGLE_RATE * SINGLE_S) + SESSIONS
    if args.sizes[0] < floor:
        parser.error(f"--sizes: the smallest must be at least {floor} (the handshakes before "
                     "the first fill register keys too)")
    max_peers = max(SHIPPED.peers_max, args.sizes[-1])
    report: dict[str, Any] = {
        "machine": machine(), "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
        "sizes": args.sizes, "duration_s": args.duration, "window": args.window,
        "max_peers": max_peers, "handshakes": [], "lookups": [], "rss": [],
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, \
            ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        server = None
        try:
            with rendezvous(Path(tmp), max_peers) as server:
                bench(args, pool, server, report)
        finally:
            if server is not None:
                report["server_counts"] = server.counts
    report["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    report["total_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    show(report, out)
    print(f"total {report['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
