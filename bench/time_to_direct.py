"""Time-to-direct and recovery, measured on the lab with the real agents.

    python3 bench/time_to_direct.py [--runs 20] [--recovery-runs 5] [--out FILE]

Per scenario (`easy`; `easy` with 30 ms one-way delay on each site's uplink; `easy` with 5 %
loss on each site's uplink; `symmetric-upnp`, a symmetric NAT with port mapping against
`eim`; `--scenarios` picks some), each run builds a fresh lab, starts `wgpunch registry`, then both
`wgpunch node`s, and polls both devices until the pair is direct by what `wg` shows
(lab/evidence.py). Times are counted from "both nodes up" (the later of the two agents'
`started` log events: process started, options read, device read) and, for comparison, from
launching the node processes (Python start-up included), and from both agents following the
registry's watch stream (their `registry_connected` events): the part that the physical limit
(a registry round trip plus a handshake round trip) speaks of.

Recovery: after the pair is direct, (1) `rebind`: the NAT in front of b (an `eim-port`
carrier NAT) forgets its mappings and conntrack state, so b's next packet leaves from a new
outside port; measured until the pair is direct again on the new endpoint; (2) `flush`: both
home NATs of `easy` lose their conntrack state while a ping runs from a to b every 0.2 s;
measured until that ping gets answers again. The side that sends notices the silence and
probes (unanswered) and asks for a punch; the other side's watch stream has gone silent too
(its NAT drops the registry's packets as well), and it probes its peers when it notices.

Prints a table and writes JSON (default bench/results/time_to_direct.json). Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wgpunch.lab import Lab, catalog, evidence
from wgpunch.lab.agents import Agents
from wgpunch.lab.netns import require_root, wait_for
from wgpunch.lab.scenario import Impairment, Nat, Scenario

TIMEOUT_S = 30.0


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
        (_pair, took), = found.values()
        up = max(event_at(agents, h, "started") for h in ("a", "b"))
        connected = max(event_at(agents, h, "registry_connected") for h in ("a", "b"))
        direct_wall = None if took is None else start_wall + took
        return {
            "direct": took is not None,
            "from_up_s": None if direct_wall is None else direct_wall - up,
            "from_connected_s": None if direct_wall is None else direct_wall - connected,
            "from_launch_s": None if direct_wall is None else direct_wall - launched,
            "agent_reported_s": [agent_time_to_direct(agents, h) for h in ("a", "b")],
        }


async def _until(predicate, timeout_s: float) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if await predicate():
            return time.monotonic() - start
        await asyncio.sleep(0.005)  # polling interval, bounded by timeout_s
    return None


@contextmanager
def direct_pair(scenario: str) -> Iterator[tuple[Lab, evidence.Pair | None]]:
    """A lab with its agents running and its one pair direct (None: it did not get there)."""
    with Lab(catalog.resolve(scenario), prefix=prefix()) as lab, Agents(lab) as agents:
        agents.start_registry()
        agents.start_nodes()
        (pair, took), = asyncio.run(
            evidence.wait_direct(lab, TIMEOUT_S, check=agents.check_alive)).values()
        yield lab, None if took is None else pair


def rebind_run() -> dict[str, Any]:
    """b behind an eim-port NAT that loses its mappings: a new outside port for b."""
    with direct_pair("matrix-eim-eim-port") as (lab, pair):
        if pair is None:
            return {"recovered": False, "setup_failed": True}
        old = pair.a.endpoint
        start = time.monotonic()
        lab.forget_mappings(lab.host("b").nat_chain[0])
        seen: dict[str, float] = {}

        async def recovered() -> bool:
            pairs = evidence.pairs(lab, await evidence.read_devices(lab))
            now = time.monotonic() - start
            if pairs[0].a.registry_sees != old and "registry" not in seen:
                seen["registry"] = now
            return pairs[0].direct and pairs[0].a.endpoint != old

        took = asyncio.run(_until(recovered, 60.0))
        return {"recovered": took is not None, "recovery_s": took,
                "registry_saw_new_endpoint_s": seen.get("registry"),
                "after_registry_s": None if took is None or "registry" not in seen
                else took - seen["registry"]}


def flush_run() -> dict[str, Any]:
    """Both home NATs of `easy` lose their conntrack state while a pings b."""
    with direct_pair("easy") as (lab, pair):
        if pair is None:
            return {"recovered": False, "setup_failed": True}
        target = str(lab.host("b").tunnel_ip)
        ping = lab.ns("a").popen(["ping", "-n", "-i", "0.2", "-W", "1", target],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        def seq_of(line: str) -> int | None:
            return int(line.split("icmp_seq=")[1].split()[0]) if "time=" in line else None

        try:
            last_seq = wait_for(lambda: seq_of(ping.stdout.readline()), timeout=5,
                                what="ping replies")
            start = time.monotonic()
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
                    return {"recovered": True, "recovery_s": time.monotonic() - start,
                            "lost_pings": seq - last_seq - 1}
                last_seq = seq
            return {"recovered": False}
        finally:
            ping.terminate()
            ping.wait(timeout=5)


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
                        help=f"comma-separated (default: all: {','.join(scenarios())})")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "time_to_direct.json"))
    args = parser.parse_args()
    chosen = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in scenarios()]
    if unknown or not chosen:
        parser.error(f"unknown scenario(s) {', '.join(unknown) or '(none)'}; "
                     f"known: {', '.join(scenarios())}")
    require_root()
    report: dict[str, Any] = {"runs": args.runs, "scenarios": {}, "recovery": {}}
    rows = []
    for name, scenario in scenarios().items():
        if name not in chosen:
            continue
        runs = [one_run(scenario) for _ in range(args.runs)]
        ok = [r for r in runs if r["direct"]]
        up = summary([r["from_up_s"] for r in ok])
        connected = summary([r["from_connected_s"] for r in ok])
        launch = summary([r["from_launch_s"] for r in ok])
        report["scenarios"][name] = {"runs": runs, "from_up": up, "from_connected": connected,
                                     "from_launch": launch}
        rows.append((name, f"{len(ok)}/{len(runs)}",
                     *(fmt(up[k]) for k in ("p50", "p95", "max")),
                     fmt(connected["p50"]), fmt(connected["p95"]), fmt(launch["p50"])))
        print(f"{name}: {len(ok)}/{len(runs)} direct", file=sys.stderr)
    for name, fn in (("rebind", rebind_run), ("flush", flush_run)):
        runs = [fn() for _ in range(args.recovery_runs)]
        times = [r["recovery_s"] for r in runs if r.get("recovered")]
        report["recovery"][name] = {"runs": runs, **summary(times)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print("time to direct (s), from both node agents up; from both following the registry "
          "(connected); from launching the processes (launch)")
    header = ("scenario", "direct", "p50", "p95", "max", "connected p50", "connected p95",
              "launch p50")
    table = [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print("\nrecovery (s)")
    for name, rec in report["recovery"].items():
        ok = sum(1 for r in rec["runs"] if r.get("recovered"))
        vals = " ".join(f"{k} {rec[k]:.3f}" for k in ("p50", "p95", "max") if rec[k] is not None)
        print(f"  {name:7} {ok}/{len(rec['runs'])} recovered  {vals}")
    if report["recovery"]["rebind"]["runs"]:
        after = [r["after_registry_s"] for r in report["recovery"]["rebind"]["runs"]
                 if r.get("after_registry_s") is not None]
        if after:
            print(f"  rebind: after the registry saw the new endpoint: p50 "
                  f"{statistics.median(after):.3f} max {max(after):.3f}")
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
