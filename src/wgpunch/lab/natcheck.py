"""Measure what each NAT kind does, by behaviour: `python3 -m wgpunch.lab.natcheck [--json]`.

The lab it builds (`scenario()`): three plain outside hosts `o1`, `o2`, `o3` (reflectors on
o1:3478, o1:3479, o2:3478), one NAT per kind with one host behind it, and NATs with two
hosts each for hairpinning. Per kind, from the host behind it (RFC 4787 terms):

- mapping: one inside port (40000) sends to the three reflectors; each echoes the source it
  saw. All equal: endpoint-independent; equal per address: address-dependent; else
  address-and-port-dependent. The port is `preserved` (40000), `changed` (one other
  port) or `random` (several).
- filtering: o3 (never contacted) and o1 from a new port send to the first mapping. o3's
  packet arrives: endpoint-independent; only o1's: address-dependent; neither (within
  `QUIET_S`): address-and-port-dependent.
- unsolicited state: o3 sends to the NAT's public address, port 41000 (nothing mapped);
  does conntrack inside the NAT now hold an entry for it? Then the host sends from 41000
  to that o3 port: is its port kept, or did the leftover state push it to a new one
  (DESIGN.md §9, the `collision` kind)?
- hairpin: host 1 learns its mapping from o1; host 2 sends to it. Does it arrive, and with
  which source (RFC 4787 REQ-9 wants host 2's own public mapping)?

Negative results wait `QUIET_S`: on an unimpaired lab a packet that is let through arrives
within a millisecond or two, so half a second is a wide margin.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import LabError
from .lab import Lab
from .nat import NAT_KINDS
from .netns import Namespace, python_module, wait_for
from .scenario import Host, Nat, Scenario

OUTSIDE = ("o1", "o2", "o3")
REFLECTORS = (("o1", 3478), ("o1", 3479), ("o2", 3478))
MAPPED_PORT = 40000  # the inside port whose mapping is measured
COLLIDE_PORT = 41000  # the inside port an unsolicited packet is aimed at first
QUIET_S = 0.5
ANSWER_S = 3.0  # a positive answer on an unimpaired lab takes milliseconds
HAIRPIN_NATS = (("hp", "eim", True), ("hn", "eim", False), ("hq", "eim-port", True))

Event = dict[str, Any]


class ProbeProcess:
    """One `wgpunch.lab.probe` process in a namespace; a thread collects its events."""

    def __init__(self, ns: Namespace, *args: str) -> None:
        argv, env = python_module("wgpunch.lab.probe", *args)
        self.what = f"probe {' '.join(args)} in {ns.name}"
        self.proc = ns.popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        self.events: list[Event] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def wait(self, match: Callable[[Event], bool], *, timeout: float) -> Event:
        return wait_for(lambda: next((e for e in self.events if match(e)), None),
                        timeout=timeout, what=self.what)

    def received(self, *, text: str | None = None) -> list[Event]:
        return [e for e in self.events
                if e["event"] == "recv" and (text is None or e["text"] == text)]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=5)
        self._reader.join(timeout=5)
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> ProbeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def probe_once(ns: Namespace, port: int, to: str) -> None:
    """Send one datagram (`IP:PORT=TEXT`) from `port` and exit."""
    argv, env = python_module("wgpunch.lab.probe", "--port", str(port), "--send", to,
                              "--lifetime", "0")
    ns.run(argv, env=env)


def arrives_within(probe: ProbeProcess, text: str, timeout: float) -> Event | None:
    try:
        return probe.wait(lambda e: e["event"] == "recv" and e["text"] == text, timeout=timeout)
    except LabError:
        return None


@dataclass(frozen=True)
class Behaviour:
    nat: str
    kind: str
    mapping: str
    port: str
    filtering: str
    unsolicited_state: bool
    port_after_unsolicited: str  # "kept" | "changed"
    mapped: tuple[str, ...]  # as the reflectors saw 40000, in REFLECTORS order


@dataclass(frozen=True)
class Hairpin:
    nat: str
    kind: str
    hairpin: bool  # as configured
    arrives: bool
    source: str | None  # the source host 1 saw
    sender_public: str  # host 2's mapping as o1 saw it


def scenario() -> Scenario:
    sites: list[Host | Nat] = [Host(name, wireguard=False) for name in OUTSIDE]
    sites += [Nat(f"n{i}", kind, (Host(f"h{i}", wireguard=False),))
              for i, kind in enumerate(NAT_KINDS)]
    sites += [Nat(name, kind, tuple(Host(f"{name}{i}", wireguard=False) for i in (1, 2)),
                  hairpin=hairpin) for name, kind, hairpin in HAIRPIN_NATS]
    return Scenario("natcheck", tuple(sites), description="one NAT per kind, probed from outside")


def _ip(lab: Lab, node: str) -> str:
    address = lab.plan.node(node).address
    assert address is not None
    return str(address.ip)


def reflectors(lab: Lab) -> list[ProbeProcess]:
    started = [ProbeProcess(lab.ns(host), "--port", str(port), "--echo", "--lifetime", "600")
               for host, port in REFLECTORS]
    for probe in started:
        probe.wait(lambda e: e["event"] == "bound", timeout=ANSWER_S)
    return started


def measure_kind(lab: Lab, nat: str, host: str) -> Behaviour:
    public = _ip(lab, nat)
    sends = [arg for h, p in REFLECTORS for arg in ("--send", f"{_ip(lab, h)}:{p}")]
    with ProbeProcess(lab.ns(host), "--port", str(MAPPED_PORT), *sends,
                      "--lifetime", "30") as session:
        wait_for(lambda: len(session.received()) >= len(REFLECTORS), timeout=ANSWER_S,
                 what=f"the reflectors' answers to {host}")
        seen = {e["from"]: e["text"] for e in session.received()}
        mapped = tuple(seen[f"{_ip(lab, h)}:{p}"] for h, p in REFLECTORS)
        first = mapped[0]
        probe_once(lab.ns("o3"), 5000, f"{first}=from-o3")
        probe_once(lab.ns("o1"), 5001, f"{first}=from-o1-new-port")
        from_o1 = arrives_within(session, "from-o1-new-port", QUIET_S)
        from_o3 = arrives_within(session, "from-o3", QUIET_S if from_o1 else 0.0)
    if mapped[0] == mapped[1] == mapped[2]:
        mapping = "endpoint-independent"
    elif mapped[0] == mapped[1]:
        mapping = "address-dependent"
    else:
        mapping = "address-and-port-dependent"
    ports = {int(m.rpartition(":")[2]) for m in mapped}
    port = ("preserved" if ports == {MAPPED_PORT} else "changed" if len(ports) == 1
            else "random")
    filtering = ("endpoint-independent" if from_o3 else "address-dependent" if from_o1
                 else "address-and-port-dependent")
    state, after = measure_unsolicited(lab, nat, host, public)
    return Behaviour(nat, lab.plan.node(nat).kind or "", mapping, port, filtering, state, after,
                     mapped)


def measure_unsolicited(lab: Lab, nat: str, host: str, public: str) -> tuple[bool, str]:
    outside = _ip(lab, "o3")
    with ProbeProcess(lab.ns("o3"), "--port", "5002", "--send", f"{public}:{COLLIDE_PORT}=early",
                      "--lifetime", "10", "--expect", "1") as watcher:
        watcher.wait(lambda e: e["event"] == "sent", timeout=ANSWER_S)

        def entries() -> bool:
            out = lab.exec(nat, ["conntrack", "-L", "-p", "udp", "-s", outside, "-d", public,
                                 "--dport", str(COLLIDE_PORT)], check=False).stdout
            return bool(out.strip())

        try:
            state = bool(wait_for(entries, timeout=QUIET_S, interval=0.05, what="conntrack"))
        except LabError:
            state = False
        probe_once(lab.ns(host), COLLIDE_PORT, f"{outside}:5002=late")
        got = watcher.wait(lambda e: e["event"] == "recv", timeout=ANSWER_S)
    kept = got["from"] == f"{public}:{COLLIDE_PORT}"
    return state, "kept" if kept else "changed"


def measure_hairpin(lab: Lab, nat: str) -> Hairpin:
    o1 = f"{_ip(lab, 'o1')}:3478"
    with ProbeProcess(lab.ns(f"{nat}1"), "--port", str(MAPPED_PORT), "--send", o1,
                      "--lifetime", "30") as first:
        mapping = first.wait(lambda e: e["event"] == "recv", timeout=ANSWER_S)["text"]
        with ProbeProcess(lab.ns(f"{nat}2"), "--port", str(MAPPED_PORT + 1), "--send", o1,
                          "--send", f"{mapping}=hairpin", "--lifetime", "30") as second:
            own = second.wait(lambda e: e["event"] == "recv" and e["from"] == o1,
                              timeout=ANSWER_S)["text"]
            got = arrives_within(first, "hairpin", QUIET_S)
    node = lab.plan.node(nat)
    return Hairpin(nat, node.kind or "", node.hairpin, got is not None,
                   got["from"] if got else None, own)


def measure(lab: Lab) -> tuple[list[Behaviour], list[Hairpin]]:
    probes = reflectors(lab)
    try:
        kinds = [measure_kind(lab, f"n{i}", f"h{i}") for i in range(len(NAT_KINDS))]
        hairpins = [measure_hairpin(lab, name) for name, _, _ in HAIRPIN_NATS]
    finally:
        for probe in probes:
            probe.close()
    return kinds, hairpins


def table(kinds: Sequence[Behaviour], hairpins: Sequence[Hairpin]) -> str:
    rows = [("kind", "mapping", "port", "filtering", "unsolicited→state", "port after")]
    rows += [(b.kind, b.mapping, b.port, b.filtering, "yes" if b.unsolicited_state else "no",
              b.port_after_unsolicited) for b in kinds]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.append("")
    for h in hairpins:
        result = f"arrives from {h.source}" if h.arrives else "does not arrive"
        lines.append(f"hairpin {'on ' if h.hairpin else 'off'} ({h.kind}): {result}"
                     f" (sender's public mapping {h.sender_public})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m wgpunch.lab.natcheck",
                                     description="Measure every NAT kind of the lab.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    with Lab(scenario()) as lab:
        kinds, hairpins = measure(lab)
    if args.json:
        print(json.dumps({"kinds": [asdict(b) for b in kinds],
                          "hairpin": [asdict(h) for h in hairpins]}, indent=2))
    else:
        print(table(kinds, hairpins))
    return 0


if __name__ == "__main__":
    sys.exit(main())
