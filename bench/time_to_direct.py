"""Time-to-direct and recovery, measured on the lab with the real agents.

    python3 bench/time_to_direct.py [--runs 20] [--recovery-runs 5] [--cases NAME,...]
                                    [--scenarios NAME,...] [--natpunch-go DIR] [--out FILE]
                                    [--matrix | --kinds K,... | --cells K1:K2,...]

Per scenario (`easy`; `easy` with 30 ms one-way delay on each site's uplink; `easy` with 5 %
loss on each site's uplink; `symmetric-upnp`, a symmetric NAT with port mapping against `eim`;
`dual-fw`, direct over IPv6 through two stateful firewalls; `dual-blocked`, IPv6 filtered on
one side, so direct over IPv4 after the IPv6 attempt; `--scenarios` picks some), each run
builds a fresh lab, starts `wgpunch registry`, then both `wgpunch node`s, and polls both
devices until the pair is direct by what `wg` shows (lab/evidence.py). Times are counted from
"both nodes up" (the later of the two agents' `started` log events: process started, options
read, device read) and, for comparison, from launching the node processes (Python start-up
included), and from both agents following the registry's watch stream (their
`registry_connected` events): the part that the physical limit (a registry round trip plus a
handshake round trip) speaks of. `launch` is the cold start of both agents.

Recovery: after the pair is direct, (1) `rebind`: the NAT in front of b (an `eim-port`
carrier NAT) forgets its mappings and conntrack state, so b's next packet leaves from a new
outside port; measured until the pair is direct again on the new endpoint; (2) `flush`: both
home NATs of `easy` lose their conntrack state while a ping runs from a to b every 0.2 s
(ten replies in before the flush); measured until that ping gets answers again (0 when
every ping is answered in turn for 5 s after the flush: nothing was lost). Each side's
heartbeats (node/registrylink.py) map it again on its NAT toward the registry, and toward a
peer with traffic; before them, the side that sends noticed the silence, probed (unanswered)
and asked for a punch, and the other side's watch stream went silent too (its NAT dropped the
registry's packets as well), so it probed its peers when it noticed;
(3) `forget`: both NATs of a pair behind `eim-port` carrier NATs, with 5 % loss on each
uplink, forget their mappings: both sides get new outside ports; measured until the pair is
direct again on both new endpoints; (4) `registry-restart`: the registry process is killed
(SIGKILL) while the pair is direct and started again `--restart-after` seconds later; measured
from the new registry's `serving` event until both agents follow it again (their next
`registry_connected` events).

`late-registry`: the registry learns of the nodes only after their first initiations (a node
set up before the registry's configuration lists it): the registry's device has the nodes'
peers removed, each node's registry peer is added again (so its device initiates at once, in
vain), the registry and both agents start, and 1 s after both agents are up the nodes' peers
go back into the registry's device. Measured from that moment until both nodes have a
handshake with the registry, and until the pair is direct. WireGuard alone retries 5 s after
its previous attempt.

`--natpunch-go DIR` (DIR holding natpunch-go's `server` and `client`, built apart: github.com/
malcolmseyd/natpunch-go; none of its code is here): with `easy`, each wgpunch run is followed
by one of natpunch-go in a fresh lab of its own: its server on the registry host (UDP
NATPUNCH_GO_PORT, a throwaway key), both clients launched at once (`client IF
REGISTRY:PORT KEY`, its default 2 s between retries), timed from that launch until the pair
is direct, as wgpunch's `launch` column.

Every process runs wgpunch from compiled bytecode, as an installed package does, and one run
before the measured ones is thrown away (common.py, `run_from_bytecode`); `--no-bytecode`
leaves the environment as it is (with PYTHONDONTWRITEBYTECODE=1, as on this machine, each
agent compiles every module at start: `launch` figures before 2026-12 were measured so).

The NAT grid (`--matrix`: every pair of `wgpunch lab matrix`'s kinds; `--kinds`: every pair
of these; `--cells`: just these pairs), `--runs` runs per cell: each run is a demo of
`matrix-K1-K2` (lab/matrix.py's `run_cells`, as `wgpunch lab matrix` runs it), timed from
launching the node processes until the pair has the path its kinds call for (direct or lan;
relay where no direct path can exist); p50/p95/max per cell over the runs that got it.
E.g. `--scenarios '' --cases '' --kinds eim,symmetric,collision --runs 10`.

`--keep-logs DIR`: every run's agent logs (registry, a, b: JSON lines, no keys) are copied
to DIR/CASE-N/ (a cold start's CASE is its scenario) before its lab goes, with `state.txt`:
what the devices and NAT routers hold as the run ends (endpoints, handshakes, counters,
mapping maps, conntrack); a recovery run's JSON says when the case's trouble began
(`start_wall`, Unix time), so a slow run can be read event by event.

Prints a table and writes JSON (default bench/results/time_to_direct.json). Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import run_from_bytecode
from wgpunch.errors import LabError
from wgpunch.keys import generate_keypair
from wgpunch.lab import Lab, catalog, evidence, matrix
from wgpunch.lab.agents import Agents
from wgpunch.lab.netns import require_root, stop_process, wait_for
from wgpunch.lab.scenario import Impairment, Nat, Scenario
from wgpunch.lab.state import state_dir

TIMEOUT_S = 30.0
NATPUNCH_GO_PORT = 12345  # its README's example port, on the registry host
NO_LOSS_S = 5.0  # flush: replies in sequence for this long after it mean nothing was lost
RECOVERY_CASES = ("rebind", "flush", "forget", "registry-restart", "late-registry")
KEPT: dict[str, Any] = {"dir": None, "runs": {}}  # --keep-logs: where, and runs per case


def impaired(base: Scenario, name: str, link: Impairment) -> Scenario:
    sites = tuple(replace(s, link=link) if isinstance(s, Nat) else s for s in base.sites)
    return Scenario(name, sites, description=f"{base.description}; uplinks {link}")


def scenarios() -> dict[str, Scenario]:
    easy = catalog.resolve("easy")
    return {
        "easy": easy,
        "easy+30ms": impaired(easy, "easy30ms", Impairment(delay_ms=30)),
        "easy+5%loss": impaired(easy, "easyloss", Impairment(loss_pct=5)),
        "symmetric-upnp": catalog.resolve("symmetric-upnp"),
        "dual-fw": catalog.resolve("dual-fw"),
        "dual-blocked": catalog.resolve("dual-blocked"),
    }


def prefix() -> str:
    return "bt" + secrets.token_hex(2)


def event_at(agents: Agents, host: str, name: str) -> float:
    """When the agent in `host` first logged event `name` (Unix time)."""
    def find() -> float | None:
        for event in agents.events(host):
            if event.get("event") == name:
                return float(event["ts"])
        return None

    return wait_for(find, timeout=10, what=f"the agent in {host} to log {name}")


def agent_time_to_direct(agents: Agents, host: str) -> float | None:
    for event in agents.events(host):
        if event.get("event") == "connected" and event.get("time_to_direct_s") is not None:
            return float(event["time_to_direct_s"])
    return None


def one_run(scenario: Scenario) -> dict[str, Any]:
    with Lab(scenario, prefix=prefix()) as lab, Agents(lab) as agents:
        agents.start_registry()
        launched = time.time()
        agents.start_nodes()
        start_wall = time.time()
        found = asyncio.run(evidence.wait_direct(lab, TIMEOUT_S, check=agents.check_alive))
        (pair, took), = found.values()
        up = max(event_at(agents, h, "started") for h in ("a", "b"))
        connected = max(event_at(agents, h, "registry_connected") for h in ("a", "b"))
        direct_wall = None if took is None else start_wall + took
        return {
            "direct": took is not None,
            "ipv6": took is not None and pair.ipv6,  # direct over IPv6 on both sides
            "from_up_s": None if direct_wall is None else direct_wall - up,
            "from_connected_s": None if direct_wall is None else direct_wall - connected,
            "from_launch_s": None if direct_wall is None else direct_wall - launched,
            "agent_reported_s": [agent_time_to_direct(agents, h) for h in ("a", "b")],
            "logs": keep_logs(lab, scenario.name),
        }


def natpunch_go_run(binaries: Path) -> dict[str, Any]:
    """natpunch-go's cold start in a fresh `easy` lab: its server, then both its clients."""
    private, public = generate_keypair()
    with Lab(catalog.resolve("easy"), prefix=prefix()) as lab, ExitStack() as procs:
        registry = lab.host("registry")
        logs = state_dir(lab.prefix)

        def start(host: str, argv: list[str]) -> None:
            with (logs / f"{host}.natpunch-go.log").open("a") as out:
                proc = lab.ns(host).popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=out, start_new_session=True)
            procs.callback(stop_process, proc, timeout=5)

        start("registry", [str(binaries / "server"), str(NATPUNCH_GO_PORT), private.base64()])
        wait_for(lambda: f":{NATPUNCH_GO_PORT} " in registry.ns.run(["ss", "-Hlun"]).stdout,
                 timeout=10, what="the natpunch-go server to listen")
        server = f"{registry.public_ip}:{NATPUNCH_GO_PORT}"
        launched = time.time()
        for host in ("a", "b"):
            ifname = lab.host(host).ifname
            assert ifname is not None
            start(host, [str(binaries / "client"), ifname, server, public.base64()])
        start_wall = time.time()
        (_pair, took), = asyncio.run(evidence.wait_direct(lab, TIMEOUT_S)).values()
        return {"direct": took is not None,
                "from_launch_s": None if took is None else start_wall + took - launched}


async def _until(predicate, timeout_s: float, start: float | None = None) -> float | None:
    """Seconds from `start` (default: now) until `predicate()` holds; None after timeout_s."""
    start = time.monotonic() if start is None else start
    while time.monotonic() - start < timeout_s:
        if await predicate():
            return time.monotonic() - start
        await asyncio.sleep(0.005)  # polling interval, bounded by timeout_s
    return None


def keep_logs(lab: Lab, case: str) -> str | None:
    """With --keep-logs: the lab's agent logs copied to DIR/CASE-N/; that directory."""
    if KEPT["dir"] is None:
        return None
    n = KEPT["runs"][case] = KEPT["runs"].get(case, 0) + 1
    into = Path(KEPT["dir"]) / f"{case}-{n}"
    into.mkdir(parents=True, exist_ok=True)
    for log in state_dir(lab.prefix).glob("*.agent.log"):
        shutil.copy(log, into / log.name)
    (into / "state.txt").write_text(lab_state(lab))
    return str(into)


def lab_state(lab: Lab) -> str:
    """What the devices and NATs hold as the run ends: each device's endpoints, handshakes
    and byte counters (no keys but public ones), each NAT router's mapping maps and UDP
    conntrack, so a run that never recovered shows which side's state is stuck."""
    out = [f"at {time.time():.3f}"]
    nats: list[str] = []
    for name, host in lab.hosts.items():
        nats += [nat for nat in host.nat_chain if nat not in nats]
        if host.ifname is None:
            continue
        for what in ("endpoints", "latest-handshakes", "transfer", "persistent-keepalive"):
            shown = lab.exec(name, ["wg", "show", host.ifname, what], check=False)
            out.append(f"== {name} wg show {host.ifname} {what}\n{shown.stdout}{shown.stderr}")
    for nat in nats:
        for argv in (["nft", "list", "map", "ip", f"{lab.prefix}_nat", "outbound"],
                     ["nft", "list", "map", "ip", f"{lab.prefix}_nat", "inbound"],
                     ["conntrack", "-L", "-p", "udp"]):
            shown = lab.exec(nat, argv, check=False)
            out.append(f"== {nat} {' '.join(argv)}\n{shown.stdout}{shown.stderr}")
    return "\n".join(out) + "\n"


@contextmanager
def direct_pair(scenario: str | Scenario
                ) -> Iterator[tuple[Lab, Agents, evidence.Pair | None]]:
    """A lab with its agents running and its one pair direct (None: it did not get there)."""
    if isinstance(scenario, str):
        scenario = catalog.resolve(scenario)
    with Lab(scenario, prefix=prefix()) as lab, Agents(lab) as agents:
        agents.start_registry()
        agents.start_nodes()
        (pair, took), = asyncio.run(
            evidence.wait_direct(lab, TIMEOUT_S, check=agents.check_alive)).values()
        yield lab, agents, None if took is None else pair


def rebind_run() -> dict[str, Any]:
    """b behind an eim-port NAT that loses its mappings: a new outside port for b."""
    with direct_pair("matrix-eim-eim-port") as (lab, _agents, pair):
        if pair is None:
            return {"recovered": False, "setup_failed": True}
        old = pair.a.endpoint
        start, start_wall = time.monotonic(), time.time()
        lab.forget_mappings(lab.host("b").nat_chain[0])
        seen: dict[str, float] = {}

        async def recovered() -> bool:
            pairs = evidence.pairs(lab, await evidence.read_devices(lab))
            now = time.monotonic() - start
            if pairs[0].a.registry_sees != old and "registry" not in seen:
                seen["registry"] = now
            return pairs[0].direct and pairs[0].a.endpoint != old

        took = asyncio.run(_until(recovered, 60.0))
        return {"recovered": took is not None, "recovery_s": took, "start_wall": start_wall,
                "logs": keep_logs(lab, "rebind"),
                "registry_saw_new_endpoint_s": seen.get("registry"),
                "after_registry_s": None if took is None or "registry" not in seen
                else took - seen["registry"]}


def flush_run() -> dict[str, Any]:
    """Both home NATs of `easy` lose their conntrack state while a pings b."""
    with direct_pair("easy") as (lab, _agents, pair):
        if pair is None:
            return {"recovered": False, "setup_failed": True}
        target = str(lab.host("b").tunnel_ip)
        ping = lab.ns("a").popen(["ping", "-n", "-i", "0.2", "-W", "1", target],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        def seq_of(line: str) -> int | None:
            return int(line.split("icmp_seq=")[1].split()[0]) if "time=" in line else None

        try:
            # Traffic for a while (ten replies, 2 s) before the NATs forget, as on a path
            # in use: an agent tells a peer with traffic from one that only keeps alive.
            replies = [wait_for(lambda: seq_of(ping.stdout.readline()), timeout=5,
                                what="ping replies") for _ in range(10)]
            last_seq = replies[-1]
            start, start_wall = time.monotonic(), time.time()

            def done(**result: Any) -> dict[str, Any]:
                return {**result, "start_wall": start_wall, "logs": keep_logs(lab, "flush")}

            for nat in ("na", "nb"):
                lab.flush_conntrack(nat)
            # Replies already on their way may still arrive: recovery is the first reply
            # after a gap in the sequence numbers.
            while time.monotonic() - start < 60:
                ready, _, _ = select.select([ping.stdout], [], [], 1.0)
                seq = seq_of(ping.stdout.readline()) if ready else None
                if seq is None:
                    continue
                if seq > last_seq + 1:
                    return done(recovered=True, recovery_s=time.monotonic() - start,
                                lost_pings=seq - last_seq - 1)
                last_seq = seq
                if time.monotonic() - start > NO_LOSS_S:
                    # Every ping answered in turn: the path never broke (the nodes' own
                    # packets mapped them again between two pings).
                    return done(recovered=True, recovery_s=0.0, lost_pings=0)
            return done(recovered=False)
        finally:
            ping.terminate()
            ping.wait(timeout=5)


def forget_run() -> dict[str, Any]:
    """Both sides behind eim-port NATs (5 % loss on each uplink) that lose their mappings."""
    base = catalog.resolve("matrix-eim-port-eim-port")
    with direct_pair(impaired(base, "forget", Impairment(loss_pct=5))) as (lab, _agents, pair):
        if pair is None:
            return {"recovered": False, "setup_failed": True}
        old = (pair.a.endpoint, pair.b.endpoint)
        start, start_wall = time.monotonic(), time.time()
        for host in (pair.a.host, pair.b.host):
            lab.forget_mappings(lab.host(host).nat_chain[0])
        seen: dict[str, float] = {}  # when each new endpoint showed, in s after the start

        async def recovered() -> bool:
            now, = evidence.pairs(lab, await evidence.read_devices(lab))
            for name, new in (("registry_sees_b", now.a.registry_sees != old[0]),
                              ("registry_sees_a", now.b.registry_sees != old[1]),
                              ("a_sets_b", now.a.endpoint != old[0]),
                              ("b_sets_a", now.b.endpoint != old[1])):
                if new and name not in seen:
                    seen[name] = round(time.monotonic() - start, 3)
            return now.direct and now.a.endpoint != old[0] and now.b.endpoint != old[1]

        took = asyncio.run(_until(recovered, 60.0, start))
        return {"recovered": took is not None, "recovery_s": took, "start_wall": start_wall,
                "seen_s": seen, "logs": keep_logs(lab, "forget")}


def registry_restart_run(after_s: float) -> dict[str, Any]:
    """The registry killed with SIGKILL, started again `after_s` later."""
    with direct_pair("easy") as (lab, agents, pair):
        if pair is None:
            return {"recovered": False, "setup_failed": True}
        before = {h: _count(agents, h, "registry_connected") for h in ("a", "b")}
        start_wall = time.time()
        agents.stop("registry", signal.SIGKILL)
        time.sleep(after_s)  # the outage itself, not a synchronisation
        serving_before = _count(agents, "registry", "serving")
        agents.start_registry(wait=False)
        try:
            serving = wait_for(lambda: _nth(agents, "registry", "serving", serving_before),
                               timeout=10, what="the registry to serve again")
            followed = [wait_for(lambda h=h: _nth(agents, h, "registry_connected", before[h]),
                                 timeout=60, what=f"{h} to follow the registry again")
                        for h in ("a", "b")]
        except LabError as error:  # a run that fails is a result
            return {"recovered": False, "error": str(error), "start_wall": start_wall,
                    "logs": keep_logs(lab, "registry-restart")}
        return {"recovered": True, "recovery_s": max(followed) - serving,
                "per_node_s": [t - serving for t in followed], "start_wall": start_wall,
                "logs": keep_logs(lab, "registry-restart")}


def _count(agents: Agents, host: str, name: str) -> int:
    return sum(1 for e in agents.events(host) if e.get("event") == name)


def _nth(agents: Agents, host: str, name: str, n: int) -> float | None:
    """The time of the (n+1)-th `name` event in `host`'s log, if there is one yet."""
    found = [float(e["ts"]) for e in agents.events(host) if e.get("event") == name]
    return found[n] if len(found) > n else None


def late_registry_run() -> dict[str, Any]:
    """The registry learns of the nodes after their first initiations."""
    with Lab(catalog.resolve("easy"), prefix=prefix()) as lab, Agents(lab) as agents:
        registry = lab.host("registry")
        assert registry.ifname is not None and registry.public_key is not None
        nodes = [lab.host(h) for h in ("a", "b")]
        for node in nodes:
            assert node.public_key is not None and node.ifname is not None
            registry.ns.run(["wg", "set", registry.ifname, "peer", node.public_key.base64(),
                             "remove"])
            node.ns.run(["wg", "set", node.ifname, "peer", registry.public_key.base64(),
                         "remove"])
            node.ns.run(["wg", "set", node.ifname, "peer", registry.public_key.base64(),
                         "endpoint", f"{registry.public_ip}:{registry.listen_port}",
                         "allowed-ips", f"{registry.tunnel_ip}/32",
                         "persistent-keepalive", "25"])
        agents.start_registry()
        agents.start_nodes()
        up = max(event_at(agents, h, "started") for h in ("a", "b"))
        time.sleep(max(0.0, up + 1.0 - time.time()))  # the scenario's delay, not a sync
        added, added_wall = time.monotonic(), time.time()
        for node in nodes:
            assert node.public_key is not None
            registry.ns.run(["wg", "set", registry.ifname, "peer", node.public_key.base64(),
                             "allowed-ips", f"{node.tunnel_ip}/32"])
        seen: dict[str, float] = {}

        async def direct() -> bool:
            states = await evidence.read_devices(lab)
            now = time.monotonic() - added
            for node in nodes:
                mine = states[node.name].peer(registry.public_key)
                if (node.name not in seen and mine is not None
                        and mine.latest_handshake is not None
                        and mine.latest_handshake >= added_wall - 0.001):
                    seen[node.name] = now
            pair, = evidence.pairs(lab, states)
            return pair.direct and len(seen) == 2

        took = asyncio.run(_until(direct, TIMEOUT_S))
        return {"recovered": took is not None, "recovery_s": max(seen.values(), default=None)
                if len(seen) == 2 else None, "direct_s": took,
                "registry_handshake_s": seen, "start_wall": added_wall,
                "logs": keep_logs(lab, "late-registry")}


def grid(cells: list[matrix.Cell], runs: int, timeout_s: float) -> tuple[list[dict[str, Any]],
                                                                        list[tuple[str, ...]]]:
    """Every cell `runs` times (round-robin); per cell its JSON and a table row."""
    done = iter(range(1, len(cells) * runs + 1))

    def progress(cell: matrix.Cell, run: matrix.Run) -> None:
        print(f"[{next(done)}/{len(cells) * runs}] {cell.first} x {cell.second}: {run.path}"
              f" {fmt(run.seconds)} (lower key: {run.lower_key})", file=sys.stderr, flush=True)

    matrix.run_cells(cells, runs, timeout_s, progress)
    out, rows = [], []
    for cell in cells:
        wanted = {"direct", "lan"} if cell.expected.path == "direct" else {"relay"}
        took = summary([r.seconds for r in cell.runs
                        if r.path in wanted and r.seconds is not None])
        orders = sorted({r.lower_key for r in cell.runs if r.lower_key})
        out.append({**cell.to_json(), **took, "lower_key_counts": {
            k: sum(1 for r in cell.runs if r.lower_key == k) for k in orders}})
        got = ", ".join(f"{p} {n}" for p, n in sorted(cell.counts.items()))
        rows.append((f"{cell.first} x {cell.second}", cell.expected.path, got,
                     *(fmt(took[k]) for k in ("p50", "p95", "max")),
                     " ".join(f"{k}:{n}" for k, n in out[-1]["lower_key_counts"].items()),
                     "" if cell.met else "MISSED"))
    return out, rows


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    return {"p50": statistics.median(values), "p95": pct(values, 0.95), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per scenario (default 20)")
    parser.add_argument("--recovery-runs", type=int, default=5,
                        help="runs of each recovery case (default 5)")
    parser.add_argument("--scenarios", default=",".join(scenarios()),
                        help=f"comma-separated (default: all: {','.join(scenarios())}; "
                        "'' for none)".replace("%", "%%"))  # argparse formats help with %
    parser.add_argument("--cases", default=",".join(RECOVERY_CASES),
                        help="recovery cases to run, comma-separated (default all: "
                        f"{', '.join(RECOVERY_CASES)}; '' for none)")
    parser.add_argument("--restart-after", type=float, default=15.0, metavar="SECONDS",
                        help="registry-restart: how long the registry stays away (default 15)")
    parser.add_argument("--natpunch-go", type=Path, metavar="DIR",
                        help="with easy: also natpunch-go's cold start, its `server` and "
                             "`client` from DIR, interleaved with wgpunch's runs")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="do not compile wgpunch first: each agent compiles what it "
                             "imports if the environment says so (PYTHONDONTWRITEBYTECODE)")
    parser.add_argument("--keep-logs", type=Path, metavar="DIR",
                        help="copy each run's agent logs to DIR/CASE-N/ (cold starts: "
                             "CASE is the scenario)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "time_to_direct.json"))
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--matrix", action="store_true",
                       help=f"the NAT grid: every pair of {','.join(matrix.KINDS)}")
    which.add_argument("--kinds", metavar="K,...", help="the NAT grid: every pair of these")
    which.add_argument("--cells", metavar="K1:K2,...", help="the NAT grid: these pairs")
    parser.add_argument("--matrix-timeout", type=float, default=15.0, metavar="SECONDS",
                        help="how long a grid run waits for a path (default 15)")
    args = parser.parse_args()
    try:
        cells = (matrix.cells_of(matrix.KINDS) if args.matrix
                 else matrix.cells_of(matrix.parse_kinds(args.kinds)) if args.kinds
                 else matrix.parse_cells(args.cells) if args.cells else [])
    except LabError as error:
        parser.error(str(error))
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    cases = [name.strip() for name in args.cases.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in scenarios()]
    unknown += [name for name in cases if name not in RECOVERY_CASES]
    if unknown or not chosen + cases + cells:
        parser.error(f"unknown scenario(s) or case(s) {', '.join(unknown) or '(none)'}; "
                     f"known: {', '.join([*scenarios(), *RECOVERY_CASES])}")
    require_root()
    KEPT["dir"] = args.keep_logs
    if not args.no_bytecode:
        run_from_bytecode()
        one_run(catalog.resolve("easy"))  # warm: the first agents fill the bytecode cache
    report: dict[str, Any] = {"runs": args.runs, "scenarios": {}, "recovery": {},
                              "bytecode": not args.no_bytecode}
    grid_rows: list[tuple[str, ...]] = []
    if cells:
        report["matrix"], grid_rows = grid(cells, args.runs, args.matrix_timeout)
    rows = []
    for name, scenario in scenarios().items():
        if name not in chosen:
            continue
        go = args.natpunch_go if name == "easy" else None
        runs, go_runs = [], []
        for _ in range(args.runs):  # interleaved, so that both see the same load
            runs.append(one_run(scenario))
            if go is not None:
                go_runs.append(natpunch_go_run(go))
        if go is not None:
            go_ok = [r for r in go_runs if r["direct"]]
            go_launch = summary([r["from_launch_s"] for r in go_ok])
            report["natpunch_go"] = {"runs": go_runs, "from_launch": go_launch}
            rows.append(("easy, natpunch-go", f"{len(go_ok)}/{len(go_runs)}", "-", "-", "-",
                         "-", "-", fmt(go_launch["p50"]), fmt(go_launch["p95"])))
        ok = [r for r in runs if r["direct"]]
        up = summary([r["from_up_s"] for r in ok])
        connected = summary([r["from_connected_s"] for r in ok])
        launch = summary([r["from_launch_s"] for r in ok])
        report["scenarios"][name] = {"runs": runs, "from_up": up, "from_connected": connected,
                                     "from_launch": launch}
        rows.append((name, f"{len(ok)}/{len(runs)}",
                     *(fmt(up[k]) for k in ("p50", "p95", "max")),
                     fmt(connected["p50"]), fmt(connected["p95"]), fmt(launch["p50"]),
                     fmt(launch["p95"])))
        print(f"{name}: {len(ok)}/{len(runs)} direct, "
              f"{sum(r['ipv6'] for r in ok)} of them over IPv6", file=sys.stderr)
    run_case = {"rebind": rebind_run, "flush": flush_run, "forget": forget_run,
                "registry-restart": lambda: registry_restart_run(args.restart_after),
                "late-registry": late_registry_run}
    for name in cases:
        runs = [run_case[name]() for _ in range(args.recovery_runs)]
        times = [r["recovery_s"] for r in runs
                 if r.get("recovered") and r["recovery_s"] is not None]
        report["recovery"][name] = {"runs": runs, **summary(times)}
        print(f"{name}: {len(times)}/{len(runs)} recovered", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    if grid_rows:
        print(f"NAT grid: time to the cell's path (s) from launching the node processes, "
              f"{args.runs} runs per cell")
        print_table(("cell", "expected", "got", "p50", "p95", "max", "lower key", ""),
                    grid_rows)
        print()
    if rows:
        print("time to direct (s), from both node agents up; from both following the registry "
              "(connected); from launching the processes (launch)")
        print_table(("scenario", "direct", "p50", "p95", "max", "connected p50",
                     "connected p95", "launch p50", "launch p95"), rows)
    if report["recovery"]:
        print("\nrecovery (s; late-registry: until both nodes have a registry handshake)")
    for name, rec in report["recovery"].items():
        ok = sum(1 for r in rec["runs"] if r.get("recovered"))
        vals = " ".join(f"{k} {rec[k]:.3f}" for k in ("p50", "p95", "max") if rec[k] is not None)
        print(f"  {name:16} {ok}/{len(rec['runs'])} recovered  {vals}")
    late = [r["direct_s"] for r in report["recovery"].get("late-registry", {}).get("runs", [])
            if r.get("direct_s") is not None]
    if late:
        until = summary(late)
        print("  late-registry: until direct: " +
              " ".join(f"{k} {fmt(until[k])}" for k in ("p50", "p95", "max")))
    if report["recovery"].get("rebind", {}).get("runs"):
        after = [r["after_registry_s"] for r in report["recovery"]["rebind"]["runs"]
                 if r.get("after_registry_s") is not None]
        if after:
            print(f"  rebind: after the registry saw the new endpoint: p50 "
                  f"{statistics.median(after):.3f} max {max(after):.3f}")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
