"""`wgpunch demo`: the whole product in the lab, judged by what `wg` shows.

Build a lab, start the real `wgpunch registry` (with its relay) and `wgpunch node` processes
in it, wait until every pair of nodes has a path (lab/evidence.py: direct, on its LAN, or
relayed where no direct path can exist), ping through each tunnel, print the evidence and
tear everything down. Exit 0 only if every pair has a path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .commands import help_of
from .errors import MalformedMessage
from .lab import catalog
from .lab.netns import require_root
from .protocol import NatBehaviour, lower_key, nat_from_json, relay_reason
from .protocol.natinfo import NAT_FIELDS


@dataclass
class PairResult:
    a: str
    b: str
    direct: bool
    path: str  # "direct" (public endpoints), "lan" (behind one NAT), "relay", "none"
    time_to_direct_s: float | None
    a_endpoint_for_b: str | None
    b_endpoint_for_a: str | None
    b_public_ip: str
    a_public_ip: str
    handshake_age_s: float | None
    ping_ms: float | None
    why: str | None = None  # a pair that cannot go direct: why, from both nodes' NATs
    lower_key: str | None = None  # a or b: whose public key is lower (protocol/roles.py)


def _ping_ms(lab: Any, a: str, b: str) -> float | None:
    # Echoes every 0.2 s until one is answered, for 3 s at most: on a loaded machine (the
    # 14-node lab at load 9) one datagram of a pair relayed a moment before was lost.
    done = lab.exec(a, ["ping", "-c", "1", "-i", "0.2", "-w", "3", str(lab.host(b).tunnel_ip)],
                    check=False)
    match = re.search(r"time=([\d.]+) ms", done.stdout)
    return float(match.group(1)) if done.returncode == 0 and match else None


def run_demo(scenario: str, timeout_s: float, prefix: str | None,
             natpunch: str | None = None) -> list[PairResult]:
    from .lab import Lab, evidence

    with Lab(catalog.resolve(scenario), prefix=prefix,
             registry_peer=natpunch is None) as lab, _agents(lab, natpunch) as agents:
        needs_relay = _NeedsRelay(agents)

        def check() -> None:
            agents.check_alive()
            needs_relay.read()

        found = asyncio.run(evidence.wait_direct(lab, timeout_s, check=check,
                                                 accept=needs_relay.settled, lan_ok=True,
                                                 relay_ok=natpunch is None))
        needs_relay.read()
        results = []
        for (a, b), (pair, took) in found.items():
            why = needs_relay.why(a, b)
            results.append(PairResult(
                a=a, b=b, direct=pair.direct, path=pair.path, time_to_direct_s=took,
                a_endpoint_for_b=None if pair.a.endpoint is None else str(pair.a.endpoint),
                b_endpoint_for_a=None if pair.b.endpoint is None else str(pair.b.endpoint),
                b_public_ip=pair.a.peer_public_ip, a_public_ip=pair.b.peer_public_ip,
                handshake_age_s=pair.a.handshake_age_s,
                ping_ms=_ping_ms(lab, a, b) if pair.path != "none" else None,
                why=None if pair.path not in ("none", "relay") else why or (
                    "relayed though direct may be possible: the agents keep probing it"
                    if pair.path == "relay" else None),
                lower_key=_lower_key(lab, a, b),
            ))
        return results


class _NeedsRelay:
    """Whether a pair's NATs, as its nodes measured them, rule a direct path out: a relayed
    pair counts as settled only then; the others are watched until they go direct (the
    agents move them back: node/upgrade.py) or the time is up."""

    def __init__(self, agents: Any) -> None:
        self.agents = agents
        self._logs = {host: NatLog() for host in agents.nodes}

    def read(self) -> None:
        """Read on in every agent's log. Once per round of the wait (its `check`): the round
        then asks about every pair (91 in a 14-node lab), and a relayed pair's time to the
        relay, the grid's figure, counts from the first round whose read shows its reason."""
        for host, log in self._logs.items():
            log.read_on(self.agents.logs.get(host))

    def why(self, a: str, b: str) -> str | None:
        log_a, log_b = (self._logs.get(host, NatLog()) for host in (a, b))
        return relay_reason(log_a.nat, log_b.nat, mapped=log_a.mapped or log_b.mapped)

    def settled(self, pair: Any) -> bool:
        return pair.direct or pair.lan or self.why(pair.a.host, pair.b.host) is not None


class NatLog:
    """What a node's JSON log says of its NAT so far: its last `nat_measured` event, and
    whether its last `port_mapped` or `port_unmapped` event (node/portmap/mapper.py) says it
    holds a port mapping. Each read parses only the lines written since the last one."""

    def __init__(self) -> None:
        self.nat: NatBehaviour | None = None
        self.mapped = False
        self._offset = 0

    def read_on(self, path: Path | None) -> None:
        if path is None:
            return
        try:
            with path.open("rb") as log:
                log.seek(self._offset)
                written = log.read()
        except OSError:
            return
        # A line the agent is still writing is left for the next read, which gets it whole.
        whole = written[:written.rfind(b"\n") + 1]
        self._offset += len(whole)
        for line in whole.splitlines():
            self._take(line)

    def _take(self, line: bytes) -> None:
        try:
            entry = json.loads(line)
        except ValueError:
            return
        event = entry.get("event") if isinstance(entry, dict) else None
        if event == "nat_measured":
            try:
                self.nat = nat_from_json({k: entry.get(k) for k in NAT_FIELDS})
            except MalformedMessage:
                self.nat = None
        elif event in ("port_mapped", "port_unmapped"):
            self.mapped = event == "port_mapped"


def _lower_key(lab: Any, a: str, b: str) -> str | None:
    keys = lab.host(a).public_key, lab.host(b).public_key
    if None in keys:
        return None
    return a if lower_key(*keys) else b


def _agents(lab: Any, natpunch: str | None) -> Any:
    """The registry and a node on every host; with `natpunch` ("noise" or "legacy"), a
    rendezvous server on the registry host instead, which no node has as a peer."""
    from .lab import state
    from .lab.agents import Agents, natpunch_flags
    from .natpunch.wire import RENDEZVOUS_PORT

    if natpunch is None:
        agents = Agents(lab, registry_args=["--relay"])
        for name in agents.registries:
            # The relay's kernel path forwards; the lab's registry hosts are ours to set.
            lab.ns(name).run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        agents.start_registries()
        agents.start_nodes()
        return agents
    # The key lives in the lab's state directory: removed with the lab.
    rendezvous, flags = natpunch_flags(lab, natpunch, state.state_dir(lab.prefix) / "r.key")
    agents = Agents(lab, node_args=[*flags, "--interval", "1"])
    try:
        agents.start_rendezvous(rendezvous, port=RENDEZVOUS_PORT)
        for host in agents.nodes:
            agents.start_node(host, registry_key=False)
    except BaseException:
        agents.stop_all()
        raise
    return agents


def _endpoint(endpoint: str | None, peer: str, nat_ip: str) -> str:
    """An endpoint with where it leads: the peer's NAT, or (IPv6) the peer itself."""
    if endpoint is not None and endpoint.startswith("["):
        return f"{endpoint} ({peer}'s IPv6, no NAT)"
    return f"{endpoint or '(none)'} ({peer}'s NAT: {nat_ip})"


def render(results: list[PairResult]) -> str:
    header = ("PAIR A-B", "PATH", "TIME-TO-DIRECT", "A'S ENDPOINT FOR B", "B'S ENDPOINT FOR A",
              "HANDSHAKE", "PING A->B")
    rows = [header] + [(
        f"{r.a}-{r.b}", r.path,
        "-" if r.time_to_direct_s is None else f"{r.time_to_direct_s:.3f} s",
        _endpoint(r.a_endpoint_for_b, r.b, r.b_public_ip),
        _endpoint(r.b_endpoint_for_a, r.a, r.a_public_ip),
        "never" if r.handshake_age_s is None else f"{r.handshake_age_s:.1f} s ago",
        "-" if r.ping_ms is None else f"{r.ping_ms:.2f} ms",
    ) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join(lines + [f"{r.a}-{r.b}: {r.why}" for r in results if r.why])


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not in 0-3600 seconds (more than 0)")
    return value


def run(args: argparse.Namespace) -> int:
    require_root()
    results = run_demo(args.scenario, args.timeout, args.prefix, args.natpunch)
    ok = bool(results) and all(r.path != "none" and r.ping_ms is not None for r in results)
    if args.json:
        print(json.dumps({"scenario": args.scenario, "ok": ok,
                          "pairs": [vars(r) for r in results]}, indent=2))
    else:
        print(render(results))
        how = f", natpunch {args.natpunch}" if args.natpunch else ""
        others = sorted({r.path for r in results} & {"lan", "relay"})
        print(f"\n{'every pair is direct' if ok else 'NOT every pair is direct'} "
              f"{'(or ' + ' or '.join(others) + ') ' if others else ''}"
              f"({args.scenario}{how}; time-to-direct counts from starting the node agents)")
    return 0 if ok else 1


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help=help_of("demo"),
        description=(
            "Build a lab (default scenario: easy, two hosts behind home-router NATs), start "
            "`wgpunch registry` and `wgpunch node` in it, wait until every pair of nodes has "
            "a direct path (both devices show a recent handshake on an endpoint at the other "
            "NAT's public address), or is relayed by the registry where no direct path can "
            "exist, ping through each tunnel, print the evidence and remove the lab. Exit 0 "
            "only if every pair has a path. Needs root."
        ),
    )
    parser.add_argument("scenario", nargs="?", default="easy", metavar="SCENARIO",
                        help="lab scenario (default: easy; see `wgpunch lab scenarios`)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--timeout", type=_seconds, default=20.0, metavar="SECONDS",
                        help="how long to wait for every pair to go direct (default 20)")
    parser.add_argument(
        "--natpunch", choices=("noise", "legacy"),
        help="instead of a registry that is every node's WireGuard peer, run `wgpunch "
        "rendezvous` on the registry host and the nodes with --natpunch (noise: natpunch-go's "
        "protocol) or --natpunch-legacy (the wireguard-tools example's); docs/natpunch.md",
    )
    parser.add_argument("--prefix", metavar="P",
                        help="name prefix of the lab's objects (default: random)")
    parser.set_defaults(func=run)
