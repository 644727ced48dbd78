"""Start-up: how soon `wgpunch` answers `--help`, and how soon `wgpunch node` asks the registry
for its first punch.

    python3 bench/startup.py [--runs 10] [--out FILE]

`--help`: `python -m wgpunch.cli --help` and `... node --help`, wall time of the whole process
(interpreter start-up included), `--runs` each, interleaved.

First punch request: per run, a fresh `easy` lab with the registry and node b's agent
running and b reported (b's device without peer a, so that only a asks); then a's agent is
launched and the clock runs from just before the process is created until the registry
logs a's `punch` request (the registry's log line, timestamped as the request is handled).
Also reported, from the same launch: a's `started` event (options read, device read) and
its `registry_connected` event (the first watch-stream line). The host's Python and the
registry are warm (one run before the measured ones is thrown away).

Every process runs wgpunch from compiled bytecode, as an installed package does (common.py,
`run_from_bytecode`); `--no-bytecode` leaves the environment as it is (with
PYTHONDONTWRITEBYTECODE=1, as on this machine, each start compiles every module it imports:
the figures before 2026-12 were measured so).

Prints a table and writes JSON (default bench/results/startup.json). The punch part needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import run_from_bytecode
from wgpunch.lab import Lab, catalog
from wgpunch.lab.agents import Agents
from wgpunch.lab.netns import python_module, require_root, wait_for

EVENT_TIMEOUT_S = 15.0


def help_time(argv: list[str]) -> float:
    command, env = python_module("wgpunch.cli", *argv)
    start = time.perf_counter()
    subprocess.run(command, env={**os.environ, **env}, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def event_ts(agents: Agents, host: str, name: str, **fields: str) -> float:
    """The Unix time of the first `name` event in `host`'s log whose fields match."""
    def find() -> float | None:
        for event in agents.events(host):
            if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                return float(event["ts"])
        return None

    return wait_for(find, timeout=EVENT_TIMEOUT_S, what=f"{host} to log {name}")


def punch_run() -> dict[str, Any]:
    with Lab(catalog.resolve("easy"), prefix="bs" + secrets.token_hex(2)) as lab, \
            Agents(lab) as agents:
        b, a_key, b_key = lab.host("b"), lab.host("a").public_key, lab.host("b").public_key
        assert a_key is not None and b_key is not None and b.ifname is not None
        # b has no peer a: only a asks for the punch (b would, once a reports, or alone
        # after a while), and the registry's first punch line is a's request.
        b.ns.run(["wg", "set", b.ifname, "peer", a_key.base64(), "remove"])
        agents.start_registry()
        agents.start_node("b")
        event_ts(agents, "b", "registry_connected")
        # b reported: its record carries the report, which a waits for before punching.
        wait_for(lambda: _reported(agents, str(b_key)), timeout=EVENT_TIMEOUT_S,
                 what="b's report to reach the registry")
        launched = time.time()
        agents.start_node("a")
        punch = wait_for(lambda: _first_punch(agents, str(a_key)),
                         timeout=EVENT_TIMEOUT_S, what="the registry to log a's punch")
        return {
            "first_punch_s": punch - launched,
            "started_s": event_ts(agents, "a", "started") - launched,
            "connected_s": event_ts(agents, "a", "registry_connected") - launched,
        }


def _reported(agents: Agents, key: str) -> bool:
    return any(e.get("event") == "node_reported" and e.get("peer") == key
               for e in agents.events("registry"))


def _first_punch(agents: Agents, caller: str) -> float | None:
    for event in agents.events("registry"):
        if event.get("event") == "punch" and event.get("peer") == caller:
            return float(event["ts"])
    return None


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "min": None, "max": None}
    return {"p50": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs of each (default 10)")
    parser.add_argument("--no-punch", action="store_true", help="only the --help timings")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="do not compile wgpunch first: each process compiles what it "
                             "imports if the environment says so (PYTHONDONTWRITEBYTECODE)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "startup.json"))
    args = parser.parse_args()
    if not args.no_bytecode:
        run_from_bytecode()
    report: dict[str, Any] = {"runs": args.runs, "bytecode": not args.no_bytecode}
    helps: dict[str, list[float]] = {"wgpunch --help": [], "wgpunch node --help": []}
    for argv in (["--help"], ["node", "--help"]):
        help_time(argv)  # warm the page cache (and the bytecode cache)
    for _ in range(args.runs):
        helps["wgpunch --help"].append(help_time(["--help"]))
        helps["wgpunch node --help"].append(help_time(["node", "--help"]))
    rows = [(name, summary(values)) for name, values in helps.items()]
    report["help"] = {name: {"runs": values, **summary(values)} for name, values in helps.items()}
    if not args.no_punch:
        require_root()
        punch_run()  # warm: the first lab of a process pays for imports and caches
        runs = [punch_run() for _ in range(args.runs)]
        report["punch"] = {"runs": runs}
        for key, label in (("started_s", "node: launch -> started (device read)"),
                           ("connected_s", "node: launch -> watch stream open"),
                           ("first_punch_s", "node: launch -> registry has punch request")):
            values = [r[key] for r in runs]
            report["punch"][key] = summary(values)
            rows.append((label, summary(values)))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    width = max(len(name) for name, _ in rows)
    print(f"{'start-up (s)'.ljust(width)}  p50    min    max")
    for name, s in rows:
        print(f"{name.ljust(width)}  " + "  ".join(
            "-    " if s[k] is None else f"{s[k]:.3f}" for k in ("p50", "min", "max")))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
