"""The relay's kernel fast path: nftables forwards a bound slot's flow, so its datagrams never
reach the relay process (DESIGN.md §6).

Per bound slot with IPv4 sides A (sending to port pA) and B (to pB), in the relay's own
table (nothing else on the host is touched):

    prerouting   ip saddr A udp sport A.port udp dport pA  dnat to B        (and B -> A)
    postrouting  ct status dnat, A -> B                     snat to R:pB     (and B -> A)
    forward      ct status dnat, A -> B   over the slot's rate: drop; else counter (and B -> A)

so A's datagram leaves toward B from the relay's port pB, exactly as the userspace path sends
it, and one conntrack entry carries both directions. NAT rules act on a flow's first packet
only: the conntrack entries that the userspace phase made for the slot's ports (datagrams to
the relay's sockets, and from them) would keep the flow in userspace, so they are deleted
when the rules go in, and the NAT entries are deleted when the rules go out (else the kernel
would forward for the entry's lifetime, 120 s for UDP). The table is written whole, in one
nft transaction, on every change: no half-applied state, and a restart after `kill -9`
replaces whatever was left (`reset`).

Needs nft, conntrack (conntrack-tools) and IPv4 forwarding in the relay's network namespace;
`unavailable()` says what is missing, and the relay then forwards in userspace.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, RelayError
from .relayslots import Address, RelayLimits

log = logging.getLogger(__name__)

FORWARDING = Path("/proc/sys/net/ipv4/ip_forward")
_ORIGINAL = re.compile(r"\bsport=(\d+) dport=(\d+)")


@dataclass(frozen=True, slots=True)
class Flow:
    """A bound slot as the kernel forwards it: datagrams from `a` on `a_port` go to `b` from
    `b_port`, and back."""

    a_port: int
    a: Address
    b_port: int
    b: Address


def unavailable() -> str | None:
    """Why the kernel path cannot run here, or None."""
    for tool in ("nft", "conntrack"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        if FORWARDING.read_text().strip() != "1":
            return f"IPv4 forwarding is off ({FORWARDING} is not 1)"
    except OSError as error:
        return f"cannot read {FORWARDING}: {error.strerror}"
    return None


class KernelPath:
    def __init__(self, table: str, ports: range, address: str | None = None,
                 limits: RelayLimits | None = None) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,31}", table):
            raise ConfigError(f"relay: nftables table name {table!r}: letters, digits and _")
        self.table = table
        self.ports = ports
        self.address = address  # the relay's own address for SNAT; None: the route's
        self.limits = limits or RelayLimits()
        self._installed: dict[int, Flow] = {}  # by a_port
        self.generation = 0  # how often the table was written: each write zeroes its counters
        # Datagrams dropped over the slot's rate per side (by its relay port), as last read
        # by counters(), since the table was last written.
        self.rate_dropped: dict[int, int] = {}

    async def reset(self) -> None:
        """Remove what an earlier relay process left: its table, and the conntrack entries of
        its port range."""
        await _run(["nft", "-f", "-"], self._replace(()))
        stale = await self._conntrack_ports()
        await self.forget(stale)
        self._installed = {}
        if stale:
            log.info("relay: removed the conntrack entries an earlier relay left on %d ports",
                     len(stale), extra={"event": "relay_kernel_reset"})

    async def apply(self, flows: Mapping[int, Flow]) -> None:
        """Make the table forward exactly `flows` (by their `a_port`)."""
        old = self._installed
        changed = [flow for p in set(flows) | set(old) if flows.get(p) != old.get(p)
                   for flow in (flows.get(p), old.get(p)) if flow is not None]
        if not changed:
            return
        self.generation += 1
        await _run(["nft", "-f", "-"], self._replace(flows.values()))
        self._installed = dict(flows)
        await self.forget(port for flow in changed for port in (flow.a_port, flow.b_port))

    async def counters(self) -> dict[int, tuple[int, int]]:
        """Datagrams and bytes each side of the installed flows has sent through the kernel
        since the table was last written, by the relay port that side sends to; the
        datagrams each side had dropped over the slot's rate go to `rate_dropped`."""
        out = await _run(["nft", "-j", "list", "chain", "ip", self.table, "forwarded"])
        counts: dict[int, tuple[int, int]] = {}
        dropped: dict[int, int] = {}
        for item in json.loads(out).get("nftables", []):
            rule = item.get("rule") or {}
            words = str(rule.get("comment", "")).split()
            for expr in rule.get("expr", []):
                counter = expr.get("counter") if isinstance(expr, dict) else None
                if counter is None:
                    continue
                if words[:1] == ["side"]:
                    counts[int(words[1])] = (int(counter["packets"]), int(counter["bytes"]))
                elif words[2:3] == ["rate"]:
                    dropped[int(words[3])] = int(counter["packets"])
        self.rate_dropped = dropped
        return counts

    async def forget(self, ports: Iterable[int]) -> None:
        """Delete the conntrack entries of UDP flows to or from these relay ports."""
        for port in sorted(set(ports)):
            for direction in ("--orig-port-dst", "--orig-port-src"):
                await _run(["conntrack", "-D", "-p", "udp", direction, str(port)], check=False)

    async def close(self) -> None:
        ports = [port for flow in self._installed.values() for port in (flow.a_port, flow.b_port)]
        t = self.table
        await _run(["nft", "-f", "-"], f"table ip {t} {{}}\ndelete table ip {t}\n")
        await self.forget(ports)
        self._installed = {}

    def _replace(self, flows: Iterable[Flow]) -> str:
        """One nft transaction: the table made if missing, dropped, and made with `flows`."""
        pre, post, counted = [], [], []
        rate, burst = round(self.limits.packets_per_s), self.limits.packets_burst
        for flow in flows:
            comment = f'comment "slot {flow.a_port}"'
            for (src, src_port), to_port, (dst, dst_port), from_port in (
                    (flow.a, flow.a_port, flow.b, flow.b_port),
                    (flow.b, flow.b_port, flow.a, flow.a_port)):
                match = f"ip saddr {src} udp sport {src_port}"
                pre.append(f"    {match} udp dport {to_port} dnat to {dst}:{dst_port} "
                           f"{comment}\n")
                source = (f"snat to {self.address}:{from_port}" if self.address
                          else f"masquerade to :{from_port}")
                post.append(f"    ct status dnat {match} ip daddr {dst} udp dport {dst_port} "
                            f"{source} {comment}\n")
                # NAT chains see a flow's first packet only; this one sees every one: the
                # slot's packet rate per side, as in userspace, and the counter that tells the
                # relay a side is still sending (relay.py).
                flow_match = f"ct status dnat {match} ip daddr {dst} udp dport {dst_port}"
                counted.append(f"    {flow_match} limit rate over {rate}/second burst {burst} "
                               f'packets counter drop comment "slot {flow.a_port} rate '
                               f'{to_port}"\n'
                               f'    {flow_match} counter comment "side {to_port}"\n')
        t = self.table
        return (f"table ip {t} {{}}\ndelete table ip {t}\ntable ip {t} {{\n"
                "  chain pre {\n    type nat hook prerouting priority dstnat; policy accept;\n"
                + "".join(pre) + "  }\n"
                "  chain post {\n    type nat hook postrouting priority srcnat; policy accept;\n"
                + "".join(post) + "  }\n"
                "  chain forwarded {\n    type filter hook forward priority filter; "
                "policy accept;\n" + "".join(counted) + "  }\n}\n")

    async def _conntrack_ports(self) -> list[int]:
        out = await _run(["conntrack", "-L", "-p", "udp"], check=False)
        found: set[int] = set()
        for line in out.splitlines():
            match = _ORIGINAL.search(line)
            if match:
                found.update(p for p in map(int, match.groups()) if p in self.ports)
        return sorted(found)


async def _run(argv: list[str], stdin: str | None = None, *, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate(None if stdin is None else stdin.encode())
    if check and proc.returncode != 0:
        raise RelayError(f"relay: {' '.join(argv[:3])} failed: "
                          f"{err.decode(errors='replace').strip()[:300]}")
    return out.decode(errors="replace")
